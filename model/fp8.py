"""FP8 (E4M3) fine-grained quantisation in the model, DeepSeek-V3 TR §3.3.

- activations: one scale per 1 x ``block`` tile along the reduction dim K (per token, per 128 channels);
- weights: one scale per ``block`` x ``block`` block;
- scales are *dequantisation multipliers* (``x ~= q * scale``), the same convention as the
  ``weight_scale_inv`` tensors of DeepSeek's FP8 checkpoint; online max-abs scaling, no delay.

The float quantisers and the dense reference GEMM are the kernels' torch references
(``kernels.fp8_quant.*_ref``, ``kernels.fp8_gemm.fp8_gemm_ref``), called with the model's two own
choices: any ``block`` (``ModelOptions.fp8_block_size``) and the amax floor ``MIN_AMAX``. The
reference GEMMs multiply dequantised operands in FP32: the product an FP8 tensor-core GEMM with
FP32 accumulation computes, up to summation order.

``Fp8Ops`` is how the FP8 layers quantise and multiply; ``resolve_fp8_ops`` builds it for
``ModelOptions.fp8_kernel``. "reference": the float quantisers and FP32 GEMMs above, any block.
"kernels" (block 128 only): the Triton quantisers (``quant_act_1x128``, the transposed 128x1
``quant_act_128x1_t`` for Wgrad, ``quant_act_both`` for both from one read, ``quant_weight_128x128``) with the
model's amax floor, the auto-dispatched dense GEMM (``kernels.fp8_gemm.fp8_gemm``: Triton, the Gluon kernel or
cuBLAS, timed per shape), and the grouped GEMM in DeepGEMM's contiguous layout (each expert's rows padded to 128,
``m_indices`` = row expert or -1; ``contiguous_layout`` converts our ``offs`` rows to it and back; the
routed experts' fused path, ``model.fused_experts``, keeps its rows in that layout from permute to combine).
Given the experts' row counts on the host (``host_counts``, one planned sync per MoE layer), the
grouped paths never wait for the GPU; on Hopper the fused path needs no counts at all (a worst-case-sized
plan, ``model.experts.GroupedExperts.counts_on_host``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import accumulate

import torch

from moeplan.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from moeplan.kernels.fp8_gemm_ws import runs_on as gluon_runs_on
from moeplan.kernels.fp8_quant import (
    FP8_DTYPE,
    FP8_MAX,
    TILE,
    dequant_blocks,
    dequant_rows,
    quant_act_1x128,
    quant_act_1x128_ref,
    quant_act_128x1_t,
    quant_act_both,
    quant_weight_128x128,
    quant_weight_128x128_ref,
    quant_weight_128x128_t,
)
from moeplan.kernels.grouped_gemm import grouped_gemm_fp8, grouped_wgrad_fp8
from moeplan.kernels.mla_backward import heads_quant_both, rope_backward_quant_both
from moeplan.kernels.moe_permute import moe_permute_quant_both
from moeplan.kernels.swiglu import swiglu_backward_quant_both
from moeplan.kernels.triton_compat import INTERPRET
from moeplan.model.grouped_mm import reference_grouped_mm, reference_grouped_weight_grad

__all__ = [  # FP8_DTYPE and FP8_MAX re-exported: the model's FP8 format is the kernels'
    "FP8_DTYPE",
    "FP8_MAX",
    "FP8_WEIGHT_CACHE",
    "MIN_AMAX",
    "Fp8Gemm",
    "Fp8Ops",
    "Fp8WeightCache",
    "clear_fp8_weight_cache",
    "contiguous_layout",
    "dequantize_blocks",
    "dequantize_tiles",
    "fp8_grouped_weight_grad",
    "kernel_ops",
    "quant_weight_fwd",
    "quantize_blocks",
    "quantize_tiles",
    "reference_fp8_gemm",
    "reference_fp8_grouped_gemm",
    "reference_fp8_grouped_wgrad",
    "reference_ops",
    "resolve_fp8_ops",
]

# An all-zero tile gets scale MIN_AMAX / 448 instead of 0/0. The kernels floor amax at 1e-4
# (DeepSeek's value); the model keeps 1e-12, so a tile of tiny gradients (max below 1e-4, common
# in an FP8 backward) keeps the full E4M3 resolution instead of being squeezed into subnormals.
MIN_AMAX = 1e-12

Fp8Gemm = Callable[..., torch.Tensor]


def quantize_tiles(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (..., K) -> q: (..., K) E4M3, scale: (..., ceil(K/block)) FP32 with x ~= q * scale."""
    return quant_act_1x128_ref(x, tile=block, amax_floor=MIN_AMAX)


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of ``quantize_tiles`` (FP32)."""
    return dequant_rows(q, scale, tile=block)


def quantize_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (..., N, K) -> q: (..., N, K) E4M3, scale: (..., ceil(N/b), ceil(K/b)) FP32."""
    return quant_weight_128x128_ref(w, tile=block, amax_floor=MIN_AMAX)


def dequantize_blocks(
    q: torch.Tensor, scale: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(..., N, K) FP8 weight times its (..., ceil(N/b), ceil(K/b)) ``weight_scale_inv``."""
    n, k = q.shape[-2:]
    expected = (-(-n // block), -(-k // block))
    if tuple(scale.shape[-2:]) != expected:
        raise ValueError(f"weight_scale_inv shape {tuple(scale.shape)} does not match weight {tuple(q.shape)} "
                         f"with block={block} (expected {expected})")
    return dequant_blocks(q, scale.float(), tile=block).to(dtype)  # checkpoints may store bf16 scales


def reference_fp8_gemm(a, a_scale, b, b_scale, out_dtype: torch.dtype, block: int = 128) -> torch.Tensor:
    """(M, K) x (N, K)^T from quantised operands, FP32 accumulation.

    ``b_scale`` is (ceil(N/b), ceil(K/b)) for a weight in blocks, or (N, ceil(K/b)) for an operand in
    1 x b tiles along K (the weight gradient's second operand); for N = 1 both mean the same.
    """
    return fp8_gemm_ref(a, a_scale, b, b_scale, dtype=torch.float32, tile=block).to(out_dtype)


def reference_fp8_grouped_gemm(a, a_scale, b, b_scale, offs, out_dtype: torch.dtype, block: int = 128) -> torch.Tensor:
    """Rows a[offs[e-1]:offs[e]] times b[e]^T for each expert e; b: (E, N, K).

    Not ``kernels.grouped_gemm.grouped_gemm_ref``: that one is a float64 test oracle on the
    contiguous layout; this one runs in training (``fp8_kernel="reference"``), on ``offs`` rows, in FP32.
    """
    a_dq = dequantize_tiles(a, a_scale, block)
    b_dq = dequantize_blocks(b, b_scale, block).transpose(-2, -1)  # (E, K, N)
    return reference_grouped_mm(a_dq, b_dq, offs).to(out_dtype)


def reference_fp8_grouped_wgrad(a_t, a_t_scale, b_t, b_t_scale, seg_offsets, out_dtype: torch.dtype = torch.float32,
                                block: int = 128) -> torch.Tensor:
    """(E, N, K): per expert e, a_t[:, seg e] · b_t[:, seg e]^T; a_t (N, M), b_t (K, M) in 1 x b tiles along M.

    ``seg_offsets`` (E + 1,) are segment bounds on M, multiples of ``block``, so no tile spans two experts.
    """
    end = int(seg_offsets[-1])
    a = dequantize_tiles(a_t, a_t_scale, block)[:, :end]
    b = dequantize_tiles(b_t, b_t_scale, block)[:, :end]
    return reference_grouped_weight_grad(a.t(), b.t(), seg_offsets[1:]).to(out_dtype)


def fp8_grouped_weight_grad(g: torch.Tensor, a: torch.Tensor, offs: torch.Tensor, ops: Fp8Ops,
                            host_counts: Sequence[int] | None = None,
                            out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 weight gradient of a grouped linear, (E, N, K) in ``out_dtype``: per expert g_e^T a_e, accumulated in
    FP32 by the GEMM and rounded once on its way out.

    The reduction runs over tokens, so both operands are quantised in tiles of ``block`` tokens (TR
    §3.3's 128 x 1 tiles for Wgrad). Each expert's rows are first padded to a multiple of ``block``
    (``contiguous_layout``) so that no tile mixes two experts' tokens under one scale.
    """
    block = ops.block
    dest, m_indices = contiguous_layout(offs, g.shape[0], block, host_counts)
    rows = m_indices.numel()
    g_pad = g.new_zeros(rows, g.shape[1]).index_copy(0, dest, g)
    a_pad = a.new_zeros(rows, a.shape[1]).index_copy(0, dest, a)
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())
    bounds = torch.cat((counts.new_zeros(1), ((counts + block - 1) // block * block).cumsum(0))).to(torch.int32)
    gq, gs = ops.quant_act_t(g_pad)  # (N, rows), tiles of `block` tokens
    aq, a_s = ops.quant_act_t(a_pad)  # (K, rows)
    return ops.grouped_wgrad(gq, gs, aq, a_s, bounds, out_dtype=out_dtype, host_counts=host_counts)


def contiguous_layout(offs: torch.Tensor, num_rows: int, tile: int,
                      host_counts: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by ``offs`` -> (destination row of each row (M,), m_indices (M_pad,) int32).

    Each expert's segment starts at a multiple of ``tile``; padding rows get m_indices = -1. The
    padded size comes from ``host_counts`` (rows per expert, on the host) when given, else from the
    GPU (a host sync).
    """
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())  # (E,)
    padded = (counts + tile - 1) // tile * tile
    pad_start = padded.cumsum(0) - padded
    expert = torch.repeat_interleave(torch.arange(len(offs), device=offs.device), counts, output_size=num_rows)
    slot = torch.arange(num_rows, device=offs.device) - (offs.long() - counts)[expert]
    dest = pad_start[expert] + slot
    total = sum(-(-int(n) // tile) * tile for n in host_counts) if host_counts is not None else int(padded.sum())
    m_indices = torch.full((max(total, tile),), -1, dtype=torch.int32, device=offs.device)
    m_indices[dest] = expert.to(torch.int32)
    return dest, m_indices


def _grouped_via_contiguous(grouped_gemm: Fp8Gemm, tile: int) -> Fp8Gemm:
    """Adapt a contiguous-layout grouped FP8 GEMM to the ``offs`` convention used here."""

    def gemm(a, a_scale, b, b_scale, offs, out_dtype: torch.dtype, host_counts: Sequence[int] | None = None):
        dest, m_indices = contiguous_layout(offs, a.shape[0], tile, host_counts)
        a_pad = a.new_zeros((m_indices.numel(), a.shape[1])).view(torch.uint8)  # fp8 has no index_put
        a_pad[dest] = a.view(torch.uint8)
        s_pad = a_scale.new_ones((m_indices.numel(), a_scale.shape[1]))
        s_pad[dest] = a_scale
        out = grouped_gemm(a_pad.view(a.dtype), s_pad, b, b_scale, m_indices, out_dtype=out_dtype, m_counts=host_counts)
        return out[dest]

    return gemm


@dataclass(frozen=True)
class Fp8Ops:
    """How the model's FP8 layers quantise and multiply (TR §3.3). Every GEMM takes (q, scale) pairs.

    - ``quant_act``: x (M, K) -> E4M3 (M, K), scales (M, ceil(K/block)): 1 x block tiles along K;
    - ``quant_act_t``: x (M, K) -> E4M3 of x^T (K, M), scales (K, ceil(M/block)): tiles of ``block``
      tokens, for the weight gradient, whose reduction runs over tokens;
    - ``quant_weight``: w ([E,] N, K) (any strides) -> E4M3, scales ([E,] ceil(N/b), ceil(K/b));
    - ``quant_act_both``: x (M, K) -> (``quant_act(x)``, ``quant_act_t(x)``) bit for bit, from one read of x, or
      None (the layers then call the two): a dense layer's input (forward GEMM, then Wgrad) and output gradient
      (Dgrad, then Wgrad) are each quantised both ways;
    - ``gemm(a, a_scale, b, b_scale, out_dtype)`` -> (M, N), b's scales in blocks or 1 x block rows;
    - ``grouped(a, a_scale, b, b_scale, offs, out_dtype, host_counts)``: rows of expert e times b[e]^T;
    - ``grouped_wgrad(a_t, a_t_scale, b_t, b_t_scale, seg_offsets, out_dtype, host_counts)``: per-expert
      a_t · b_t^T (segments padded to ``block``; ``host_counts``, the experts' rows on the host, or None);
    - ``grouped_contiguous(a, a_scale, b, b_scale, m_indices, out_dtype, host_counts)``: the grouped GEMM on
      rows already in the contiguous layout (``m_indices``), or None. Set, the routed experts run fused
      (``model.fused_experts``: permute with quantise, SwiGLU with quantise, weighted combine), and on a
      worst-case plan they pass its ``row_bound=`` to ``quant_act``, ``quant_act_t`` and ``quant_act_both`` (as
      the kernels' quantisers take it: the rows after it left unwritten);
    - ``permute_quant_both(x, plan, row_weights)``: ``quant_act_both`` of ``moe_permute(x, plan, row_weights=...)``
      bit for bit (the plan's ``row_bound`` passed on), the permuted rows possibly never stored
      (``kernels.moe_permute.moe_permute_quant_both``), or None: the combine's backward then permutes, then
      quantises;
    - ``swiglu_backward_quant_both(h, dact, row_bound=...)``: ``quant_act_both`` of
      ``kernels.swiglu.swiglu_backward(h, dact)`` bit for bit, d h possibly never stored
      (``kernels.swiglu.swiglu_backward_quant_both``), or None: the experts' backward then computes d h, then
      quantises it;
    - ``rope_backward_quant_both(dq, cos, sin, head, nope)`` and ``heads_quant_both(dk, dv, head, nope)``:
      ``quant_act_both`` of MLA's up-projections' output gradients from the attention's (``kernels.mla_backward``:
      RoPE's backward applied to d q, the heads' no-RoPE d k and d v put together), possibly never stored, or None:
      the attention (``model.attention``) then leaves that glue to autograd and the linears cast its output.
    """

    block: int
    quant_act: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    quant_act_t: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    quant_weight: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    gemm: Fp8Gemm
    grouped: Fp8Gemm
    grouped_wgrad: Fp8Gemm
    grouped_contiguous: Fp8Gemm | None = None
    quant_act_both: Callable[[torch.Tensor], tuple[tuple[torch.Tensor, torch.Tensor],
                                                   tuple[torch.Tensor, torch.Tensor]]] | None = None
    permute_quant_both: Callable[..., tuple[tuple[torch.Tensor, torch.Tensor],
                                            tuple[torch.Tensor, torch.Tensor]]] | None = None
    swiglu_backward_quant_both: Callable[..., tuple[tuple[torch.Tensor, torch.Tensor],
                                                    tuple[torch.Tensor, torch.Tensor]]] | None = None
    rope_backward_quant_both: Callable[..., tuple[tuple[torch.Tensor, torch.Tensor],
                                                  tuple[torch.Tensor, torch.Tensor]]] | None = None
    heads_quant_both: Callable[..., tuple[tuple[torch.Tensor, torch.Tensor],
                                          tuple[torch.Tensor, torch.Tensor]]] | None = None


def _reference_grouped(a, a_scale, b, b_scale, offs, out_dtype, host_counts=None, *, block):
    return reference_fp8_grouped_gemm(a, a_scale, b, b_scale, offs, out_dtype, block=block)


def _reference_grouped_wgrad(a_t, a_t_scale, b_t, b_t_scale, seg_offsets, out_dtype, host_counts=None, *, block):
    return reference_fp8_grouped_wgrad(a_t, a_t_scale, b_t, b_t_scale, seg_offsets, out_dtype, block=block)


def _reference_act_both(x: torch.Tensor, *, block: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    return quantize_tiles(x, block), quantize_tiles(x.t(), block)


def reference_ops(block: int = 128) -> Fp8Ops:
    """The float quantisers and FP32 GEMMs: the model's reference FP8, any block size."""
    return Fp8Ops(
        block=block,
        quant_act=partial(quantize_tiles, block=block),
        quant_act_t=lambda x: quantize_tiles(x.t(), block),
        quant_weight=partial(quantize_blocks, block=block),
        gemm=lambda a, a_scale, b, b_scale, out_dtype: reference_fp8_gemm(a, a_scale, b, b_scale, out_dtype, block),
        grouped=partial(_reference_grouped, block=block),
        grouped_wgrad=partial(_reference_grouped_wgrad, block=block),
        quant_act_both=partial(_reference_act_both, block=block),
    )


def tensor_key(t: torch.Tensor) -> tuple:
    """A cache key for what ``t`` views: storage address, dtype, device, shape and strides. An entry under it is
    still valid while ``storage_owner(t)`` is the tensor it was made from and ``t._version`` is unchanged."""
    return (t.data_ptr(), t.dtype, t.device, tuple(t.shape), tuple(t.stride()))


def storage_owner(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns ``t``'s storage: ``t``, or the base it is a view of."""
    return t if t._base is None else t._base


class Fp8WeightCache:
    """The FP8 copy of each weight, made once per weight version instead of on every GEMM call.

    A run quantises each weight once per optimizer step, however many micro-batches its forward and
    backward passes run (TR §3.3 quantises weights per 128x128 block; the blocks only change when the
    optimizer writes). An entry is keyed by the weight's storage, shape and strides and is valid while the
    tensor it was made from is alive and its version counter (bumped by every in-place write under
    autograd) is unchanged. Writes that bypass the counter (``.data``, a collective filling a flat buffer)
    are why the runtime also calls ``clear`` after every optimizer step.

    The transposed weight the input gradient multiplies, W^T in 128x128 blocks, holds W's blocks with the
    same scales (square blocks aligned at 0 hold the same elements either way), so ``quantise_t`` makes it
    from W read in its own layout, storing each block transposed (a strided read of W^T, or an FP8
    transpose copy afterwards, ran 2-3x slower on an H100: 44.6 ms for 40 copies in one step).
    """

    def __init__(self, quantise: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 quantise_t: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 quantise_both: Callable[[torch.Tensor], tuple[tuple, tuple]] | None = None) -> None:
        self.quantise, self.quantise_t, self.quantise_both = quantise, quantise_t, quantise_both
        self._entries: dict[tuple, tuple[weakref.ref, int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.misses = 0

    def clear(self) -> None:
        self._entries.clear()

    def _lookup(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        hit = self._entries.get(tensor_key(w))
        if hit is not None and hit[0]() is storage_owner(w) and hit[1] == w._version:
            return hit[2]
        return None

    def _store(self, w: torch.Tensor, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._entries[tensor_key(w)] = (weakref.ref(storage_owner(w)), w._version, value)

    def __call__(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value = self._lookup(w)
        if value is not None:
            return value
        self.misses += 1
        if self.quantise_t is not None and w.dim() >= 2 and not w.is_contiguous() and w.mT.is_contiguous():
            value = self.quantise_t(w.mT)  # W^T from W, read in W's own layout
        else:
            value = self.quantise(w)
        self._store(w, value)
        return value

    def with_transpose(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W's FP8 copy, for a layer whose backward will also multiply W^T: on a miss both are made in one
        pass over W (``quantise_both``), and W^T's waits in the cache for the backward's ``self(w.mT)``. W is
        then read once per optimizer step instead of twice."""
        value = self._lookup(w)
        if value is not None:
            return value
        if self.quantise_both is None or w.dim() < 2 or not w.is_contiguous():
            return self(w)
        self.misses += 1
        value, value_t = self.quantise_both(w)
        self._store(w, value)
        self._store(w.mT, value_t)
        return value


def _kernel_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale, _ = quant_weight_128x128(w, amax_floor=MIN_AMAX)
    return q, scale


def _kernel_weight_t(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_weight_128x128_t(w, amax_floor=MIN_AMAX)


def _kernel_weight_both(w: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    q, scale, qt = quant_weight_128x128(w, transposed=True, amax_floor=MIN_AMAX)
    return (q, scale), (qt, scale.mT.contiguous())


# The kernels' FP8 weights, shared by every layer built with ``kernel_ops``; ``clear_fp8_weight_cache``
# after each optimizer step (``model.runtime.rank``), and between timed steps of a benchmark that stands
# for one micro-batch per optimizer step.
FP8_WEIGHT_CACHE = Fp8WeightCache(_kernel_weight, _kernel_weight_t, _kernel_weight_both)


def quant_weight_fwd(ops: Fp8Ops, w: torch.Tensor, backward_too: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's FP8 weight; with ``backward_too`` (an FP8 Dgrad will multiply W^T) and the kernels' cache,
    W^T's blocks are made in the same pass (``Fp8WeightCache.with_transpose``)."""
    if backward_too and isinstance(ops.quant_weight, Fp8WeightCache):
        return ops.quant_weight.with_transpose(w)
    return ops.quant_weight(w)


def clear_fp8_weight_cache() -> None:
    FP8_WEIGHT_CACHE.clear()


def _kernel_grouped_contiguous(a, a_scale, b, b_scale, m_indices, out_dtype, host_counts=None):
    return grouped_gemm_fp8(a, a_scale, b, b_scale, m_indices, out_dtype=out_dtype, backend="auto", m_counts=host_counts)


def _kernel_grouped_wgrad(a_t, a_t_scale, b_t, b_t_scale, seg_offsets, out_dtype, host_counts=None):
    """On a Hopper GPU: the Gluon kernel's K-grouped mode, every expert in one launch, the segment bounds read on
    the GPU (``kernels.fp8_gemm_ws.fp8_wgrad_ws``). Elsewhere on a GPU with the experts' rows on the host: one
    cuBLAS block-scaled GEMM per expert, sliced at host segment bounds (a CPU ``seg_offsets``: nothing reads the
    GPU). The Triton K-grouped kernel otherwise; it ran at about 60 TFLOPS at V3's expert shapes on an H100
    (docs/design/model.md)."""
    if a_t.shape[0] % TILE == 0 and gluon_runs_on(a_t.device):
        return grouped_wgrad_fp8(a_t, a_t_scale, b_t, b_t_scale, seg_offsets, out_dtype, backend="gluon")
    if host_counts is None or not a_t.is_cuda or INTERPRET:
        return grouped_wgrad_fp8(a_t, a_t_scale, b_t, b_t_scale, seg_offsets, out_dtype, backend="triton")
    padded = [-(-int(n) // TILE) * TILE for n in host_counts]
    bounds = torch.tensor([0, *accumulate(padded)], dtype=torch.int32)  # on the host
    return grouped_wgrad_fp8(a_t, a_t_scale, b_t, b_t_scale, bounds, out_dtype, backend="torch")


def kernel_ops() -> Fp8Ops:
    """Our Triton quantisers and the auto-dispatched GEMMs (block 128); the grouped weight gradient per
    expert on cuBLAS where the experts' rows are on the host, else on the Triton K-grouped kernel."""
    return Fp8Ops(
        block=128,
        quant_act=partial(quant_act_1x128, amax_floor=MIN_AMAX),
        quant_act_t=partial(quant_act_128x1_t, amax_floor=MIN_AMAX),
        quant_weight=FP8_WEIGHT_CACHE,
        gemm=partial(fp8_gemm, backend="auto"),
        grouped=_grouped_via_contiguous(partial(grouped_gemm_fp8, backend="auto"), 128),
        grouped_wgrad=_kernel_grouped_wgrad,
        grouped_contiguous=_kernel_grouped_contiguous,
        quant_act_both=partial(quant_act_both, amax_floor=MIN_AMAX),
        permute_quant_both=partial(moe_permute_quant_both, amax_floor=MIN_AMAX),
        swiglu_backward_quant_both=partial(swiglu_backward_quant_both, amax_floor=MIN_AMAX),
        rope_backward_quant_both=partial(rope_backward_quant_both, amax_floor=MIN_AMAX),
        heads_quant_both=partial(heads_quant_both, amax_floor=MIN_AMAX),
    )


def resolve_fp8_ops(kernel: str, block: int = 128) -> Fp8Ops:
    """``Fp8Ops`` for ``ModelOptions.fp8_kernel``: "reference" (any block) or "kernels" (block 128)."""
    if kernel not in ("reference", "kernels"):
        raise ValueError(f"fp8_kernel={kernel!r} must be 'reference' or 'kernels'")
    if kernel == "kernels" and block != 128:
        raise ValueError(f"fp8_kernel='kernels' supports fp8_block_size=128 only, got {block}")
    return reference_ops(block) if kernel == "reference" else kernel_ops()
