"""Block-scaled FP8 GEMM for Hopper in Gluon: a TMA producer warp and two math warpgroups, the
structure DeepSeek-V3 describes for its FP8 GEMM (TR §3.3, "two warpgroups alternate MMA and
promotion").

The same product as ``fp8_gemm.py`` and ``fp8_gemm_tma.py``: ``C = (A·sa) · (B·sb)ᵀ`` with the
tensor cores' partial sums promoted into FP32 registers every 128 elements of K. The work is split
by role, each role its own partition:

* a producer warp streams A (128 x 128) and B (BLOCK_N x 128) tiles through a ring of ``STAGES``
  shared-memory buffers with TMA, each buffer guarded by a ``ready`` barrier (the copy engine
  completes it) and an ``empty`` barrier (both math warpgroups release it). With each K block's
  operands it brings that block's scales: A's 128 row scales (from an MN-major copy) and the
  16-byte-aligned group of B's block scales that holds the tile's;
* two math warpgroups own the upper and the lower 64 rows of the output tile, in 128-column
  pieces (BLOCK_N = 256 is two pieces sharing each A tile: a quarter less data through L2 and
  shared memory per FLOP than 128-wide tiles). For each piece a warpgroup issues its 128-deep MMA,
  waits for it and promotes (one FFMA per accumulator element: a 128x128 weight block's scale is
  folded into A's row scales); both pieces reuse one set of 64 partial-sum registers, so a
  promoted 64 x 256 tile fits in 232 registers without spilling. By default the two warpgroups
  issue their MMAs in turn (``ORDERS``: two named barriers, an arrive after each issue and a wait
  before the next), and every 8th promotion FFMA may yield (``kernels/sass_yield.py``);
* the grid is persistent (one program per SM, tiles in L2-friendly bands of ``GROUP_M`` row tiles)
  and each warpgroup stores its half of the tile through TMA, one 64 x 128 piece at a time.

With ``m_indices`` it is the MoE grouped GEMM in the contiguous layout (``grouped_gemm.py``): B is
the experts' (E*N, K) stack and every 128-row tile takes its expert's rows of it.

Measured on the H200 (docs/design/kernels.md, docs/results/kernels-sustained.md): with the scales read from
global memory inside the K step (``scales="global"``, the first version) the first MMA of every
step waited on that load, and the kernel ran ~25% slower at 4096x7168x16384 than with the scales
in the stage; 256-wide tiles then gained another ~10% over 128-wide ones. What is left of the
promotion's cost is measured against the same data flow promoting without scales
(``scales="none"``) and not promoting at all (``promote=False``), both benchmarks only. B's scales
may also be 1x128 rows (the weight gradient's activation operand: a scale per column, brought in
with the stage like A's; the promotion is then an FMUL and an FFMA per element; 128-wide tiles
only: 256-wide ones spill at 232 registers and ran 0.89-1.0x as fast at 240; the tile may be 256 rows
tall instead, ``block_m``, each math warpgroup two 64-row pieces on one B tile: ``TALL_DENSE`` and
``TALL_MIN_SEGMENTS`` say where by default). Gluon compiles for
Hopper only: there is no interpreter path, so the CPU tests compile this kernel for sm_90a offline
and read its PTX, ptxas report and SASS.
"""

import copy
import functools
import math

import torch

from .fp8_quant import row_scaled
from .sass_yield import interleave_ffma
from .triton_compat import INTERPRET, cdiv, triton

try:
    from triton import knobs
except ImportError:  # CPU torch without triton
    knobs = None

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.experimental.gluon.language._core import builtin as _gluon_builtin
    from triton._C.libtriton import ir as _ir
    HAVE_GLUON = True
    _GL_DTYPES = {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}
except ImportError:  # CPU torch without triton, or a triton before Gluon's Hopper ops
    HAVE_GLUON = False

TILE = 128  # K step and scale block (TR §3.3: N_C = 128)
ROWS_PER_WARPGROUP = 64  # one wgmma's M
# (BLOCK_N, STAGES, GROUP_M); the default is the first (docs/design/kernels.md)
CONFIGS = [(256, 4, 16), (256, 4, 8), (256, 3, 16), (128, 4, 16), (128, 5, 16), (128, 5, 8), (128, 6, 12)]
WIDTHS = {256: CONFIGS[0], 128: CONFIGS[3]}  # what kernels.fp8_gemm's dispatch times, by tile width
FFMA_YIELD_EVERY = 8  # the default of fp8_gemm_ws's ffma_yield (docs/design/kernels.md)
ORDER = "issue"  # the default of fp8_gemm_ws's order (ORDERS, below; docs/design/kernels.md)
# Registers a thread of (each math warpgroup, the TMA warp's warpgroup) keeps, by whether B's scales
# are 1x128 rows. Triton 3.6 gives the three warpgroups 504 together (the default partition, the
# first math warpgroup, takes what the other two leave). With block scales 232 / 40 as DeepGEMM
# (240 / 24 measured no better on the forward: +2%, -1%, 0% on three shapes); the weight
# gradient's promotion holds 32 column scales more and runs 1-4% faster on 240 / 24 (same scratch
# comparison, H200, 2026-12-01 ~21:15 UTC, docs/design/kernels.md); the TMA warp fits in 24 without
# spilling (tests/kernels/test_fp8_gemm_ws.py reads the ptxas report).
REGS = {False: (232, 40), True: (240, 24)}
# Named barriers the math warpgroups take turns on (``ORDERS``): above the ones Triton 3.6's warp
# specialisation uses (0-2 in this kernel's SASS; tests/kernels/test_fp8_gemm_ws.py checks)
TURN_BARRIERS = (8, 9)
# How the two math warpgroups share the tensor cores. "free": each issues its MMAs when its
# operands are ready. "issue": they issue alternately (each waits until the other has issued its
# previous MMA). "complete": a warpgroup issues an MMA only once the other's previous MMA has
# finished, so one promotes while the other's MMA runs (docs/design/kernels.md measures the three).
ORDERS = {"free": 0, "issue": 1, "complete": 2}
# Where an accumulating epilogue (``accumulate_into``: C += A·B, an FP32 main gradient) gets the tile's old values
# (the kernel's ACCUMULATE, by ``OLD_VALUE_PATHS``). "after": plain loads after the last MMA, each tile's math
# warpgroups waiting on HBM. "l2": the loads after the last MMA, the lines asked into L2 before the K loop
# (``_prefetch_l2``). "tma": each math warpgroup has the copy engine bring its 64 x 128 piece of old values into its
# output buffer in shared memory when the tile starts (once the previous tile's store has read the buffer), and
# reads them from there after the last MMA: no extra shared memory, no load instruction per line; 128-wide tiles
# only (a 256-wide tile's two pieces share the buffer), others take "l2". Measured by
# benchmarks/grouped_wgrad_bench.py (H100, 2026-12-06 17:33 UTC, 32 experts, 34,560 rows, into FP32): gate_up
# 5.274 ms "after", 4.222 ms "l2", the same bits; the FP8 training step 139.7 -> 136.0 ms a micro-batch
# (docs/results/model-step.md). Again on the H100 (2026-12-07 02:49 UTC, tree b8ec6bd), all three: gate_up 5.243 /
# 4.195 / 3.883 ms, down 2.493 / 2.096 / 1.926 ms, each bit-exact: "tma" is the default. Read when a launch is
# planned (``_plan``).
# "reduce": no old values in the kernel at all; the epilogue stores the product as a plain output does, through the
# copy engine's reduction (``cp.reduce.async.bulk.tensor ... .add``: L2 adds each FP32 value into the main gradient,
# one rounding as ``old + product``), so the math warpgroups never wait on the old values and the read-modify-write
# of C runs beside the next tiles' MMAs; any tile width.
OLD_VALUE_PATHS = {"after": 1, "l2": 2, "tma": 3, "reduce": 4}
OLD_VALUES = "tma"
# The path of the dense (not K-grouped) weight gradients' epilogue, None = ``OLD_VALUES``. Their tiles run K = the
# micro-batch's tokens (4096 in V3), compute-bound, where the experts' K-grouped ones run K = an expert's rows and
# are bound by the main gradient's traffic, so the best path differs. benchmarks/grouped_wgrad_bench.py (H100,
# 2026-12-07 10:33 and 10:40 UTC, two machines, every path bit-exact): the experts' gate_up / down 3.859 / 1.913 ms
# "tma", 4.335 / 2.222 ms "reduce" (L2's read-modify-write falls behind the stores where the traffic binds); V3's
# dense linears at 4096 tokens, one layer's seven summed, 2.547 ms "tma", 2.305 ms "reduce", faster on every shape
# (o_proj 1.306 -> 1.129 ms, as fast as without accumulating). In the FP8 step (docs/results/model-step.md) the
# dense backward GEMMs went 14.85 -> 13.67 ms a micro-batch.
DENSE_OLD_VALUES: str | None = "reduce"
# Rows of a weight gradient's output tile (1x128-row B scales, whose tiles are 128 wide): 128 (each math warpgroup
# 64 rows) or 256, the "tall" tile (each math warpgroup two 64-row pieces sharing B's tile and column scales: the
# same operand bytes per FLOP as the forward's 128 x 256 tiles, whose 256-wide counterpart here spills). Only where M
# is a multiple of 256 (no tile straddles two experts, and no dense tile is a quarter empty). Tall tiles have no
# "tma" old-value path (their two pieces share the output buffer): "tma" becomes "l2" there.
# Which launches take them by default, from benchmarks/grouped_wgrad_bench.py --tall (H100, 2026-12-07 15:15 UTC,
# into FP32 main gradients, a micro-batch; the same bits, tests/kernels/test_fp8_gemm_ws.py):
# - the experts' K-grouped Wgrads of TALL_MIN_SEGMENTS or more segment tables (micro-batches), their old values by
#   TALL_OLD_VALUES: at 4 tables gate_up 2.643 ms (128 rows, "tma") -> 2.300 ms (256 rows, "reduce"), down 1.359 ->
#   1.229 ms; at one table tall tiles are slower by every path (gate_up 4.005 "tma" -> 4.482 at best, "reduce"),
#   since each tile then runs only ~8 K blocks between two epilogues;
# - the dense Wgrads (``TALL_DENSE``): V3's seven of a layer 2.427 -> 2.314 ms, o_proj 1.225 -> 1.145, q_b 0.380 ->
#   0.364, kv_b 0.181 -> 0.164; kv_a (M = 576) and the shared down (7168 x 2048) were slower tall (0.066 -> 0.075,
#   0.150 -> 0.158): the first is not a multiple of 256, the second is within noise.
TALL_DENSE = True
TALL_MIN_SEGMENTS = 2
TALL_OLD_VALUES = "reduce"


if HAVE_GLUON:

    TILE_C = gl.constexpr(TILE)  # globals read inside a kernel must be constexprs
    ROWS_C = gl.constexpr(ROWS_PER_WARPGROUP)
    SCALES_GLOBAL_C = gl.constexpr(0)
    SCALES_TMA_C = gl.constexpr(1)
    SCALES_NONE_C = gl.constexpr(2)
    # The turn-taking of ORDERS on named barriers TURN_BARRIERS (both math warpgroups' 256 threads),
    # as inline PTX: warpgroup h arrives on barrier h when the other may go on ("issue": once it has
    # issued an MMA; "complete": once that MMA is done) and bar.syncs on the other's before its next.
    ARRIVE_0_C = gl.constexpr(f"bar.arrive {TURN_BARRIERS[0]}, 256;")
    ARRIVE_1_C = gl.constexpr(f"bar.arrive {TURN_BARRIERS[1]}, 256;")
    SYNC_0_C = gl.constexpr(f"bar.sync {TURN_BARRIERS[0]}, 256;")
    SYNC_1_C = gl.constexpr(f"bar.sync {TURN_BARRIERS[1]}, 256;")
    TIED_64_C = gl.constexpr(",".join(["=r"] * 64 + [str(i) for i in range(64)]))

    @_gluon_builtin
    def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
        """``tma.async_copy_shared_to_global`` that adds into the tensor instead of overwriting it (Triton 3.6's
        Gluon has the op, ``create_async_tma_reduce``, but no Python wrapper); committed and waited on as a store."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)

    @gluon.jit
    def _larger(a, b):  # a combine function of our own: gl.max's is an interpreter object in CPU tests
        return gl.maximum(a, b)

    @gluon.jit
    def _scalar(x):
        """The one element of a (1, 1) tensor."""
        return gl.reduce(gl.reduce(x, 1, _larger), 0, _larger)

    @gluon.jit
    def _promote(partial, acc, sa, sb, SCALES: gl.constexpr, ROW_SCALED_B: gl.constexpr):
        """The 128-deep partial sum, scaled by its rows' A scale times the tile's B block scale,
        into the FP32 accumulator: one FFMA per element ("none" adds it unscaled, a diagnostic).
        With 1x128-row B scales ``sb`` is the piece's 128 column scales: an FMUL and an FFMA."""
        if SCALES == SCALES_NONE_C:
            acc = partial + acc
        elif ROW_SCALED_B:
            acc = partial * (sa[:, None] * sb[None, :]) + acc
        else:
            acc = partial * (sa * sb)[:, None] + acc
        return acc

    @gluon.jit
    def _on_registers(x, ASM: gl.constexpr):
        """``ASM`` once per thread, after whatever produced ``x`` and before whatever reads the ``x``
        it returns: the turn token (one register a thread) or a 64 x 128 accumulator (64 registers
        a thread), passed through unchanged on tied operands (no instruction)."""
        if x.numel == 4 * 32:
            x = gl.inline_asm_elementwise(ASM, "=r,0", [x], dtype=x.dtype, is_pure=False, pack=1)
        else:
            x = gl.inline_asm_elementwise(ASM, TIED_64_C, [x], dtype=x.dtype, is_pure=False, pack=64)
        return x

    @gluon.jit
    def _my_turn(x, HALF: gl.constexpr, ORDER: gl.constexpr):
        """Wait until the other warpgroup has had its turn: warpgroup 1 before each of its MMAs
        (on ``partial``), warpgroup 0 after each promotion (on the accumulator it just promoted),
        which is also before its next MMA: the issues alternate, warpgroup 0 first."""
        if ORDER != 0:
            x = _on_registers(x, SYNC_1_C if HALF == 0 else SYNC_0_C)
        return x

    @gluon.jit
    def _your_turn(token, HALF: gl.constexpr, ORDER: gl.constexpr, WHEN: gl.constexpr):
        """Let the other warpgroup take its turn (arrive, do not wait) if ``ORDER`` is ``WHEN``:
        after an MMA's issue (1, "issue") or after its wait (2, "complete"; ptxas sinks a bare
        arrive below the FFMAs that follow, so the caller reads B's scale after it: a shared
        load stays behind the barrier)."""
        if ORDER == WHEN:
            token = _on_registers(token, ARRIVE_0_C if HALF == 0 else ARRIVE_1_C)
        return token

    @gluon.jit
    def _piece_mma(a, b_piece, partial, token, HALF: gl.constexpr, ORDER: gl.constexpr):
        """One 128-column piece's 128-deep MMA into ``partial`` (overwritten), taking turns as
        ``ORDER`` says; returns the finished partial sums and the turn token."""
        if HALF == 1:
            partial = _my_turn(partial, HALF, ORDER)
        partial = warpgroup_mma(a, b_piece.permute((1, 0)), partial, use_acc=False, is_async=True)
        token = _your_turn(token, HALF, ORDER, 1)
        partial = warpgroup_mma_wait(num_outstanding=0, deps=[partial])
        token = _your_turn(token, HALF, ORDER, 2)
        return partial, token

    @gluon.jit
    def _prefetch_l2(c_ptr, row0, col0, rows, N, stride_cm, ROWS: gl.constexpr, BLOCK_N: gl.constexpr):
        """Ask L2 for a warpgroup's rows of an FP32 output tile (``rows`` of them real, from row ``row0`` and
        column ``col0``), one ``prefetch.global.L2`` per 128-byte line: issued before the tile's K loop, the
        accumulating epilogue's read of the old values then comes from L2 instead of waiting on HBM after
        the last MMA. Lines outside the tensor ask for its first line instead (a prefetch never faults on a
        valid address; it changes no value)."""
        LINES: gl.constexpr = BLOCK_N // 32  # 32 FP32 values a line
        lay: gl.constexpr = gl.BlockedLayout([1, 1], [32 // LINES, LINES], [4, 1], [1, 0])
        r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, lay))
        cols = col0 + gl.arange(0, LINES, layout=gl.SliceLayout(0, lay)) * 32
        ok = (r < rows)[:, None] & (cols < N)[None, :]
        ptrs = c_ptr + (row0 + r).to(gl.int64)[:, None] * stride_cm + cols[None, :]
        ptrs = gl.where(ok, ptrs, c_ptr)
        gl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=gl.int32, is_pure=False,
                                  pack=1)

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
    def _expert_tile(m_ptr, off_m, off_n, N, k_steps, GROUPED: gl.constexpr):
        """(K steps, first row of B, first block row of B's scales) of the tile at (off_m, off_n).
        Grouped (the contiguous layout): B is the experts' (E*N, K) stack and the tile's expert is
        its first row's m_indices entry; a padding-only tile (-1) runs no K step and stores zeros."""
        if GROUPED:
            expert = gl.load(m_ptr + off_m)
            steps = gl.where(expert >= 0, k_steps, 0)
            expert = gl.maximum(expert, 0)
            first_b = expert * N + off_n
            first_sb = expert * gl.cdiv(N, TILE_C) + off_n // TILE_C
        else:
            steps = k_steps
            first_b = off_n
            first_sb = off_n // TILE_C
        return steps, first_b, first_sb

    @gluon.jit
    def _k_group_tile(tile, seg_ptr, num_pid_m, num_pid_n, M, groups, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      GROUP_M: gl.constexpr, SEGMENTS: gl.constexpr = 1):
        """K-grouped (the experts' weight gradient): tile ``tile`` of group g = tile // (tiles per group) is a
        tile of C[g] = A[:, seg g] B[:, seg g]^T. Returns its row and column offset in C[g], its first K
        block and number of K blocks (segment bounds ``seg_ptr[g]``, multiples of 128; an empty segment runs
        no K step and stores zeros), and C[g]'s first row in the (groups * M, N) output."""
        per_group = num_pid_m * num_pid_n
        group = tile // per_group
        off_m, off_n = _tile_offsets(tile % per_group, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
        lo = gl.load(seg_ptr + group)
        hi = gl.load(seg_ptr + group + 1)
        steps = (hi - lo) // TILE_C
        for j in gl.static_range(1, SEGMENTS):  # the group's segments in the other tables (``_k_block``)
            row = seg_ptr + j * (groups + 1) + group
            steps += (gl.load(row + 1) - gl.load(row)) // TILE_C
        return off_m, off_n, lo // TILE_C, steps, group * M, group

    @gluon.jit
    def _k_block(seg_ptr, group, groups, kj, SEGMENTS: gl.constexpr):
        """The K block of a K-grouped tile's ``kj``-th K step where each group has SEGMENTS segments, one in each
        (groups + 1,) table of ``seg_ptr`` (micro-batches' expert segments side by side along K): the steps walk
        table 0's segment, then table 1's, and so on."""
        ki = kj * 0
        rem = kj
        done = kj < 0
        for j in gl.static_range(SEGMENTS):
            row = seg_ptr + j * (groups + 1) + group
            lo = gl.load(row) // TILE_C
            n = gl.load(row + 1) // TILE_C - lo
            here = (done == 0) & (rem < n)
            ki = gl.where(here, lo + rem, ki)
            rem = gl.where(done | here, rem, rem - n)
            done = done | here
        return ki

    @gluon.jit
    def _producer(a_desc, b_desc, sa_desc, sb_desc, a_smem, b_smem, sa_smem, sb_smem, ready, empty, m_ptr, M, N,
                  K, sa_pitch, sb_pitch, groups, ROW_SCALED_B: gl.constexpr, SCALES: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                  GROUPED: gl.constexpr, GROUPED_K: gl.constexpr):
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, TILE_C)
        if SCALES == SCALES_TMA_C:
            nbytes: gl.constexpr = (a_desc.block_type.nbytes + b_desc.block_type.nbytes + sa_desc.block_type.nbytes
                                    + sb_desc.block_type.nbytes)
        else:
            nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        counter = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n * groups, gl.num_programs(0)):
            if GROUPED_K:  # GROUPED_K: the segment tables a group's K steps walk (``_k_block``)
                off_m, off_n, k0, steps, _, group = _k_group_tile(tile, m_ptr, num_pid_m, num_pid_n, M, groups,
                                                                  BLOCK_M, BLOCK_N, GROUP_M, GROUPED_K)
                first_b = off_n  # B's scales are 1x128 rows here: no block row to find
            else:
                off_m, off_n = _tile_offsets(tile, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
                steps, first_b, first_sb = _expert_tile(m_ptr, off_m, off_n, N, k_steps, GROUPED)
                k0 = 0
            for kj in range(steps):
                ki = k0 + kj  # the K block (K-grouped: counted from the start of K, not of the segment)
                if GROUPED_K > 1:
                    ki = _k_block(m_ptr, group, groups, kj, GROUPED_K)
                s = counter % STAGES
                # a fresh barrier counts as released once: the first pass over the ring waits on nothing
                mbarrier.wait(empty.index(s), ((counter // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), nbytes)
                tma.async_copy_global_to_shared(a_desc, [off_m, ki * TILE_C], ready.index(s), a_smem.index(s))
                tma.async_copy_global_to_shared(b_desc, [first_b, ki * TILE_C], ready.index(s), b_smem.index(s))
                if SCALES == SCALES_TMA_C:
                    # the K block's scales ride with its operands: A's 128 row scales (MN-major, so
                    # contiguous) and the aligned group of four that holds B's block scale, or with
                    # 1x128-row B scales the tile's BLOCK_N column scales (MN-major too)
                    tma.async_copy_global_to_shared(sa_desc, [ki * sa_pitch + off_m], ready.index(s), sa_smem.index(s))
                    if ROW_SCALED_B:
                        tma.async_copy_global_to_shared(sb_desc, [ki * sb_pitch + first_b], ready.index(s),
                                                        sb_smem.index(s))
                    else:
                        tma.async_copy_global_to_shared(sb_desc, [first_sb, ki // 4 * 4], ready.index(s),
                                                        sb_smem.index(s))
                counter += 1

    @gluon.jit
    def _math(c_desc, a_smem, b_smem, sa_smem, sb_smem, c_smem, c_bar, ready, empty, sa_ptr, sb_ptr, m_ptr, c_ptr, M,
              N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, groups, stride_cm, HALF: gl.constexpr,
              ROW_SCALED_B: gl.constexpr, SCALES: gl.constexpr, PROMOTE: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, GROUPED: gl.constexpr,
              ORDER: gl.constexpr, GROUPED_K: gl.constexpr, ACCUMULATE: gl.constexpr, M_PIECES: gl.constexpr):
        """One math warpgroup: rows HALF*64 .. HALF*64+63 of every output tile, in 128-column pieces
        (BLOCK_N = 256 is two pieces that share one A tile and one stage, for half the A traffic per
        FLOP; each piece is its own 64x128 accumulator, and both pieces' MMAs use one set of partial
        registers). With M_PIECES = 2 (a 256-row tile, 128-wide: the weight gradient's "tall" tile) the
        warpgroup owns rows HALF*128 .. HALF*128+127 as two 64-row pieces that share one B tile and its
        column scales, the same two accumulators and one set of partial registers."""
        ROWS: gl.constexpr = ROWS_C
        PIECES: gl.constexpr = BLOCK_N // TILE_C
        WG_ROWS: gl.constexpr = ROWS * M_PIECES  # rows of the tile this warpgroup owns
        TWO: gl.constexpr = PIECES * M_PIECES == 2  # two accumulators: two column pieces or two row pieces
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, TILE_C, 32])
        row_layout: gl.constexpr = gl.SliceLayout(1, layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, layout)
        # one of B's block scales, read by every thread (a broadcast), from the stage's box seen as
        # a flat column: stage s, block row r, K block ki is element 32 s + 4 r + ki % 4
        one_layout: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [4, 1], [1, 0])
        flat_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, TILE_C)
        n_blocks = gl.cdiv(N, TILE_C)
        partial = gl.zeros([ROWS, TILE_C], gl.float32, layout)  # registers for the MMAs' partial sums
        token = gl.full([4 * 32], 0, gl.int32, gl.BlockedLayout([1], [32], [4], [0]))  # ORDER "issue": one a thread
        counter = 0
        tiles_done = 0  # the phase of ``c_bar`` (ACCUMULATE 3: one completion a tile)
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n * groups, gl.num_programs(0)):
            if GROUPED_K:  # the K blocks' scales come with the stage (TMA): only the count matters here
                off_m, off_n, _, steps, c_row, _ = _k_group_tile(tile, m_ptr, num_pid_m, num_pid_n, M, groups,
                                                                 BLOCK_M, BLOCK_N, GROUP_M, GROUPED_K)
            else:
                off_m, off_n = _tile_offsets(tile, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
                steps, _, first_sb = _expert_tile(m_ptr, off_m, off_n, N, k_steps, GROUPED)
                c_row = 0
            off_m = off_m + HALF * WG_ROWS
            if ACCUMULATE == 2:
                _prefetch_l2(c_ptr, c_row + off_m, off_n, M - off_m, N, stride_cm, ROWS, BLOCK_N)
                if M_PIECES == 2:
                    _prefetch_l2(c_ptr, c_row + off_m + ROWS, off_n, M - off_m - ROWS, N, stride_cm, ROWS, BLOCK_N)
            if ACCUMULATE == 3:
                # the old values come into the output buffer while the K loop runs: once the previous
                # tile's store has read the buffer, the copy engine brings this tile's piece (rows past
                # the tensor read as zeros, and the store leaves them out)
                tma.store_wait(pendings=0)
                mbarrier.expect(c_bar.index(0), c_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(c_desc, [c_row + off_m, off_n], c_bar.index(0), c_smem.index(0))
            offs_m = off_m + gl.arange(0, ROWS, layout=row_layout)
            sa_ptrs = sa_ptr + offs_m * stride_sam
            m_mask = offs_m < M
            if ROW_SCALED_B:
                offs_n = off_n + gl.arange(0, TILE_C, layout=col_layout)
                sb_ptrs = sb_ptr + offs_n * stride_sbn
                n_mask = offs_n < N
            else:
                sb_ptrs = sb_ptr + first_sb * stride_sbn
            acc0 = gl.zeros([ROWS, TILE_C], gl.float32, layout)
            acc1 = gl.zeros([ROWS, TILE_C], gl.float32, layout)  # the second piece (BLOCK_N = 256 or M_PIECES = 2)
            for ki in range(steps):
                if SCALES == SCALES_GLOBAL_C:
                    # the scales' loads go out before the wait (a column's scales, 32 registers a
                    # thread, wait until the MMA has its registers back)
                    sa = gl.load(sa_ptrs + ki * stride_sak, mask=m_mask, other=0.0)
                    if not ROW_SCALED_B:
                        sb0 = gl.load(sb_ptrs + ki * stride_sbk)
                        if PIECES == 2:
                            sb1 = gl.load(sb_ptrs + stride_sbn + ki * stride_sbk,
                                          mask=off_n // TILE_C + 1 < n_blocks, other=0.0)
                if SCALES == SCALES_NONE_C:  # unread
                    sa = 0.0
                    sb0 = 0.0
                    sb1 = 0.0
                s = counter % STAGES
                mbarrier.wait(ready.index(s), (counter // STAGES) & 1)
                if SCALES == SCALES_TMA_C:  # from the stage: shared-memory latency, not global
                    sa = sa_smem.index(s).slice(HALF * WG_ROWS, ROWS).load(row_layout)
                    if M_PIECES == 2:  # the second row piece's
                        sa1 = sa_smem.index(s).slice(HALF * WG_ROWS + ROWS, ROWS).load(row_layout)
                if SCALES == SCALES_TMA_C and ROW_SCALED_B:  # the (one 128-wide) piece's column scales
                    sb0 = sb_smem.index(s).slice(0, TILE_C).load(col_layout)
                if SCALES == SCALES_TMA_C and not ROW_SCALED_B:
                    # one load of the scale itself (selecting it out of the four cost ~5%: docs/design/kernels.md)
                    sb_flat = sb_smem._reinterpret(gl.float32, [STAGES * 32, 1, 1], flat_layout)
                    if ORDER != 2:  # "complete" reads them after its turn's arrive
                        sb0 = _scalar(sb_flat.index(s * 32 + ki % 4).load(one_layout))
                        if PIECES == 2:  # the next block row of B's scales: the box's second row
                            sb1 = _scalar(sb_flat.index(s * 32 + 4 + ki % 4).load(one_layout))
                a = a_smem.index(s).slice(HALF * WG_ROWS, ROWS)  # (ROWS, 128), K contiguous
                b = b_smem.index(s)  # (BLOCK_N, 128); permuted below to K-major (128, 128) pieces
                if M_PIECES == 2:  # the second piece: the next 64 rows of A times the same B, its scales
                    a_2 = a_smem.index(s).slice(HALF * WG_ROWS + ROWS, ROWS)
                    b_2 = b.slice(0, TILE_C)
                else:  # the second piece: the same A times B's next 128 columns
                    a_2 = a
                    b_2 = b.slice(TILE_C, TILE_C) if PIECES == 2 else b.slice(0, TILE_C)
                if PROMOTE:
                    partial, token = _piece_mma(a, b.slice(0, TILE_C), partial, token, HALF, ORDER)
                    if ORDER == 2 and SCALES == SCALES_TMA_C and not ROW_SCALED_B:
                        sb0 = _scalar(sb_flat.index(s * 32 + ki % 4).load(one_layout))
                    if not TWO:
                        mbarrier.arrive(empty.index(s), count=1)
                    if ROW_SCALED_B and SCALES == SCALES_GLOBAL_C:
                        sb0 = gl.load(sb_ptrs + ki * stride_sbk, mask=n_mask, other=0.0)
                    acc0 = _promote(partial, acc0, sa, sb0, SCALES, ROW_SCALED_B)
                    if HALF == 0:
                        acc0 = _my_turn(acc0, HALF, ORDER)
                    if TWO:
                        # the second piece's MMA reuses the partial registers: pin the first piece's
                        # FFMAs before it (a volatile no-op on acc0), or the compiler hoists the MMA
                        # above them and needs a third 64-register set, which spills
                        acc0 = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [acc0], dtype=gl.float32,
                                                         is_pure=False, pack=1)
                        partial, token = _piece_mma(a_2, b_2, partial, token, HALF, ORDER)
                        if ORDER == 2 and SCALES == SCALES_TMA_C and not ROW_SCALED_B:
                            sb1 = _scalar(sb_flat.index(s * 32 + 4 + ki % 4).load(one_layout))
                        mbarrier.arrive(empty.index(s), count=1)
                        if M_PIECES == 2:  # B's column scales are the first piece's; A's rows are the next 64
                            acc1 = _promote(partial, acc1, sa1, sb0, SCALES, ROW_SCALED_B)
                        else:
                            acc1 = _promote(partial, acc1, sa, sb1, SCALES, ROW_SCALED_B)
                        if HALF == 0:
                            acc1 = _my_turn(acc1, HALF, ORDER)
                else:  # no block scales at all: the same data flow's upper bound (benchmarks only)
                    acc0 = warpgroup_mma(a, b.slice(0, TILE_C).permute((1, 0)), acc0, is_async=True)
                    if PIECES == 2:
                        acc1 = warpgroup_mma(a, b.slice(TILE_C, TILE_C).permute((1, 0)), acc1, is_async=True)
                        acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=[acc0, acc1])
                    else:
                        acc0 = warpgroup_mma_wait(num_outstanding=0, deps=[acc0])
                    mbarrier.arrive(empty.index(s), count=1)
                counter += 1
            if GROUPED:  # padding rows (m_indices -1) come out as zeros, whatever A holds there
                real = gl.load(m_ptr + offs_m, mask=m_mask, other=-1) >= 0
                acc0 = gl.where(real[:, None], acc0, 0.0)
                acc1 = gl.where(real[:, None], acc1, 0.0)
            if ACCUMULATE == 3:  # C += the product, the old values from the output buffer (the same layout
                # as the store below: every thread reads and then overwrites only its own elements)
                mbarrier.wait(c_bar.index(0), tiles_done & 1)
                acc0 = acc0 + c_smem.index(0).load(layout)
            if ACCUMULATE == 1 or ACCUMULATE == 2:  # C += the product (an FP32 main gradient): old values read first
                cols = off_n + gl.arange(0, TILE_C, layout=col_layout)
                c_ptrs = c_ptr + (c_row + offs_m).to(gl.int64)[:, None] * stride_cm + cols[None, :]
                acc0 = acc0 + gl.load(c_ptrs, mask=m_mask[:, None] & (cols < N)[None, :], other=0.0)
                if PIECES == 2:
                    acc1 = acc1 + gl.load(c_ptrs + TILE_C, mask=m_mask[:, None] & (cols + TILE_C < N)[None, :],
                                          other=0.0)
            # epilogue: the previous tile's stores must have left c_smem before it is overwritten
            tma.store_wait(pendings=0)
            c_smem.index(0).store(acc0.to(c_desc.dtype))
            fence_async_shared()
            if ACCUMULATE == 4:  # C += the product, added by the copy engine in L2
                _tma_reduce_add(c_desc, [c_row + off_m, off_n], c_smem.index(0))
            else:
                tma.async_copy_shared_to_global(c_desc, [c_row + off_m, off_n], c_smem.index(0))
            if TWO:  # once the copy engine has read the first piece out of shared memory
                if M_PIECES == 2:  # the next 64 rows, the same columns
                    row_2 = c_row + off_m + ROWS
                    col_2 = off_n
                else:  # the same rows, the next 128 columns
                    row_2 = c_row + off_m
                    col_2 = off_n + TILE_C
                if M_PIECES == 2 and (ACCUMULATE == 1 or ACCUMULATE == 2):
                    # the next 64 rows' old values, read once acc0 has left its registers (both tiles' old values
                    # and accumulators at once spill)
                    acc1 = acc1 + gl.load(c_ptrs + ROWS * stride_cm,
                                          mask=(offs_m + ROWS < M)[:, None] & (cols < N)[None, :], other=0.0)
                tma.store_wait(pendings=0)
                c_smem.index(0).store(acc1.to(c_desc.dtype))
                fence_async_shared()
                if ACCUMULATE == 4:
                    _tma_reduce_add(c_desc, [row_2, col_2], c_smem.index(0))
                else:
                    tma.async_copy_shared_to_global(c_desc, [row_2, col_2], c_smem.index(0))
            tiles_done += 1
        tma.store_wait(pendings=0)

    @gluon.jit
    def _fp8_gemm_ws_kernel(
        a_desc, b_desc, c_desc, sa_desc, sb_desc, sa_ptr, sb_ptr, m_ptr, c_ptr, M, N, K, stride_sam, stride_sak,
        stride_sbn, stride_sbk, sa_pitch, sb_pitch, groups, stride_cm, ROW_SCALED_B: gl.constexpr,
        SCALES: gl.constexpr, PROMOTE: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
        STAGES: gl.constexpr, GROUPED: gl.constexpr, ORDER: gl.constexpr, MATH_REGS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr, GROUPED_K: gl.constexpr, ACCUMULATE: gl.constexpr, M_PIECES: gl.constexpr,
    ):
        BLOCK_M: gl.constexpr = 2 * ROWS_C * M_PIECES
        PIECES: gl.constexpr = BLOCK_N // TILE_C
        a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, TILE_C], a_desc.layout)
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, TILE_C], b_desc.layout)
        # each warpgroup stages its output through one 64 x 128 piece (a 256-wide tile's two pieces
        # take turns), which leaves room for a fourth ring stage at BLOCK_N = 256
        c0_smem = gl.allocate_shared_memory(c_desc.dtype, [1, ROWS_C, TILE_C], c_desc.layout)
        c1_smem = gl.allocate_shared_memory(c_desc.dtype, [1, ROWS_C, TILE_C], c_desc.layout)
        if SCALES == SCALES_TMA_C:
            sa_smem = gl.allocate_shared_memory(sa_desc.dtype, [STAGES, BLOCK_M], sa_desc.layout)
            if ROW_SCALED_B:
                sb_smem = gl.allocate_shared_memory(sb_desc.dtype, [STAGES, BLOCK_N], sb_desc.layout)
            else:
                sb_smem = gl.allocate_shared_memory(sb_desc.dtype, [STAGES, 8, 4], sb_desc.layout)
        else:  # placeholders, never read
            sa_smem = a_smem
            sb_smem = a_smem
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        # each math warpgroup's barrier for its old values (ACCUMULATE 3), completed by the copy engine
        c0_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        c1_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrival per math warpgroup
        mbarrier.init(c0_bar.index(0), count=1)
        mbarrier.init(c1_bar.index(0), count=1)
        fence_async_shared()
        gl.warp_specialize([
            (_math, (c_desc, a_smem, b_smem, sa_smem, sb_smem, c0_smem, c0_bar, ready, empty, sa_ptr, sb_ptr, m_ptr,
                     c_ptr, M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, groups, stride_cm, 0, ROW_SCALED_B,
                     SCALES, PROMOTE, BLOCK_M, BLOCK_N, GROUP_M, STAGES, GROUPED, ORDER, GROUPED_K, ACCUMULATE,
                     M_PIECES)),
            (_math, (c_desc, a_smem, b_smem, sa_smem, sb_smem, c1_smem, c1_bar, ready, empty, sa_ptr, sb_ptr, m_ptr,
                     c_ptr, M, N, K, stride_sam, stride_sak, stride_sbn, stride_sbk, groups, stride_cm, 1, ROW_SCALED_B,
                     SCALES, PROMOTE, BLOCK_M, BLOCK_N, GROUP_M, STAGES, GROUPED, ORDER, GROUPED_K, ACCUMULATE,
                     M_PIECES)),
            (_producer, (a_desc, b_desc, sa_desc, sb_desc, a_smem, b_smem, sa_smem, sb_smem, ready, empty, m_ptr, M,
                         N, K, sa_pitch, sb_pitch, groups, ROW_SCALED_B, SCALES, BLOCK_M, BLOCK_N, GROUP_M,
                         STAGES, GROUPED, GROUPED_K)),
        ], [4, 1], [MATH_REGS, PRODUCER_REGS])


def _blocks(block_n: int, rows: bool = False, block_m: int = TILE) -> dict[str, list[int]]:
    """TMA box of each descriptor: A (128 or, tall, 256 rows) and B tiles 128 deep in K, C in 64 x 128 pieces,
    one K block's A row scales, and the aligned group of four K blocks' scales of B's block row (with the seven
    rows below it: a TMA destination must start 128-byte aligned, so each stage's box is 128 bytes),
    or with 1x128-row B scales one K block's ``block_n`` column scales."""
    return {"a_desc": [block_m, TILE], "b_desc": [block_n, TILE], "c_desc": [ROWS_PER_WARPGROUP, TILE],
            "sa_desc": [block_m], "sb_desc": [block_n] if rows else [8, 4]}


_DESC_ARGS = ("a_desc", "b_desc", "c_desc", "sa_desc", "sb_desc")


def _desc_layouts(block_n: int, out_dtype: torch.dtype, on_tma: bool, rows: bool = False,
                  block_m: int = TILE) -> dict[str, tuple]:
    """(box, shared layout, element type) of each descriptor: E4M3 operands, the output, FP32
    scales; off the "tma" path the scale descriptors are unread placeholders, A's."""
    blocks = _blocks(block_n, rows, block_m)
    dtypes = {"a_desc": torch.float8_e4m3fn, "b_desc": torch.float8_e4m3fn, "c_desc": out_dtype,
              "sa_desc": torch.float32, "sb_desc": torch.float32}
    out = {}
    for name in _DESC_ARGS:
        src = "a_desc" if name in ("sa_desc", "sb_desc") and not on_tma else name
        out[name] = (blocks[src], _layout(src, tuple(blocks[src]), dtypes[src]), dtypes[src])
    return out


@functools.lru_cache(maxsize=None)
def _layout(name: str, box: tuple[int, ...], dtype: torch.dtype):
    """Shared-memory layout of a descriptor's box (cached: Gluon builds one in ~25 us of Python)."""
    if name in ("sa_desc", "sb_desc"):  # read back as vectors, not by the MMA: no swizzle
        return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=len(box))
    return gl.NVMMASharedLayout.get_default_for(list(box), _GL_DTYPES[dtype])


# Where the math warpgroups find the scales. "tma": the producer brings each K block's scales into
# its stage with the operands, so the promotion waits on shared memory only (DeepGEMM does the same
# for A's; with the weight gradient's 1x128-row B scales, B's column scales too). "global": each
# warpgroup loads them from global memory in the K step that uses them; the first MMA of the step
# waits on that load (docs/design/kernels.md measures the difference). "none" ignores them: the
# promotion's cost without the scales, a diagnostic for the benchmarks (128x128 B blocks only).
SCALE_PATHS = {"global": 0, "tma": 1, "none": 2}


def _default_config(rows: bool) -> tuple[int, int, int]:
    """CONFIGS[0], or the first 128-wide one for 1x128-row B scales (a scale per column), the only width they take."""
    return WIDTHS[TILE] if rows else CONFIGS[0]


CONSTEXPR_ARGS = ("ROW_SCALED_B", "SCALES", "PROMOTE", "BLOCK_N", "GROUP_M", "STAGES", "GROUPED", "ORDER",
                  "MATH_REGS", "PRODUCER_REGS", "GROUPED_K", "ACCUMULATE", "M_PIECES")


def _constexprs(config, rows: bool, promote: bool, scales: str | None = None, grouped: bool = False,
                order: str | None = None, grouped_k: bool | int = False, accumulate: bool = False,
                block_m: int = 128) -> dict:
    """The kernel's constexprs. ``grouped_k``: K-grouped with that many segment tables (True: one), else 0.
    ``block_m``: the output tile's rows, 128, or 256 (tall; 1x128-row B scales through TMA, promoted)."""
    block_n, stages, group_m = config
    if block_m not in (TILE, 2 * TILE) or (block_m != TILE and not _tall_applies(rows, promote, scales)):
        raise ValueError(f"block_m={block_m}: 128, or 256 with 1x128-row B scales through TMA, promoted")
    scales = scales or "tma"
    if scales not in SCALE_PATHS or (scales == "none" and rows):
        raise ValueError(f"scales={scales!r}: one of {sorted(SCALE_PATHS)}; 'none' needs 128x128 weight scales")
    if grouped_k and (grouped or not rows or scales != "tma" or not promote):
        raise ValueError("K-grouped: 1x128-row B scales through TMA, promoted, not also M-grouped")
    if block_n not in (TILE, 2 * TILE) or (rows and block_n != TILE):  # rows: see the module's docstring
        raise ValueError(f"config={config}: BLOCK_N must be 128, or 256 with 128x128 weight scales")
    order = order or ORDER
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: one of {sorted(ORDERS)}")
    return {"ROW_SCALED_B": rows, "SCALES": SCALE_PATHS[scales], "PROMOTE": promote, "BLOCK_N": block_n,
            "GROUP_M": group_m, "STAGES": stages, "GROUPED": grouped, "ORDER": ORDERS[order],
            "MATH_REGS": REGS[rows][0], "PRODUCER_REGS": REGS[rows][1], "GROUPED_K": int(grouped_k),
            "ACCUMULATE": _old_value_path(block_n, grouped_k, block_m) if accumulate else 0,
            "M_PIECES": block_m // TILE}


def _old_value_path(block_n: int, grouped_k: bool = False, block_m: int = TILE) -> int:
    """The ACCUMULATE constexpr of ``OLD_VALUES`` (of ``DENSE_OLD_VALUES``, where set, unless ``grouped_k``; of
    ``TALL_OLD_VALUES``, where set, for K-grouped tall tiles) at tile width ``block_n`` and height ``block_m``
    ("tma" needs 128 x 128 tiles)."""
    if grouped_k and block_m != TILE and TALL_OLD_VALUES is not None:
        name, path = "TALL_OLD_VALUES", TALL_OLD_VALUES
    elif grouped_k or DENSE_OLD_VALUES is None:
        name, path = "OLD_VALUES", OLD_VALUES
    else:
        name, path = "DENSE_OLD_VALUES", DENSE_OLD_VALUES
    if path not in OLD_VALUE_PATHS:
        raise ValueError(f"{name}={path!r}: one of {sorted(OLD_VALUE_PATHS)}")
    if path == "tma" and (block_n != TILE or block_m != TILE):
        return OLD_VALUE_PATHS["l2"]
    return OLD_VALUE_PATHS[path]


def _mn_major(scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    """1x128 row scales (rows, k_blocks) flattened K-block-major with a pitch of ``rows`` rounded up
    to 4 (a TMA box must start 16-byte aligned), and that pitch. Free when they are already laid
    out so, as ``fp8_quant``'s row quantisers write them."""
    rows, kb = scale.shape
    if scale.stride(0) == 1 and scale.stride(1) % 4 == 0 and scale.stride(1) >= rows:
        pitch = scale.stride(1)
        return scale.as_strided((pitch * (kb - 1) + rows,), (1,)), pitch
    pitch = cdiv(rows, 4) * 4
    buf = torch.empty((kb, pitch), dtype=torch.float32, device=scale.device)
    buf[:, :rows].copy_(scale.t())
    return buf.view(-1), pitch


def tma_scales(a_scale: torch.Tensor, b_scale: torch.Tensor, rows: bool = False) -> tuple[torch.Tensor, int,
                                                                                          torch.Tensor, int]:
    """The scales as the producer's TMA reads them, with their pitches: A's (M, k_blocks) as
    ``_mn_major`` lays them out; B's (n_blocks, k_blocks) with k_blocks rounded up to 4 (pitch 0),
    free when k_blocks % 4 == 0; with ``rows`` B's (N, k_blocks) 1x128 rows laid out as A's."""
    sa, pitch = _mn_major(a_scale)
    if rows:
        return (sa, pitch, *_mn_major(b_scale))
    if b_scale.stride(1) == 1 and b_scale.stride(0) % 4 == 0:
        sb = b_scale
    else:
        nb, kb = b_scale.shape
        sb = torch.zeros((nb, cdiv(kb, 4) * 4), dtype=torch.float32, device=b_scale.device)[:, :kb]
        sb.copy_(b_scale)
    return sa, pitch, sb, 0


def fp8_gemm_ws(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, config=None, promote: bool = True,
                scales: str | None = None, ffma_yield: int | None = None,
                m_indices: torch.Tensor | None = None, order: str | None = None,
                accumulate_into: torch.Tensor | None = None, block_m: int | None = None) -> torch.Tensor:
    """C (M, N) = (a·a_scale)(b·b_scale)ᵀ on Hopper; a (M, K), b (N, K) E4M3 with K contiguous.

    a_scale (M, ceil(K/128)) fp32, any strides; b_scale (ceil(N/128), ceil(K/128)) for 128x128
    blocks or (N, ceil(K/128)) for 1x128 rows. ``config``: one tuple like those in ``CONFIGS``.
    ``promote=False`` ignores the scales and lets the tensor cores accumulate all of K: a different
    product, the benchmarks' upper bound for this kernel's data flow. ``scales``: a key of
    ``SCALE_PATHS``; by default "tma" where it applies, else "global". ``ffma_yield``: every how
    many promotion FFMAs the warp scheduler may switch warps (kernels/sass_yield.py; 0 leaves
    ptxas's code as it is); by default ``FFMA_YIELD_EVERY``. ``order``: a key of ``ORDERS``, how the
    two math warpgroups take turns on the tensor cores; by default ``ORDER``.

    With ``m_indices`` (int32 (M,), each row's expert, -1 for padding) it is the MoE grouped GEMM
    in the contiguous layout: b (E, N, K) viewable as (E*N, K), b_scale (E, ceil(N/128),
    ceil(K/128)), M a multiple of 128 (one expert per 128-row tile); padding rows come out as zeros.

    ``accumulate_into``: an (M, N) tensor of ``out_dtype`` (an FP32 main gradient), rows 16-byte aligned,
    that the product is added to in the epilogue (C += A·B, read once and written once) and returned.
    ``block_m``: the output tile's rows with 1x128-row B scales (128 or 256); by default 256 where ``TALL_DENSE``
    and M % 256 == 0.
    """
    if not HAVE_GLUON or INTERPRET or not a.is_cuda:
        raise RuntimeError("fp8_gemm_ws needs Triton's Gluon on a Hopper GPU (no interpreter path)")
    M, K = a.shape
    grouped = m_indices is not None
    if grouped:
        if b.dim() != 3 or b_scale.dim() != 3 or M % TILE or m_indices.dtype != torch.int32:
            raise ValueError(f"grouped: need b (E, N, K), b_scale (E, n_blocks, k_blocks), M % 128 == 0 and int32 "
                             f"m_indices; got b {tuple(b.shape)}, b_scale {tuple(b_scale.shape)}, M={M}, "
                             f"m_indices {m_indices.dtype}")
        experts, N = b.shape[0], b.shape[1]
        if b.stride(2) != 1 or b.stride(1) != K or b.stride(0) != N * K:
            raise ValueError(f"grouped: b must be contiguous (E*N, K) for TMA, got strides {b.stride()}")
        b, b_scale = b.view(experts * N, K), b_scale.reshape(-1, b_scale.shape[2])
    else:
        N = b.shape[0]
    if a.stride(1) != 1 or b.stride(1) != 1 or K % 16:
        raise ValueError(f"TMA needs K-contiguous operands with K % 16 == 0, got K={K} "
                         f"a.stride={a.stride()} b.stride={b.stride()}")
    device = a.device.index if a.device.index is not None else torch.cuda.current_device()
    rows = not grouped and row_scaled(N, b_scale)
    tall = _wgrad_block_m(block_m, _tall_applies(rows, promote, scales), M, 0)
    meta, on_tma, layouts, grid = _plan(M, N, K, out_dtype, config, rows, promote, scales, device, grouped,
                                       order or ORDER, accumulate=accumulate_into is not None,
                                       paths=_paths(accumulate_into), block_m=tall)
    if accumulate_into is not None:
        c = _accumulation_target(accumulate_into, (M, N), out_dtype)
    else:  # TMA rows must be 16-byte aligned: a ragged N gets a padded row pitch (the view hides it)
        pitch = cdiv(N * out_dtype.itemsize, 16) * 16 // out_dtype.itemsize
        c = torch.empty((M, pitch), dtype=out_dtype, device=a.device)[:, :N]
    sa, sa_pitch, sb, sb_pitch = tma_scales(a_scale, b_scale, rows) if on_tma else (None, 0, None, 0)
    # each descriptor's tensor; off the "tma" path the scale descriptors are unread placeholders (A's)
    descs = dict(zip(_DESC_ARGS, (a, b, c, sa if on_tma else a, sb if on_tma else a)))
    args = dict(descs, sa_ptr=a_scale, sb_ptr=b_scale, m_ptr=m_indices if grouped else a_scale, M=M, N=N, K=K,
                stride_sam=a_scale.stride(0), stride_sak=a_scale.stride(1), stride_sbn=b_scale.stride(0),
                stride_sbk=b_scale.stride(1), sa_pitch=sa_pitch, sb_pitch=sb_pitch, groups=1, c_ptr=c,
                stride_cm=c.stride(0), **meta)
    _launch(grid, args, layouts, a.device, FFMA_YIELD_EVERY if ffma_yield is None else ffma_yield)
    return c


MAX_SEGMENTS = 4  # segment tables a K-grouped launch walks (``fp8_wgrad_ws``): micro-batches whose Wgrads run as one


def fp8_wgrad_ws(a_t, a_t_scale, b_t, b_t_scale, seg_offsets: torch.Tensor, out_dtype=torch.float32,
                 config=None, ffma_yield: int | None = None, order: str | None = None,
                 accumulate_into: torch.Tensor | None = None, block_m: int | None = None) -> torch.Tensor:
    """The experts' weight gradient in one launch: C (E, M, N) with C[e] = (a_t·s)[:, seg e] (b_t·s)[:, seg e]ᵀ.

    a_t (M, K_total) and b_t (N, K_total) E4M3, K-contiguous (the token dimension: ``quant_act_128x1_t``'s
    output); a_t_scale (M, K_total/128) and b_t_scale (N, K_total/128), one scale per 128 tokens of a row;
    ``seg_offsets`` int32 (E + 1,) on the GPU, segment bounds on K that are multiples of 128 (the contiguous
    layout pads each expert's rows so, and no scale tile straddles two experts); M % 128 == 0, so no output
    tile straddles two experts either. An empty segment gives zeros. ``seg_offsets`` (S, E + 1), S <= MAX_SEGMENTS:
    S tables side by side along K (S micro-batches' layouts in one buffer, each table's bounds counted from K's
    start), expert e's product summed over its S segments in one K loop: C[e] read and written once for all S.
    The persistent grid walks the tiles expert by expert (DeepGEMM's K-grouped Wgrad does the same product), so
    nothing is read on the host.
    ``accumulate_into``: a contiguous (E, M, N) tensor of ``out_dtype`` (the experts' FP32 main gradient) that
    C is added to in the epilogue, and returned; an empty segment then leaves its expert's slice unchanged.
    ``block_m``: the output tile's rows (128, or 256 where M is a multiple of 256); by default 256 at
    ``TALL_MIN_SEGMENTS`` tables or more where M allows, else 128.
    """
    if not HAVE_GLUON or INTERPRET or not a_t.is_cuda:
        raise RuntimeError("fp8_wgrad_ws needs Triton's Gluon on a Hopper GPU (no interpreter path)")
    M, K = a_t.shape
    N = b_t.shape[0]
    if (b_t.shape[1] != K or M % TILE or K % TILE or a_t.stride(1) != 1 or b_t.stride(1) != 1
            or seg_offsets.dtype != torch.int32 or seg_offsets.dim() not in (1, 2) or not seg_offsets.is_cuda
            or not seg_offsets.is_contiguous() or (seg_offsets.dim() == 2
                                                   and not 1 <= seg_offsets.shape[0] <= MAX_SEGMENTS)):
        raise ValueError(f"fp8_wgrad_ws: need a_t (M, K), b_t (N, K) K-contiguous, M and K multiples of {TILE}, "
                         f"contiguous int32 seg_offsets (E + 1,) or (S <= {MAX_SEGMENTS}, E + 1) on the GPU; got "
                         f"a_t {tuple(a_t.shape)} {a_t.stride()}, b_t {tuple(b_t.shape)} {b_t.stride()}, seg_offsets "
                         f"{seg_offsets.dtype} {tuple(seg_offsets.shape)} on {seg_offsets.device}")
    segments = seg_offsets.shape[0] if seg_offsets.dim() == 2 else 1
    groups = seg_offsets.shape[-1] - 1
    device = a_t.device.index if a_t.device.index is not None else torch.cuda.current_device()
    meta, _, layouts, grid = _plan(M, N, K, out_dtype, config, True, True, "tma", device, False, order or ORDER,
                                   groups, accumulate=accumulate_into is not None, paths=_paths(accumulate_into),
                                   segments=segments, block_m=_wgrad_block_m(block_m, True, M, segments))
    if accumulate_into is not None:
        if not accumulate_into.is_contiguous():
            raise ValueError(f"fp8_wgrad_ws: accumulate_into must be contiguous, got strides {accumulate_into.stride()}")
        rows = _accumulation_target(accumulate_into.view(groups * M, N), (groups * M, N), out_dtype)
        pitch = N
    else:
        pitch = cdiv(N * out_dtype.itemsize, 16) * 16 // out_dtype.itemsize
        rows = torch.empty((groups * M, pitch), dtype=out_dtype, device=a_t.device)  # the groups' C stacked
    sa, sa_pitch, sb, sb_pitch = tma_scales(a_t_scale, b_t_scale, rows=True)
    args = dict(zip(_DESC_ARGS, (a_t, b_t, rows[:, :N], sa, sb)),
                sa_ptr=a_t_scale, sb_ptr=b_t_scale, m_ptr=seg_offsets, M=M, N=N, K=K,
                stride_sam=a_t_scale.stride(0), stride_sak=a_t_scale.stride(1), stride_sbn=b_t_scale.stride(0),
                stride_sbk=b_t_scale.stride(1), sa_pitch=sa_pitch, sb_pitch=sb_pitch, groups=groups, c_ptr=rows,
                stride_cm=rows.stride(0), **meta)
    if groups > 0:
        _launch(grid, args, layouts, a_t.device, FFMA_YIELD_EVERY if ffma_yield is None else ffma_yield)
    return rows.view(groups, M, pitch)[:, :, :N]


def _tall_applies(rows: bool, promote: bool, scales: str | None) -> bool:
    """Whether a launch may take 256-row tiles: 1x128-row B scales, through TMA (the default path), promoted."""
    return rows and promote and (scales or "tma") == "tma"


def _wgrad_block_m(block_m: int | None, tall_ok: bool, M: int, segments: int) -> int:
    """The output tile's rows of a launch (``segments``: its segment tables, 0 for a dense one): ``block_m`` where
    given, else 256 by the module's defaults (``TALL_DENSE``, ``TALL_MIN_SEGMENTS``) where it applies (1x128-row B
    scales through TMA, promoted; M a multiple of 256), else 128. A ``block_m`` given that does not apply raises."""
    ok = tall_ok and M % (2 * TILE) == 0
    if block_m is None:
        default = TALL_DENSE if segments == 0 else segments >= TALL_MIN_SEGMENTS
        return 2 * TILE if ok and default else TILE
    if block_m not in (TILE, 2 * TILE):
        raise ValueError(f"block_m={block_m}: 128 or 256")
    if block_m == 2 * TILE and not ok:
        raise ValueError(f"block_m=256 needs 1x128-row B scales through TMA, promoted, and M a multiple of 256 (M={M})")
    return block_m


@functools.cache
def runs_on(device: torch.device) -> bool:
    """Whether these kernels run on ``device``: Gluon present, no interpreter, a Hopper GPU (sm_90)."""
    return (HAVE_GLUON and not INTERPRET and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] == 9)


def _accumulation_target(c: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``c`` checked as what the epilogue reads and TMA writes: ``shape``, ``dtype``, unit column stride and rows
    16-byte aligned."""
    if (tuple(c.shape) != shape or c.dtype != dtype or c.stride(1) != 1 or (c.stride(0) * c.element_size()) % 16
            or c.data_ptr() % 16):
        raise ValueError(f"accumulate_into must be {shape} {dtype} with unit column stride and 16-byte aligned rows, "
                         f"got {tuple(c.shape)} {c.dtype} strides {c.stride()}")
    return c


def _paths(accumulate_into) -> tuple:
    """The old-value paths an accumulating launch's plan is made with (``_plan``'s cache key: a plan made before
    ``OLD_VALUES`` or ``DENSE_OLD_VALUES`` changed is not reused after)."""
    return () if accumulate_into is None else (OLD_VALUES, DENSE_OLD_VALUES, TALL_OLD_VALUES)


@functools.lru_cache(maxsize=4096)
def _plan(M: int, N: int, K: int, out_dtype, config, rows: bool, promote: bool, scales, device: int,
          grouped: bool = False, order: str = "free", k_groups: int = 0, accumulate: bool = False,
          paths: tuple = (), segments: int = 1, block_m: int = TILE):
    """What a problem size's launch needs besides its tensors, worked out once (a launch is
    host-bound on the smaller shapes): the constexprs with the ring depth that fits, whether the
    scales go through TMA, each descriptor's box and shared layout, and the persistent grid. ``paths``: only
    the cache key (``_paths``); the constexprs read the module's paths themselves."""
    meta = _constexprs(config or _default_config(rows), rows=rows, promote=promote, scales=scales, grouped=grouped,
                       order=order, grouped_k=segments if k_groups > 0 else 0, accumulate=accumulate,
                       block_m=block_m)
    on_tma = meta["SCALES"] == SCALE_PATHS["tma"]
    sms, smem = _device_limits(device)
    meta["STAGES"] = ring_stages(meta["STAGES"], meta["BLOCK_N"], out_dtype.itemsize, on_tma, smem, rows, block_m)
    layouts = _desc_layouts(meta["BLOCK_N"], out_dtype, on_tma, rows, block_m)
    tiles = cdiv(M, block_m) * cdiv(N, meta["BLOCK_N"]) * max(k_groups, 1)
    return meta, on_tma, layouts, max(min(tiles, sms), 1)


# Shared memory the kernel takes beyond its ring and output pieces: the ring's barriers and the
# alignment padding after the small scale buffers (264 bytes in every configuration compiled for
# sm_90a with Triton 3.6; tests/kernels/test_fp8_gemm_ws.py checks the bound on each)
SMEM_OVERHEAD = 512


def ring_stages(stages: int, block_n: int, out_itemsize: int, on_tma: bool, smem: int, rows: bool = False,
                block_m: int = TILE) -> int:
    """At most ``stages`` ring stages, as many as ``smem`` bytes hold beside the two warpgroups'
    64 x 128 output pieces (FP32 output takes twice BF16's)."""
    out_bytes = 2 * ROWS_PER_WARPGROUP * TILE * out_itemsize
    stage_bytes = (block_m + block_n) * TILE  # A and B tiles, E4M3
    if on_tma:  # and the scales' boxes, FP32
        boxes = _blocks(block_n, rows, block_m)
        stage_bytes += 4 * sum(math.prod(boxes[name]) for name in ("sa_desc", "sb_desc"))
    return min(stages, (smem - SMEM_OVERHEAD - out_bytes) // stage_bytes)


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple[int, int]:
    """(SMs, shared memory a block may opt in to) of a device."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", 232448)


_COMPILED: dict = {}  # launch key -> Triton's compiled kernel


_INT_ARGS = ("M", "N", "K", "stride_sam", "stride_sak", "stride_sbn", "stride_sbk", "sa_pitch", "sb_pitch", "groups",
             "stride_cm")


def _launch_key(args: dict, layouts: dict, device) -> tuple:
    """What Triton specialises a compiled kernel on (runtime/jit.py, the binder): the constexprs,
    each descriptor's dtype and box, each pointer's 16-byte alignment, each integer's == 1,
    % 16 and 64-bit range. Read by name: a loop testing every argument's type cost ~10 us."""
    key = [device.index, *(args[name] for name in CONSTEXPR_ARGS)]
    key += [(args[n].dtype, tuple(layouts[n][0])) for n in _DESC_ARGS]
    key += [(args[n].dtype, args[n].data_ptr() % 16 == 0) for n in ("sa_ptr", "sb_ptr", "m_ptr", "c_ptr")]
    key += [(v == 1, v % 16 == 0, abs(v) >= 2**31) for v in (args[n] for n in _INT_ARGS)]
    return tuple(key)


def _descriptors(args: dict, layouts: dict) -> dict:
    """``args`` with each descriptor's tensor made the host TensorDescriptor Triton's JIT takes."""
    return dict(args, **{name: TensorDescriptor.from_tensor(args[name], *layouts[name][:2]) for name in _DESC_ARGS})


def _launch(grid: int, args: dict, layouts: dict, device, ffma_yield: int = 0) -> None:
    """Launch on ``grid`` programs. The first launch of a specialisation goes through Triton's JIT
    (compile and cache); later ones go straight to the compiled kernel's C launcher with the TMA
    descriptors' tensor maps from ``_TensorMaps`` (docs/design/kernels.md: Triton's own path binds and
    specialises 22 arguments and encodes five tensor maps on every call). With ``ffma_yield`` the
    later launches run a copy whose promotion FFMAs may yield (``with_ffma_yields``)."""
    key = _launch_key(args, layouts, device) + (ffma_yield,)
    entry = _COMPILED.get(key)
    if entry is None:
        kernel = _fp8_gemm_ws_kernel[(grid,)](**_descriptors(args, layouts), num_warps=4)
        kernel = with_ffma_yields(kernel, ffma_yield) if ffma_yield else kernel
        _COMPILED[key] = (kernel, _DirectLaunch.of(kernel))
        return
    kernel, direct = entry
    stream = torch.cuda.current_stream(device).cuda_stream
    if direct is not None and not _hooks_active():
        direct(grid, stream, args)
        return
    descs = _descriptors(args, layouts)
    bound = [descs[n] for n in _fp8_gemm_ws_kernel.arg_names]
    meta = kernel.launch_metadata((grid, 1, 1), stream, *bound)
    kernel.run(grid, 1, 1, stream, kernel.function, kernel.packed_metadata, meta,
               knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound)


def _hooks_active() -> bool:
    """Whether a launch hook is registered (Triton 3.6 keeps an empty ``HookChain`` otherwise)."""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


class _TensorMaps:
    """CUtensorMaps by everything their encoding reads (address, shape, strides, box, element type,
    swizzle), as Triton's launcher expands a host descriptor (``[map, *shape, *strides]``,
    backends/nvidia/driver.py ``make_tensordesc_arg``). A weight's and its scales' maps are the
    same on every call, and the caching allocator hands activations the same addresses again."""

    LIMIT = 1024

    def __init__(self):
        self.maps: dict = {}

    def expanded(self, t: torch.Tensor, meta: dict) -> list:
        shape, strides = tuple(t.shape), tuple(t.stride())
        key = (t.data_ptr(), shape, strides, meta["swizzle"], meta["elem_size"], meta["elem_type"],
               tuple(meta["block_size"]))
        hit = self.maps.get(key)
        if hit is None:
            from triton.backends.nvidia.driver import TMA_DTYPE_DEVICE_TO_HOST

            tensor_map = triton.runtime.driver.active.utils.fill_tma_descriptor(
                key[0], meta["swizzle"], meta["elem_size"], TMA_DTYPE_DEVICE_TO_HOST[meta["elem_type"]],
                meta["block_size"], list(shape), list(strides), 0)
            if len(self.maps) >= self.LIMIT:
                self.maps.clear()
            hit = self.maps[key] = [tensor_map, *shape, *strides]
        return hit


_MAPS = _TensorMaps()


class _DirectLaunch:
    """A compiled kernel's C launcher called with the argument list Triton's Python wrapper would
    build (driver.py ``CudaLauncher.__call__`` and ``wrap_handle_tensordesc``), the descriptors'
    tensor maps from ``_MAPS``. ``of`` returns None where that structure is not what Triton 3.6
    has (the caller then takes Triton's path)."""

    def __init__(self, kernel, raw, tensordesc_meta):
        self.kernel, self.raw = kernel, raw
        meta = dict(zip(_DESC_ARGS, tensordesc_meta))
        self.params = [(name, meta.get(name)) for name in _fp8_gemm_ws_kernel.arg_names]  # (name, TMA meta or None)
        self.coop, self.pdl = kernel.run.launch_cooperative_grid, kernel.run.launch_pdl

    @classmethod
    def of(cls, kernel):
        run = getattr(kernel, "run", None)
        wrapper = getattr(run, "launch", None)
        code = getattr(wrapper, "__code__", None)
        tensordesc_meta = getattr(kernel.metadata, "tensordesc_meta", None)
        if (code is None or "launcher" not in code.co_freevars or not tensordesc_meta
                or len(tensordesc_meta) != len(_DESC_ARGS) or run.global_scratch_size or run.profile_scratch_size):
            return None
        raw = wrapper.__closure__[code.co_freevars.index("launcher")].cell_contents
        return cls(kernel, raw, tensordesc_meta)

    def __call__(self, grid: int, stream: int, args: dict) -> None:
        k = self.kernel
        final = [grid, 1, 1, stream, k.function, self.coop, self.pdl, None, None, k.packed_metadata, None, None, None]
        for name, meta in self.params:
            if meta is None:
                final.append(args[name])
            else:
                final.extend(_MAPS.expanded(args[name], meta))
        self.raw(*final)


def with_ffma_yields(kernel, every: int):
    """A copy of Triton's compiled kernel whose cubin lets every ``every``-th FFMA yield
    (kernels/sass_yield.py), loaded as its own module; Triton's cached original is unchanged."""
    patched, _ = interleave_ffma(kernel.asm["cubin"], every)
    clone = copy.copy(kernel)
    clone.asm = dict(kernel.asm, cubin=patched)
    clone.kernel = patched
    clone.module = clone.function = clone._run = None
    clone._init_handles()
    return clone


def compile_offline(config=None, rows=False, out_dtype=torch.bfloat16, promote: bool = True,
                    capability: int = 90, scales: str | None = None, grouped: bool = False,
                    order: str | None = None, grouped_k: bool = False, accumulate: bool = False,
                    block_m: int = TILE, stages: int | None = None):
    """Compile the kernel for ``sm_{capability}`` without a GPU and return Triton's compiled kernel
    (its ``.asm["ptx"]``; register counts need ptxas, which the tests run on it)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    meta = _constexprs(config or _default_config(rows), rows, promote, scales, grouped, order, grouped_k, accumulate,
                       block_m)
    if stages is None and block_m != TILE:  # the ring depth a launch on an H100 or H200 takes (``ring_stages``)
        stages = ring_stages(meta["STAGES"], meta["BLOCK_N"], out_dtype.itemsize, meta["SCALES"] == SCALE_PATHS["tma"],
                             232448, rows, block_m)
    if stages is not None:
        meta["STAGES"] = stages
    names = {torch.bfloat16: "bf16", torch.float32: "fp32"}
    layouts = _desc_layouts(meta["BLOCK_N"], out_dtype, meta["SCALES"] == SCALE_PATHS["tma"], rows, block_m)
    signature = {}
    for name, (box, layout, dtype) in layouts.items():
        signature[name] = f"tensordesc<{names.get(dtype, 'fp8e4nv')}[{', '.join(map(str, box))}],{layout!r}>"
    signature |= {"sa_ptr": "*fp32", "sb_ptr": "*fp32", "m_ptr": "*i32" if grouped or grouped_k else "*fp32",
                  "c_ptr": f"*{names.get(out_dtype, 'fp8e4nv')}"}
    signature |= {n: "i32" for n in _INT_ARGS}
    signature |= {n: "constexpr" for n in meta}
    src = GluonASTSource(_fp8_gemm_ws_kernel, signature, meta)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
