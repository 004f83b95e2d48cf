"""FP8 (E4M3) fine-grained quantisation, DeepSeek-V3 TR §3.3.

- activations: one scale per 1 x ``block`` tile along the reduction dim K (per token, per 128 channels);
- weights: one scale per ``block`` x ``block`` block;
- scales are *dequantisation multipliers* (``x ~= q * scale``), the same convention as the
  ``weight_scale_inv`` tensors of DeepSeek's FP8 checkpoint; online max-abs scaling, no delay.

The GEMMs take (q, scale) pairs. ``reference_fp8_gemm`` dequantises and multiplies in FP32: the
exact product an FP8 tensor-core GEMM with FP32 accumulation computes, up to summation order.

Hook for ``kernels`` (``ModelOptions.fp8_kernel="kernels"``, block 128 only): the dense GEMM is
``kernels.fp8_gemm.fp8_gemm(a, a_scale, b, b_scale, out_dtype)`` (same conventions as here);
the grouped GEMM is ``kernels.grouped_gemm.grouped_gemm_fp8(a, a_scale, b, b_scale, m_indices,
out_dtype)`` in DeepGEMM's contiguous layout (each expert's rows padded to 128, ``m_indices`` = row
expert or -1). ``contiguous_layout`` converts our ``offs`` rows to that layout and back.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
_MIN_AMAX = 1e-12  # an all-zero tile gets a tiny scale instead of 0/0

Fp8Gemm = Callable[..., torch.Tensor]


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    pad = (-x.shape[dim]) % multiple
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat((x, x.new_zeros(shape)), dim=dim)


def quantize_tiles(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (..., K) -> q: (..., K) E4M3, scale: (..., ceil(K/block)) FP32 with x ~= q * scale."""
    k = x.shape[-1]
    tiles = _pad_to(x.float(), -1, block).unflatten(-1, (-1, block))  # (..., K/b, b)
    scale = tiles.abs().amax(-1).clamp_min(_MIN_AMAX) / FP8_MAX  # (..., K/b)
    q = (tiles / scale[..., None]).to(FP8_DTYPE).flatten(-2)[..., :k]
    return q, scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of ``quantize_tiles`` (FP32)."""
    k = q.shape[-1]
    tiles = _pad_to(q.float(), -1, block).unflatten(-1, (-1, block))
    return (tiles * scale[..., None]).flatten(-2)[..., :k]


def quantize_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (..., N, K) -> q: (..., N, K) E4M3, scale: (..., ceil(N/b), ceil(K/b)) FP32."""
    n, k = w.shape[-2:]
    padded = _pad_to(_pad_to(w.float(), -1, block), -2, block)
    blocks = padded.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))  # (..., N/b, b, K/b, b)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp_min(_MIN_AMAX) / FP8_MAX  # (..., N/b, K/b)
    q = (blocks / scale[..., :, None, :, None]).to(FP8_DTYPE)
    return q.flatten(-2).flatten(-3, -2)[..., :n, :k], scale


def dequantize_blocks(
    q: torch.Tensor, scale: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(..., N, K) FP8 weight times its (..., ceil(N/b), ceil(K/b)) ``weight_scale_inv``."""
    n, k = q.shape[-2:]
    expected = (-(-n // block), -(-k // block))
    if tuple(scale.shape[-2:]) != expected:
        raise ValueError(f"weight_scale_inv shape {tuple(scale.shape)} does not match weight {tuple(q.shape)} "
                         f"with block={block} (expected {expected})")
    full = scale.float().repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :n, :k]
    return (q.float() * full).to(dtype)


def reference_fp8_gemm(a, a_scale, b, b_scale, out_dtype: torch.dtype, block: int = 128) -> torch.Tensor:
    """(M, K) x (N, K)^T from quantised operands, FP32 accumulation.

    ``b_scale`` is (ceil(N/b), ceil(K/b)) for a weight in blocks, or (N, ceil(K/b)) for an operand in
    1 x b tiles along K (the weight gradient's second operand); for N = 1 both mean the same.
    """
    rows = b_scale.shape[-2] == b.shape[-2]
    b_dq = dequantize_tiles(b, b_scale, block) if rows else dequantize_blocks(b, b_scale, block)
    return (dequantize_tiles(a, a_scale, block) @ b_dq.t()).to(out_dtype)


def reference_fp8_grouped_gemm(a, a_scale, b, b_scale, offs, out_dtype: torch.dtype, block: int = 128) -> torch.Tensor:
    """Rows a[offs[e-1]:offs[e]] times b[e]^T for each expert e; b: (E, N, K)."""
    from moeplan.model.grouped_mm import reference_grouped_mm  # local: grouped_mm imports nothing of fp8

    a_dq = dequantize_tiles(a, a_scale, block)
    b_dq = dequantize_blocks(b, b_scale, block).transpose(-2, -1)  # (E, K, N)
    return reference_grouped_mm(a_dq, b_dq, offs).to(out_dtype)


def reference_fp8_grouped_wgrad(a_t, a_t_scale, b_t, b_t_scale, seg_offsets, out_dtype: torch.dtype = torch.float32,
                                block: int = 128) -> torch.Tensor:
    """(E, N, K): per expert e, a_t[:, seg e] · b_t[:, seg e]^T; a_t (N, M), b_t (K, M) in 1 x b tiles along M.

    ``seg_offsets`` (E + 1,) are segment bounds on M, multiples of ``block``, so no tile spans two experts.
    """
    from moeplan.model.grouped_mm import reference_grouped_weight_grad

    end = int(seg_offsets[-1])
    a = dequantize_tiles(a_t, a_t_scale, block)[:, :end]
    b = dequantize_tiles(b_t, b_t_scale, block)[:, :end]
    return reference_grouped_weight_grad(a.t(), b.t(), seg_offsets[1:]).to(out_dtype)


def fp8_grouped_weight_grad(g: torch.Tensor, a: torch.Tensor, offs: torch.Tensor, block: int,
                            grouped_wgrad: Fp8Gemm) -> torch.Tensor:
    """FP8 weight gradient of a grouped linear, (E, N, K) FP32: per expert g_e^T a_e.

    The reduction runs over tokens, so both operands are quantised in tiles of ``block`` tokens (TR
    §3.3's 128 x 1 tiles for Wgrad). Each expert's rows are first padded to a multiple of ``block``
    (``contiguous_layout``) so that no tile mixes two experts' tokens under one scale.
    """
    dest, m_indices = contiguous_layout(offs, g.shape[0], block)
    rows = m_indices.numel()
    g_pad = g.new_zeros(rows, g.shape[1]).index_copy(0, dest, g)
    a_pad = a.new_zeros(rows, a.shape[1]).index_copy(0, dest, a)
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())
    bounds = torch.cat((counts.new_zeros(1), ((counts + block - 1) // block * block).cumsum(0))).to(torch.int32)
    gq, gs = quantize_tiles(g_pad.t(), block)  # (N, rows), tiles of `block` tokens
    aq, a_s = quantize_tiles(a_pad.t(), block)  # (K, rows)
    return grouped_wgrad(gq, gs, aq, a_s, bounds, out_dtype=torch.float32)


def contiguous_layout(offs: torch.Tensor, num_rows: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by ``offs`` -> (destination row of each row (M,), m_indices (M_pad,) int32).

    Each expert's segment starts at a multiple of ``tile``; padding rows get m_indices = -1.
    """
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())  # (E,)
    padded = (counts + tile - 1) // tile * tile
    pad_start = padded.cumsum(0) - padded
    expert = torch.repeat_interleave(torch.arange(len(offs), device=offs.device), counts, output_size=num_rows)
    slot = torch.arange(num_rows, device=offs.device) - (offs.long() - counts)[expert]
    dest = pad_start[expert] + slot
    m_indices = torch.full((max(int(padded.sum()), tile),), -1, dtype=torch.int32, device=offs.device)
    m_indices[dest] = expert.to(torch.int32)
    return dest, m_indices


def _grouped_via_contiguous(grouped_gemm_fp8: Fp8Gemm, tile: int) -> Fp8Gemm:
    """Adapt a contiguous-layout grouped FP8 GEMM to the ``offs`` convention used here."""

    def gemm(a, a_scale, b, b_scale, offs, out_dtype: torch.dtype, block: int = tile) -> torch.Tensor:
        assert block == tile, f"{block=} {tile=}"
        dest, m_indices = contiguous_layout(offs, a.shape[0], tile)
        a_pad = a.new_zeros((m_indices.numel(), a.shape[1])).view(torch.uint8)  # fp8 has no index_put
        a_pad[dest] = a.view(torch.uint8)
        s_pad = a_scale.new_ones((m_indices.numel(), a_scale.shape[1]))
        s_pad[dest] = a_scale
        out = grouped_gemm_fp8(a_pad.view(a.dtype), s_pad, b, b_scale, m_indices, out_dtype=out_dtype)
        return out[dest]

    return gemm


def resolve_fp8_grouped_wgrad(kernel: str, block: int = 128) -> Fp8Gemm:
    """The grouped FP8 weight-gradient GEMM for ``ModelOptions.fp8_kernel`` (``reference_fp8_grouped_wgrad``'s
    signature; the kernels' is ``kernels.grouped_gemm.grouped_wgrad_fp8``)."""
    if kernel == "reference":
        return lambda *args, out_dtype=torch.float32: reference_fp8_grouped_wgrad(*args, out_dtype=out_dtype, block=block)
    resolve_fp8_gemms(kernel, block)  # the same checks and error messages
    wgrad = importlib.import_module("moeplan.kernels.grouped_gemm").grouped_wgrad_fp8
    return lambda *args, out_dtype=torch.float32: wgrad(*args, out_dtype=out_dtype, backend="triton")


def resolve_fp8_gemms(kernel: str, block: int = 128) -> tuple[Fp8Gemm, Fp8Gemm]:
    """(dense gemm, grouped gemm) for ``ModelOptions.fp8_kernel``; both take ``block=`` and ``out_dtype=``."""
    if kernel == "reference":
        return reference_fp8_gemm, reference_fp8_grouped_gemm
    if kernel != "kernels":
        raise ValueError(f"fp8_kernel={kernel!r} must be 'reference' or 'kernels'")
    if block != 128:
        raise ValueError(f"fp8_kernel='kernels' supports fp8_block_size=128 only, got {block}")
    try:
        dense = importlib.import_module("moeplan.kernels.fp8_gemm").fp8_gemm
        grouped = importlib.import_module("moeplan.kernels.grouped_gemm").grouped_gemm_fp8
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"fp8_kernel='kernels' needs kernels.fp8_gemm.fp8_gemm and "
                         f"kernels.grouped_gemm.grouped_gemm_fp8 ({exc})") from exc

    def dense_gemm(a, a_scale, b, b_scale, out_dtype: torch.dtype, block: int = 128) -> torch.Tensor:
        # backend="triton": the kernels' torch._scaled_mm path gave wrong results for N > 128 with
        # 128x128 weight scales on an H200 (2026-11-28, rel. error ~200); "auto" may pick it.
        return dense(a, a_scale, b, b_scale, out_dtype=out_dtype, backend="triton")

    return dense_gemm, _grouped_via_contiguous(grouped, 128)
