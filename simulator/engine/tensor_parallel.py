"""Tensor and sequence parallelism in the step: a TP rank's unit costs and its collectives.

Compute (``accounting.tensor_parallel``): a TP rank runs the TP slice of each layer (heads, KV heads and
the dense MLP width divided by ``tp``) on the micro-batch's whole sequence, so ``unit_costs`` on
``tp_slice(m, tp)`` prices its GEMMs and attention core at the split shapes. Memory-bound work: without
SP the width-``h`` kernels (norms, residual adds, casts of ``h``-wide inputs) run whole on every TP
rank and the head- and intermediate-width ones on the slice (what ``unit_costs`` of the slice gives);
with SP every memory-bound kernel of the layer runs on the rank's ``1/tp`` of the sequence, so its
bytes are the whole layer's over ``tp`` (Korthikanti et al. 2022, §4.2.2). MLA's down-projections are
whole on every TP rank: on the whole sequence without SP, on the rank's ``1/tp`` of it with SP (the
latent is then all-gathered, as Megatron-Core's MLA does). A MoE layer (SP is required) runs its whole
MoE block, router, shared expert and routed experts with their all-to-alls, on the rank's ``1/tp`` of
the sequence with whole weights: the TP group acts as ``tp`` data-parallel ranks there, no TP
collective.

Collectives (Megatron-LM, Shoeybi et al. 2019, §3, Fig. 4; Korthikanti et al. 2022, Fig. 6), per
TP region (an attention block, a dense MLP) and micro-batch, on the TP group's NVLink:

============== ============================== ===============================================
               without SP                     with SP
============== ============================== ===============================================
forward in     none (``f`` is the identity)   all-gather of the region's input
forward out    all-reduce of ``T x h``        reduce-scatter of ``T x h``
backward out   none                           all-gather of the output's gradient ``T x h``
backward in    all-reduce of the input grad   reduce-scatter of the input gradient, and the
                                              input re-gathered for the weight gradient
============== ============================== ===============================================

The region's input is ``T x h`` (GQA attention, dense MLP) or, for MLA, the latent the up-projections
read (``q_lora_rank + kv_lora_rank + qk_rope_head_dim`` per token). Each is priced with the collective
cost of ``costs.machine.bytes_moved`` (ring) at the NVLink rate plus ``collective_latency_s``.
Overlap follows Megatron's defaults: forward collectives and the output-gradient all-gather are
exposed (Megatron overlaps none of them unless Transformer Engine's ``tp_comm_overlap`` is set, which
is off by default); the backward input-gradient all-reduce / reduce-scatter and SP's re-gather run
beside the weight-gradient GEMM when the same pass computes it (Megatron's asynchronous
``LinearWithGradAccumulationAndAsyncCommunication``), and are exposed when the weight gradient is
deferred (zero-bubble ``I``). The ends: the vocabulary-parallel embedding all-reduces (reduce-scatters)
its output, the head gathers its input under SP and reduces its input gradient, and the
vocabulary-parallel cross-entropy all-reduces three FP32 values per token (max, sum of exponentials,
target logit).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from moeplan.simulator.accounting.tensor_parallel import tp_slice
from moeplan.simulator.costs.elementwise import layer_bytes_per_token
from moeplan.simulator.costs.machine import Collective, bytes_moved
from moeplan.simulator.costs.tables import CostTables
from moeplan.simulator.engine.expert_traffic import ExpertTraffic
from moeplan.simulator.engine.unit_costs import (
    CostContext,
    UnitCosts,
    _linears,
    memory_bound_s,
    padded_rows_per_token,
    _recompute_s,
    attention_shapes,
    unit_costs,
)
from moeplan.simulator.spec.model import ModelSpec

BF16_BYTES = 2.0
FP32_BYTES = 4.0
CROSS_ENTROPY_REDUCTIONS = 3  # max, sum of exponentials, target logit (Megatron's vocab-parallel CE)


@dataclass(frozen=True)
class TpComm:
    """Seconds of one layer unit's TP collectives per micro-batch (all 0 at tp = 1 and for MoE blocks)."""

    attn_in_fwd_s: float = 0.0  # SP: all-gather of the attention input (GQA: T x h; MLA: the latent)
    attn_out_fwd_s: float = 0.0  # all-reduce (SP: reduce-scatter) after the output projection
    attn_out_bwd_s: float = 0.0  # SP: all-gather of the output's gradient
    attn_in_bwd_s: float = 0.0  # all-reduce (SP: reduce-scatter) of the input gradient, + SP's re-gather
    mlp_in_fwd_s: float = 0.0
    mlp_out_fwd_s: float = 0.0
    mlp_out_bwd_s: float = 0.0
    mlp_in_bwd_s: float = 0.0

    @staticmethod
    def merged(comms: list[TpComm]) -> TpComm:
        return TpComm(**{f.name: sum(getattr(c, f.name) for c in comms) for f in fields(TpComm)})


@dataclass(frozen=True)
class TpEnds:
    """Seconds of the ends' TP collectives per micro-batch."""

    embed_fwd_s: float = 0.0  # all-reduce (SP: reduce-scatter) of the embedding output
    head_fwd_s: float = 0.0  # SP: all-gather of the head input; the cross-entropy's all-reduces
    head_bwd_s: float = 0.0  # all-reduce (SP: reduce-scatter) of the head's input gradient


def collective_s(tables: CostTables, collective: Collective, buffer_bytes: float, tp: int,
                 nvlink_bytes_per_s: float) -> float:
    """One ring collective over the TP group's NVLink (``buffer_bytes``: the whole tensor)."""
    if tp <= 1 or buffer_bytes <= 0:
        return 0.0
    return tables.collective_latency_s + bytes_moved(collective, buffer_bytes, tp) / nvlink_bytes_per_s


def attention_input_width(m: ModelSpec) -> int:
    """Values per token entering attention's column-parallel region: MLA's latent, else ``h``."""
    if m.is_mla:
        assert m.kv_lora_rank is not None
        return (m.q_lora_rank or 0) + m.kv_lora_rank + m.qk_rope_head_dim
    return m.hidden_size


def tp_comm(tables: CostTables, m: ModelSpec, moe: bool, tokens: int, tp: int, sp: bool,
            nvlink_bytes_per_s: float) -> TpComm:
    """The collectives of one layer unit (``tokens``: the micro-batch's whole sequence on the TP group)."""
    if tp == 1:
        return TpComm()

    def c(kind: Collective, width: int) -> float:
        return collective_s(tables, kind, tokens * width * BF16_BYTES, tp, nvlink_bytes_per_s)

    h, a_in = m.hidden_size, attention_input_width(m)
    if sp:
        attn = dict(attn_in_fwd_s=c("all_gather", a_in), attn_out_fwd_s=c("reduce_scatter", h),
                    attn_out_bwd_s=c("all_gather", h), attn_in_bwd_s=c("reduce_scatter", a_in) + c("all_gather", a_in))
        mlp = dict(mlp_in_fwd_s=c("all_gather", h), mlp_out_fwd_s=c("reduce_scatter", h),
                   mlp_out_bwd_s=c("all_gather", h), mlp_in_bwd_s=c("reduce_scatter", h) + c("all_gather", h))
    else:
        attn = dict(attn_out_fwd_s=c("all_reduce", h), attn_in_bwd_s=c("all_reduce", a_in))
        mlp = dict(mlp_out_fwd_s=c("all_reduce", h), mlp_in_bwd_s=c("all_reduce", h))
    return TpComm(**attn, **({} if moe else mlp))


def tp_ends(tables: CostTables, m: ModelSpec, tokens: int, tp: int, sp: bool, nvlink_bytes_per_s: float) -> TpEnds:
    """The embedding's and one head's collectives (``tokens``: the micro-batch's whole sequence)."""
    if tp == 1:
        return TpEnds()
    act = tokens * m.hidden_size * BF16_BYTES

    def c(kind: Collective, nbytes: float) -> float:
        return collective_s(tables, kind, nbytes, tp, nvlink_bytes_per_s)

    loss = CROSS_ENTROPY_REDUCTIONS * c("all_reduce", tokens * FP32_BYTES)
    if sp:
        return TpEnds(embed_fwd_s=c("reduce_scatter", act), head_fwd_s=c("all_gather", act) + loss,
                      head_bwd_s=c("reduce_scatter", act))
    return TpEnds(embed_fwd_s=c("all_reduce", act), head_fwd_s=loss, head_bwd_s=c("all_reduce", act))


def _memory_bound(ctx: CostContext, m: ModelSpec, moe: bool, tokens: int, rows_per_token: float,
                  dispatch: bool, traffic: ExpertTraffic | None = None) -> tuple[float, float, float]:
    """(forward, backward, selective-recompute) seconds of one layer's memory-bound kernels on ``tokens``
    tokens, as ``unit_costs`` prices them (its classes, fusion and recompute set; the experts' segments padded
    as it pads them, ``padded_rows_per_token``)."""
    at = replace(ctx, tokens=tokens)
    padded = padded_rows_per_token(at, m, traffic) if moe else None
    layer = layer_bytes_per_token(m, moe, ctx.precision, rows_per_token, ctx.fusion, dispatch, padded)
    return (*memory_bound_s(at, layer), _recompute_s(at, m, layer, []))


def tp_unit_costs(ctx: CostContext, m: ModelSpec, moe: bool, traffic: ExpertTraffic | None, mtp: bool,
                  tp: int, sp: bool) -> UnitCosts:
    """One layer unit on one TP rank. ``ctx.tokens``: the micro-batch's tokens on the TP group (whole
    sequence); ``traffic``: a MoE unit's all-to-all for the rank's ``ctx.tokens / tp`` tokens."""
    if tp == 1:
        return unit_costs(ctx, m, moe, traffic, mtp)
    sliced, tokens = tp_slice(m, tp), ctx.tokens
    shard = tokens // tp
    u = unit_costs(ctx, sliced, moe=moe, traffic=None, mtp=mtp)  # attention (and a dense MLP) on the slice
    k = float(m.num_experts_per_tok) if moe else 0.0
    have = _memory_bound(ctx, sliced, moe, tokens, k, False)  # what ``u`` priced
    if moe:  # the MoE block on the rank's sequence shard, whole weights
        v = unit_costs(replace(ctx, tokens=shard, kv_rows=shard), m, moe=True, traffic=traffic, mtp=mtp)
        rows = traffic.expert_rows_max / shard if traffic else k
        u = replace(v, attn_fwd_s=u.attn_fwd_s, attn_dx_s=u.attn_dx_s, attn_dw_s=u.attn_dw_s,
                    recompute_s=u.recompute_s)
        want = _memory_bound(ctx, m, moe, shard, rows, traffic is not None and ctx.ep_backend == "deepep", traffic)
        # ``v``'s MLP fields hold half of ``want`` already; the attention half moves from ``have`` to ``want``
        attn_f, attn_b, mlp_f, mlp_b = (want[0] - have[0]) / 2, (want[1] - have[1]) / 2, 0.0, 0.0
    elif sp:
        want = _memory_bound(ctx, m, moe, shard, 0.0, False)
        attn_f = mlp_f = (want[0] - have[0]) / 2
        attn_b = mlp_b = (want[1] - have[1]) / 2
    else:
        want, attn_f, attn_b, mlp_f, mlp_b = have, 0.0, 0.0, 0.0, 0.0
    down = (0.0, 0.0, 0.0)
    if sp and m.is_mla:  # the down-projections run on the rank's shard only
        whole = _linears(ctx, attention_shapes(m)[0][:1], ctx.precision)
        part = _linears(ctx, attention_shapes(m)[0][:1], ctx.precision, rows=shard)
        down = tuple(p - w for p, w in zip(part, whole, strict=True))
    recompute = u.recompute_s
    if ctx.recompute == "selective":  # the named memory-bound ops redone on the rank's tokens
        recompute += want[2] - have[2]
    elif ctx.recompute == "full":
        recompute = u.attn_fwd_s + attn_f + down[0] + u.mlp_fwd_s + mlp_f + u.experts_fwd_s
    return replace(u, attn_fwd_s=u.attn_fwd_s + attn_f + down[0], attn_dx_s=u.attn_dx_s + attn_b + down[1],
                   attn_dw_s=u.attn_dw_s + down[2], mlp_fwd_s=u.mlp_fwd_s + mlp_f, mlp_dx_s=u.mlp_dx_s + mlp_b,
                   recompute_s=recompute)
