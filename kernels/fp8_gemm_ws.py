"""Block-scaled FP8 GEMM for Hopper in Gluon: a TMA producer warp and two math warpgroups that take
turns on the tensor cores (DeepSeek-V3 TR §3.3, "two warpgroups alternate MMA and promotion").

The same product as ``fp8_gemm.py`` and ``fp8_gemm_tma.py``: ``C = (A·sa) · (B·sb)ᵀ`` with the
tensor cores' partial sums promoted into FP32 registers every 128 elements of K. The Triton kernels
lose about a quarter of the tensor-core time on that promotion: each K step waits for its MMA, then
runs the FFMAs while the tensor cores idle, and every warp of the program does so in lock-step
(docs/kernels-sweep.md). Here the work is split by role, each role its own partition:

* a producer warp streams A (BLOCK_M x 128) and B (BLOCK_N x 128) tiles through a ring of
  ``STAGES`` shared-memory buffers with TMA, each buffer guarded by a ``ready`` barrier (the copy
  engine completes it) and an ``empty`` barrier (both math warpgroups release it);
* two math warpgroups own the upper and the lower 64 rows of the output tile. Each issues its
  128-deep MMA, waits for it, releases the buffer and promotes, with nothing tying it to the other
  warpgroup, so one promotes on the CUDA cores while the other's MMA runs on the tensor cores;
* the grid is persistent (one program per SM, tiles in L2-friendly bands of ``GROUP_M`` row tiles)
  and each warpgroup stores its half of the tile through TMA while its next tile's MMAs start.

B's scales are 128x128 blocks (a weight: one number per tile and K step, folded into A's row
scales, so the promotion is one FFMA per element) or 1x128 rows (an activation, for the weight
gradient: a scale per column). Gluon compiles for Hopper only: there is no interpreter path, so
the CPU tests compile this kernel for sm_90 offline and read its PTX and register report.
"""

import torch

from .triton_compat import INTERPRET, triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except ImportError:  # CPU torch without triton, or a triton before Gluon's Hopper ops
    HAVE_GLUON = False

TILE = 128  # K step and scale block (TR §3.3: N_C = 128)
ROWS_PER_WARPGROUP = 64  # one wgmma's M
# (BLOCK_N, STAGES, GROUP_M, PINGPONG); the default is the first (docs/kernels-sweep.md)
CONFIGS = [(128, 5, 16, False), (128, 5, 16, True), (128, 4, 16, True), (128, 6, 16, True), (128, 5, 8, True), (128, 5, 8, False)]
PRODUCER_REGS = 40  # registers per thread the TMA warp keeps; the math warpgroups share the rest
MATH_REGS = 232


if HAVE_GLUON:

    TILE_C = gl.constexpr(TILE)  # globals read inside a kernel must be constexprs
    ROWS_C = gl.constexpr(ROWS_PER_WARPGROUP)
    MATH_REGS_C = gl.constexpr(MATH_REGS)
    PRODUCER_REGS_C = gl.constexpr(PRODUCER_REGS)

    @gluon.jit
    def _tile_offsets(tile, num_pid_m, num_pid_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      GROUP_M: gl.constexpr):
        """Row and column offset of output tile ``tile``: bands of GROUP_M row tiles share B (tutorial 03)."""
        tiles_per_band = GROUP_M * num_pid_n
        band = tile // tiles_per_band
        first_m = band * GROUP_M
        band_rows = gl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % tiles_per_band) % band_rows
        pid_n = (tile % tiles_per_band) // band_rows
        return pid_m * BLOCK_M, pid_n * BLOCK_N

    @gluon.jit
    def _producer(a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr):
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, TILE_C)
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        counter = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
            for ki in range(k_steps):
                s = counter % STAGES
                # a fresh barrier counts as released once: the first pass over the ring waits on nothing
                mbarrier.wait(empty.index(s), ((counter // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), nbytes)
                tma.async_copy_global_to_shared(a_desc, [off_m, ki * TILE_C], ready.index(s), a_smem.index(s))
                tma.async_copy_global_to_shared(b_desc, [off_n, ki * TILE_C], ready.index(s), b_smem.index(s))
                counter += 1

    @gluon.jit
    def _math(c_desc, a_smem, b_smem, c_smem, ready, empty, turn, sa_ptr, sb_ptr, M, N, K,
              stride_sam, stride_sak, stride_sbn, stride_sbk, HALF: gl.constexpr, ROW_SCALED_B: gl.constexpr,
              PINGPONG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr):
        ROWS: gl.constexpr = ROWS_C
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                     instr_shape=[16, BLOCK_N, 32])
        row_layout: gl.constexpr = gl.SliceLayout(1, layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, layout)
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, TILE_C)
        partial = gl.zeros([ROWS, BLOCK_N], gl.float32, layout)
        counter = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            off_m, off_n = _tile_offsets(tile, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
            off_m = off_m + HALF * ROWS
            offs_m = off_m + gl.arange(0, ROWS, layout=row_layout)
            sa_ptrs = sa_ptr + offs_m * stride_sam
            m_mask = offs_m < M
            if ROW_SCALED_B:
                offs_n = off_n + gl.arange(0, BLOCK_N, layout=col_layout)
                sb_ptrs = sb_ptr + offs_n * stride_sbn
                n_mask = offs_n < N
            else:
                sb_ptrs = sb_ptr + (off_n // TILE_C) * stride_sbn
            acc = gl.zeros([ROWS, BLOCK_N], gl.float32, layout)
            for ki in range(k_steps):
                # the scales' loads go out before the wait, so their latency hides behind it (a
                # column's scales, 32 registers a thread, wait until the MMA has its registers back)
                sa = gl.load(sa_ptrs + ki * stride_sak, mask=m_mask, other=0.0)
                if not ROW_SCALED_B:
                    sb = gl.load(sb_ptrs + ki * stride_sbk)
                s = counter % STAGES
                mbarrier.wait(ready.index(s), (counter // STAGES) & 1)
                a = a_smem.index(s).slice(HALF * ROWS, ROWS)  # (ROWS, 128), K contiguous
                b = b_smem.index(s).permute((1, 0))  # (128, BLOCK_N), K-major as FP8 wgmma needs
                if PINGPONG:  # wait for the other warpgroup to have issued its MMA of the step before
                    mbarrier.wait(turn.index(HALF), (counter & 1) ^ (1 - HALF))
                partial = warpgroup_mma(a, b, partial, use_acc=False, is_async=True)
                if PINGPONG:
                    mbarrier.arrive(turn.index(1 - HALF), count=1)
                partial = warpgroup_mma_wait(num_outstanding=0, deps=[partial])
                mbarrier.arrive(empty.index(s), count=1)
                if ROW_SCALED_B:
                    sb = gl.load(sb_ptrs + ki * stride_sbk, mask=n_mask, other=0.0)
                # promotion: the 128-deep partial sum, scaled, into the FP32 accumulator
                if ROW_SCALED_B:
                    acc = partial * (sa[:, None] * sb[None, :]) + acc
                else:
                    acc = partial * (sa * sb)[:, None] + acc
                counter += 1
            # epilogue: the previous tile's store must have left c_smem before it is overwritten
            tma.store_wait(pendings=0)
            c_smem.store(acc.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _fp8_gemm_ws_kernel(
        a_desc, b_desc, c_desc, sa_ptr, sb_ptr, M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk,
        ROW_SCALED_B: gl.constexpr, PINGPONG: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
    ):
        BLOCK_M: gl.constexpr = 2 * ROWS_C
        a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, TILE_C], a_desc.layout)
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, TILE_C], b_desc.layout)
        c_smem = gl.allocate_shared_memory(c_desc.dtype, [2, ROWS_C, BLOCK_N], c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrival per math warpgroup
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        fence_async_shared()
        gl.warp_specialize([
            (_math, (c_desc, a_smem, b_smem, c_smem.index(0), ready, empty, turn, sa_ptr, sb_ptr, M, N, K, stride_sam,
                     stride_sak, stride_sbn, stride_sbk, 0, ROW_SCALED_B, PINGPONG, BLOCK_M, BLOCK_N, GROUP_M, STAGES)),
            (_math, (c_desc, a_smem, b_smem, c_smem.index(1), ready, empty, turn, sa_ptr, sb_ptr, M, N, K, stride_sam,
                     stride_sak, stride_sbn, stride_sbk, 1, ROW_SCALED_B, PINGPONG, BLOCK_M, BLOCK_N, GROUP_M, STAGES)),
            (_producer, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, BLOCK_M, BLOCK_N, GROUP_M, STAGES)),
        ], [4, 1], [MATH_REGS_C, PRODUCER_REGS_C])


def fp8_gemm_ws(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, config=None) -> torch.Tensor:
    """C (M, N) = (a·a_scale)(b·b_scale)ᵀ on Hopper; a (M, K), b (N, K) E4M3 with K contiguous.

    a_scale (M, ceil(K/128)) fp32, any strides; b_scale (ceil(N/128), ceil(K/128)) for 128x128
    blocks or (N, ceil(K/128)) for 1x128 rows. ``config``: one tuple like those in ``CONFIGS``.
    """
    if not HAVE_GLUON or INTERPRET or not a.is_cuda:
        raise RuntimeError("fp8_gemm_ws needs Triton's Gluon on a Hopper GPU (no interpreter path)")
    M, K = a.shape
    N = b.shape[0]
    if a.stride(1) != 1 or b.stride(1) != 1 or K % 16:
        raise ValueError(f"TMA needs K-contiguous operands with K % 16 == 0, got K={K} "
                         f"a.stride={a.stride()} b.stride={b.stride()}")
    block_n, stages, group_m, pingpong = config or CONFIGS[0]
    row_scaled = b_scale.shape[0] == N and N > 1
    if not row_scaled and block_n != TILE:
        raise ValueError(f"128x128 weight scales need BLOCK_N={TILE}, got config={config}")
    # TMA rows must be 16-byte aligned: a ragged N gets a padded row pitch (the view hides it)
    pitch = triton.cdiv(N * out_dtype.itemsize, 16) * 16 // out_dtype.itemsize
    c = torch.empty((M, pitch), dtype=out_dtype, device=a.device)[:, :N]
    fp8, out_gl = gl.float8e4nv, {torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}[out_dtype]
    a_desc = TensorDescriptor.from_tensor(a, [2 * ROWS_PER_WARPGROUP, TILE],
                                          gl.NVMMASharedLayout.get_default_for([2 * ROWS_PER_WARPGROUP, TILE], fp8))
    b_desc = TensorDescriptor.from_tensor(b, [block_n, TILE], gl.NVMMASharedLayout.get_default_for([block_n, TILE], fp8))
    c_desc = TensorDescriptor.from_tensor(c, [ROWS_PER_WARPGROUP, block_n],
                                          gl.NVMMASharedLayout.get_default_for([ROWS_PER_WARPGROUP, block_n], out_gl))
    # as many ring stages as shared memory holds beside the two output halves (FP32 output takes twice BF16's)
    props = torch.cuda.get_device_properties(a.device)
    smem = getattr(props, "shared_memory_per_block_optin", 232448) - 1024  # barriers and alignment
    stage_bytes = (2 * ROWS_PER_WARPGROUP + block_n) * TILE
    stages = min(stages, (smem - 2 * ROWS_PER_WARPGROUP * block_n * out_dtype.itemsize) // stage_bytes)
    tiles = triton.cdiv(M, 2 * ROWS_PER_WARPGROUP) * triton.cdiv(N, block_n)
    _fp8_gemm_ws_kernel[(min(tiles, props.multi_processor_count),)](
        a_desc, b_desc, c_desc, a_scale, b_scale, M, N, K,
        a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
        ROW_SCALED_B=row_scaled, PINGPONG=pingpong, BLOCK_N=block_n, GROUP_M=group_m, STAGES=stages, num_warps=4,
    )
    return c


def compile_offline(config=None, row_scaled=False, out_dtype=torch.bfloat16, capability: int = 90):
    """Compile the kernel for ``sm_{capability}`` without a GPU; returns Triton's compiled kernel
    (``.asm["ptx"]``, ``.n_regs`` / ``.n_spills`` are filled in only on a machine with a driver)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    block_n, stages, group_m, pingpong = config or CONFIGS[0]
    bm = 2 * ROWS_PER_WARPGROUP
    out = {torch.bfloat16: ("bf16", gl.bfloat16), torch.float32: ("fp32", gl.float32)}[out_dtype]

    def desc(dtype_name, gl_dtype, shape):
        layout = gl.NVMMASharedLayout.get_default_for(shape, gl_dtype)
        return f"tensordesc<{dtype_name}[{shape[0]}, {shape[1]}],{layout!r}>"

    signature = {
        "a_desc": desc("fp8e4nv", gl.float8e4nv, [bm, TILE]), "b_desc": desc("fp8e4nv", gl.float8e4nv, [block_n, TILE]),
        "c_desc": desc(out[0], out[1], [ROWS_PER_WARPGROUP, block_n]), "sa_ptr": "*fp32", "sb_ptr": "*fp32",
        "M": "i32", "N": "i32", "K": "i32", "stride_sam": "i32", "stride_sak": "i32", "stride_sbn": "i32",
        "stride_sbk": "i32", "ROW_SCALED_B": "constexpr", "PINGPONG": "constexpr", "BLOCK_N": "constexpr", "GROUP_M": "constexpr",
        "STAGES": "constexpr",
    }
    constexprs = {"ROW_SCALED_B": row_scaled, "PINGPONG": pingpong, "BLOCK_N": block_n, "GROUP_M": group_m, "STAGES": stages}
    src = GluonASTSource(_fp8_gemm_ws_kernel, signature, constexprs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
