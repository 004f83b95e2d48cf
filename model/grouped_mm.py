"""Grouped matmul for routed experts: rows sorted by expert, one weight matrix per expert.

Convention (``torch._grouped_mm``): a: (M, K) with the rows of expert e in
``a[offs[e-1]:offs[e]]``; b: (E, K, N); offs: (E,) int32 cumulative row counts; out: (M, N).

Backends:
- ``torch_grouped_mm``: ``torch._grouped_mm`` (CUDA grouped GEMM; a CPU fallback exists in recent
  torch). Needs 16-byte aligned row strides.
- ``reference_grouped_mm``: scatter rows into a zero-padded (E, max_rows, K) batch, one ``bmm``,
  gather back. No Python loop over experts; wastes (E * max_rows - M) rows of work.

Float math only: the autograd around it (BF16 or FP8, Wgrad now or later) is ``model.grouped_linear``,
and ``model.fp8``'s reference FP8 grouped GEMMs are these on dequantised operands.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _row_slots(offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For each sorted row up to the last segment's end: its expert and its position within that expert's
    segment. (Rows after ``offs[-1]``, a worst-case-sized layout's tail, belong to no expert.)"""
    num_rows = int(offs[-1]) if len(offs) else 0
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())  # (E,)
    expert = torch.repeat_interleave(torch.arange(len(offs), device=offs.device), counts, output_size=num_rows)
    starts = offs.long() - counts
    slot = torch.arange(num_rows, device=offs.device) - starts[expert]
    max_rows = int(counts.max()) if len(counts) else 0
    return expert, slot, max_rows


def reference_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Loop-free padded-batch grouped matmul; a: (M, K), b: (E, K, N) -> (M, N) (zero after ``offs[-1]``)."""
    expert, slot, max_rows = _row_slots(offs)
    padded = a.new_zeros(b.shape[0], max_rows, a.shape[1])  # (E, R, K)
    padded = padded.index_put((expert, slot), a[:len(expert)])
    out = torch.bmm(padded, b.to(a.dtype))  # (E, R, N)
    rows = out[expert, slot]
    if len(expert) == a.shape[0]:
        return rows
    return torch.cat((rows, rows.new_zeros(a.shape[0] - len(expert), rows.shape[1])))


def reference_grouped_weight_grad(a: torch.Tensor, g: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-expert a_e^T g_e; a: (M, K), g: (M, N) -> (E, K, N)."""
    expert, slot, max_rows = _row_slots(offs)
    num_experts, n = len(offs), len(expert)
    pa = a.new_zeros(num_experts, max_rows, a.shape[1]).index_put((expert, slot), a[:n])
    pg = g.new_zeros(num_experts, max_rows, g.shape[1]).index_put((expert, slot), g[:n])
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
