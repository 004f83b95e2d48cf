"""The autograd function of the routed experts' grouped matmuls: BF16 or FP8, Wgrad now or later.

The grouped twin of ``model.linear.LinearFn``: Dgrad always, Wgrad now or queued on a
``WeightGradStore``, so zero-bubble schedules split the expert matmuls like the dense ones. The
float math is ``model.grouped_mm``; the FP8 quantisation and GEMMs are ``model.fp8``'s.
"""

from __future__ import annotations

import torch

from moeplan.model.fp8 import Fp8Gemm, fp8_grouped_weight_grad, quantize_blocks, quantize_tiles
from moeplan.model.grouped_mm import (
    reference_grouped_mm,
    reference_grouped_weight_grad,
    torch_grouped_mm,
    torch_grouped_weight_grad,
)
from moeplan.model.weight_grad import WeightGradStore, weight_grad_now_or_later


class GroupedLinearFn(torch.autograd.Function):
    """out = grouped(a, weight^T) with weight (E, N, K) in ``nn.Linear`` orientation.

    ``fp8_grouped`` None = the float grouped matmul (``use_torch``: ``torch._grouped_mm``, else the
    padded-bmm reference); a grouped FP8 GEMM = quantised forward, and with ``fp8_wgrad`` an FP8
    backward too (TR §3.3), else a straight-through backward in the float dtype.
    """

    @staticmethod
    def forward(ctx, a, weight, offs, use_torch: bool, store: WeightGradStore | None, fp8_grouped: Fp8Gemm | None,
                block: int, fp8_wgrad: Fp8Gemm | None = None):
        ctx.save_for_backward(a, weight, offs)
        ctx.use_torch, ctx.store, ctx.weight = use_torch, store, weight
        # FP8 backward (TR §3.3) when the grouped FP8 GEMM comes with its weight-gradient GEMM
        ctx.fp8 = (fp8_grouped, fp8_wgrad, block) if fp8_grouped is not None and fp8_wgrad is not None else None
        if fp8_grouped is not None:
            aq, a_scale = quantize_tiles(a, block)
            wq, w_scale = quantize_blocks(weight, block)  # per expert (E, N/b, K/b)
            return fp8_grouped(aq, a_scale, wq, w_scale, offs, out_dtype=a.dtype, block=block)
        mm = torch_grouped_mm if use_torch else reference_grouped_mm
        return mm(a, weight.transpose(1, 2), offs)  # (M, N)

    @staticmethod
    def backward(ctx, grad_out):
        a, weight, offs = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        mm = torch_grouped_mm if ctx.use_torch else reference_grouped_mm
        wgrad = torch_grouped_weight_grad if ctx.use_torch else reference_grouped_weight_grad
        grad_a = None
        if ctx.needs_input_grad[0]:
            if ctx.fp8 is None:
                grad_a = mm(grad_out, weight, offs)  # (M, K)
            else:  # Dgrad: grad rows in 1x128 tiles times each expert's W^T (K, N) in blocks
                gemm, _, block = ctx.fp8
                wt, wt_scale = quantize_blocks(weight.transpose(1, 2), block)
                gq, gs = quantize_tiles(grad_out, block)
                grad_a = gemm(gq, gs, wt, wt_scale, offs, out_dtype=grad_out.dtype, block=block)
        none = (None,) * 6  # offs, use_torch, store, fp8_grouped, block, fp8_wgrad
        if not ctx.needs_input_grad[1]:
            return grad_a, None, *none

        def weight_grad() -> torch.Tensor:  # (E, N, K)
            if ctx.fp8 is None:
                return wgrad(grad_out, a, offs)
            _, grouped_wgrad, block = ctx.fp8
            return fp8_grouped_weight_grad(grad_out, a, offs, block, grouped_wgrad).to(weight.dtype)

        return grad_a, weight_grad_now_or_later(ctx.store, ctx.weight, weight_grad), *none
