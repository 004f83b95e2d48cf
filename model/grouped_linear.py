"""The autograd function of the routed experts' grouped matmuls: BF16 or FP8, Wgrad now or later.

The grouped twin of ``model.linear.LinearFn``: Dgrad always, Wgrad now or queued on a
``WeightGradStore``, so zero-bubble schedules split the expert matmuls like the dense ones. The
float math is ``model.grouped_mm``; the FP8 quantisation and GEMMs are ``model.fp8``'s ``Fp8Ops``.
``host_counts`` (rows per expert on the host, or None) lets the FP8 paths size the contiguous layout
without waiting for the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moeplan.model.fp8 import Fp8Ops, fp8_grouped_weight_grad, quant_weight_fwd
from moeplan.model.grouped_mm import (
    reference_grouped_mm,
    reference_grouped_weight_grad,
    torch_grouped_mm,
    torch_grouped_weight_grad,
)
from moeplan.model.weight_grad import WeightGradStore, weight_grad_now_or_later, wgrad_dtype


class GroupedLinearFn(torch.autograd.Function):
    """out = grouped(a, weight^T) with weight (E, N, K) in ``nn.Linear`` orientation.

    ``fp8`` None = the float grouped matmul (``use_torch``: ``torch._grouped_mm``, else the
    padded-bmm reference); an ``Fp8Ops`` = quantised forward, and with ``fp8_backward`` an FP8
    backward too (TR §3.3), else a straight-through backward in the float dtype.
    """

    @staticmethod
    def forward(ctx, a, weight, offs, use_torch: bool, store: WeightGradStore | None, fp8: Fp8Ops | None,
                fp8_backward: bool = False, host_counts: Sequence[int] | None = None):
        ctx.save_for_backward(a, weight, offs)
        ctx.use_torch, ctx.store, ctx.weight, ctx.host_counts = use_torch, store, weight, host_counts
        ctx.fp8 = fp8 if fp8_backward else None
        if fp8 is not None:
            aq, a_scale = fp8.quant_act(a)
            wq, w_scale = quant_weight_fwd(fp8, weight, fp8_backward)  # per expert (E, N/b, K/b)
            # out in the weight's dtype: an FP32 input (the SwiGLU product) still gives a BF16 output and gradient
            return fp8.grouped(aq, a_scale, wq, w_scale, offs, out_dtype=weight.dtype, host_counts=host_counts)
        mm = torch_grouped_mm if use_torch else reference_grouped_mm
        return mm(a, weight.transpose(1, 2), offs)  # (M, N)

    @staticmethod
    def backward(ctx, grad_out):
        a, weight, offs = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        mm = torch_grouped_mm if ctx.use_torch else reference_grouped_mm
        wgrad = torch_grouped_weight_grad if ctx.use_torch else reference_grouped_weight_grad
        fp8 = ctx.fp8
        grad_a = None
        if ctx.needs_input_grad[0]:
            if fp8 is None:
                grad_a = mm(grad_out, weight, offs)  # (M, K)
            else:  # Dgrad: grad rows in 1x128 tiles times each expert's W^T (K, N) in blocks
                wt, wt_scale = fp8.quant_weight(weight.transpose(1, 2))
                gq, gs = fp8.quant_act(grad_out)
                grad_a = fp8.grouped(gq, gs, wt, wt_scale, offs, out_dtype=grad_out.dtype, host_counts=ctx.host_counts)
        none = (None,) * 6  # offs, use_torch, store, fp8, fp8_backward, host_counts
        if not ctx.needs_input_grad[1]:
            return grad_a, None, *none

        def weight_grad() -> torch.Tensor:  # (E, N, K)
            if fp8 is None:
                return wgrad(grad_out, a.to(grad_out.dtype), offs)
            return fp8_grouped_weight_grad(grad_out, a, offs, fp8, ctx.host_counts, out_dtype=wgrad_dtype(weight))

        return grad_a, weight_grad_now_or_later(ctx.store, ctx.weight, weight_grad), *none
