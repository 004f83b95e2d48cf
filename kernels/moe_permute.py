"""Token permutation for MoE dispatch and combine, in the contiguous layout of ``grouped_gemm.py``.

Dispatch: sort the (token, slot) pairs by expert (``make_dispatch_plan`` for (T, topk) routing,
``make_pair_plan`` for any pairs, sized from host counts without a sync), pad each expert's segment
to a multiple of 128 rows and gather ``x`` rows into it, optionally quantising to FP8 1×128 tiles in
the same pass (the grouped FP8 GEMM reads that directly: one bf16 read and one fp8 write instead of
a bf16 round trip). Combine: ``out[t] = Σ_j w[t, j] · y[dest[t, j]]`` (a pair plan: over each
token's pairs), the weighted scatter-add written as a gather, so it needs no atomics and is
deterministic. Both move bytes only; ``benchmark`` reports GB/s.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .e4m3_cast import EMULATED, cast_for_device
from .fp8_quant import (
    AMAX_FLOOR,
    TILE,
    cast_for_store,
    empty_cols_t_output,
    empty_rows_output,
    past_bound,
    quant_act_both,
    store_cols_t,
    store_rows,
)
from .triton_compat import INTERPRET, cdiv, tl, triton


@dataclass(frozen=True)
class DispatchPlan:
    """Where every routed (token, expert) pair goes. All tensors on the tokens' device, int32.

    src_token: (M_total,) source token of each permuted row, -1 for padding rows.
    m_indices: (M_total,) expert of each permuted row, -1 for padding rows.
    dest:      (T, topk) permuted row of each (token, slot); for a pair plan (P,), in the pairs' order.
    seg_offsets: (E + 1,) first row of each expert's segment; multiples of ``align``.
    pair_ptr, by_token: pair plans only (``make_pair_plan``), any number of pairs per token: token t's pairs
      are ``by_token[pair_ptr[t]:pair_ptr[t + 1]]`` ((T + 1,) and (P,)); None for a (T, topk) plan.
    rows_bound: (1,) ``seg_offsets[-1:]``, the rows in use, where the buffers take the worst case
      (``worst_case_rows``, a pair plan sized without host counts); None where ``num_rows`` is exact. The
      memory-bound kernels on the permuted rows (here, ``swiglu``, the activation quantisers of ``fp8_quant``)
      read it on the device and leave the rows from it on unwritten (``fp8_quant.past_bound``): whole
      padding-only tiles (``m_indices`` -1), which the grouped GEMMs skip without reading their values or scales
      and whose gradients the K-grouped weight gradients never reach (each reads its segment's rows only).
    """

    src_token: torch.Tensor
    m_indices: torch.Tensor
    dest: torch.Tensor
    seg_offsets: torch.Tensor
    pair_ptr: torch.Tensor | None = None
    by_token: torch.Tensor | None = None
    rows_bound: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.src_token.numel()

    @property
    def num_tokens(self) -> int:
        return self.dest.shape[0] if self.pair_ptr is None else self.pair_ptr.numel() - 1

    def pair_tokens(self) -> torch.Tensor:
        """(P,) int64 source token of each pair, in ``dest``'s flat order."""
        return self.src_token[self.dest.reshape(-1).long()].long()


def _segments(expert: torch.Tensor, num_experts: int, align: int):
    """Pairs (P,) int64 expert ids → (order (P,), sorted experts, their rows (P,), seg_offsets (E + 1,) int64).

    Each expert's segment padded to a multiple of ``align`` rows; device work only, no host sync."""
    # Step 1: sort pairs by expert; stable, so tokens keep their order inside a segment.
    order = torch.argsort(expert, stable=True)
    # (E,) pairs per expert; not torch.bincount, whose CUDA kernel reads the largest index on the host
    counts = expert.new_zeros(num_experts).scatter_add_(0, expert, torch.ones_like(expert))
    # Step 2: segment bounds, each segment padded to a multiple of `align` rows.
    padded = (counts + align - 1) // align * align
    seg_offsets = torch.cat((padded.new_zeros(1), torch.cumsum(padded, 0)))
    first_sorted = torch.cumsum(counts, 0) - counts  # index in `order` of each expert's first pair
    # Step 3: destination row of each sorted pair = segment start + rank inside the expert.
    expert_sorted = expert[order]
    rank = torch.arange(expert.numel(), device=expert.device) - first_sorted[expert_sorted]
    return order, expert_sorted, seg_offsets[expert_sorted] + rank, seg_offsets


def _rows_of(order, token_sorted, expert_sorted, row_sorted, num_rows: int):
    """(src_token (M_total,), m_indices (M_total,), dest (P,)) int32 from the sorted pairs."""
    device = row_sorted.device
    src_token = torch.full((num_rows,), -1, dtype=torch.int32, device=device)
    src_token[row_sorted] = token_sorted.to(torch.int32)
    m_indices = torch.full((num_rows,), -1, dtype=torch.int32, device=device)
    m_indices[row_sorted] = expert_sorted.to(torch.int32)
    dest = torch.empty(order.numel(), dtype=torch.int32, device=device)
    dest[order] = row_sorted.to(torch.int32)
    return src_token, m_indices, dest


def make_dispatch_plan(topk_ids: torch.Tensor, num_experts: int, align: int = TILE) -> DispatchPlan:
    """topk_ids (T, topk) int → DispatchPlan. One host sync (the padded row count sizes the buffers)."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be (T, topk), got shape={tuple(topk_ids.shape)}")
    T, topk = topk_ids.shape
    order, expert_sorted, row_sorted, seg_offsets = _segments(topk_ids.reshape(-1).long(), num_experts, align)
    num_rows = int(seg_offsets[-1])
    src_token, m_indices, dest = _rows_of(order, order // topk, expert_sorted, row_sorted, num_rows)
    return DispatchPlan(src_token, m_indices, dest.view(T, topk), seg_offsets.to(torch.int32))


def worst_case_rows(num_pairs: int, num_experts: int, align: int) -> int:
    """The most rows ``num_pairs`` pairs over ``num_experts`` experts can fill, each expert's segment padded to a
    multiple of ``align``: each segment pads at most ``align - 1`` rows, and their sum is a multiple of ``align``
    (at least ``align`` rows, or 1 unpadded)."""
    if align == 1:
        return max(num_pairs, 1)
    return max((num_pairs + num_experts * (align - 1)) // align * align, align)


def make_pair_plan(token_of_pair: torch.Tensor, expert_of_pair: torch.Tensor, num_tokens: int,
                   expert_counts: Sequence[int] | int, align: int = TILE) -> DispatchPlan:
    """Any (token, expert) pairs, token_of_pair and expert_of_pair (P,) int, a token in any number of them.

    ``expert_counts``: pairs per expert on the host (the caller's one planned sync); they size the
    buffers, so nothing here waits for the GPU. At least ``align`` rows even without pairs. Given only the
    number of experts (an int), nothing needs the counts on the host: with ``align=1`` nothing is padded and
    the rows are the pairs; with a larger ``align`` the buffers take the most the padding can need
    (``worst_case_rows``), the rows after the last segment padding too (``m_indices`` -1), and ``rows_bound``
    tells the kernels on the device where the last segment ends."""
    if token_of_pair.shape != expert_of_pair.shape or token_of_pair.dim() != 1:
        raise ValueError(f"token_of_pair {tuple(token_of_pair.shape)} and expert_of_pair "
                         f"{tuple(expert_of_pair.shape)} must be the same (P,)")
    if isinstance(expert_counts, int):
        num_experts, num_rows = expert_counts, worst_case_rows(token_of_pair.numel(), expert_counts, align)
    else:
        if sum(int(n) for n in expert_counts) != token_of_pair.numel():
            raise ValueError(f"expert_counts sum to {sum(int(n) for n in expert_counts)}, "
                             f"not the {token_of_pair.numel()} pairs")
        num_experts = len(expert_counts)
        num_rows = max(sum(cdiv(int(n), align) * align for n in expert_counts), align)
    token = token_of_pair.long()
    order, expert_sorted, row_sorted, seg_offsets = _segments(expert_of_pair.long(), num_experts, align)
    src_token, m_indices, dest = _rows_of(order, token[order], expert_sorted, row_sorted, num_rows)
    # Each token's pairs, for the combine: a CSR index over the pairs sorted by token.
    by_token = torch.argsort(token, stable=True).to(torch.int32)
    per_token = token.new_zeros(num_tokens).scatter_add_(0, token, torch.ones_like(token))
    pair_ptr = torch.cat((per_token.new_zeros(1), torch.cumsum(per_token, 0))).to(torch.int32)
    seg_offsets = seg_offsets.to(torch.int32)
    worst_case = isinstance(expert_counts, int) and align > 1  # align 1: the rows are the pairs, exactly
    return DispatchPlan(src_token, m_indices, dest, seg_offsets, pair_ptr, by_token,
                        seg_offsets[-1:] if worst_case else None)


@triton.jit
def _permute_kernel(
    # pointers: x (T, H), out (M_total, H), out scales (M_total, H/128), src_token, row weights, the rows in use
    # (1,) int32 or None
    x_ptr, out_ptr, scale_ptr, src_ptr, weight_ptr, bound_ptr,
    # sizes
    num_rows, H,
    # strides
    stride_xt, stride_om, stride_sm,
    # meta
    QUANT: tl.constexpr, WEIGHTED: tl.constexpr, POW2: tl.constexpr, FLOOR: tl.constexpr,
    TRANSPOSED: tl.constexpr, CAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """TRANSPOSED (BLOCK_R = 128): out (H, M_total) fp8 in 128x1 tiles, scales (H, M_total/128). CAST: the E4M3
    path (``e4m3_cast``)."""
    if bound_ptr is not None:
        if past_bound(tl.program_id(0) * BLOCK_R, bound_ptr):
            return
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    src = tl.load(src_ptr + rows, mask=rows < num_rows, other=-1)
    col_ok = cols[None, :] < H
    x = tl.load(x_ptr + src[:, None].to(tl.int64) * stride_xt + cols[None, :],
                mask=(src[:, None] >= 0) & col_ok, other=0.0).to(tl.float32)  # padding rows read as 0
    if WEIGHTED:
        x = x * tl.load(weight_ptr + rows, mask=rows < num_rows, other=0.0)[:, None]
    out_mask = (rows[:, None] < num_rows) & col_ok
    if TRANSPOSED:
        store_cols_t(out_ptr, scale_ptr, x, rows, cols, out_mask, cols < H, stride_om, stride_sm, tl.program_id(0),
                     POW2, FLOOR, CAST)
    else:
        out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
        store_rows(out_ptrs, scale_ptr + rows * stride_sm + tl.program_id(1), x, out_mask, rows < num_rows, QUANT,
                   POW2, FLOOR, CAST)


@triton.jit
def _combine_kernel(
    # pointers: y (M_total, H), out (T, H), dest (P,), weights (P,), pair_ptr (T + 1,), by_token (P,)
    y_ptr, out_ptr, dest_ptr, weight_ptr, ptr_ptr, order_ptr,
    # sizes
    H,
    # strides
    stride_ym, stride_ot,
    # meta: TOPK > 0: token t's pairs are t*TOPK .. t*TOPK + TOPK - 1; TOPK = 0: the CSR index of a pair plan
    TOPK: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    if TOPK > 0:
        first = t * TOPK
        last = first + TOPK
    else:
        first = tl.load(ptr_ptr + t)
        last = tl.load(ptr_ptr + t + 1)
    for i in range(first, last):  # fixed order: deterministic, no atomics
        if TOPK > 0:
            j = i
        else:
            j = tl.load(order_ptr + i)
        row = tl.load(dest_ptr + j).to(tl.int64)
        y = tl.load(y_ptr + row * stride_ym + cols, mask=cols < H, other=0.0).to(tl.float32)
        if WEIGHTED:
            y = y * tl.load(weight_ptr + j).to(tl.float32)
        acc += y
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + cols, cast_for_store(acc, out_ptr.dtype.element_ty), mask=cols < H)


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name} must be 2-D with unit column stride, got shape={tuple(x.shape)} "
                         f"stride={x.stride()}")


def moe_permute(
    x: torch.Tensor, plan: DispatchPlan, quantize: bool | str = False, pow2_scale: bool = False,
    row_weights: torch.Tensor | None = None, amax_floor: float = AMAX_FLOOR,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gather x (T, H) into the contiguous layout (M_total, H); padding rows are zeros, but for the rows from
    ``plan.rows_bound`` on, left unwritten.

    quantize: return (fp8 (M_total, H), scales (M_total, ceil(H/128))) instead of x's dtype, each 1x128
    tile's amax floored at ``amax_floor`` (padding rows: zeros, scale amax_floor / 448). quantize="128x1_t":
    the permuted rows for a weight gradient, (fp8 (H, M_total), scales (H, M_total/128)) in tiles of 128
    rows, what ``quant_act_128x1_t`` gives for the permuted rows, which are never stored.
    row_weights: (M_total,) fp32 factor per permuted row (the combine's backward).
    out: with quantize="128x1_t", the caller's (values, scales) buffers to write (``fp8_quant.check_out_t``, scales
    with unit stride along their rows): a micro-batch's columns of a stash that a K-grouped Wgrad reads later.
    """
    _check_rows(x, "x")
    M, H = plan.num_rows, x.shape[1]
    transposed = quantize == "128x1_t"
    if quantize not in (False, True, "128x1_t"):
        raise ValueError(f"quantize={quantize!r} must be False, True or '128x1_t'")
    if out is not None and not transposed:
        raise ValueError(f"out is for quantize='128x1_t', got quantize={quantize!r}")
    if transposed:
        out, scale = empty_cols_t_output(M, H, x.device, out)
    else:
        out, scale = empty_rows_output(M, H, x.dtype, quantize, x.device)
    weights = row_weights if row_weights is not None else plan.src_token
    block_r, block_h = (TILE, 64) if transposed else (16, TILE)
    grid = (cdiv(M, block_r), cdiv(H, block_h))
    _permute_kernel[grid](
        x, out, scale, plan.src_token, weights, plan.rows_bound, M, H, x.stride(0), out.stride(0), scale.stride(0),
        QUANT=bool(quantize), WEIGHTED=row_weights is not None, POW2=pow2_scale, FLOOR=amax_floor,
        TRANSPOSED=transposed, CAST=cast_for_device(x.device) if quantize else EMULATED, BLOCK_R=block_r,
        BLOCK_H=block_h,
    )
    return (out, scale) if quantize else out


# Whether ``moe_permute_quant_both`` runs the Gluon gather on a Hopper GPU (``fp8_quant_gluon``): the permuted
# rows read from x and quantised both ways from shared memory, never stored in BF16. Off (the permute, then
# ``quant_act_both``: the same bits) where False. On since its GPU test passed (tests/kernels/test_fp8_quant_gluon.py
# -m gpu, H100, 2026-12-07): benchmarks/model_step.py's FP8 step spent 0.5 ms a micro-batch less in memory-bound
# backward kernels (17.40 -> 16.90 ms; docs/results/model-step.md).
PERMUTE_BOTH = True


def moe_permute_quant_both(
    x: torch.Tensor, plan: DispatchPlan, row_weights: torch.Tensor | None = None, pow2_scale: bool = False,
    amax_floor: float = AMAX_FLOOR, out_t: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``quant_act_both(moe_permute(x, plan, row_weights=row_weights), row_bound=plan.rows_bound)`` bit for bit:
    the permuted (weighted) rows in 1x128 tiles and, transposed, in 128x1 tiles, for a grouped Dgrad and the
    K-grouped Wgrad (the combine's backward: ``model.fused_experts``). Where ``PERMUTE_BOTH`` and the Gluon kernel
    runs (``fp8_quant_gluon.runs_on``), from one read of the gathered rows, without storing them in x's dtype:
    one write of (M, H) and one read of it fewer; else the permute, then ``quant_act_both``. ``out_t``: the
    transposed pair into the caller's buffers (``fp8_quant.check_out_t``)."""
    _check_rows(x, "x")
    if row_weights is not None and (row_weights.dtype != torch.float32 or row_weights.shape != (plan.num_rows,)):
        raise ValueError(f"row_weights must be ({plan.num_rows},) float32, got {tuple(row_weights.shape)} "
                         f"{row_weights.dtype}")
    if PERMUTE_BOTH:
        from . import fp8_quant_gluon  # imports fp8_quant and the GEMMs: not at the top

        if fp8_quant_gluon.runs_on(x) and plan.src_token.dtype == torch.int32:
            return fp8_quant_gluon.quant_act_both_gluon(x, pow2_scale, amax_floor, row_bound=plan.rows_bound,
                                                        gather=plan.src_token, row_weights=row_weights,
                                                        out_t=out_t)
    return quant_act_both(moe_permute(x, plan, row_weights=row_weights), pow2_scale, amax_floor,
                          row_bound=plan.rows_bound, out_t=out_t)


def moe_unpermute(y: torch.Tensor, plan: DispatchPlan, topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    """out (T, H) = Σ over token t's pairs p of weights[p] · y[dest[p]] (weights 1 when None); y (M_total, H).

    topk_weights: shaped like ``plan.dest``, (T, topk) or, for a pair plan, (P,). Sums in fp32, in a fixed order.
    A program a token: y's rows are read at the pairs' rows only, so a worst-case plan's tail costs nothing here.
    """
    _check_rows(y, "y")
    H = y.shape[1]
    out = torch.empty((plan.num_tokens, H), dtype=y.dtype, device=y.device)
    if topk_weights is not None and topk_weights.shape != plan.dest.shape:
        raise ValueError(f"topk_weights must be {tuple(plan.dest.shape)}, got {tuple(topk_weights.shape)}")
    weights = topk_weights.contiguous() if topk_weights is not None else plan.dest
    pair_plan = plan.pair_ptr is not None
    ptr, order = (plan.pair_ptr, plan.by_token) if pair_plan else (plan.dest, plan.dest)
    block_h = 1024 if not INTERPRET else 128
    if plan.num_tokens:
        _combine_kernel[(plan.num_tokens, cdiv(H, block_h))](
            y, out, plan.dest, weights, ptr, order, H, y.stride(0), out.stride(0),
            TOPK=0 if pair_plan else plan.dest.shape[1], WEIGHTED=topk_weights is not None, BLOCK_H=block_h,
        )
    return out


class MoEPermute(torch.autograd.Function):
    """x (T, H) → contiguous-layout rows (M_total, H); backward sums each token's copies."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        ctx.plan = plan
        return moe_permute(x, plan)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return moe_unpermute(grad_out.contiguous(), ctx.plan), None


class MoEUnpermute(torch.autograd.Function):
    """(y (M_total, H), topk_weights (T, topk)) → out (T, H), the weighted combine."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, topk_weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        ctx.plan = plan
        ctx.save_for_backward(y, topk_weights)
        return moe_unpermute(y, plan, topk_weights)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        y, topk_weights = ctx.saved_tensors
        plan = ctx.plan
        grad_out = grad_out.contiguous()
        grad_y = moe_permute(grad_out, plan, row_weights=pair_row_weights(plan, topk_weights))
        return grad_y, pair_weight_grad(grad_out, y, plan).to(topk_weights.dtype), None


def pair_row_weights(plan: DispatchPlan, topk_weights: torch.Tensor) -> torch.Tensor:
    """(M_total,) fp32 weight of the pair in each permuted row, 0 for padding rows (the combine's backward)."""
    row_weights = torch.zeros(plan.num_rows, dtype=torch.float32, device=topk_weights.device)
    return row_weights.index_put_((plan.dest.reshape(-1).long(),), topk_weights.reshape(-1).float())


@triton.jit
def _row_dot_kernel(
    # pointers: g (T, H), y (M_total, H), out (M_total,) fp32, src_token (M_total,), the rows in use (1,) int32 or
    # None
    g_ptr, y_ptr, out_ptr, src_ptr, bound_ptr,
    # sizes, strides
    num_rows, H, stride_gt, stride_ym,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[r] = <g[src[r]], y[r]> in fp32 (0 for padding rows), each row's H in BLOCK_H chunks in a fixed order."""
    if bound_ptr is not None:
        if past_bound(tl.program_id(0) * BLOCK_R, bound_ptr):
            return
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    src = tl.load(src_ptr + rows, mask=rows < num_rows, other=-1)
    live = (src >= 0)[:, None]
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = live & (cols[None, :] < H)
        g = tl.load(g_ptr + src[:, None].to(tl.int64) * stride_gt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(g * y, axis=1)
    tl.store(out_ptr + rows, acc, mask=rows < num_rows)


def pair_weight_grad(grad_out: torch.Tensor, y: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """d out[t] / d w[p] = y[dest[p]] for t the token of pair p: one fp32 dot per pair, shaped like ``plan.dest``.

    One pass over the permuted rows (``_row_dot_kernel``: each row's token gradient and output read once, in
    their dtype); the gather-cast-multiply-sum in torch moved ~6x those bytes (3.2 of the 4.3 ms of glue around
    the grouped GEMMs of a V3 expert layer on an H100)."""
    return row_dots(grad_out, y, plan)[plan.dest.long()]


def row_dots(grad_out: torch.Tensor, y: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """(M_total,) fp32: each permuted row's dot with its token's gradient, <grad_out[src_token[r]], y[r]>, 0 for
    padding rows; the rows from ``plan.rows_bound`` on left unwritten (no pair there)."""
    _check_rows(grad_out, "grad_out")
    _check_rows(y, "y")
    rows = torch.empty(plan.num_rows, dtype=torch.float32, device=y.device)
    block_r, block_h = (16, 256) if not INTERPRET else (16, 64)
    if plan.num_rows:
        _row_dot_kernel[(cdiv(plan.num_rows, block_r),)](grad_out, y, rows, plan.src_token, plan.rows_bound,
                                                         plan.num_rows, y.shape[1], grad_out.stride(0), y.stride(0),
                                                         BLOCK_R=block_r, BLOCK_H=block_h)
    return rows


# ----------------------------------------------------------------------------- torch references


def pair_weight_grad_ref(grad_out: torch.Tensor, y: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``pair_weight_grad`` in torch: gather, FP32 product, sum."""
    rows = y[plan.dest.reshape(-1).long()].float()  # (P, H)
    return (grad_out[plan.pair_tokens()].float() * rows).sum(-1).view(plan.dest.shape)


def moe_permute_ref(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Reference gather: rows of x by src_token, zeros for padding rows."""
    out = torch.zeros((plan.num_rows, x.shape[1]), dtype=x.dtype, device=x.device)
    valid = plan.src_token >= 0
    out[valid] = x[plan.src_token[valid].long()]
    return out


def moe_unpermute_ref(y: torch.Tensor, plan: DispatchPlan, topk_weights: torch.Tensor) -> torch.Tensor:
    """Reference weighted scatter-add, in float64 (any plan)."""
    out = torch.zeros((plan.num_tokens, y.shape[1]), dtype=torch.float64, device=y.device)
    rows = y[plan.dest.reshape(-1).long()].double()
    return out.index_add_(0, plan.pair_tokens(), rows * topk_weights.reshape(-1, 1).double())


def benchmark(T: int = 4096, H: int = 7168, topk: int = 8, num_experts: int = 32) -> dict[str, float]:
    """GB/s of dispatch (bf16, fused fp8) and combine ((T, topk) and pair plans) on CUDA, counting bytes
    read plus written; ``plan_pairs_us``: building a pair plan (the model's, ``make_pair_plan``)."""
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(num_experts, device="cuda")[:topk] for _ in range(T)])
    plan = make_dispatch_plan(ids, num_experts)
    tokens = torch.arange(T * topk, device="cuda") // topk
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts).tolist()
    pairs = make_pair_plan(tokens, ids.reshape(-1), T, counts)
    w = torch.rand(T, topk, device="cuda")
    y = torch.randn(plan.num_rows, H, device="cuda", dtype=torch.bfloat16)
    rows = T * topk
    runs = {
        "permute_bf16": (lambda: moe_permute(x, plan), rows * H * 4),
        "permute_fp8_fused": (lambda: moe_permute(x, plan, quantize=True), rows * H * 3),
        "unpermute_bf16": (lambda: moe_unpermute(y, plan, w), rows * H * 2 + T * H * 2),
        "unpermute_pairs_bf16": (lambda: moe_unpermute(y, pairs, w.reshape(-1)), rows * H * 2 + T * H * 2),
    }
    out = {name: nbytes / (triton.testing.do_bench(fn, return_mode="median") * 1e-3) / 1e9
           for name, (fn, nbytes) in runs.items()}
    plan_ms = triton.testing.do_bench(lambda: make_pair_plan(tokens, ids.reshape(-1), T, counts), return_mode="median")
    return out | {"plan_pairs_us": plan_ms * 1e3}
