"""The routed experts fused: the FP8 path as DeepSeek-V3 TR §3.3 fuses it (``fp8_kernel="kernels"``), and the
BF16 path (``ModelOptions.fuse_memory_bound``) with the same kernels around ``torch._grouped_mm``.

Every expert-side tensor stays in the contiguous layout of ``kernels.moe_permute`` (each expert's rows
padded to 128, ``plan.m_indices`` = row expert or -1), from permute to combine. Forward:

1. permute with quantise: the tokens' rows written straight into that layout as E4M3 1x128 tiles
   (``moe_permute(quantize=True)``), which the gate_up grouped GEMM reads; no BF16 copy of the rows;
2. gate_up grouped FP8 GEMM -> h (M_pad, 2I) in the activation dtype;
3. SwiGLU with its quantisation (``swiglu(h, quantize=True)``): the down-projection's FP8 operand,
   quantised from the FP32 product; no BF16 SwiGLU output;
4. down grouped FP8 GEMM -> y (M_pad, d);
5. weighting and combine in one pass (``moe_unpermute(y, plan, weights)``).

Saved for backward: x, h and y (TR: keep the SwiGLU input, recompute its output). Backward, in the same
layout: the combine's backward is the weighted permute of the output gradient and one dot per pair;
the down projection's Dgrad and Wgrad (its input recomputed from h: ``swiglu_quant_t`` writes it straight
into the Wgrad's 128x1 FP8 tiles); ``swiglu_backward`` from h; gate_up's Dgrad and Wgrad (its input, the
permuted rows, gathered again, into 128x1 tiles: ``moe_permute(quantize="128x1_t")``); the permute's backward is
the unweighted combine. With ``fp8_backward`` the Dgrads are FP8 grouped GEMMs (1x128 gradients, 128x128
transposed weights) and the Wgrads the K-grouped FP8 Wgrad on 128x1 tiles, whose tiles never straddle two
experts because the layout already pads each one; without it they run in the float dtype (straight-through).
Weight gradients are queued on a ``WeightGradStore`` when one is attached, as ``GroupedLinearFn``'s are. With an
``ExpertWgradBatch`` (``model.weight_grad``) the FP8 Wgrads' 128x1 operands are written into the micro-batch's slot
of its stash instead, and the Wgrads of several micro-batches run as one launch.

No host sync anywhere: every size comes from the plan, built from the per-expert counts that the caller
read once (``make_pair_plan``), or, on Hopper, sized for the worst case without them. Such a plan's tail, the
rows after the last segment (``plan.rows_bound``, read on the GPU), is whole padding-only tiles: the
memory-bound kernels (permute, SwiGLU, the activation quantisers, the row dots) keep their worst-case grids and
return at once there, leaving the tail of their outputs unwritten. Nothing reads it: the grouped GEMMs skip
padding-only tiles (``m_indices`` -1: no K step, neither values nor scales read) and write zeros there, the
K-grouped Wgrad and the float grouped GEMMs read only the rows inside the segments, and the combine and the pair
weights read only the pairs' rows. The comments at each step say which of these holds.

BF16 (``ops`` None): the same five steps and the same saved tensors, without quantisation: permute into
unpadded segments (``torch._grouped_mm`` takes any row offsets, so the plan needs no counts on the host),
the two grouped GEMMs, ``swiglu`` (one kernel; its output recomputed from h for the down Wgrad), and the
weighted combine summing each token's pairs in FP32. Against the op-by-op path of ``model.experts`` (a
gathered copy, ``F.silu(gate) * up``, an FP32 weighting and ``index_add_``, each saving its inputs) it keeps
h and y per pair instead of the permuted rows, ``silu(gate)``, the SwiGLU output and y.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moeplan.kernels.moe_permute import DispatchPlan, moe_permute, moe_unpermute, pair_row_weights, pair_weight_grad
from moeplan.kernels.swiglu import swiglu, swiglu_backward, swiglu_quant_t
from moeplan.model.fp8 import MIN_AMAX, Fp8Ops, quant_weight_fwd
from moeplan.model.grouped_mm import (
    reference_grouped_mm,
    reference_grouped_weight_grad,
    torch_grouped_mm,
    torch_grouped_weight_grad,
)
from moeplan.model.weight_grad import (
    ExpertWgradBatch,
    WeightGradStore,
    fused_main_grad_fp8,
    fused_main_grad_grouped_mm,
    weight_grad_now_or_later,
    wgrad_dtype,
)


class FusedExpertsFn(torch.autograd.Function):
    """(x (N, d), weight of each pair (P,), gate_up (E, 2I, d), down (E, d, I)) -> out (N, d).

    ``plan``: a pair plan (``kernels.moe_permute.make_pair_plan``) of the same pairs; ``host_counts``:
    pairs per expert on the host; ``use_torch``: the float grouped GEMMs on ``torch._grouped_mm`` (else the
    padded-bmm reference). ``ops`` None is the BF16 path: the same steps with float grouped GEMMs, no
    quantisation, and a plan whose segments need no padding (``align=1``: no host counts, no sync); where the
    weights have FP32 main gradients on a GPU, their weight gradients accumulate into them expert by expert, the
    bounds copied to the host during the forward. ``batch``: the module's ``ExpertWgradBatch`` or None.
    """

    @staticmethod
    def forward(ctx, x, weight_of_pair, gate_up, down, plan: DispatchPlan, ops: Fp8Ops | None, fp8_backward: bool,
                store: WeightGradStore | None, host_counts: Sequence[int] | None, use_torch: bool,
                batch: ExpertWgradBatch | None = None):
        x = x.contiguous()
        bound = plan.rows_bound  # a worst-case plan's rows in use, on the GPU; else None
        if ops is None:  # BF16: permute, gate_up, SwiGLU, down, weighted combine
            mm = torch_grouped_mm if use_torch else reference_grouped_mm
            offs = plan.seg_offsets[1:]
            h = mm(moe_permute(x, plan), gate_up.transpose(1, 2), offs)  # (M, 2I)
            y = mm(swiglu(h, row_bound=bound), down.transpose(1, 2), offs)  # (M, d)
        else:
            gemm = ops.grouped_contiguous
            # Step 1: permute with quantise, then gate_up. Its tail unwritten: padding-only tiles, which the
            # grouped GEMM skips (reading neither values nor scales) and writes as zeros, so h's tail is zeros.
            rows_q, rows_s = moe_permute(x, plan, quantize=True, amax_floor=MIN_AMAX)  # (M_pad, d) E4M3
            h = gemm(rows_q, rows_s, *quant_weight_fwd(ops, gate_up, fp8_backward), plan.m_indices,
                     out_dtype=x.dtype, host_counts=host_counts)  # (M_pad, 2I)
            # Step 2: SwiGLU with its quantisation, then down; the tail as in step 1, so y's tail is zeros.
            act_q, act_s = swiglu(h, quantize=True, amax_floor=MIN_AMAX, row_bound=bound)  # (M_pad, I) E4M3
            y = gemm(act_q, act_s, *quant_weight_fwd(ops, down, fp8_backward), plan.m_indices, out_dtype=x.dtype,
                     host_counts=host_counts)  # (M_pad, d)
        # Step 3: weighting and combine (y read at the pairs' rows only).
        ctx.save_for_backward(x, weight_of_pair, h, y)
        ctx.plan, ctx.ops, ctx.fp8_backward, ctx.store = plan, ops, fp8_backward and ops is not None, store
        ctx.host_counts, ctx.use_torch, ctx.gate_up, ctx.down = host_counts, use_torch, gate_up, down
        ctx.batch = batch
        ctx.host_bounds = _bounds_to_host(plan, ops, use_torch, gate_up, down)
        return moe_unpermute(y, plan, weight_of_pair.contiguous())

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_of_pair, h, y = ctx.saved_tensors
        plan = ctx.plan
        bound = plan.rows_bound
        grad_out = grad_out.contiguous()
        # Every (M_pad, .) gradient below keeps an unwritten tail where the plan has a bound (rows_bound): read by
        # nothing but kernels that stop at the same bound, the Dgrads (padding-only tiles skipped; the float
        # grouped GEMMs read the rows inside the segments only) and the Wgrads (each expert's segment only).
        # Step 1: the combine's backward: each row's pair weight times its token's gradient, one dot per pair
        # (``pair_weight_grad`` keeps the dots of the pairs' rows only).
        # With an FP8 backward whose ops quantise the permuted rows as they gather them (``permute_quant_both``),
        # the weighted rows come out in both tilings only, never stored in BF16 (grad_y None).
        row_weights = pair_row_weights(plan, weight_of_pair)
        slot = _reserve(ctx)  # the micro-batch's columns of the batch's stash, or None: its Wgrads run alone
        gy_out, h_out, x_out, gh_out = (_stash(ctx, slot, o) for o in ("down_g", "down_x", "gate_up_x", "gate_up_g"))
        gy_rows, gy_t = _permute_quant_both(ctx, 3, grad_out, row_weights, gy_out)
        grad_y = None if gy_rows is not None else moe_permute(grad_out, plan, row_weights=row_weights)  # (M_pad, d)
        grad_w = pair_weight_grad(grad_out, y, plan).to(weight_of_pair.dtype)
        # Step 2: down projection; its input, the SwiGLU output, recomputed from h (FP8: quantised 128x1 from
        # the FP32 product in the same pass, as the forward quantised it 1x128).
        if grad_y is not None:
            gy_rows, gy_t = _quant_both(ctx, 3, grad_y, gy_out)
        grad_down = _weight_grad(ctx, 3, ctx.down, grad_y, lambda: swiglu(h, row_bound=bound),
                                 lambda: swiglu_quant_t(h, amax_floor=MIN_AMAX, row_bound=bound, out=h_out), gy_t,
                                 slot)
        grad_act = _dgrad(ctx, grad_y, ctx.down, gy_rows, grad_out.dtype)  # (M_pad, I)
        # Step 3: SwiGLU from its saved input, then gate_up; its input, the permuted rows, gathered again
        # (FP8: gathered straight into 128x1 tiles).
        # With an FP8 backward whose ops quantise d h as they compute it (``swiglu_backward_quant_both``), d h comes
        # out in both tilings only, never stored in BF16 (grad_h None).
        grad_h = None
        gh_rows, gh_t = _swiglu_backward_quant_both(ctx, 2, h, grad_act, gh_out)
        if gh_rows is None:
            grad_h = swiglu_backward(h, grad_act, row_bound=bound)  # (M_pad, 2I)
            gh_rows, gh_t = _quant_both(ctx, 2, grad_h, gh_out)
        grad_gate_up = _weight_grad(ctx, 2, ctx.gate_up, grad_h, lambda: moe_permute(x, plan),
                                    lambda: moe_permute(x, plan, quantize="128x1_t", amax_floor=MIN_AMAX, out=x_out),
                                    gh_t, slot)
        grad_rows = _dgrad(ctx, grad_h, ctx.gate_up, gh_rows, grad_out.dtype)  # (M_pad, d)
        # Step 4: the permute's backward: each token's rows summed.
        grad_x = moe_unpermute(grad_rows, plan) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, grad_gate_up, grad_down, *(None,) * 7


def _reserve(ctx) -> int | None:
    """A slot of ``ctx.batch`` for this micro-batch's expert Wgrads where they run in FP8 through the kernels'
    quantisers (which write into the stash) and both weights want gradients; else None."""
    ops, batch = ctx.ops, ctx.batch
    if (batch is None or not ctx.fp8_backward or not (ctx.needs_input_grad[2] and ctx.needs_input_grad[3])
            or ops.quant_act_both is None or ops.permute_quant_both is None):
        return None
    return batch.reserve(ctx.plan.seg_offsets, ctx.plan.num_rows, {"gate_up": ctx.gate_up, "down": ctx.down})


def _stash(ctx, slot: int | None, operand: str):
    """``operand``'s columns of the batch's stash for ``slot`` (the quantisers' ``out=``), or None."""
    if slot is None:
        return None
    features = {"down_g": ctx.down.shape[1], "down_x": ctx.down.shape[2], "gate_up_g": ctx.gate_up.shape[1],
                "gate_up_x": ctx.gate_up.shape[2]}[operand]
    return ctx.batch.out(operand, slot, features, ctx.plan.num_rows)


def _bounds_to_host(plan: DispatchPlan, ops: Fp8Ops | None, use_torch: bool, *weights: torch.Tensor):
    """The BF16 path's segment bounds on their way to the host (a pinned copy and its event), when the weight
    gradients will accumulate into FP32 main gradients expert by expert (``fused_main_grad_grouped_mm``, which
    needs the bounds on the host): copied without waiting in forward, read in backward, so the layer never
    stalls the host. None otherwise."""
    offs = plan.seg_offsets
    if ops is not None or not use_torch or not offs.is_cuda or all(getattr(w, "main_grad", None) is None
                                                                       for w in weights):
        return None
    host = torch.empty(offs.shape, dtype=offs.dtype, pin_memory=True)
    host.copy_(offs, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def _both_op(ctx, index: int, name: str):
    """The ops' ``name``, one of the casts that give a gradient in both tilings (1x128 for the Dgrad of input
    ``index``, 128x1 transposed for its Wgrad), where the FP8 backward wants both and the ops have it; else None."""
    op = getattr(ctx.ops, name, None)
    return op if ctx.fp8_backward and ctx.needs_input_grad[index] else None


def _quant_both(ctx, index: int, g: torch.Tensor, out_t=None):
    """g (M_pad, N) in 1x128 tiles for the FP8 Dgrad and in 128x1 tiles (N, M_pad) for the FP8 Wgrad of input
    ``index``, from one read (``Fp8Ops.quant_act_both``; bit-exact to the two quantisers), where both run; else
    (None, None) and each quantises its own. ``out_t``: the stash's columns for the 128x1 tiles, or None."""
    op = _both_op(ctx, index, "quant_act_both")
    return (None, None) if op is None else op(g, **_bounded(ctx.plan), **_out_t(out_t))


def _permute_quant_both(ctx, index: int, grad_out: torch.Tensor, row_weights: torch.Tensor, out_t=None):
    """The combine's backward, ``moe_permute(grad_out, plan, row_weights)``, straight into the 1x128 and 128x1
    tiles that ``_quant_both`` would make of it (``Fp8Ops.permute_quant_both``), where the ops have it and both
    tilings are wanted; else (None, None). ``out_t`` as ``_quant_both``'s."""
    op = _both_op(ctx, index, "permute_quant_both")
    return (None, None) if op is None else op(grad_out, ctx.plan, row_weights, **_out_t(out_t))


def _swiglu_backward_quant_both(ctx, index: int, h: torch.Tensor, grad_act: torch.Tensor, out_t=None):
    """SwiGLU's backward, ``swiglu_backward(h, grad_act)``, straight into the 1x128 and 128x1 tiles that
    ``_quant_both`` would make of it (``Fp8Ops.swiglu_backward_quant_both``), where the ops have it and both tilings
    are wanted; else (None, None). ``out_t`` as ``_quant_both``'s."""
    op = _both_op(ctx, index, "swiglu_backward_quant_both")
    return (None, None) if op is None else op(h, grad_act, **_bounded(ctx.plan), **_out_t(out_t))


def _out_t(out_t) -> dict:
    """``out_t=`` for the ops' quantisers where a stash slot is given: nothing otherwise, so that any ops run."""
    return {} if out_t is None else {"out_t": out_t}


def _bounded(plan: DispatchPlan) -> dict:
    """``row_bound=plan.rows_bound`` for the ops' activation quantisers (the kernels' take it) where the plan has
    a bound (a worst-case plan); nothing otherwise, so that an exact plan runs with any ops' quantisers."""
    return {} if plan.rows_bound is None else {"row_bound": plan.rows_bound}


def _dgrad(ctx, g: torch.Tensor | None, weight: torch.Tensor, g_rows=None, dtype: torch.dtype | None = None
           ) -> torch.Tensor:
    """g (M_pad, N) times each expert's weight (E, N, K): (M_pad, K) in g's dtype (``dtype`` where g is None);
    ``g_rows``: g in 1x128 tiles, made already (g itself then may be None)."""
    plan, ops = ctx.plan, ctx.ops
    if ctx.fp8_backward:  # gradient rows in 1x128 tiles times each expert's W^T (K, N) in 128x128 blocks
        wt, wt_scale = ops.quant_weight(weight.transpose(1, 2))
        gq, gs = g_rows if g_rows is not None else ops.quant_act(g, **_bounded(plan))
        return ops.grouped_contiguous(gq, gs, wt, wt_scale, plan.m_indices, out_dtype=dtype or g.dtype,
                                      host_counts=ctx.host_counts)
    mm = torch_grouped_mm if ctx.use_torch else reference_grouped_mm
    return mm(g, weight.to(g.dtype), plan.seg_offsets[1:])  # padding rows are zero: so is their product


def _weight_grad(ctx, index: int, weight: torch.Tensor, g: torch.Tensor, input_float, input_fp8_t, g_t=None,
                 slot: int | None = None):
    """What backward returns for ``weight`` (E, N, K), from g (M_pad, N) and the layer input, recomputed when the
    Wgrad runs (now, or in the W step): ``input_float()`` (M_pad, K), or ``input_fp8_t()`` its transpose
    (K, M_pad) in E4M3 128x1 tiles with scales (K, M_pad/128). ``g_t``: g's 128x1 tiles, made already (a deferred
    Wgrad then holds them instead of g). ``slot``: the micro-batch's slot of ``ctx.batch``, where g_t is already
    and ``input_fp8_t()`` writes; the Wgrad then commits it (run with the batch's other micro-batches)."""
    if not ctx.needs_input_grad[index]:
        return None
    if slot is not None:
        name = "gate_up" if index == 2 else "down"

        def batched() -> None:  # the input's 128x1 tiles into the slot, then the slot to the batch
            input_fp8_t()
            ctx.batch.commit(name, slot)

        return weight_grad_now_or_later(ctx.store, weight, batched)
    plan, ops, fp8_backward, use_torch = ctx.plan, ctx.ops, ctx.fp8_backward, ctx.use_torch
    if g_t is not None:
        g = None  # the closure keeps the FP8 tiles, not the gradient

    def weight_grad() -> torch.Tensor | None:  # (E, N, K) FP32 in FP8, else the float dtype; None: accumulated
        if not fp8_backward:
            if ctx.host_bounds is not None:  # into the FP32 main gradient, expert by expert
                if not isinstance(ctx.host_bounds, list):  # the forward's copy, long finished: no stall
                    host, copied = ctx.host_bounds
                    copied.synchronize()
                    ctx.host_bounds = host.tolist()
                if fused_main_grad_grouped_mm(weight, g, input_float(), ctx.host_bounds):
                    return None
            wgrad = torch_grouped_weight_grad if use_torch else reference_grouped_weight_grad
            return wgrad(g, input_float(), plan.seg_offsets[1:])
        gq, gs = g_t if g_t is not None else ops.quant_act_t(g, **_bounded(plan))  # (N, M_pad), 128 tokens a tile
        aq, a_s = input_fp8_t()  # (K, M_pad)
        if fused_main_grad_fp8(weight, gq, gs, aq, a_s, plan.seg_offsets):  # into the FP32 main gradient
            return None
        return ops.grouped_wgrad(gq, gs, aq, a_s, plan.seg_offsets, out_dtype=wgrad_dtype(weight),
                                 host_counts=ctx.host_counts)

    return weight_grad_now_or_later(ctx.store, weight, weight_grad)

