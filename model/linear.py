"""The linear layer every dense matmul of the model uses: BF16 or FP8, fused or deferred weight grad.

Forward: y = x W^T (+ b). With an FP8 GEMM both operands are quantised (1x128 activation tiles,
128x128 weight blocks) and multiplied by it. Backward is straight-through by default: gradients
in the high-precision dtype against the *unquantised* tensors. With ``fp8_backward`` the two
backward GEMMs run in FP8 as in TR §3.3 (Figure 6): Dgrad quantises the output gradient in 1x128
tiles along N and multiplies the 128x128-block weight; Wgrad quantises both the output gradient and
the input in tiles of 128 tokens (the reduction runs over tokens) and accumulates in FP32.

``LinearFn`` and its grouped twin ``model.grouped_linear.GroupedLinearFn`` are the model's one
autograd stack for FP8 layers: the kernels package provides GEMMs, not layers, so the weight
gradient can be deferred (``WeightGradStore``) whichever GEMM runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeplan.model.fp8 import Fp8Ops, quant_weight_fwd
from moeplan.model.weight_grad import WeightGradStore, fused_main_grad_mm, weight_grad_now_or_later, wgrad_dtype


class LinearFn(torch.autograd.Function):
    """y = x W^T with an optional FP8 forward and an optional deferred weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, store: WeightGradStore | None, fp8: Fp8Ops | None, fp8_backward: bool = False):
        ctx.save_for_backward(x, weight)
        ctx.store = store
        ctx.weight = weight
        ctx.fp8 = fp8 if fp8_backward else None
        if fp8 is None:
            return F.linear(x, weight)
        xq, xs = fp8.quant_act(x.reshape(-1, x.shape[-1]))
        wq, ws = quant_weight_fwd(fp8, weight, fp8_backward)
        out = fp8.gemm(xq, xs, wq, ws, out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (M, N)
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.fp8 is None:
                grad_x = grad_out @ weight  # (..., K)
            else:  # Dgrad: (M, N) tiles x W^T (K, N) blocks
                fp8 = ctx.fp8
                wt, wt_scale = fp8.quant_weight(weight.t())
                grad_x = fp8.gemm(*fp8.quant_act(g2), wt, wt_scale, out_dtype=grad_out.dtype).reshape(x.shape)
        none = (None,) * 3  # store, fp8, fp8_backward
        if not ctx.needs_input_grad[1]:
            return grad_x, None, *none

        def weight_grad() -> torch.Tensor | None:  # (N, K), or None once added into the main gradient
            if ctx.fp8 is None:
                return None if fused_main_grad_mm(ctx.weight, g2.t(), x2) else g2.t() @ x2
            fp8 = ctx.fp8  # Wgrad: both operands in tiles of `block` tokens, FP32 out
            return fp8.gemm(*fp8.quant_act_t(g2), *fp8.quant_act_t(x2), out_dtype=wgrad_dtype(weight))

        return grad_x, weight_grad_now_or_later(ctx.store, ctx.weight, weight_grad), *none


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) routed through ``LinearFn``.

    ``fp8`` None = plain matmul in the parameter dtype; an ``Fp8Ops`` = FP8 block quantisation.
    ``weight_grad_store`` is set by ``attach_weight_grad_store`` for zero-bubble schedules.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        fp8: Fp8Ops | None = None,
        fp8_backward: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.fp8 = fp8
        self.fp8_backward = fp8_backward
        self.weight_grad_store: WeightGradStore | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fuse_main_grad = x.is_cuda and hasattr(self.weight, "main_grad")  # LinearFn adds the Wgrad into it
        if self.fp8 is None and self.weight_grad_store is None and not fuse_main_grad:
            return F.linear(x, self.weight, self.bias)
        y = LinearFn.apply(x, self.weight, self.weight_grad_store, self.fp8, self.fp8_backward)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + (", fp8" if self.fp8 is not None else "")


@dataclass(frozen=True)
class LinearFactory:
    """Builds every dense ``Linear`` of a model with one dtype and one precision choice."""

    dtype: torch.dtype
    fp8: Fp8Ops | None = None
    fp8_backward: bool = False

    def __call__(self, in_features: int, out_features: int, bias: bool = False) -> Linear:
        return Linear(in_features, out_features, bias=bias, dtype=self.dtype, fp8=self.fp8,
                      fp8_backward=self.fp8_backward)
