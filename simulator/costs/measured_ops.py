"""Sub-operation durations measured in a run, at the run's shape: an optional section of the cost tables.

``moeplan check RUN --recalibrate OUT`` reads a run's per-rank traces, whose sub-step events carry the
simulator's names (``"{stage}{kind}{mb} L{i} {op}"``, ``"{stage}{kind}{mb} head"``), and keeps, per layer
kind, action kind and op, the median duration after warm-up. The engine (``engine.unit_costs``) then uses
that duration for the same op at the same shape in place of what the tables would compute from GEMM,
attention, memory-bound and host entries: each entry replaces the price of its own op only, never a
step. A shape the run did not measure keeps the computed price.

The optimizer step is measured the same way, part by part (``costs.optimizer_step.OPTIMIZER_PARTS``), per
pipeline rank's parameter set (layer kind ``optimizer``; its shape is the set's ``params`` elements in
``tensors`` tensors, the runtime's own step over them): ``moeplan calibrate --plan`` times the runtime's
step over each rank's tensors, ``check --recalibrate`` reads the run's ``"optimizer {part}"`` events. The
engine (``engine.build``) uses them in place of the bytes at the ``optimizer`` class fraction plus the host
term, for a rank whose parameter set was measured (``measured_optimizer_s``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.simulator.costs.optimizer_step import OPTIMIZER_PARTS
from moeplan.simulator.spec.numbers import Float, Int

LayerKind = Literal["dense", "moe", "mtp", "ends", "optimizer"]
ActionKind = Literal["F", "B", "I"]
# The simulator's op names whose duration a measured one replaces (``engine.step``), per action kind
MEASURABLE_OPS: dict[str, tuple[str, ...]] = {
    "F": ("attn", "mlp", "shared", "experts", "head", "embed"),
    "B": ("attn-bwd", "mlp-bwd", "shared-bwd", "experts-bwd", "head"),
    "I": ("attn-bwd", "mlp-bwd", "shared-bwd", "experts-bwd", "head"),
}


# A stage pass's work outside its timed nodes (layer kind ``ends``, action ``F`` or ``B``): the runtime's RoPE
# tables, each node's detached input leaf and tape entry, the walk back; the engine adds it to the stage's first
# unit (``engine.build``). Timed by ``moeplan calibrate`` on a CPU (``calibration.stage_steps``); no trace event.
PASS_OP = "pass"


class MeasuredOp(BaseModel):
    """One op's median duration per occurrence (per layer; per head for ``head``; per step for an optimizer
    part) in a measured run or benchmark."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer_kind: LayerKind
    action: ActionKind
    op: str
    tokens: Int = Field(..., gt=0, description="Tokens of one micro-batch on one GPU.")
    seq_len: Int = Field(..., gt=0)
    s: Float = Field(..., ge=0, le=3600)
    samples: Int = Field(..., gt=0)
    source: str
    params: Int | None = Field(None, gt=0, description="Optimizer parts only: the elements of the rank's "
                                                       "parameter set the step updates.")
    tensors: Int | None = Field(None, gt=0, description="Optimizer parts only: the tensors they are in (the "
                                                        "runtime updates each apart on a ZeRO group of one).")

    @model_validator(mode="after")
    def _optimizer_shape(self) -> MeasuredOp:
        optimizer = self.layer_kind == "optimizer"
        if optimizer != (self.params is not None and self.tensors is not None):
            raise ValueError(f"layer_kind={self.layer_kind!r} with params={self.params}, tensors={self.tensors}: "
                             "an optimizer part has both, any other op neither")
        if optimizer and (self.op not in OPTIMIZER_PARTS or self.action != "F"):
            raise ValueError(f"optimizer op={self.op!r}, action={self.action!r}: the op is one of "
                             f"{', '.join(OPTIMIZER_PARTS)}, the action F")
        return self

    @property
    def key(self) -> tuple:
        """What an entry measures: another entry with the same key replaces it (``check --recalibrate``)."""
        return self.layer_kind, self.action, self.op, self.tokens, self.seq_len, self.params, self.tensors


def measured_s(ops: tuple[MeasuredOp, ...], layer_kind: LayerKind, action: ActionKind, op: str, tokens: int,
               seq_len: int) -> float | None:
    """The measured seconds of ``op`` at this shape, or None when the run did not measure it."""
    for m in ops:
        if (m.layer_kind, m.action, m.op, m.tokens, m.seq_len) == (layer_kind, action, op, tokens, seq_len):
            return m.s
    return None


def measured_optimizer_s(ops: tuple[MeasuredOp, ...], params: int, tensors: int) -> dict[str, float] | None:
    """Seconds of each optimizer part measured over a set of ``params`` elements in ``tensors`` tensors, in
    ``OPTIMIZER_PARTS`` order; None unless every part was measured at that shape (the latest entry of each)."""
    found = {m.op: m.s for m in ops if m.layer_kind == "optimizer" and (m.params, m.tensors) == (params, tensors)}
    if any(part not in found for part in OPTIMIZER_PARTS):
        return None
    return {part: found[part] for part in OPTIMIZER_PARTS}
