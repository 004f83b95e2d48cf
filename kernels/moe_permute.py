"""Token permutation for MoE dispatch and combine, in the contiguous layout of ``grouped_gemm.py``.

Dispatch: sort the (token, slot) pairs by expert, pad each expert's segment to a multiple of 128
rows and gather ``x`` rows into it, optionally quantising to FP8 1×128 tiles in the same pass (the
grouped FP8 GEMM reads that directly: one bf16 read and one fp8 write instead of a bf16 round trip).
Combine: ``out[t] = Σ_j w[t, j] · y[dest[t, j]]``, the weighted scatter-add written as a gather, so
it needs no atomics and is deterministic. Both move bytes only; ``benchmark`` reports GB/s.
"""

from dataclasses import dataclass

import torch

from .fp8_quant import TILE, cast_for_store, empty_rows_output, store_rows
from .triton_compat import INTERPRET, cdiv, tl, triton


@dataclass(frozen=True)
class DispatchPlan:
    """Where every routed token goes. All tensors on the tokens' device, int32.

    src_token: (M_total,) source token of each permuted row, -1 for padding rows.
    m_indices: (M_total,) expert of each permuted row, -1 for padding rows.
    dest:      (T, topk)  permuted row of each (token, slot).
    seg_offsets: (E + 1,) first row of each expert's segment; multiples of ``align``.
    """

    src_token: torch.Tensor
    m_indices: torch.Tensor
    dest: torch.Tensor
    seg_offsets: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.src_token.numel()


def make_dispatch_plan(topk_ids: torch.Tensor, num_experts: int, align: int = TILE) -> DispatchPlan:
    """topk_ids (T, topk) int → DispatchPlan. One host sync (the padded row count sizes the buffers)."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be (T, topk), got shape={tuple(topk_ids.shape)}")
    T, topk = topk_ids.shape
    device = topk_ids.device
    # Step 1: sort (token, slot) pairs by expert; stable, so tokens keep their order inside a segment.
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    # Step 2: segment bounds, each segment padded to a multiple of `align` rows.
    padded = (counts + align - 1) // align * align
    seg_offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    seg_offsets[1:] = torch.cumsum(padded, 0)
    first_sorted = torch.cumsum(counts, 0) - counts  # index in `order` of each expert's first pair
    # Step 3: destination row of each sorted pair = segment start + rank inside the expert.
    expert_sorted = flat[order]
    rank = torch.arange(flat.numel(), device=device) - first_sorted[expert_sorted]
    dest_sorted = seg_offsets[expert_sorted] + rank
    num_rows = int(seg_offsets[-1])
    src_token = torch.full((num_rows,), -1, dtype=torch.int32, device=device)
    src_token[dest_sorted] = (order // topk).to(torch.int32)
    m_indices = torch.full((num_rows,), -1, dtype=torch.int32, device=device)
    m_indices[dest_sorted] = expert_sorted.to(torch.int32)
    dest = torch.empty(T * topk, dtype=torch.int32, device=device)
    dest[order] = dest_sorted.to(torch.int32)
    return DispatchPlan(src_token, m_indices, dest.view(T, topk), seg_offsets.to(torch.int32))


@triton.jit
def _permute_kernel(
    # pointers: x (T, H), out (M_total, H), out scales (M_total, H/128), src_token, row weights
    x_ptr, out_ptr, scale_ptr, src_ptr, weight_ptr,
    # sizes
    num_rows, H,
    # strides
    stride_xt, stride_om, stride_sm,
    # meta
    QUANT: tl.constexpr, WEIGHTED: tl.constexpr, POW2: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    src = tl.load(src_ptr + rows, mask=rows < num_rows, other=-1)
    col_ok = cols[None, :] < H
    x = tl.load(x_ptr + src[:, None].to(tl.int64) * stride_xt + cols[None, :],
                mask=(src[:, None] >= 0) & col_ok, other=0.0).to(tl.float32)  # padding rows read as 0
    if WEIGHTED:
        x = x * tl.load(weight_ptr + rows, mask=rows < num_rows, other=0.0)[:, None]
    out_mask = (rows[:, None] < num_rows) & col_ok
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    store_rows(out_ptrs, scale_ptr + rows * stride_sm + tl.program_id(1), x, out_mask, rows < num_rows, QUANT, POW2)


@triton.jit
def _combine_kernel(
    # pointers: y (M_total, H), out (T, H), dest (T, TOPK), weights (T, TOPK)
    y_ptr, out_ptr, dest_ptr, weight_ptr,
    # sizes
    H,
    # strides
    stride_ym, stride_ot,
    # meta
    TOPK: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOPK):  # fixed order: deterministic
        row = tl.load(dest_ptr + t * TOPK + j).to(tl.int64)
        y = tl.load(y_ptr + row * stride_ym + cols, mask=cols < H, other=0.0).to(tl.float32)
        if WEIGHTED:
            y = y * tl.load(weight_ptr + t * TOPK + j).to(tl.float32)
        acc += y
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + cols, cast_for_store(acc, out_ptr.dtype.element_ty), mask=cols < H)


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name} must be 2-D with unit column stride, got shape={tuple(x.shape)} "
                         f"stride={x.stride()}")


def moe_permute(
    x: torch.Tensor, plan: DispatchPlan, quantize: bool = False, pow2_scale: bool = False,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gather x (T, H) into the contiguous layout (M_total, H); padding rows are zeros.

    quantize: return (fp8 (M_total, H), scales (M_total, ceil(H/128))) instead of x's dtype.
    row_weights: (M_total,) fp32 factor per permuted row (the combine's backward).
    """
    _check_rows(x, "x")
    M, H = plan.num_rows, x.shape[1]
    out, scale = empty_rows_output(M, H, x.dtype, quantize, x.device)
    weights = row_weights if row_weights is not None else plan.src_token
    block_r = 16
    grid = (cdiv(M, block_r), cdiv(H, TILE))
    _permute_kernel[grid](
        x, out, scale, plan.src_token, weights, M, H, x.stride(0), out.stride(0), scale.stride(0),
        QUANT=quantize, WEIGHTED=row_weights is not None, POW2=pow2_scale, BLOCK_R=block_r, BLOCK_H=TILE,
    )
    return (out, scale) if quantize else out


def moe_unpermute(y: torch.Tensor, plan: DispatchPlan, topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    """out (T, H) = Σ_j topk_weights[t, j] · y[dest[t, j]] (weights 1 when None); y (M_total, H)."""
    _check_rows(y, "y")
    T, topk = plan.dest.shape
    H = y.shape[1]
    out = torch.empty((T, H), dtype=y.dtype, device=y.device)
    if topk_weights is not None and tuple(topk_weights.shape) != (T, topk):
        raise ValueError(f"topk_weights must be {(T, topk)}, got {tuple(topk_weights.shape)}")
    weights = topk_weights.contiguous() if topk_weights is not None else plan.dest
    block_h = 1024 if not INTERPRET else 128
    _combine_kernel[(T, cdiv(H, block_h))](
        y, out, plan.dest, weights, H, y.stride(0), out.stride(0),
        TOPK=topk, WEIGHTED=topk_weights is not None, BLOCK_H=block_h,
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
        row_weights = torch.zeros(plan.num_rows, dtype=torch.float32, device=y.device)
        row_weights[plan.dest.reshape(-1).long()] = topk_weights.reshape(-1).float()
        grad_y = moe_permute(grad_out, plan, row_weights=row_weights)
        # d out[t] / d w[t, j] = y[dest[t, j]]: one dot per (token, slot), (T, topk, H) → (T, topk)
        grad_w = torch.einsum("th,tkh->tk", grad_out.float(), y[plan.dest.long()].float())
        return grad_y, grad_w.to(topk_weights.dtype), None


# ----------------------------------------------------------------------------- torch references


def moe_permute_ref(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Reference gather: rows of x by src_token, zeros for padding rows."""
    out = torch.zeros((plan.num_rows, x.shape[1]), dtype=x.dtype, device=x.device)
    valid = plan.src_token >= 0
    out[valid] = x[plan.src_token[valid].long()]
    return out


def moe_unpermute_ref(y: torch.Tensor, plan: DispatchPlan, topk_weights: torch.Tensor) -> torch.Tensor:
    """Reference weighted scatter-add, in float64."""
    T, topk = plan.dest.shape
    out = torch.zeros((T, y.shape[1]), dtype=torch.float64, device=y.device)
    token = torch.arange(T, device=y.device).repeat_interleave(topk)
    out.index_add_(0, token, y[plan.dest.reshape(-1).long()].double() * topk_weights.reshape(-1, 1).double())
    return out


def benchmark(T: int = 4096, H: int = 7168, topk: int = 8, num_experts: int = 32) -> dict[str, float]:
    """GB/s of dispatch (bf16, fused fp8) and combine on CUDA, counting bytes read plus written."""
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(num_experts, device="cuda")[:topk] for _ in range(T)])
    plan = make_dispatch_plan(ids, num_experts)
    w = torch.rand(T, topk, device="cuda")
    y = torch.randn(plan.num_rows, H, device="cuda", dtype=torch.bfloat16)
    rows = T * topk
    runs = {
        "permute_bf16": (lambda: moe_permute(x, plan), rows * H * 4),
        "permute_fp8_fused": (lambda: moe_permute(x, plan, quantize=True), rows * H * 3),
        "unpermute_bf16": (lambda: moe_unpermute(y, plan, w), rows * H * 2 + T * H * 2),
    }
    return {name: nbytes / (triton.testing.do_bench(fn, return_mode="median") * 1e-3) / 1e9
            for name, (fn, nbytes) in runs.items()}
