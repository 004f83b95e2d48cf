"""The parallel layout of one training step: pipeline, expert, data and context parallelism."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ScheduleKind = Literal["1f1b", "interleaved", "zb1p", "dualpipe", "dualpipev"]
RecomputeKind = Literal["none", "selective", "full"]


class ParallelSpec(BaseModel):
    """How a step is laid out over the cluster.

    ``world = pp * dp * cp`` GPUs. ``dp`` counts the data-parallel replicas (groups that take
    different sequences); each replica splits every sequence over ``cp`` GPUs (context
    parallelism; docs/design/simulator.md). Rank order, innermost first: cp, dp, pp, so a CP group of up
    to a node's GPUs shares NVLink. Attention and dense weights are replicated over the
    ``dp * cp`` GPUs of a pipeline stage (ZeRO shards over all of them); each stage's routed
    experts are sharded ``ep`` ways inside that group (DeepSeek-V3: EP64 inside DP128, cp = 1),
    so ``ep`` divides ``dp * cp`` and experts are replicated ``dp * cp / ep`` times.

    What the schedule kind implies (stages, the stages a rank holds: DualPipe keeps a mirrored
    second copy of a stage, DualPipeV two chunks, interleaved 1F1B ``virtual_stages``; valid
    micro-batch counts) is the kind registry's, ``simulator.schedules.registry``: ``spec`` imports
    nothing of ours.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    pp: int = Field(1, gt=0, description="Pipeline ranks (GPUs in one pipeline).")
    ep: int = Field(1, gt=0, description="Expert-parallel group size.")
    dp: int | None = Field(None, gt=0, description="Data-parallel degree; null = world / (pp * cp).")
    cp: int = Field(1, gt=0, description="Context-parallel size: GPUs that split each sequence (zig-zag, 2 cp chunks).")
    tp: Literal[1] = Field(1, description="Tensor parallelism is fixed to 1 for now.")
    schedule: ScheduleKind = "1f1b"
    virtual_stages: int = Field(2, gt=0, description="Chunks per rank for interleaved 1F1B.")
    microbatches: int | None = Field(
        None, gt=0, description="Micro-batches per step per pipeline; null = global batch / (dp * micro_batch_size)."
    )
    micro_batch_size: int = Field(
        1, gt=0, description="Sequences per micro-batch (whole sequences: each GPU of a CP group holds 1/cp of them)."
    )
    seq_len_tokens: int = Field(4096, gt=0, description="Sequence length the layout is planned for.")
    recompute: RecomputeKind = "none"
    zero_stage: Literal[0, 1, 2, 3] = 1
    stage_layers: tuple[int, ...] | None = Field(
        None, description="Decoder layers (MTP counted last) per pipeline stage; null = balanced split."
    )
