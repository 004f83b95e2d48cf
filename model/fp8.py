"""FP8 (E4M3) fine-grained quantisation, DeepSeek-V3 TR §3.3.

- activations: one scale per 1 x ``block`` tile along the reduction dim K (per token, per 128 channels);
- weights: one scale per ``block`` x ``block`` block;
- scales are *dequantisation multipliers* (``x ~= q * scale``), the same convention as the
  ``weight_scale_inv`` tensors of DeepSeek's FP8 checkpoint; online max-abs scaling, no delay.

The GEMMs take (q, scale) pairs. ``reference_fp8_gemm`` dequantises and multiplies in FP32: the
exact product an FP8 tensor-core GEMM with FP32 accumulation computes, up to summation order.

Hook for ``kernels`` (``ModelOptions.fp8_kernel="kernels"``): the module ``kernels.fp8_gemm`` is
expected to provide, with the shapes and scale conventions above,
- ``fp8_gemm(a, a_scale, b, b_scale, out_dtype) -> (M, N)`` with a: (M, K), b: (N, K);
- ``fp8_grouped_gemm(a, a_scale, b, b_scale, offs, out_dtype) -> (M, N)`` with b: (E, N, K) and
  ``offs`` the int32 cumulative row counts per expert (``torch._grouped_mm`` convention).
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
    """(M, K) x (N, K)^T from quantised operands, FP32 accumulation."""
    return (dequantize_tiles(a, a_scale, block) @ dequantize_blocks(b, b_scale, block).t()).to(out_dtype)


def reference_fp8_grouped_gemm(a, a_scale, b, b_scale, offs, out_dtype: torch.dtype, block: int = 128) -> torch.Tensor:
    """Rows a[offs[e-1]:offs[e]] times b[e]^T for each expert e; b: (E, N, K)."""
    from model.grouped_mm import reference_grouped_mm  # local: grouped_mm imports nothing of fp8

    a_dq = dequantize_tiles(a, a_scale, block)
    b_dq = dequantize_blocks(b, b_scale, block).transpose(-2, -1)  # (E, K, N)
    return reference_grouped_mm(a_dq, b_dq, offs).to(out_dtype)


def resolve_fp8_gemms(kernel: str) -> tuple[Fp8Gemm, Fp8Gemm]:
    """(dense gemm, grouped gemm) for ``ModelOptions.fp8_kernel``."""
    if kernel == "reference":
        return reference_fp8_gemm, reference_fp8_grouped_gemm
    if kernel == "kernels":
        try:
            mod = importlib.import_module("kernels.fp8_gemm")
            return mod.fp8_gemm, mod.fp8_grouped_gemm
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"fp8_kernel='kernels' needs kernels.fp8_gemm.fp8_gemm/fp8_grouped_gemm ({exc})") from exc
    raise ValueError(f"fp8_kernel={kernel!r} must be 'reference' or 'kernels'")
