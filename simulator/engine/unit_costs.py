"""Durations of the sub-operations of one layer unit for one micro-batch, on the busiest GPU.

A decoder layer splits as in DeepSeek-V3 TR §3.2.1: attention, dispatch all-to-all, MLP (routed
experts; the shared expert and router run beside the dispatch), combine all-to-all. Backward
splits each matmul into input gradient (``dx``) and weight gradient (``dw``) so zero-bubble
schedules can defer ``dw``. GEMM shapes: a linear ``in -> out`` on ``T`` tokens is (T x in)(in x out)
forward, (T x out)(out x in) for dx and (out x T)(T x in) for dw.

Precision ``fp8`` runs every linear layer's GEMMs in FP8 except the router, embedding and output
head (TR §3.3); attention's core stays BF16 either way. Memory-bound kernels (norms, RoPE,
residual adds, SwiGLU, FP8 casts, router, token permutation and combine) are costed class by class
(``simulator.costs.elementwise``): each class's forward and backward bytes, as the run's kernels move
them (``training.kernels.fusion``), at its own fraction of HBM bandwidth (``CostTables.memory_fracs``),
half of them beside attention, half beside the MLP.

Recompute (TR §3.2.3): ``selective`` redoes in backward the forward of the ops it does not store
(``elementwise.selective_recompute_bytes_per_token`` and the MLA up-projections' GEMMs); ``full`` the
whole forward. The loss is priced by ``training.kernels.loss`` (``end_costs``).

Context parallelism (``accounting.context_parallel``): ``tokens`` are the GPU's share of the
micro-batch, the attention core still sees the whole sequence's keys (so it does 1/cp of the
causal work), ``kv_b_proj`` runs on the gathered rows, and the unit records the bytes of its
KV all-gather together with the compute that comes before it (``attn_pre_fwd_s``: the
down-projection that makes the latent), beside it (``attn_beside_fwd_s``: the query
up-projection) and, in backward, after the gradient's reduce-scatter (``attn_down_dx_s``).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeplan.simulator.accounting.flops import attention_core_flops
from moeplan.simulator.accounting.params import expert_params, swiglu_params
from moeplan.simulator.costs.elementwise import (
    BF16_BYTES,
    FP32_BYTES,
    FUSED_LOSS,
    WEIGHT_QUANT,
    KernelBytes,
    end_bytes_per_token,
    experts_swiglu_redo_bytes,
    fp32_loss_bytes_per_token,
    fp8_weight_quant_bytes,
    layer_bytes_per_token,
    priced_as,
    selective_recompute_bytes_per_token,
)
from moeplan.simulator.costs.kernels import attention_s, gemm_s, main_grad_measured, memory_s
from moeplan.simulator.costs.tables import CostTables, Precision
from moeplan.simulator.engine.expert_traffic import ExpertTraffic, padded_rows
from moeplan.simulator.engine.host_term import ends_with_host_and_measured, layer_kind, with_host, with_measured
from moeplan.simulator.spec.hardware import GpuSpec
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.parallel import EpBackend, RecomputeKind
from moeplan.simulator.spec.training import Fusion, LossKernel


@dataclass(frozen=True)
class UnitCosts:
    """Seconds (compute) and bytes (all-to-all, busiest GPU) of one layer unit and micro-batch."""

    attn_fwd_s: float
    attn_dx_s: float
    attn_dw_s: float
    mlp_fwd_s: float  # dense MLP, or shared experts + router
    mlp_dx_s: float
    mlp_dw_s: float
    experts_fwd_s: float  # routed experts (grouped GEMM)
    experts_dx_s: float
    experts_dw_s: float
    recompute_s: float  # forward work redone in backward
    dispatch_ib_bytes: float = 0.0
    dispatch_nvlink_bytes: float = 0.0
    combine_ib_bytes: float = 0.0
    combine_nvlink_bytes: float = 0.0
    routing_ib_bytes: float = 0.0  # metadata beside the dispatch (flat backend); its gradient beside dispatch-bwd
    routing_nvlink_bytes: float = 0.0
    # context parallelism (0 when cp = 1); the three times are parts of attn_fwd_s / attn_dx_s
    cp_gather_bytes: float = 0.0  # received by one GPU per all-gather; its gradient's reduce-scatter sends as many
    attn_pre_fwd_s: float = 0.0
    attn_beside_fwd_s: float = 0.0
    attn_down_dx_s: float = 0.0

    @property
    def moe(self) -> bool:
        return self.experts_fwd_s > 0

    @property
    def fwd_s(self) -> float:
        return self.attn_fwd_s + self.mlp_fwd_s + self.experts_fwd_s

    @property
    def dx_s(self) -> float:
        return self.attn_dx_s + self.mlp_dx_s + self.experts_dx_s + self.recompute_s

    @property
    def dw_s(self) -> float:
        return self.attn_dw_s + self.mlp_dw_s + self.experts_dw_s


@dataclass(frozen=True)
class CostContext:
    tables: CostTables
    gpu: GpuSpec
    precision: Precision
    tokens: int  # per micro-batch on one GPU
    seq_len_tokens: int
    compute_frac: float  # SMs left to compute
    recompute: RecomputeKind
    kv_rows: int = 0  # rows of the KV up-projection under CP (the gathered sequence); 0 = tokens
    cp_gather_bytes: float = 0.0  # bytes one GPU receives per layer's KV all-gather; 0 = no CP
    fusion: Fusion = "eager"  # training.kernels.fusion
    loss: LossKernel = "fp32"  # training.kernels.loss
    ep_backend: EpBackend = "deepep"  # parallel.ep_backend: DeepEP's kernels are what fuse the permutation
    expert_wgrad_batch: int = 1  # training.kernels.expert_wgrad_batch: FP8 expert Wgrads of S micro-batches at once


def _linears(ctx: CostContext, shapes: list[tuple[int, int]], precision: Precision,
             rows: int | None = None) -> tuple[float, float, float]:
    """(fwd, dx, dw) seconds of linears ``in -> out`` on ``rows`` rows (default ``ctx.tokens``). A BF16 Wgrad is
    priced as added into its FP32 main gradient by cuBLAS (``model.weight_grad.fused_main_grad_mm``, as the runtime
    runs it on a GPU) where the tables time it so (``main_grad_measured``: ``moeplan calibrate`` on a GPU); others
    leave that addition unpriced (``unit_costs``)."""
    t, f = rows or ctx.tokens, ctx.compute_frac
    into = precision == "bf16" and main_grad_measured(ctx.tables, precision)
    fwd = sum(gemm_s(ctx.tables, ctx.gpu, precision, t, o, i, compute_frac=f) for i, o in shapes)
    dx = sum(gemm_s(ctx.tables, ctx.gpu, precision, t, i, o, compute_frac=f) for i, o in shapes)
    dw = sum(gemm_s(ctx.tables, ctx.gpu, precision, o, i, t, compute_frac=f, main_grad=into) for i, o in shapes)
    return fwd, dx, dw


def attention_shapes(m: ModelSpec) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(down/fused projections, MLA up-projections) as ``(in, out)``; GQA has no up-projections."""
    h, heads = m.hidden_size, m.num_attention_heads
    if m.is_mla:
        assert m.kv_lora_rank is not None
        kv_a = m.kv_lora_rank + m.qk_rope_head_dim
        if m.q_lora_rank:
            down = [(h, m.q_lora_rank + kv_a)]  # q_a and kv_a fused (DeepGEMM's 2112 x 7168)
            up = [(m.q_lora_rank, heads * m.qk_head_dim)]
        else:
            down = [(h, heads * m.qk_head_dim + kv_a)]
            up = []
        up.append((m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim)))
        return down + [(heads * m.v_head_dim, h)], up
    qkv = (heads + 2 * m.kv_heads) * m.gqa_head_dim
    return [(h, qkv), (heads * m.gqa_head_dim, h)], []


def fp8_weight_params(m: ModelSpec, units, ep: int = 1, tp: int = 1) -> float:
    """One rank's FP8 linear parameters in ``units`` (layer indices; MTP modules past the last layer): the attention
    projections, the dense MLP or shared experts and MTP's eh_proj, split over ``tp``, and the rank's ``1/ep`` of
    the routed experts (the router, the norms, the embedding and the head stay BF16: TR §3.3)."""
    attn, up = attention_shapes(m)
    h, dense, routed = m.hidden_size, 0, 0
    for u in units:
        mtp = u >= m.num_hidden_layers
        dense += _dense_params(attn + up) + (2 * h * h if mtp else 0)
        if (m.is_moe if mtp else m.is_moe_layer(u)):
            dense += swiglu_params(h, m.moe_intermediate_size * m.n_shared_experts)
            routed += m.n_routed_experts * expert_params(m)
        else:
            dense += swiglu_params(h, m.intermediate_size)
    return dense / tp + routed / ep


def fp8_weight_quant_s(ctx: CostContext, m: ModelSpec, units, ep: int, tp: int = 1, transposed: bool = True) -> float:
    """Seconds to quantise a stage copy's FP8 weights once (``model.fp8.Fp8WeightCache``: at the step's first
    micro-batch after the weights change), W and, for an FP8 backward, W^T (``elementwise.fp8_weight_quant_bytes``),
    at the tables' ``WEIGHT_QUANT`` fraction where they measured it, else the copy bandwidth. 0 for a BF16 run."""
    if ctx.precision != "fp8":
        return 0.0
    nbytes = fp8_weight_quant_bytes(fp8_weight_params(m, units, ep, tp), transposed)
    return memory_s(ctx.tables, ctx.gpu, nbytes, WEIGHT_QUANT)  # one call: measured at one size, no fixed term


def _priced_as(ctx: CostContext, kernel: str) -> str:
    """The table point a class is priced at (``elementwise.priced_as``)."""
    return priced_as(kernel, ctx.precision, ctx.fusion)


def memory_bound_s(ctx: CostContext, per_token: dict[str, KernelBytes]) -> tuple[float, float]:
    """(forward, backward) seconds of memory-bound kernel classes, each at its own HBM fraction."""
    t, g, n = ctx.tables, ctx.gpu, ctx.tokens
    return (sum(memory_s(t, g, n * b.fwd_bytes, _priced_as(ctx, k)) for k, b in per_token.items()),
            sum(memory_s(t, g, n * b.bwd_bytes, _priced_as(ctx, k), backward=True) for k, b in per_token.items()))


def swiglu_redo_s(ctx: CostContext, m: ModelSpec, rows_per_token: float) -> float:
    """Seconds of the routed experts' SwiGLU output redone in backward (``elementwise.experts_swiglu_redo_bytes``),
    at the tables' SwiGLU forward point."""
    nbytes = ctx.tokens * experts_swiglu_redo_bytes(m, ctx.precision, rows_per_token, ctx.fusion)
    return memory_s(ctx.tables, ctx.gpu, nbytes, _priced_as(ctx, "swiglu"))  # 0 without bytes


def _recompute_s(ctx: CostContext, m: ModelSpec, layer: dict[str, KernelBytes], up: list[tuple[int, int]]) -> float:
    """Selective recompute: the MLA up-projections' forward GEMMs and the named memory-bound ops' forward."""
    redo = selective_recompute_bytes_per_token(m, layer, ctx.precision)
    t, g, n = ctx.tables, ctx.gpu, ctx.tokens
    return _linears(ctx, up, ctx.precision)[0] + sum(memory_s(t, g, n * b, _priced_as(ctx, k)) for k, b in redo.items())


def unit_costs(ctx: CostContext, m: ModelSpec, moe: bool, traffic: ExpertTraffic | None, mtp: bool = False) -> UnitCosts:
    """Costs of one decoder layer (``moe`` or dense), or an MTP module when ``mtp``."""
    attn, up = attention_shapes(m)
    a_fwd, a_dx, a_dw = _linears(ctx, attn + up, ctx.precision)
    # FP8 Wgrads add into the FP32 main gradients in the Gluon GEMM's epilogue (MAIN_GRAD_EPILOGUE_BYTES); the
    # dense BF16 linears' cuBLAS addmm (on a GPU) is priced only where the tables timed it (``_linears``): at
    # K = tokens its epilogue is a small share
    unfused_dense = ctx.precision == "fp8"
    if unfused_dense:
        a_dw += _main_grad_add_s(ctx, _dense_params(attn + up), in_gemm=True)
    if mtp:  # eh_proj: 2h -> h
        p = _linears(ctx, [(2 * m.hidden_size, m.hidden_size)], ctx.precision)
        a_fwd, a_dx, a_dw = a_fwd + p[0], a_dx + p[1], a_dw + p[2]
        a_dw += _main_grad_add_s(ctx, 2 * m.hidden_size * m.hidden_size, in_gemm=True) if unfused_dense else 0.0
    core = attention_core_flops(m, ctx.seq_len_tokens) * ctx.tokens
    seq = ctx.seq_len_tokens
    a_fwd += attention_s(ctx.tables, ctx.gpu, core, backward=False, compute_frac=ctx.compute_frac, seq_len=seq)
    a_dx += attention_s(ctx.tables, ctx.gpu, core, backward=True, compute_frac=ctx.compute_frac, seq_len=seq)
    h = m.hidden_size
    if moe:
        shared = [(h, 2 * m.moe_intermediate_size * m.n_shared_experts), (m.moe_intermediate_size * m.n_shared_experts, h)]
        mf, mdx, mdw = _linears(ctx, [s for s in shared if min(s) > 0], ctx.precision)
        mdw += _main_grad_add_s(ctx, _dense_params(shared), in_gemm=True) if unfused_dense else 0.0
        r = _linears(ctx, [(h, m.n_routed_experts)], "bf16")  # router stays high precision
        mf, mdx, mdw = mf + r[0], mdx + r[1], mdw + r[2]
        e_fwd, e_dx, e_dw = _experts(ctx, m, traffic)
        rows_per_token = traffic.expert_rows_max / ctx.tokens if traffic else m.num_experts_per_tok
    else:
        dense = [(h, 2 * m.intermediate_size), (m.intermediate_size, h)]
        mf, mdx, mdw = _linears(ctx, dense, ctx.precision)
        mdw += _main_grad_add_s(ctx, _dense_params(dense), in_gemm=True) if unfused_dense else 0.0
        e_fwd = e_dx = e_dw = 0.0
        rows_per_token = 0.0
    dispatch = traffic is not None and ctx.ep_backend == "deepep"  # flat: NCCL's all-to-all moves rows as laid out
    padded = padded_rows_per_token(ctx, m, traffic) if moe else None
    layer = layer_bytes_per_token(m, moe, ctx.precision, rows_per_token, ctx.fusion, dispatch, padded)
    elementwise, elementwise_bwd = memory_bound_s(ctx, layer)
    cp = _context_parallel(ctx, m, attn, up, mtp)
    a_fwd, a_dx, a_dw = a_fwd + cp.fwd_s, a_dx + cp.dx_s, a_dw + cp.dw_s
    recompute = 0.0
    if ctx.recompute == "selective":
        recompute = _recompute_s(ctx, m, layer, up)
    elif ctx.recompute == "full":
        recompute = a_fwd + mf + e_fwd + elementwise
    if ctx.recompute != "full":  # the remote rows' K/V are rebuilt from the re-gathered latent
        recompute += cp.fwd_s
    if moe and ctx.recompute != "selective":  # the fused experts redo SwiGLU's output in backward (elementwise)
        recompute += swiglu_redo_s(ctx, m, rows_per_token if padded is None else padded)
    costs = UnitCosts(
        attn_fwd_s=a_fwd + elementwise / 2, attn_dx_s=a_dx + elementwise_bwd / 2, attn_dw_s=a_dw,
        mlp_fwd_s=mf + elementwise / 2, mlp_dx_s=mdx + elementwise_bwd / 2, mlp_dw_s=mdw,
        experts_fwd_s=e_fwd, experts_dx_s=e_dx, experts_dw_s=e_dw, recompute_s=recompute,
        dispatch_ib_bytes=traffic.dispatch_ib_bytes if moe and traffic else 0.0,
        dispatch_nvlink_bytes=traffic.dispatch_nvlink_bytes if moe and traffic else 0.0,
        combine_ib_bytes=traffic.combine_ib_bytes if moe and traffic else 0.0,
        combine_nvlink_bytes=traffic.combine_nvlink_bytes if moe and traffic else 0.0,
        routing_ib_bytes=traffic.routing_ib_bytes if moe and traffic else 0.0,
        routing_nvlink_bytes=traffic.routing_nvlink_bytes if moe and traffic else 0.0,
        cp_gather_bytes=ctx.cp_gather_bytes, attn_pre_fwd_s=cp.pre_fwd_s + elementwise / 2 if ctx.cp_gather_bytes else 0.0,
        attn_beside_fwd_s=cp.beside_fwd_s, attn_down_dx_s=cp.down_dx_s,
    )
    kind = layer_kind(moe, mtp)  # the host term per op (costs.host), then ops measured in a run at this shape
    return with_measured(ctx, with_host(ctx.tables, costs, kind, ctx.recompute == "full"), kind)


@dataclass(frozen=True)
class _CpCosts:
    """Context parallelism's change to a unit's attention: the KV up-projection on the gathered
    rows less on the GPU's own (``fwd_s``, ``dx_s``, ``dw_s``), and the parts of the attention time
    the engine orders around the collectives."""

    fwd_s: float = 0.0
    dx_s: float = 0.0
    dw_s: float = 0.0
    pre_fwd_s: float = 0.0
    beside_fwd_s: float = 0.0
    down_dx_s: float = 0.0


def _context_parallel(ctx: CostContext, m: ModelSpec, attn: list[tuple[int, int]], up: list[tuple[int, int]],
                      mtp: bool) -> _CpCosts:
    """Zero at cp = 1. ``attn[0]`` is the projection that makes what CP gathers (MLA: the fused
    down-projection with the KV latent; GQA: QKV); for MLA ``up[-1]`` is ``kv_b_proj``, run on the
    gathered rows, and ``up[0]`` the query up-projection when ``q_lora_rank`` is set."""
    if not ctx.cp_gather_bytes:
        return _CpCosts()
    pre = _linears(ctx, [attn[0]] + ([(2 * m.hidden_size, m.hidden_size)] if mtp else []), ctx.precision)
    extra = (0.0, 0.0, 0.0)
    beside = 0.0
    if m.is_mla:
        own = _linears(ctx, [up[-1]], ctx.precision)
        gathered = _linears(ctx, [up[-1]], ctx.precision, rows=ctx.kv_rows)
        extra = tuple(g - o for g, o in zip(gathered, own))
        beside = _linears(ctx, [up[0]], ctx.precision)[0] if m.q_lora_rank else 0.0
    return _CpCosts(fwd_s=extra[0], dx_s=extra[1], dw_s=extra[2], pre_fwd_s=pre[0], beside_fwd_s=beside,
                    down_dx_s=pre[1])


# model/runtime/main_grad.py ``_add_into_main_grad``: a weight gradient the GEMM did not add into the FP32 main
# gradient itself is written in the parameter's dtype, then the hook reads it and reads and writes the FP32 sum,
# every micro-batch: the op-by-op experts' grouped Wgrad (torch._grouped_mm). Priced as an elementwise add at
# the tables' residual_add fraction.
MAIN_GRAD_ADD_BYTES = BF16_BYTES + 2 * FP32_BYTES
# The FP8 Wgrads add into the FP32 main gradient in the Gluon GEMM's epilogue (model/weight_grad.py
# ``fused_main_grad_fp8``, kernels/fp8_gemm_ws.py ``accumulate_into``), the fused BF16 experts in cuBLAS
# (``fused_main_grad_grouped_mm``: one addmm into FP32 an expert, beta 1). The old FP32 values are read and the
# sum written, against the BF16 output the GEMM tables' points wrote: priced as that difference in bytes at the
# residual_add fraction, not hidden under the GEMM. Measured (docs/results/model-step.md, H100, 2026-12-06
# 16:11 UTC, workload A): the fused BF16 experts' addmm Wgrads (K = 1,024 rows an expert) took 28.9 ms a
# micro-batch against 17.3 for their Dgrad of the same FLOPs, which the engine had priced as equal while it held
# these adds free (grouped backward -23%). The dense BF16 linears' addmm (``fused_main_grad_mm``, K = the
# micro-batch's tokens) stays unpriced: their backward was measured 6% above the prediction in the same run.
# Tables that timed the BF16 Wgrads as the runtime runs them, into FP32 (``GemmPoint.main_grad``: ``moeplan
# calibrate`` on a GPU), price both from those points and add nothing (``_linears``, ``_experts``).
MAIN_GRAD_EPILOGUE_BYTES = 2 * FP32_BYTES - BF16_BYTES


def _main_grad_add_s(ctx: CostContext, params: float, in_gemm: bool) -> float:
    """Seconds to add ``params`` weight gradients of one micro-batch into their FP32 main gradients: in the Wgrad
    GEMM's epilogue (``in_gemm``), or by the main-grad hook after a Wgrad that wrote the parameter's dtype. Bytes
    alone (``calls=0``): the residual adds' fixed seconds a call are those of a layer's many small adds, not of
    an epilogue or of a few whole-weight adds."""
    per_param = MAIN_GRAD_EPILOGUE_BYTES if in_gemm else MAIN_GRAD_ADD_BYTES
    return memory_s(ctx.tables, ctx.gpu, per_param * params, "residual_add", backward=True, calls=0)


def _dense_params(shapes: list[tuple[int, int]]) -> int:
    return sum(i * o for i, o in shapes)


def _expert_groups(ctx: CostContext, m: ModelSpec, traffic: ExpertTraffic | None) -> tuple[int, float]:
    """(local experts, routed rows) of the busiest GPU in a micro-batch."""
    if traffic is None:  # no expert parallelism: all experts local, the micro-batch's own rows
        return m.n_routed_experts, ctx.tokens * m.num_experts_per_tok
    return traffic.experts_per_gpu, traffic.expert_rows_max


def pads_expert_segments(precision: Precision, fusion: Fusion) -> bool:
    """Whether the routed experts run on the contiguous layout, each expert's rows padded to 128
    (``model.fused_experts``: the FP8 experts, and the BF16 ones under ``fusion="fused"``; DeepGEMM's layout pads
    the same way); the op-by-op BF16 experts (``model/experts.py``) do not pad."""
    return precision == "fp8" or fusion == "fused"


def expert_segment_rows(ctx: CostContext, m: ModelSpec, traffic: ExpertTraffic | None) -> float:
    """Rows of one local expert's segment: its routed rows, padded as the layout pads them
    (``expert_traffic.padded_rows``) where it does (``pads_expert_segments``)."""
    groups, rows = _expert_groups(ctx, m, traffic)
    return padded_rows(rows / groups) if pads_expert_segments(ctx.precision, ctx.fusion) else rows / groups


def padded_rows_per_token(ctx: CostContext, m: ModelSpec, traffic: ExpertTraffic | None) -> float | None:
    """The routed rows per token with each expert's segment padded (``layer_bytes_per_token``'s
    ``padded_rows_per_token``), where the layout pads (``pads_expert_segments``); else None."""
    if not (m.is_moe and pads_expert_segments(ctx.precision, ctx.fusion)):
        return None
    groups, _ = _expert_groups(ctx, m, traffic)
    return groups * expert_segment_rows(ctx, m, traffic) / ctx.tokens


def _experts(ctx: CostContext, m: ModelSpec, traffic: ExpertTraffic | None) -> tuple[float, float, float]:
    """Grouped GEMMs of the busiest GPU's experts over their segments' rows (``expert_segment_rows``: padded on
    the contiguous layout): gate+up (h -> 2f), down (f -> h); the weight gradients'
    addition into the main gradients with the Wgrad: in the GEMM's epilogue for the FP8 Wgrad (the K-grouped
    Gluon kernel) and the fused BF16 experts (``model.weight_grad.fused_main_grad_grouped_mm``, one cuBLAS
    ``addmm`` an expert), by the hook after the op-by-op (``eager``) BF16 experts' ``torch._grouped_mm``."""
    groups, _ = _expert_groups(ctx, m, traffic)
    per = max(1, round(expert_segment_rows(ctx, m, traffic)))
    h, f, fr, p = m.hidden_size, m.moe_intermediate_size, ctx.compute_frac, ctx.precision
    t, g = ctx.tables, ctx.gpu
    fwd = gemm_s(t, g, p, per, 2 * f, h, groups, fr) + gemm_s(t, g, p, per, h, f, groups, fr)
    dx = gemm_s(t, g, p, per, h, 2 * f, groups, fr) + gemm_s(t, g, p, per, f, h, groups, fr)
    in_gemm = ctx.precision == "fp8" or ctx.fusion == "fused"  # else torch._grouped_mm, then the hook
    if in_gemm and p == "bf16" and main_grad_measured(t, p):  # the addmm an expert timed as the runtime runs it
        dw = gemm_s(t, g, p, 2 * f, h, per, groups, fr, main_grad=True) + gemm_s(t, g, p, h, f, per, groups, fr,
                                                                                 main_grad=True)
        return fwd, dx, dw
    # FP8 Wgrads of S micro-batches as one launch (``expert_wgrad_batch``): each expert's K is S segments, and the
    # main gradient's read and write happen once for all S; a micro-batch's share is 1/S of that launch.
    batch = ctx.expert_wgrad_batch if p == "fp8" else 1
    dw = gemm_s(t, g, p, 2 * f, h, per * batch, groups, fr) + gemm_s(t, g, p, h, f, per * batch, groups, fr)
    return fwd, dx, (dw + _main_grad_add_s(ctx, groups * 3 * h * f, in_gemm)) / batch


@dataclass(frozen=True)
class EndCosts:
    """The embedding (first stage) and the output head with its loss (last stage; MTP reuses it)."""

    embed_fwd_s: float
    head_fwd_s: float
    head_dx_s: float
    head_dw_s: float


def loss_s(ctx: CostContext, m: ModelSpec) -> tuple[float, float]:
    """(forward, backward) seconds of the cross-entropy over one micro-batch's logits.

    ``fused``: one pass over the BF16 logits (``end_bytes_per_token``) at the ``fused_cross_entropy`` point.
    ``fp32``: ``model.losses.cross_entropy``. A tables' ``cross_entropy`` point times exactly that loss at the
    class's one-pass bytes (``moeplan calibrate``'s memory cases), so its seconds are used as measured; tables
    without one price the bytes the loss moves (``fp32_loss_bytes_per_token``: 6 + 12 a logit, 3x the forward's
    and the backward's one-pass bytes) at ``memory_frac``, the tables' copy bandwidth. The packaged tables
    ([EW], [CPU]) have none: theirs timed the loss before 2026-12-06 (commit 36bd188), which cast the logits to
    FP32 first (14 + 22 bytes a logit), so [EW] keeps that row out of the table and [CPU] dropped it."""
    ideal = end_bytes_per_token(m)["cross_entropy"]
    if ctx.loss == "fused":
        return memory_bound_s(ctx, {FUSED_LOSS: ideal})
    measured = any(p.kernel == "cross_entropy" for p in ctx.tables.memory_kernels)
    return memory_bound_s(ctx, {"cross_entropy": ideal if measured else fp32_loss_bytes_per_token(m)})


def end_costs(ctx: CostContext, m: ModelSpec) -> EndCosts:
    """The embedding gather and, per output head (the main head and each MTP module's, which reuse it), the
    BF16 head GEMMs with the loss (``loss_s``)."""
    fwd, dx, dw = _linears(ctx, [(m.hidden_size, m.vocab_size)], "bf16")  # head stays BF16 (TR §3.3)
    ends = end_bytes_per_token(m)
    embed_s, _ = memory_bound_s(ctx, {"embedding": ends["embedding"]})
    loss_fwd_s, loss_bwd_s = loss_s(ctx, m)
    ends = EndCosts(embed_fwd_s=embed_s, head_fwd_s=fwd + loss_fwd_s, head_dx_s=dx + loss_bwd_s, head_dw_s=dw)
    return ends_with_host_and_measured(ctx, ends)
