"""The host's cost per framework op, and how many ops each priced unit issues: optional sections of the cost tables.

A PyTorch step issues thousands of small operator calls (a 64-token tiny-moe micro-batch: about 1,200 in
forward and 1,800 in backward, counted below). Each call costs the host a fixed time (Python, the
dispatcher, autograd's graph; on a GPU also the kernel launch) that the GEMM, attention and memory-bound
entries do not price when the tensors are small. Two measurements, never fitted to a step time:

- ``HostOpCost``: seconds per op from a micro-benchmark of tiny tensors (``orchestrator.calibration.host_ops``):
  forward ops that compute, forward view ops (views, transposes, detaches: no kernel), and backward ops
  (one autograd node's ops, the engine's bookkeeping included);
- ``HostOpCount``: per piece of the model (``PIECES``), the ops one micro-batch issues at the plan's shape,
  counted by running that piece once under a ``TorchDispatchMode`` counter. GEMM and attention-core ops are
  left out (``priced`` in the counter): their entries are measured whole, their call included.

How the host time meets the device time (``mode``): ``sum`` on a CPU, where the thread that issues an op
also runs it (measured: an op on a tensor that takes t to stream takes t plus the tiny op's time, see
``docs/design/calibration.md``); ``max`` on a GPU, where launches run ahead of the kernels and the host
only shows when it is slower than the device (``extra_s``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.simulator.spec.numbers import Float, Int

# Pieces of the model whose ops are counted: a decoder layer's attention half (input norm, MLA, residual)
# and FFN half (post-attention norm, MLP or MoE, residual) per layer kind; the embedding (forward and its
# backward); one output head with its loss; one optimizer tensor's AdamW update.
Piece = Literal["dense_attn", "dense_ffn", "moe_attn", "moe_ffn", "mtp_attn", "mtp_ffn", "embedding", "head",
                "optimizer"]
PIECES: tuple[Piece, ...] = ("dense_attn", "dense_ffn", "moe_attn", "moe_ffn", "mtp_attn", "mtp_ffn", "embedding",
                             "head", "optimizer")
OpClass = Literal["fwd_compute", "fwd_view", "bwd"]
HostMode = Literal["sum", "max"]


class HostOpCost(BaseModel):
    """Seconds per op of one op kind and class, from tiny tensors (median of repeated calls)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    op: str = Field(..., description="What was called, e.g. 'add' or 'chain backward'.")
    op_class: OpClass
    s: Float = Field(..., gt=0, le=1)
    source: str


class HostOpCount(BaseModel):
    """Ops one micro-batch of ``tokens`` (sequences of ``seq_len``) issues in one piece, GEMM/attention excluded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    piece: Piece
    fwd_compute: Int = Field(..., ge=0)
    fwd_view: Int = Field(..., ge=0)
    bwd: Int = Field(..., ge=0)
    priced: Int = Field(0, ge=0, description="GEMM and attention-core ops seen and left out (their entries are "
                                             "measured whole).")
    tokens: Int = Field(..., gt=0)
    seq_len: Int = Field(..., gt=0)
    source: str


class HostCosts(BaseModel):
    """The host term: per-op costs by class and op counts by piece, and how it meets the device time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: HostMode
    costs: tuple[HostOpCost, ...] = Field(..., min_length=1)
    counts: tuple[HostOpCount, ...] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _complete(self) -> HostCosts:
        missing = [c for c in ("fwd_compute", "fwd_view", "bwd") if all(p.op_class != c for p in self.costs)]
        if missing:
            raise ValueError(f"costs: no op of class {missing[0]!r} measured")
        pieces = [c.piece for c in self.counts]
        dup = next((p for p in pieces if pieces.count(p) > 1), None)
        if dup is not None:
            raise ValueError(f"counts: piece={dup!r} appears {pieces.count(dup)} times")
        return self

    def op_s(self, op_class: OpClass) -> float:
        """The class's seconds per op: the median over the op kinds measured in it."""
        values = sorted(p.s for p in self.costs if p.op_class == op_class)
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    def seconds(self, piece: Piece) -> tuple[float, float]:
        """(forward, backward) host seconds of one micro-batch of ``piece``; zeros when it was not counted."""
        count = next((c for c in self.counts if c.piece == piece), None)
        if count is None:
            return 0.0, 0.0
        fwd = count.fwd_compute * self.op_s("fwd_compute") + count.fwd_view * self.op_s("fwd_view")
        return fwd, count.bwd * self.op_s("bwd")

    def extra_s(self, device_s: float, host_s: float) -> float:
        """What the host adds to ``device_s`` seconds of priced work: all of it (``sum``) or what it exceeds
        the device by (``max``)."""
        return host_s if self.mode == "sum" else max(0.0, host_s - device_s)
