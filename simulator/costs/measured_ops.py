"""Sub-operation durations measured in a run, at the run's shape: an optional section of the cost tables.

``moeplan check RUN --recalibrate OUT`` reads a run's per-rank traces, whose sub-step events carry the
simulator's names (``"{stage}{kind}{mb} L{i} {op}"``, ``"{stage}{kind}{mb} head"``), and keeps, per layer
kind, action kind and op, the median duration after warm-up. The engine (``engine.unit_costs``) then uses
that duration for the same op at the same shape in place of what the tables would compute from GEMM,
attention, memory-bound and host entries: each entry replaces the price of its own op only, never a
step. A shape the run did not measure keeps the computed price.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moeplan.simulator.spec.numbers import Float, Int

LayerKind = Literal["dense", "moe", "mtp", "ends"]
ActionKind = Literal["F", "B", "I"]
# The simulator's op names whose duration a measured one replaces (``engine.step``), per action kind
MEASURABLE_OPS: dict[str, tuple[str, ...]] = {
    "F": ("attn", "mlp", "shared", "experts", "head", "embed"),
    "B": ("attn-bwd", "mlp-bwd", "shared-bwd", "experts-bwd", "head"),
    "I": ("attn-bwd", "mlp-bwd", "shared-bwd", "experts-bwd", "head"),
}


class MeasuredOp(BaseModel):
    """One op's median duration per occurrence (per layer; per head for ``head``) in a measured run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer_kind: LayerKind
    action: ActionKind
    op: str
    tokens: Int = Field(..., gt=0, description="Tokens of one micro-batch on one GPU.")
    seq_len: Int = Field(..., gt=0)
    s: Float = Field(..., ge=0, le=3600)
    samples: Int = Field(..., gt=0)
    source: str


def measured_s(ops: tuple[MeasuredOp, ...], layer_kind: LayerKind, action: ActionKind, op: str, tokens: int,
               seq_len: int) -> float | None:
    """The measured seconds of ``op`` at this shape, or None when the run did not measure it."""
    for m in ops:
        if (m.layer_kind, m.action, m.op, m.tokens, m.seq_len) == (layer_kind, action, op, tokens, seq_len):
            return m.s
    return None
