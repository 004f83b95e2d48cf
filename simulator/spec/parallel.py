"""The parallel layout of one training step: pipeline, tensor (with sequence), expert, data and context
parallelism."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.simulator.spec.numbers import NOT_BOOL, Int

ScheduleKind = Literal["1f1b", "interleaved", "zb1p", "dualpipe", "dualpipev"]
RecomputeKind = Literal["none", "selective", "full"]
EpBackend = Literal["deepep", "flat"]

# Bounds on the sizes that drive work (a schedule holds pp x micro-batches passes; the kind registry
# bounds their product too: simulator.schedules.registry.MAX_STAGE_MICROBATCHES).
MAX_RANKS = 2**10
MAX_MICROBATCHES = 2**17
MAX_SEQ_LEN_TOKENS = 2**25


class ParallelSpec(BaseModel):
    """How a step is laid out over the cluster.

    ``world = pp * dp * cp * tp`` GPUs. ``dp`` counts the data-parallel replicas (groups that take
    different sequences); each replica splits every sequence over ``cp`` GPUs (context
    parallelism; docs/design/simulator.md). Rank order, innermost first: tp, cp, dp, pp, so a TP
    group (at most a node) and a CP group of up to a node's GPUs share NVLink.

    Tensor parallelism (Megatron-LM, Shoeybi et al. 2019; docs/design/tensor-parallel.md) splits the
    attention projections (by heads; MLA's query/KV up-projections and output projection, its
    down-projections and latent norms stay whole on every TP rank, as Megatron-Core's MLA), the dense
    MLP (by its intermediate width) and the embedding and output head (by vocabulary) ``tp`` ways;
    ``sp`` (sequence parallelism, Korthikanti et al. 2022) also splits the norms, residual adds and
    the activations between the TP regions by sequence. Routed experts are never tensor-split
    (Megatron's expert tensor parallel size 1): the expert-parallel group is carved out of the
    ``dp * cp * tp`` GPUs of a stage, like Megatron's expert-model-parallel. With experts, ``tp > 1``
    needs ``sp`` (as Megatron requires): each TP rank routes its own ``1/tp`` of the sequence, and the
    whole MoE block (router, shared and routed experts) runs on that shard with whole weights, so
    it has no TP collective.

    Attention and dense weights (a TP rank's shard) are replicated over the ``dp * cp`` GPUs that
    hold the same shard (ZeRO shards over them); each stage's routed experts are sharded ``ep``
    ways inside the stage's ``dp * cp * tp`` GPUs (DeepSeek-V3: EP64 inside DP128, cp = tp = 1),
    so ``ep`` divides ``dp * cp * tp`` and experts are replicated ``dp * cp * tp / ep`` times.

    What the schedule kind implies (stages, the stages a rank holds: DualPipe keeps a mirrored
    second copy of a stage, DualPipeV two chunks, interleaved 1F1B ``virtual_stages``; valid
    micro-batch counts) is the kind registry's, ``simulator.schedules.registry``: ``spec`` imports
    nothing of ours.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    pp: Int = Field(1, gt=0, le=MAX_RANKS, description="Pipeline ranks (GPUs in one pipeline).")
    ep: Int = Field(1, gt=0, le=2**20, description="Expert-parallel group size.")
    dp: Int | None = Field(None, gt=0, le=2**20, description="Data-parallel degree; null = world / (pp * cp).")
    cp: Int = Field(1, gt=0, le=MAX_RANKS, description="Context-parallel size: GPUs that split each sequence (zig-zag, 2 cp chunks).")
    tp: Annotated[Literal[1, 2, 4, 8], NOT_BOOL] = Field(
        1, description="Tensor-parallel size (GPUs of one node that split attention, dense MLP, embedding and head).")
    sp: bool = Field(False, description="Sequence parallelism with tp > 1: norms and residuals split by sequence; "
                                        "all-gather + reduce-scatter instead of all-reduce.")
    schedule: ScheduleKind = "1f1b"
    virtual_stages: Int = Field(2, gt=0, le=2**6, description="Chunks per rank for interleaved 1F1B.")
    microbatches: Int | None = Field(
        None, gt=0, le=MAX_MICROBATCHES, description="Micro-batches per step per pipeline; null = global batch / (dp * micro_batch_size)."
    )
    micro_batch_size: Int = Field(
        1, gt=0, le=2**16, description="Sequences per micro-batch (whole sequences: each GPU of a CP group holds 1/cp of them)."
    )
    seq_len_tokens: Int = Field(4096, gt=0, le=MAX_SEQ_LEN_TOKENS, description="Sequence length the layout is planned for.")
    recompute: RecomputeKind = "none"
    zero_stage: Annotated[Literal[0, 1, 2, 3], NOT_BOOL] = 1
    ep_backend: EpBackend = Field(
        "deepep", description="How the expert all-to-all moves tokens (simulator/traffic/all_to_all.py): 'deepep' "
        "sends a token over IB once per target node, then NVLink to that node's target GPUs (DeepEP, TR §3.2.2); "
        "'flat' sends it once per target GPU, over IB to each GPU on another node (one all_to_all_single, as "
        "model/runtime/expert_parallel.py does). The same on one node.")
    stage_layers: tuple[Int, ...] | None = Field(
        None, description="Decoder layers (MTP counted last) per pipeline stage; null = balanced split."
    )

    @model_validator(mode="after")
    def _sp_needs_tp(self) -> ParallelSpec:
        if self.sp and self.tp == 1:
            raise ValueError(f"sp=true needs tp > 1 (tp={self.tp}): sequence parallelism splits the tensor-parallel group")
        return self
