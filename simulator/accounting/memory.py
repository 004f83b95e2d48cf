"""Peak memory per GPU for a layout: parameters, gradients, optimizer state, activations.

Storage per parameter follows ``TrainingSpec.optimizer`` (DeepSeek-V3: BF16 weights, FP32
gradient accumulation, FP32 master weights and BF16 AdamW moments, TR §3.3). ZeRO shards over the
group that replicates a parameter: the ``dp * cp`` GPUs of a stage that hold the same tensor-parallel
shard for attention/dense/shared/embedding weights, ``dp * cp * tp / ep`` for routed experts
(``accounting.tensor_parallel``: a TP rank holds ``1/tp`` of the split matrices, the rest whole, and
its activations per Korthikanti et al. 2022, Table 2). Stage 1 shards optimizer state, 2 also
gradients, 3 also weights. A head stage keeps each output head's logits from forward to backward, and its
backward's logits gradient or ``lm_head`` weight gradient is the rank's transient (``accounting.activations``). Under context parallelism a GPU keeps activations for its
``micro_batch_size * seq / cp`` tokens, plus one layer's gathered K/V as working memory
(``accounting.context_parallel``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.simulator.accounting.activations import (
    FP8_TILE_BYTES,
    head_activation_bytes_per_token,
    head_transient_bytes,
)
from moeplan.simulator.accounting.context_parallel import cp_tokens
from moeplan.simulator.accounting.context_parallel import working_bytes as cp_working_bytes
from moeplan.simulator.accounting.layout import Stage, pipeline_stages
from moeplan.simulator.accounting.params import decoder_layer_params, mtp_module_params
from moeplan.simulator.accounting.tensor_parallel import (
    layer_activation_bytes_per_token_tp,
    shard_rows,
    split_counts,
    tp_slice,
)
from moeplan.simulator.schedules.actions import Action
from moeplan.simulator.schedules.registry import in_flight_microbatches, make_schedule, rank_stages
from moeplan.simulator.schedules.schedule import Schedule
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import OptimizerSpec


@dataclass(frozen=True)
class RankParams:
    """Parameters held by one pipeline rank (before ZeRO-3 sharding)."""

    dense: int  # replicated over dp (a TP rank's share: split matrices / tp, the rest whole)
    expert: int  # this rank's share of routed experts, replicated over dp * cp * tp / ep
    tp_replicated: int = 0  # the part of ``dense`` every TP rank holds whole (0 at tp = 1)


class RankMemory(BaseModel):
    """Peak bytes on one GPU of a pipeline rank, by kind (the plan file stores it as is)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int
    stages: tuple[int, ...]
    params_dense: int
    params_expert: int
    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    transient_bytes: float
    in_flight_microbatches: float
    total_bytes: float = Field(0.0, description="Sum of the five byte fields; filled in when left at 0.")

    @model_validator(mode="after")
    def _total(self) -> RankMemory:
        total = self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes + self.transient_bytes
        if self.total_bytes == 0.0:
            object.__setattr__(self, "total_bytes", total)
        elif abs(self.total_bytes - total) > 1e-6 * max(total, 1.0):
            raise ValueError(f"total_bytes={self.total_bytes} differs from the sum of its parts {total}")
        return self


def _unit_params(m: ModelSpec, unit: int) -> dict[str, int]:
    if unit < m.num_hidden_layers:
        return decoder_layer_params(m, unit)
    return mtp_module_params(m)


def rank_params(m: ModelSpec, stages: Sequence[Stage], ep: int, tp: int = 1, tp_rank: int = 0) -> RankParams:
    """Dense and (per-GPU) expert parameters of the given stages, embedding and head included, on TP
    rank ``tp_rank`` (0, the default, is the busiest: it holds the first, largest share of the
    vocabulary). An MTP module on a rank without the embedding needs its own embedding copy."""
    dense = expert = whole = 0
    has_embedding = any(s.has_embedding for s in stages)
    has_mtp = False
    vocab_rows = shard_rows(m.vocab_size, tp, tp_rank)
    for stage in stages:
        for unit in stage.layers:
            counts = _unit_params(m, unit)
            expert += counts["routed_experts"] // ep
            split, replicated = split_counts(m, counts)
            dense += split // tp + replicated
            whole += replicated if tp > 1 else 0
            has_mtp |= unit >= m.num_hidden_layers
        if stage.has_head:  # the final norm (whole on every TP rank) and the head's vocabulary rows
            dense += m.hidden_size + (0 if m.tie_word_embeddings else vocab_rows * m.hidden_size)
            whole += m.hidden_size if tp > 1 else 0
    if has_embedding or has_mtp:
        dense += vocab_rows * m.hidden_size
    return RankParams(dense=dense, expert=expert, tp_replicated=whole)


def _unit_tensors(m: ModelSpec, unit: int) -> tuple[int, int]:
    """(dense, routed-expert) trainable tensors of one layer unit as ``model/`` builds it: the two norms and the
    attention's projections and latent norms, then the MLP's three, or the gate, the shared experts' three and
    the routed experts' two stacked tensors (``GroupedExperts``); an MTP module adds enorm, hnorm, eh_proj and
    its head norm. Biases where the spec has them; the gate's correction bias is a buffer, not a parameter."""
    if m.is_mla:
        attn = (3 if m.q_lora_rank else 1) + 4  # q_a, q_a_norm, q_b (or q_proj); kv_a, kv_a_norm, kv_b, o
    else:
        attn = 4 + (3 if m.attention_bias else 0)  # q, k, v, o (+ the q, k, v biases)
    dense, expert = 2 + attn, 0
    moe = m.is_moe if unit >= m.num_hidden_layers else m.is_moe_layer(unit)
    if moe:
        dense += 1 + (3 if m.n_shared_experts else 0)
        expert = 2
    else:
        dense += 3
    if unit >= m.num_hidden_layers:
        dense += 4
    return dense, expert


def rank_param_tensors(m: ModelSpec, stages: Sequence[Stage]) -> tuple[int, int]:
    """(dense, routed-expert) trainable tensors of the given stages, as ``rank_params`` counts their elements:
    the embedding where a stage has it or an MTP module needs its copy, the final norm and the head. The
    runtime's optimizer updates each one apart where its ZeRO group has one rank (``engine.host_term``)."""
    dense = expert = 0
    has_mtp = False
    for stage in stages:
        for unit in stage.layers:
            d, e = _unit_tensors(m, unit)
            dense, expert = dense + d, expert + e
            has_mtp |= unit >= m.num_hidden_layers
        if stage.has_head:
            dense += 1 if m.tie_word_embeddings else 2
    if any(s.has_embedding for s in stages) or has_mtp:
        dense += 1
    return dense, expert


def activation_peak_bytes(actions: Sequence[Action], stage_bytes: Sequence[float]) -> float:
    """Peak activation bytes of one rank running ``actions`` in order: a forward of stage ``s``
    adds ``stage_bytes[s]``, the backward that ends its use (``B``, or ``W`` after ``I``) frees it."""
    held = peak = 0.0
    for action in actions:  # plain loops: a layout search runs this for every rank of every candidate
        freed = 0.0
        for op in action.ops:
            if op.kind == "F":
                held += stage_bytes[op.stage]
            elif op.kind == "B" or op.kind == "W":
                freed += stage_bytes[op.stage]
        if held > peak:
            peak = held
        held -= freed
    return peak


# Rows an expert's segment is padded to a multiple of in the contiguous layout (kernels.moe_permute; the engine's
# expert_traffic.SEGMENT_ALIGN, a room this one may not import)
SEGMENT_ALIGN = 128


def expert_wgrad_stash_bytes(m: ModelSpec, parallel: ParallelSpec, precision: str, batch: int, units: Sequence[int],
                             tokens: float) -> float:
    """Bytes of the FP8 expert Wgrads' stash on one GPU (``training.kernels.expert_wgrad_batch`` = ``batch`` > 1,
    FP8 only; ``model.weight_grad.ExpertWgradBatch``): for every MoE layer of ``units``, ``batch`` micro-batches'
    128x1 operands of the two Wgrads, E4M3 with an FP32 scale per 128 tokens, over the rows of the contiguous
    layout: gate_up's output gradient (2I) and input (d), down's output gradient (d) and input (I), a row. The rows:
    the GPU's ``tokens`` x top-k routed pairs (an even share of its EP group's) plus the worst-case padding of its
    local experts' segments, 127 rows each (``kernels.moe_permute.worst_case_rows``, the size the runtime's plans
    take). Held from a step's first backward to its end: counted as transient."""
    if batch <= 1 or precision != "fp8" or not m.n_routed_experts:
        return 0.0
    moe_layers = sum(1 for u in units if m.is_moe_layer(u))
    rows = tokens * m.num_experts_per_tok + (m.n_routed_experts // parallel.ep) * (SEGMENT_ALIGN - 1)
    per_row = (3 * m.moe_intermediate_size + 2 * m.hidden_size) * FP8_TILE_BYTES
    return moe_layers * batch * rows * per_row


def rank_memory(
    m: ModelSpec,
    parallel: ParallelSpec,
    optimizer: OptimizerSpec,
    precision: str,
    dp: int,
    rank: int,
    microbatches: int,
    actions: Sequence[Action] | None = None,
    fusion: str = "fused",
    expert_wgrad_batch: int = 1,
) -> RankMemory:
    """Peak bytes on one GPU of pipeline rank ``rank``. With the rank's schedule ``actions`` the
    activation peak is replayed exactly; without, the kind registry's closed form
    (``schedules.registry.in_flight_microbatches``). ``fusion`` is ``training.kernels.fusion``: memory-bound
    ops run op by op keep more for backward. ``expert_wgrad_batch``: ``training.kernels.expert_wgrad_batch``,
    whose stash (``expert_wgrad_stash_bytes``) is transient."""
    all_stages = pipeline_stages(m, parallel)
    mine = [all_stages[i] for i in rank_stages(parallel, rank)]
    tp, sp = parallel.tp, parallel.sp
    p = rank_params(m, mine, parallel.ep, tp)
    group = dp * parallel.cp  # GPUs that replicate this GPU's dense weights (its TP shard)
    edp = group * tp // parallel.ep  # experts are sharded inside the stage's dp * cp * tp GPUs
    z = parallel.zero_stage
    param_elems = p.dense / (group if z >= 3 else 1) + p.expert / (edp if z >= 3 else 1)
    grad_elems = p.dense / (group if z >= 2 else 1) + p.expert / (edp if z >= 2 else 1)
    opt_elems = p.dense / (group if z >= 1 else 1) + p.expert / (edp if z >= 1 else 1)
    tokens = cp_tokens(parallel.micro_batch_size, parallel.seq_len_tokens, parallel.cp)
    units = [u for s in mine for u in s.layers]

    head_m = tp_slice(m, tp)  # vocabulary-parallel logits

    def stage_bytes(stage: Stage) -> float:  # its layers' activations and its received input (BF16, 1/tp under SP)
        acts = sum(layer_activation_bytes_per_token_tp(m, u, precision, parallel.recompute, tp, sp, fusion)
                   for u in stage.layers)
        if stage.has_head:  # the main head and one per MTP depth (model/transformer.py Transformer.head)
            heads = 1 + sum(u >= m.num_hidden_layers for u in stage.layers)
            acts += heads * head_activation_bytes_per_token(head_m, fusion)
        return tokens * (acts + 2.0 * m.hidden_size / (tp if sp else 1))

    per_mb = sum(stage_bytes(s) for s in mine)
    if actions is None:
        flights = in_flight_microbatches(parallel, rank, microbatches)
        activations = per_mb * flights
    else:
        activations = activation_peak_bytes(actions, [stage_bytes(s) for s in all_stages])
        flights = activations / per_mb
    transient = 0.0
    if any(s.has_head for s in mine):
        transient = head_transient_bytes(head_m, tokens)
    if parallel.recompute == "full" and units:
        transient += tokens * max(layer_activation_bytes_per_token_tp(m, u, precision, "none", tp, sp, fusion)
                                  for u in units)
    if units:
        transient += cp_working_bytes(m, parallel.micro_batch_size, parallel.seq_len_tokens, parallel.cp)
    transient += expert_wgrad_stash_bytes(m, parallel, precision, expert_wgrad_batch, units, tokens)
    return RankMemory(
        rank=rank,
        stages=tuple(s.index for s in mine),
        params_dense=p.dense,
        params_expert=p.expert,
        param_bytes=param_elems * optimizer.param_bytes,
        grad_bytes=grad_elems * optimizer.grad_bytes,
        optimizer_bytes=opt_elems * (optimizer.master_bytes + 2 * optimizer.moment_bytes),
        activation_bytes=activations,
        transient_bytes=transient,
        in_flight_microbatches=flights,
    )


def pipeline_memory(
    m: ModelSpec, parallel: ParallelSpec, optimizer: OptimizerSpec, precision: str, dp: int, microbatches: int,
    schedule: Schedule | None = None, fusion: str = "fused", expert_wgrad_batch: int = 1,
) -> tuple[RankMemory, ...]:
    """``rank_memory`` for every pipeline rank (exact activation peaks when ``schedule`` is given)."""
    return tuple(
        rank_memory(m, parallel, optimizer, precision, dp, r, microbatches, schedule.ranks[r] if schedule else None,
                    fusion, expert_wgrad_batch)
        for r in range(parallel.pp)
    )


def peak_bytes_per_gpu(
    m: ModelSpec, parallel: ParallelSpec, optimizer: OptimizerSpec, precision: str, dp: int, microbatches: int,
    fusion: str = "fused", expert_wgrad_batch: int = 1,
) -> float:
    """The largest ``pipeline_memory`` total over ranks, replaying the layout's own schedule."""
    schedule = make_schedule(parallel.schedule, parallel.pp, microbatches, parallel.virtual_stages)
    return max(r.total_bytes for r in pipeline_memory(m, parallel, optimizer, precision, dp, microbatches, schedule,
                                                      fusion, expert_wgrad_batch))
