"""Autograd wrappers: FP8 linear layers (dense and MoE-grouped) and the BF16 grouped linear.

``y = x · Wᵀ`` with x (M, K) bf16 and W ([E,] N, K) master weights (fp32 or bf16), following the
DeepSeek-V3 recipe (TR §3.3):
  forward  x → 1×128 fp8, W → 128×128 fp8 (+ its transposed copy, kept for backward)
  dgrad    dy → 1×128 fp8;  dx = dy · W through the transposed copy (same block scales, transposed)
  wgrad    dy, x → 128×1 fp8 (transposed); dW = dyᵀ · x, fp32 out, cast to W's dtype
Grouped: x is the contiguous layout of ``moe_permute`` (``m_indices``, ``seg_offsets``).
With ``swiglu_input`` the layer's input is ``h = [gate | up]`` and the layer applies SwiGLU first,
fused with the quantisation; backward recomputes SwiGLU from ``h`` (the input is what is cached).
"""

import torch

from .fp8_gemm import fp8_gemm
from .fp8_quant import quant_act_128x1_t, quant_act_1x128, quant_weight_128x128
from .grouped_gemm import grouped_gemm_bf16, grouped_gemm_fp8, grouped_wgrad_bf16, grouped_wgrad_fp8
from .swiglu import swiglu, swiglu_backward


class Fp8LinearFunction(torch.autograd.Function):
    """(x (M, K) or h (M, 2K), w ([E,] N, K), m_indices | None, seg_offsets | None, swiglu_input) → y (M, N) bf16."""

    @staticmethod
    def forward(ctx, x, w, m_indices=None, seg_offsets=None, swiglu_input=False):
        grouped = w.dim() == 3
        if grouped and (m_indices is None or seg_offsets is None):
            raise ValueError("a 3-D weight (E, N, K) needs m_indices and seg_offsets (contiguous layout)")
        x = x.contiguous()
        xq, xs = swiglu(x, quantize=True) if swiglu_input else quant_act_1x128(x)
        wq, ws, wqt = quant_weight_128x128(w, transposed=True)
        y = grouped_gemm_fp8(xq, xs, wq, ws, m_indices) if grouped else fp8_gemm(xq, xs, wq, ws)
        ctx.save_for_backward(x, wqt, ws, m_indices, seg_offsets)
        ctx.grouped, ctx.swiglu_input, ctx.w_dtype = grouped, swiglu_input, w.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wqt, ws, m_indices, seg_offsets = ctx.saved_tensors
        dy = dy.contiguous()
        # dgrad: d act (M, K) = dy (M, N) · W (N, K), B = Wᵀ copy (K, N) with the block scales transposed.
        dyq, dys = quant_act_1x128(dy)
        if ctx.grouped:
            dact = grouped_gemm_fp8(dyq, dys, wqt, ws.mT, m_indices)
        else:
            dact = fp8_gemm(dyq, dys, wqt, ws.mT)
        act = swiglu(x) if ctx.swiglu_input else x  # recomputed, bf16
        # wgrad: dW (N, K) = dyᵀ · act, both quantised along M in 128×1 tiles.
        dytq, dyts = quant_act_128x1_t(dy)
        atq, ats = quant_act_128x1_t(act)
        if ctx.grouped:
            dw = grouped_wgrad_fp8(dytq, dyts, atq, ats, seg_offsets)
        else:
            dw = fp8_gemm(dytq, dyts, atq, ats, out_dtype=torch.float32)
        dx = swiglu_backward(x, dact) if ctx.swiglu_input else dact
        return dx, dw.to(ctx.w_dtype), None, None, None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, swiglu_input: bool = False) -> torch.Tensor:
    """Dense FP8 linear: x (M, K) bf16 (or h (M, 2K) with swiglu_input), w (N, K) → (M, N) bf16."""
    return Fp8LinearFunction.apply(x, w, None, None, swiglu_input)


def fp8_grouped_linear(x: torch.Tensor, w: torch.Tensor, m_indices: torch.Tensor, seg_offsets: torch.Tensor,
                       swiglu_input: bool = False) -> torch.Tensor:
    """MoE experts in FP8: x (M_total, K) contiguous layout, w (E, N, K) → (M_total, N) bf16."""
    return Fp8LinearFunction.apply(x, w, m_indices, seg_offsets, swiglu_input)


class GroupedLinearFunction(torch.autograd.Function):
    """BF16 grouped linear: (x (M_total, K) bf16, w (E, N, K) bf16, m_indices, seg_offsets) → (M_total, N)."""

    @staticmethod
    def forward(ctx, x, w, m_indices, seg_offsets):
        ctx.save_for_backward(x, w, m_indices, seg_offsets)
        return grouped_gemm_bf16(x, w, m_indices, seg_offsets)

    @staticmethod
    def backward(ctx, dy):
        x, w, m_indices, seg_offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = grouped_gemm_bf16(dy, w.transpose(1, 2), m_indices, seg_offsets)  # B = Wᵀ (E, K, N), a view
        dw = grouped_wgrad_bf16(dy.t(), x.t(), seg_offsets)
        return dx, dw.to(w.dtype), None, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, m_indices: torch.Tensor, seg_offsets: torch.Tensor):
    """BF16 MoE experts: x (M_total, K), w (E, N, K) → (M_total, N) bf16."""
    return GroupedLinearFunction.apply(x, w, m_indices, seg_offsets)


class Fp8Linear(torch.nn.Module):
    """Drop-in ``nn.Linear`` (no bias) computing in FP8; the weight stays in ``dtype`` (master copy)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        torch.nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = fp8_linear(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.weight)  # (tokens, N)
        return y.view(*lead, -1)
