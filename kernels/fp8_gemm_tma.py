"""Block-scaled FP8 GEMM for Hopper: TMA loads, persistent tiles, one FFMA of promotion per element.

The same product as ``fp8_gemm.py`` (``C = (A·sa) · (B·sb)ᵀ``, FP32 promotion every 128 of K), built
the way Hopper wants it:

* operands arrive through tensor descriptors (TMA): no address arithmetic in the main loop, and
  ragged M / N / K edges come back zero-filled, so no masks or wrapped rows either;
* a persistent grid of at most one program per SM walks the output tiles in L2-friendly groups
  (the tiles of one ``GROUP_M`` band share their B columns), so the epilogue of one tile overlaps
  the next tile's first loads;
* with 128×128 weight blocks and ``BLOCK_N`` dividing 128, B's scale is one number per tile and K
  step, folded into A's row scales before the promotion: ``acc = fma(partial, sa·sb, acc)`` is one
  FFMA per accumulator element, where the general kernel spends two multiplies and an add.

Weights with 1×128 row scales (the weight gradient's ``xᵀ``) take the per-column path. Grouped modes
stay in ``fp8_gemm.py``; ``fp8_gemm(..., backend="auto")`` times this kernel against the others.
"""

import torch

from .fp8_quant import row_scaled
from .triton_compat import INTERPRET, INTERPRET_C, cdiv, tl, triton

TILE = 128
TILE_C = tl.constexpr(TILE)  # a global read inside a kernel must be a constexpr


@triton.jit
def _fp8_gemm_tma_kernel(
    a_desc, b_desc, c_desc, sa_ptr, sb_ptr,
    M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk,
    SB_DIV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    DEFER: tl.constexpr,
):
    # Step 1: this program's share of the tiles, and the L2 grouping of a tile id (tutorial 03).
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_steps = tl.cdiv(K, BLOCK_K)
    tiles_per_band = GROUP_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        band = tile // tiles_per_band
        first_m = band * GROUP_M
        band_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % tiles_per_band) % band_rows
        pid_n = (tile % tiles_per_band) // band_rows
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        sa_ptrs = sa_ptr + offs_m * stride_sam
        sb_ptrs = sb_ptr + (offs_n // SB_DIV) * stride_sbn
        sb_block_ptr = sb_ptr + (off_n // TILE_C) * stride_sbn

        # Step 2: main loop; each 128-deep partial product is promoted into the fp32 accumulator.
        # DEFER promotes step k-1's partial after issuing step k's MMA, so the FFMAs can overlap it.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        prev = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s_prev = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for ki in range(k_steps):
            off_k = ki * BLOCK_K
            a = a_desc.load([off_m, off_k])
            b = b_desc.load([off_n, off_k])
            if INTERPRET_C:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            sa = tl.load(sa_ptrs + ki * stride_sak, mask=offs_m < M, other=0.0)
            partial = tl.dot(a, b.T)
            if SB_DIV == TILE_C and BLOCK_N <= TILE_C:
                # one 128x128 weight block per (tile, k step): fold its scale into the row scales
                s = sa * tl.load(sb_block_ptr + ki * stride_sbk)
                if DEFER:
                    acc = prev * s_prev[:, None] + acc
                    prev, s_prev = partial, s
                else:
                    acc = partial * s[:, None] + acc
            else:
                sb = tl.load(sb_ptrs + ki * stride_sbk, mask=offs_n < N, other=0.0)
                acc = partial * (sa[:, None] * sb[None, :]) + acc
        if DEFER:
            acc = prev * s_prev[:, None] + acc

        # Step 3: epilogue through TMA (rows / columns past M / N are clipped by the descriptor).
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


# (BLOCK_M, BLOCK_N, num_warps, num_stages, FLATTEN, WARP_SPECIALIZE, DEFER, GROUP_M, programs per SM);
# the default is the first (measured on the H200: docs/results/kernels-sweep.md).
CONFIGS = [
    (128, 128, 8, 4, False, False, False, 8, 1),
]


def _num_sms(device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def fp8_gemm_tma(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, config=None) -> torch.Tensor:
    """C (M, N) = (a·a_scale)(b·b_scale)ᵀ; a (M, K), b (N, K) E4M3 with K contiguous (TMA needs 16-byte rows).

    a_scale (M, ceil(K/128)) fp32, any strides; b_scale (ceil(N/128), ceil(K/128)) blocks or
    (N, ceil(K/128)) rows. ``config``: one tuple like those in ``CONFIGS`` (benchmarks sweep it).
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N = b.shape[0]
    if a.stride(1) != 1 or b.stride(1) != 1 or K % 16:
        raise ValueError(f"TMA needs K-contiguous operands with K % 16 == 0, got K={K} "
                         f"a.stride={a.stride()} b.stride={b.stride()}")
    block_m, block_n, warps, stages, flatten, ws, defer, group_m, per_sm = config or CONFIGS[0]
    if INTERPRET:
        block_m, block_n, warps, stages = min(block_m, 32), min(block_n, 32), 4, 1
    sb_div = 1 if row_scaled(N, b_scale) else TILE
    # TMA rows must be 16-byte aligned: a ragged N gets a padded row pitch (the view hides it)
    pitch = cdiv(N * out_dtype.itemsize, 16) * 16 // out_dtype.itemsize
    c = torch.empty((M, pitch), dtype=out_dtype, device=a.device)[:, :N]
    a_desc = TensorDescriptor.from_tensor(a, [block_m, TILE])
    b_desc = TensorDescriptor.from_tensor(b, [block_n, TILE])
    c_desc = TensorDescriptor.from_tensor(c, [block_m, block_n])
    tiles = cdiv(M, block_m) * cdiv(N, block_n)
    programs = min(tiles, per_sm * _num_sms(a.device))
    _fp8_gemm_tma_kernel[(programs,)](
        a_desc, b_desc, c_desc, a_scale, b_scale,
        M, N, K, a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
        SB_DIV=sb_div, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=TILE, GROUP_M=group_m,
        NUM_PROGRAMS=programs, FLATTEN=flatten, WARP_SPECIALIZE=ws, DEFER=defer,
        num_warps=warps, num_stages=stages,
    )
    return c
