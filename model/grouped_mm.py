"""Grouped matmul for routed experts: rows sorted by expert, one weight matrix per expert.

Convention (``torch._grouped_mm``): a: (M, K) with the rows of expert e in
``a[offs[e-1]:offs[e]]``; b: (E, K, N); offs: (E,) int32 cumulative row counts; out: (M, N).

Backends:
- ``torch_grouped_mm``: ``torch._grouped_mm`` (CUDA grouped GEMM; a CPU fallback exists in recent
  torch). Needs 16-byte aligned row strides.
- ``reference_grouped_mm``: scatter rows into a zero-padded (E, max_rows, K) batch, one ``bmm``,
  gather back. No Python loop over experts; wastes (E * max_rows - M) rows of work.

``GroupedLinearFn`` wraps either (or an FP8 grouped GEMM from ``model.fp8``) with a backward that computes Dgrad always and Wgrad now or later
(``WeightGradStore``), so zero-bubble schedules can split the expert matmuls like dense ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeplan.model.fp8 import fp8_grouped_weight_grad, quantize_blocks, quantize_tiles
from moeplan.model.weight_grad import WeightGradStore, accumulate_grad

GroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _row_slots(offs: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For each sorted row: its expert and its position within that expert's segment."""
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())  # (E,)
    expert = torch.repeat_interleave(torch.arange(len(offs), device=offs.device), counts, output_size=num_rows)
    starts = offs.long() - counts
    slot = torch.arange(num_rows, device=offs.device) - starts[expert]
    max_rows = int(counts.max()) if len(counts) else 0
    return expert, slot, max_rows


def reference_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Loop-free padded-batch grouped matmul; a: (M, K), b: (E, K, N) -> (M, N)."""
    expert, slot, max_rows = _row_slots(offs, a.shape[0])
    padded = a.new_zeros(b.shape[0], max_rows, a.shape[1])  # (E, R, K)
    padded = padded.index_put((expert, slot), a)
    out = torch.bmm(padded, b.to(a.dtype))  # (E, R, N)
    return out[expert, slot]


def reference_grouped_weight_grad(a: torch.Tensor, g: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-expert a_e^T g_e; a: (M, K), g: (M, N) -> (E, K, N)."""
    expert, slot, max_rows = _row_slots(offs, a.shape[0])
    num_experts = len(offs)
    pa = a.new_zeros(num_experts, max_rows, a.shape[1]).index_put((expert, slot), a)
    pg = g.new_zeros(num_experts, max_rows, g.shape[1]).index_put((expert, slot), g)
    return torch.bmm(pa.transpose(1, 2), pg)


def torch_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


def torch_grouped_weight_grad(a: torch.Tensor, g: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a.t(), g, offs=offs)  # (K, M) x (M, N) -> (E, K, N)


def grouped_mm_supported(dtype: torch.dtype, *widths: int) -> bool:
    """Whether ``torch._grouped_mm`` exists and accepts rows of these widths (16-byte strides)."""
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return all((w * itemsize) % 16 == 0 for w in widths)


class GroupedLinearFn(torch.autograd.Function):
    """out = grouped(a, weight^T) with weight (E, N, K) in ``nn.Linear`` orientation."""

    @staticmethod
    def forward(ctx, a, weight, offs, use_torch: bool, store: WeightGradStore | None, fp8_grouped, block: int,
                fp8_wgrad=None):
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
        none = (None,) * 7
        if not ctx.needs_input_grad[1]:
            return grad_a, *none

        def weight_grad() -> torch.Tensor:  # (E, N, K)
            if ctx.fp8 is None:
                return wgrad(grad_out, a, offs)
            _, grouped_wgrad, block = ctx.fp8
            return fp8_grouped_weight_grad(grad_out, a, offs, block, grouped_wgrad).to(weight.dtype)

        if ctx.store is None:
            return grad_a, weight_grad(), *none[1:]
        param = ctx.weight
        ctx.store.defer(lambda: accumulate_grad(param, weight_grad()))
        return grad_a, *none
