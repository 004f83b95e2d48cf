"""One pipeline action: a compute op, or a forward and a backward overlapped (DeepSeek-V3 §3.2.1).

An ``Op`` is one unit of work on one stage for one micro-batch:

- ``F``: forward.
- ``B``: full backward (input and weight gradients together).
- ``I``: backward for the input only (zero-bubble split); its ``W`` comes later.
- ``W``: backward for the weights, after the ``I`` of the same (stage, micro-batch).

An ``Action`` is what a rank runs next: one op, or the overlapped pair ``F&B`` (the forward of one
micro-batch interleaved with the full backward of another, usually of the other local chunk).

In JSON an action is a short token, the same spelling as ``torch.distributed.pipelining`` for single
ops: ``"3F0"`` (stage 3, forward, micro-batch 0), ``"0I1"``, ``"2W0"``, ``"1B4"``; an overlapped
pair joins its two ops with ``&``: ``"0F7&7B3"`` (forward stage 0 mb 7, backward stage 7 mb 3).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, model_serializer, model_validator

OpKind = Literal["F", "B", "I", "W"]
ActionKind = Literal["F", "B", "I", "W", "FB"]
ACTION_KINDS: tuple[ActionKind, ...] = ("F", "B", "I", "W", "FB")

_OP_RE = re.compile(r"^(\d+)([FBIW])(\d+)$")
ACTION_TOKEN_PATTERN = r"^(\d+[FBIW]\d+|\d+F\d+&\d+B\d+)$"


class ScheduleError(ValueError):
    """A schedule, or a request for one, is invalid; the message names the field and value."""


class Op(BaseModel):
    """One compute unit: ``kind`` on ``stage`` for ``microbatch``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: OpKind
    stage: int = Field(ge=0)
    microbatch: int = Field(ge=0)

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, token: str) -> Op:
        """``"3F0"`` -> ``Op(kind="F", stage=3, microbatch=0)``."""
        match = _OP_RE.match(token.strip())
        if match is None:
            raise ScheduleError(f"op={token!r} is not <stage><F|B|I|W><microbatch>, e.g. '3F0'")
        stage, kind, microbatch = match.groups()
        return cls(kind=kind, stage=int(stage), microbatch=int(microbatch))


class Action(BaseModel):
    """What a rank runs next: one op, or an overlapped ``(F, B)`` pair of ops."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ops: tuple[Op] | tuple[Op, Op]

    @model_validator(mode="before")
    @classmethod
    def _from_token(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"ops": tuple(Op.parse(part) for part in data.split("&"))}
        return data

    @model_validator(mode="after")
    def _check_pair(self) -> Action:
        if len(self.ops) == 2 and (self.ops[0].kind, self.ops[1].kind) != ("F", "B"):
            raise ScheduleError(f"action={self} overlaps {self.ops[0].kind}&{self.ops[1].kind}; only F&B may overlap")
        return self

    @model_serializer
    def _to_token(self) -> str:
        return str(self)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        # Read and written as a token in JSON, whatever the schema mode.
        return {"type": "string", "pattern": ACTION_TOKEN_PATTERN, "description": "e.g. '3F0', '0I1', '0F7&7B3'"}

    def __str__(self) -> str:
        return "&".join(str(op) for op in self.ops)

    @property
    def kind(self) -> ActionKind:
        """``F``, ``B``, ``I``, ``W`` for a single op, ``FB`` for an overlapped pair."""
        return "FB" if len(self.ops) == 2 else self.ops[0].kind

    @classmethod
    def single(cls, kind: OpKind, stage: int, microbatch: int) -> Action:
        """One op. Actions are frozen values and the generators ask for the same few thousand
        millions of times in a layout search, so each is built (and validated) once."""
        return _single_action(kind, stage, microbatch)

    @classmethod
    def overlap(cls, forward: Op, backward: Op) -> Action:
        return cls(ops=(forward, backward))


@lru_cache(maxsize=None)
def _single_action(kind: OpKind, stage: int, microbatch: int) -> Action:
    return Action(ops=(Op(kind=kind, stage=stage, microbatch=microbatch),))
