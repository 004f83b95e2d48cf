"""The cast with transpose from one read of x, in Gluon: ``quant_act_both`` with the 128x128 tile in shared memory.

``quant_act_both_gluon(x)`` returns what ``fp8_quant.quant_act_both(x)`` returns, ``quant_act_1x128(x)`` and
``quant_act_128x1_t(x)`` bit for bit in the same layouts, reading each element of x from HBM once. One program per
128x128 tile of x (M, K):

* Step 1: coalesced 16-byte loads of the tile (masked at ragged edges, zeros outside as the Triton kernels'
  ``other=0.0``) into registers, all issued before the first is used, then stored once into shared memory in x's
  own dtype (32 KiB bf16, 64 KiB fp32) under a swizzled layout (below);
* Step 2, the rows: the tile read back in chunks of ``ROWS`` rows, one 16-byte vector of a row a thread, the
  tile's 128 rows' amaxes, scales and E4M3 values stored coalesced, and the row scales;
* Step 3, the columns: the tile read through the transposed view (``permute``), each thread 16 bytes along K of
  each of 4 consecutive rows, so that one warp holds whole columns (an amax over M within the warp) and stores 4
  consecutive bytes of each of its columns' rows of x^T (128 bytes a warp and instruction, coalesced along M).

With a persistent config (``CONFIGS``) each program walks tiles in the same order (along M first) and issues the
next tile's loads before it quantises the current one from shared memory, so that its reads of HBM stay in flight
while it computes; a barrier before each store into shared memory keeps the previous tile's reads first.

The swizzle is chosen so that both reads are free of bank conflicts: XOR of the 16-byte chunk index with
(row // 4) % 8. The rows' read and the store touch 8 consecutive chunks of one row a quarter-warp (any XOR keeps
them apart); the columns' read touches one chunk of rows 4l + i of lanes l = 0..7, whose phases l differ. The
kernel checks this at compile time (``gl.bank_conflicts``).

With ``gather`` (``moe_permute.moe_permute_quant_both``, the routed experts' combine backward) the tile's rows are
gathered in step 1 from x's rows ``gather[r]`` (zeros at -1), each times its ``row_weights`` value in FP32 and
rounded back to x's dtype, which is what ``moe_permute(x, plan, row_weights=...)`` would have stored: the same bits
as the permute, then the cast, without the permuted rows' write and read.

Scales and E4M3 values come from ``fp8_quant``'s own ``scale_from_amax`` and ``quantize_e4m3`` (the same jit
functions, called from Gluon), and a maximum is exact in any order, so the bits are the single quantisers'. Gluon
has no interpreter path: the CPU tests compile the kernel for sm_90a offline and read its PTX and ptxas report.
Where the kernel cannot run (no Gluon, the interpreter, not a Hopper GPU, x neither bf16 nor fp32, or x not
contiguous along K) the call falls back to ``quant_act_both``.
"""

from __future__ import annotations

import functools

import torch

from . import fp8_gemm_ws
from .fp8_quant import (
    AMAX_FLOOR,
    TILE,
    _cast,
    _check_float_2d,
    check_row_bound,
    past_bound,
    quant_act_both,
    quantize_e4m3,
    rows_output,
    scale_from_amax,
)
from .swiglu import swiglu_grads
from .triton_compat import cdiv, triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    HAVE_GLUON = True
except ImportError:  # CPU torch without triton, or a triton before Gluon
    HAVE_GLUON = False

# (num_warps, ROWS, programs an SM): ROWS rows of the tile a chunk of the rows' pass takes; programs an SM 0 for one
# program a tile, else a persistent grid of that many programs an SM (at most: as many as fit, ``resident``), each
# loading its next tile while it quantises one. The default is the first (not yet timed).
CONFIGS = [(8, 32, 0), (4, 32, 0), (8, 64, 0), (8, 32, 2), (4, 32, 3)]
SWIZZLE_ROWS = 4  # rows that share a swizzle phase: the columns' read gives each lane 4 consecutive rows
PHASES = 8  # 16-byte chunks in a 128-byte bank row
M_PER_THREAD = 4  # consecutive rows of x (bytes of a row of x^T) a thread of the columns' pass holds
# Registers a thread may take (ptxas's maxnreg), None: as many as it wants (104 at the default config: two 8-warp
# programs an SM). 80 compiles without spilling for every mode (plain, gather, SwiGLU's backward; 72 spills): three
# programs an SM, but slower or no faster on every shape timed (H100, 2026-12-07 15:15 UTC, do_bench medians: plain
# 4096 x 7168 62.3 -> 64.6 us, 4096 x 24576 183 -> 192, 34,560 x 4096 251 -> 263; SwiGLU's backward 384 -> 387; the
# gather 531 -> 560), so None.
MAX_REGS: int | None = None


if HAVE_GLUON:

    @gluon.jit
    def _larger(a, b):  # our own combine function, as fp8_gemm_ws's: gl.max's is built for Triton's interpreter
        return gl.maximum(a, b)

    @gluon.jit
    def _amax(x, axis: gl.constexpr):
        return gl.reduce(gl.abs(x), axis, _larger)

    @gluon.jit
    def _rows(smem, q_ptr, s_ptr, row0, col0, M, K, stride_qm, stride_sm, scale_col, R0: gl.constexpr,
              ROWS: gl.constexpr, layout: gl.constexpr, POW2: gl.constexpr, FLOOR: gl.constexpr,
              CAST: gl.constexpr):
        """Rows R0 .. R0 + ROWS of the tile: one scale each, E4M3 values at q[row, col], the scales at
        ``s_ptr + row * stride_sm + scale_col``."""
        x = smem.slice(R0, ROWS, dim=0).load(layout).to(gl.float32)  # (ROWS, 128)
        scale = scale_from_amax(_amax(x, 1), POW2, FLOOR)  # (ROWS,)
        q = quantize_e4m3(x, scale[:, None], POW2, CAST)
        rows = row0 + R0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
        cols = col0 + gl.arange(0, x.shape[1], layout=gl.SliceLayout(0, layout))
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        gl.store(q_ptr + rows.to(gl.int64)[:, None] * stride_qm + cols[None, :], q, mask=mask)
        gl.store(s_ptr + rows * stride_sm + scale_col, scale, mask=rows < M)

    @gluon.jit
    def _cols(smem_t, qt_ptr, st_ptr, row0, col0, M, K, stride_qt, stride_sk, scale_col, C0: gl.constexpr,
              COLS: gl.constexpr, layout: gl.constexpr, store_layout: gl.constexpr, POW2: gl.constexpr,
              FLOOR: gl.constexpr, CAST: gl.constexpr):
        """Columns C0 .. C0 + COLS of the tile (rows of ``smem_t``, the tile transposed): one scale each over the
        tile's 128 rows, E4M3 values at qt[col, row], the scales at ``st_ptr + col * stride_sk + scale_col``."""
        xt = smem_t.slice(C0, COLS, dim=0).load(layout).to(gl.float32)  # (COLS, 128): x^T's rows
        scale = scale_from_amax(_amax(xt, 1), POW2, FLOOR)  # (COLS,)
        # the same registers in the order of x^T's rows: 4 consecutive bytes of a row a thread
        qt = gl.convert_layout(quantize_e4m3(xt, scale[:, None], POW2, CAST), store_layout)
        cols = col0 + C0 + gl.arange(0, COLS, layout=gl.SliceLayout(1, store_layout))
        rows = row0 + gl.arange(0, xt.shape[1], layout=gl.SliceLayout(0, store_layout))
        mask = (cols < K)[:, None] & (rows < M)[None, :]
        gl.store(qt_ptr + cols.to(gl.int64)[:, None] * stride_qt + rows[None, :], qt, mask=mask)
        cols_s = col0 + C0 + gl.arange(0, COLS, layout=gl.SliceLayout(1, layout))
        gl.store(st_ptr + cols_s * stride_sk + scale_col, scale, mask=cols_s < K)

    @gluon.jit
    def _load_tile(x_ptr, row0, col0, M, K, stride_xm, live, BLOCK: gl.constexpr, layout: gl.constexpr,
                   src_ptr=None, w_ptr=None):
        """The (BLOCK, BLOCK) tile of x at (row0, col0) in x's dtype, zeros outside x (and everywhere unless
        ``live``), as the Triton kernels' masked loads with ``other=0.0``. With ``src_ptr`` the tile's rows are
        gathered: row r is x's row ``src[r]`` (zeros where -1 or r >= M), as ``moe_permute`` gathers them; with
        ``w_ptr`` too, each times its row's FP32 weight and rounded back to x's dtype, as ``moe_permute``'s
        ``row_weights`` store them."""
        rows = row0 + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, layout))
        cols = col0 + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, layout))
        if src_ptr is None:
            mask = (rows < M)[:, None] & (cols < K)[None, :] & live
            x = gl.load(x_ptr + rows.to(gl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        else:
            src = gl.load(src_ptr + rows, mask=(rows < M) & live, other=-1)
            mask = (src >= 0)[:, None] & (cols < K)[None, :]
            x = gl.load(x_ptr + src.to(gl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
            if w_ptr is not None:
                w = gl.load(w_ptr + rows, mask=(rows < M) & live, other=0.0)
                x = (x.to(gl.float32) * w[:, None]).to(x_ptr.dtype.element_ty)
        return x

    @gluon.jit
    def _load_dh(h_ptr, dact_ptr, row0, col0, M, K, stride_hm, stride_dm, ROWS: gl.constexpr, BLOCK: gl.constexpr,
                 layout: gl.constexpr):
        """ROWS rows from ``row0`` of d h's tile at column ``col0``, h (M, K = 2I) being SwiGLU's input: d gate
        (col0 < I) or d up, from h's gate and up columns and d act's (``swiglu.swiglu_grads``), rounded to h's dtype
        as ``swiglu_backward`` stores it (I % 128 == 0: a tile is all gate or all up); zeros outside."""
        inner = gl.multiple_of(K // 2, BLOCK)  # the caller's: I % 128 == 0 (so the up columns' loads vectorise)
        up_half = col0 >= inner
        rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
        cols = col0 - gl.where(up_half, inner, 0) + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, layout))
        mask = (rows < M)[:, None] & (cols < inner)[None, :]
        rows64 = rows.to(gl.int64)[:, None]
        h_ptrs = h_ptr + rows64 * stride_hm + cols[None, :]
        gate = gl.load(h_ptrs, mask=mask, other=0.0).to(gl.float32)
        up = gl.load(h_ptrs + inner, mask=mask, other=0.0).to(gl.float32)
        dact = gl.load(dact_ptr + rows64 * stride_dm + cols[None, :], mask=mask, other=0.0).to(gl.float32)
        dgate, dup = swiglu_grads(gate, up, dact)
        return gl.where(up_half, dup, dgate).to(h_ptr.dtype.element_ty)

    @gluon.jit
    def _load_rope(x_ptr, cos_ptr, sin_ptr, row0, col0, M, K, stride_xm, seq_len, ROWS: gl.constexpr,
                   BLOCK: gl.constexpr, layout: gl.constexpr, HEAD: gl.constexpr, NOPE: gl.constexpr):
        """ROWS rows from ``row0`` of the tile at column ``col0`` of d q (M, K = H HEAD) with RoPE's backward applied:
        in each head the channels from NOPE on are interleaved pairs (d y0, d y1) rotated back,
        (d y0 c + d y1 s, d y1 c - d y0 s) with c, s = cos, sin (seq_len, (HEAD - NOPE) / 2) at the row's position
        (row % seq_len), in FP32 and rounded to x's dtype, as ``mla_backward.rope_backward`` stores them; the other
        channels as they are; zeros outside. A pair is two neighbours of a thread's 16-byte vector: split in
        registers."""
        HALF: gl.constexpr = BLOCK // 2
        rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
        cols = col0 + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, layout))
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        x = gl.load(x_ptr + rows.to(gl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        x0, x1 = x.to(gl.float32).reshape([ROWS, HALF, 2]).split()  # (ROWS, HALF) each: even and odd channels
        pair_layout: gl.constexpr = x0.type.layout
        pcols = col0 + 2 * gl.arange(0, HALF, layout=gl.SliceLayout(0, pair_layout))  # each pair's even channel
        prows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, pair_layout))
        j = pcols % HEAD
        rope = (j >= NOPE) & (pcols < K)
        freq = gl.where(rope, (j - NOPE) // 2, 0)
        cs = (prows % seq_len)[:, None] * ((HEAD - NOPE) // 2) + freq[None, :]
        cs_mask = (prows < M)[:, None] & rope[None, :]
        c = gl.load(cos_ptr + cs, mask=cs_mask, other=1.0)
        s = gl.load(sin_ptr + cs, mask=cs_mask, other=0.0)
        y0 = gl.where(rope[None, :], x0 * c + x1 * s, x0)
        y1 = gl.where(rope[None, :], x1 * c - x0 * s, x1)
        y = gl.join(y0, y1).reshape([ROWS, BLOCK])
        return gl.convert_layout(y, layout).to(x_ptr.dtype.element_ty)

    @gluon.jit
    def _load_heads(x_ptr, b_ptr, row0, pid_k, M, stride_xm, stride_bm, BLOCK: gl.constexpr, layout: gl.constexpr,
                    HEAD: gl.constexpr, NOPE: gl.constexpr, B_COLS: gl.constexpr):
        """The (BLOCK, BLOCK) tile ``pid_k`` of the tensor whose head h is x's head h's first NOPE channels (x (M, H
        HEAD)) then b's head h (b (M, H B_COLS)): MLA's KV up-projection output gradient, the keys' no-RoPE part and
        the values (NOPE % BLOCK == B_COLS % BLOCK == 0: a tile lies in one of them). Zeros at rows >= M."""
        TILES: gl.constexpr = (NOPE + B_COLS) // BLOCK  # tiles a head
        head = pid_k // TILES
        col = (pid_k % TILES) * BLOCK
        if col < NOPE:
            base = x_ptr + head * HEAD + col
            stride = stride_xm
        else:
            base = b_ptr + head * B_COLS + (col - NOPE)
            stride = stride_bm
        rows = row0 + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, layout))
        mask = (rows < M)[:, None] & (cols < BLOCK)[None, :]
        return gl.load(base + rows.to(gl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0)

    @gluon.jit
    def _quantise_tile(smem, q_ptr, s_ptr, qt_ptr, st_ptr, pid_m, pid_k, M, K, stride_qm, stride_sm, stride_sk,
                       stride_qt, stride_stk, stride_stm, ROWS: gl.constexpr, COLS: gl.constexpr,
                       row_layout: gl.constexpr, col_layout: gl.constexpr, col_store_layout: gl.constexpr,
                       POW2: gl.constexpr, FLOOR: gl.constexpr, CAST: gl.constexpr):
        """Steps 2 and 3 (module docstring) on the tile at (pid_m, pid_k), in ``smem``."""
        BLOCK: gl.constexpr = smem.shape[0]
        row0 = pid_m * BLOCK
        col0 = pid_k * BLOCK
        for r0 in gl.static_range(0, BLOCK, ROWS):  # the rows (1x128 tiles), ROWS at a time
            _rows(smem, q_ptr, s_ptr, row0, col0, M, K, stride_qm, stride_sm, pid_k * stride_sk, r0, ROWS,
                  row_layout, POW2, FLOOR, CAST)
        smem_t = smem.permute((1, 0))  # (K, M): the same bytes
        for c0 in gl.static_range(0, BLOCK, COLS):  # the columns (128x1 tiles), stored transposed
            _cols(smem_t, qt_ptr, st_ptr, row0, col0, M, K, stride_qt, stride_stk, pid_m * stride_stm, c0, COLS,
                  col_layout, col_store_layout, POW2, FLOOR, CAST)

    @gluon.jit
    def _quant_both_gluon_kernel(
        # pointers: input (M, K), unit stride along K; fp8 copy (M, K) contiguous and its scales (M, ceil(K/128));
        # fp8 transpose (K, M) contiguous and its scales (K, ceil(M/128))
        x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr,
        # sizes
        M, K,
        # strides (the fp8 copies' row strides only: both are contiguous)
        stride_xm, stride_qm, stride_sm, stride_sk, stride_qt, stride_stk, stride_stm,
        # meta
        POW2: gl.constexpr, FLOOR: gl.constexpr, CAST: gl.constexpr, ROWS: gl.constexpr, PERSISTENT: gl.constexpr,
        SWIZZLE_ROWS: gl.constexpr, PHASES: gl.constexpr, M_PER_THREAD: gl.constexpr,
        # a worst-case-sized buffer's rows in use (M), (1,) int32 on the device, or None (as in fp8_quant's kernels)
        bound_ptr=None,
        # the gather (``_load_tile``): row r of the tile is x's row src[r] ((M,) int32, -1: zeros), times w[r]
        # ((M,) fp32) where given; None: x's own rows
        src_ptr=None, w_ptr=None,
        # SwiGLU's backward (``_load_tile``): x is h (M, K = 2I) and the tiles quantised are d h's, from h and d act
        # ((M, I), row stride stride_dm); the grid's first axis then walks K (a tile's gate and up halves, which read
        # the same h and d act tiles, run side by side, the second from L2); None: x itself
        dact_ptr=None, stride_dm=0,
        # MLA's attention backward (``mla_backward``), one program a tile. RoPE's (``_load_rope``): x is d q (M, K = H
        # HEAD), cos and sin (seq_len, (HEAD - NOPE) / 2) FP32 contiguous. The heads' (``_load_heads``): x is d k (M,
        # H HEAD) and b d v (M, H B_COLS), row stride stride_bm, K = H (NOPE + B_COLS). None: x itself
        cos_ptr=None, sin_ptr=None, seq_len=1, b_ptr=None, stride_bm=0, HEAD: gl.constexpr = 1,
        NOPE: gl.constexpr = 0, B_COLS: gl.constexpr = 0,
    ):
        """x's 128x128 tiles, each read once and both quantisations made from shared memory (module docstring).
        PERSISTENT False: the tile at (program_id(0), program_id(1)). True: tiles program_id(0), + num_programs(0),
        ... in the same order (along M first), the next tile's loads issued before this one's quantisation. Tiles
        at or past ``*bound_ptr`` are not written (``past_bound``)."""
        BLOCK: gl.constexpr = 128
        WARPS: gl.constexpr = gl.num_warps()
        VEC: gl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth  # elements in 16 bytes
        LANES_K: gl.constexpr = BLOCK // VEC if BLOCK // VEC < 32 else 32
        # one 16-byte vector of a row a thread, a warp over 32 / LANES_K whole rows
        row_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // LANES_K, LANES_K], [WARPS, 1], [1, 0])
        # x^T (K, M): VEC consecutive columns of x (16 bytes of a row of the tile) times M_PER_THREAD rows a
        # thread, a warp over VEC whole columns; registers in the tile's order (along K) for the shared read ...
        col_layout: gl.constexpr = gl.BlockedLayout([VEC, M_PER_THREAD], [1, 32], [WARPS, 1], [0, 1])
        # ... and the same registers in x^T's order (along M) for the global store
        col_store_layout: gl.constexpr = gl.BlockedLayout([VEC, M_PER_THREAD], [1, 32], [WARPS, 1], [1, 0])
        tile_layout: gl.constexpr = gl.SwizzledSharedLayout(VEC, SWIZZLE_ROWS, PHASES, [1, 0])
        gl.static_assert(M_PER_THREAD * 32 == BLOCK, "a warp holds whole columns of the tile")
        smem = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [BLOCK, BLOCK], tile_layout)
        gl.static_assert(gl.bank_conflicts(gl.distributed_type(x_ptr.dtype.element_ty, [BLOCK, BLOCK], row_layout),
                                           smem.type) == 0, "the tile's store and the rows' read have bank conflicts")
        gl.static_assert(gl.bank_conflicts(gl.distributed_type(x_ptr.dtype.element_ty, [BLOCK, BLOCK], col_layout),
                                           smem.permute((1, 0)).type) == 0, "the columns' read has bank conflicts")
        COLS: gl.constexpr = VEC * WARPS  # columns a pass of the warps takes

        if not PERSISTENT:
            if dact_ptr is None:
                pid_m = gl.program_id(0)
                pid_k = gl.program_id(1)
            else:  # programs 2j and 2j + 1 along the first axis: d gate's and d up's tile j of a row of tiles
                pid_m = gl.program_id(1)
                pid_k = (gl.program_id(0) % 2) * gl.cdiv(K // 2, BLOCK) + gl.program_id(0) // 2
            if bound_ptr is not None:
                if past_bound(pid_m * BLOCK, bound_ptr):
                    return
            # Step 1: the tile from HBM, once, into shared memory
            if cos_ptr is not None:  # RoPE's backward computed ROWS rows at a time, as d h below
                for r0 in gl.static_range(0, BLOCK, ROWS):
                    smem.slice(r0, ROWS, dim=0).store(_load_rope(x_ptr, cos_ptr, sin_ptr, pid_m * BLOCK + r0,
                                                                 pid_k * BLOCK, M, K, stride_xm, seq_len, ROWS, BLOCK,
                                                                 row_layout, HEAD, NOPE))
            elif b_ptr is not None:
                smem.store(_load_heads(x_ptr, b_ptr, pid_m * BLOCK, pid_k, M, stride_xm, stride_bm, BLOCK, row_layout,
                                       HEAD, NOPE, B_COLS))
            elif dact_ptr is None:
                smem.store(_load_tile(x_ptr, pid_m * BLOCK, pid_k * BLOCK, M, K, stride_xm, True, BLOCK, row_layout,
                                      src_ptr, w_ptr))
            else:  # d h computed ROWS rows at a time (its three inputs at once, whole, would take 160 registers)
                for r0 in gl.static_range(0, BLOCK, ROWS):
                    smem.slice(r0, ROWS, dim=0).store(_load_dh(x_ptr, dact_ptr, pid_m * BLOCK + r0, pid_k * BLOCK, M,
                                                               K, stride_xm, stride_dm, ROWS, BLOCK, row_layout))
            gl.thread_barrier()
            _quantise_tile(smem, q_ptr, s_ptr, qt_ptr, st_ptr, pid_m, pid_k, M, K, stride_qm, stride_sm, stride_sk,
                           stride_qt, stride_stk, stride_stm, ROWS, COLS, row_layout, col_layout, col_store_layout,
                           POW2, FLOOR, CAST)
        else:
            gl.static_assert(dact_ptr is None, "SwiGLU's backward runs one program a tile")
            gl.static_assert(cos_ptr is None and b_ptr is None, "MLA's backward runs one program a tile")
            rows_used = M
            if bound_ptr is not None:
                rows_used = gl.minimum(gl.maximum(gl.load(bound_ptr), 0), M)
            tiles_m = gl.cdiv(rows_used, BLOCK)
            tiles = tiles_m * gl.cdiv(K, BLOCK)
            tiles_m = gl.maximum(tiles_m, 1)  # a divisor below; with no row in use there is no tile
            step = gl.num_programs(0)
            first = gl.program_id(0)
            x = _load_tile(x_ptr, (first % tiles_m) * BLOCK, (first // tiles_m) * BLOCK, M, K, stride_xm,
                           first < tiles, BLOCK, row_layout, src_ptr, w_ptr)
            for tile in range(first, tiles, step):
                gl.thread_barrier()  # the previous tile's reads of smem are done
                smem.store(x)
                gl.thread_barrier()
                nxt = tile + step  # its loads in flight while this tile is quantised
                x = _load_tile(x_ptr, (nxt % tiles_m) * BLOCK, (nxt // tiles_m) * BLOCK, M, K, stride_xm,
                               nxt < tiles, BLOCK, row_layout, src_ptr, w_ptr)
                _quantise_tile(smem, q_ptr, s_ptr, qt_ptr, st_ptr, tile % tiles_m, tile // tiles_m, M, K, stride_qm,
                               stride_sm, stride_sk, stride_qt, stride_stk, stride_stm, ROWS, COLS, row_layout,
                               col_layout, col_store_layout, POW2, FLOOR, CAST)


def _config(config) -> tuple[int, int, int]:
    config = CONFIGS[0] if config is None else tuple(config)
    if config not in CONFIGS:
        raise ValueError(f"config={config} must be one of CONFIGS={CONFIGS}")
    return config


def _constexprs(pow2_scale: bool, amax_floor: float, cast: int, rows: int, persistent: bool) -> dict:
    return dict(POW2=pow2_scale, FLOOR=amax_floor, CAST=cast, ROWS=rows, PERSISTENT=persistent,
                SWIZZLE_ROWS=SWIZZLE_ROWS, PHASES=PHASES, M_PER_THREAD=M_PER_THREAD)


@functools.cache
def _sm_limits(index: int) -> tuple[int, int, int, int]:
    """(SMs, registers, shared memory bytes, threads) of one SM of a device (H100's where torch does not say)."""
    props = torch.cuda.get_device_properties(index)
    return (props.multi_processor_count, getattr(props, "regs_per_multiprocessor", 65536),
            getattr(props, "shared_memory_per_multiprocessor", 233472),
            getattr(props, "max_threads_per_multi_processor", 2048))


def resident(regs: int, shared_bytes: int, num_warps: int, sm_regs: int = 65536, sm_shared_bytes: int = 233472,
             sm_threads: int = 2048, sm_programs: int = 32) -> int:
    """Programs of a kernel (``regs`` a thread, ``shared_bytes`` a program) that one SM holds at once: registers go
    256 at a time to a warp, each program's shared memory takes 1 KiB more, at most 32 programs (CUDA's occupancy
    rules for sm_90)."""
    warp_regs = cdiv(regs * 32, 256) * 256
    return max(1, min(sm_regs // warp_regs // num_warps, sm_shared_bytes // (shared_bytes + 1024),
                      sm_threads // (32 * num_warps), sm_programs))


# programs an SM of a persistent launch, by the kernel's constexprs and input (``_persistent_key``): set after its
# first launch (which takes the config's number) from the registers and shared memory it compiled to
_FITS: dict = {}


def _persistent_key(x: torch.Tensor, config: tuple, consts: dict, bounded: bool, gathered: int = 0) -> tuple:
    return (x.device, x.dtype, config, bounded, gathered, *consts.values())


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def runs_on(x: torch.Tensor) -> bool:
    """Whether ``quant_act_both_gluon(x)`` runs the Gluon kernel (else it falls back to ``quant_act_both``): Gluon
    present, no interpreter, x on a Hopper GPU (``fp8_gemm_ws.runs_on``, the GEMMs' own test), bf16 or fp32, unit
    stride along K."""
    return (HAVE_GLUON and x.dtype in (torch.bfloat16, torch.float32) and x.stride(1) == 1
            and fp8_gemm_ws.runs_on(x.device))


def quant_act_both_gluon(
    x: torch.Tensor, pow2_scale: bool = False, amax_floor: float = AMAX_FLOOR, cast: str | None = None,
    row_bound: torch.Tensor | None = None, config: tuple[int, int, int] | None = None,
    gather: torch.Tensor | None = None, row_weights: torch.Tensor | None = None,
    out_t: tuple[torch.Tensor, torch.Tensor] | None = None, dact: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
    heads: tuple[torch.Tensor, int, int] | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """x (M, K) float → ((x_fp8 (M, K), scale (M, ceil(K/128))), (x^T fp8 (K, M), scale_t (K, ceil(M/128)))), as
    ``quant_act_both`` (bit for bit, the same layouts: MN-major scales; ``row_bound`` the same: 128-row tiles at or
    past it not written), reading x from HBM once. ``config``: one of ``CONFIGS`` (num_warps, rows a chunk of the
    rows' pass, persistent programs an SM or 0); the first by default.

    ``gather`` ((M,) int32 row of x or -1, on x's device; x then (T, K)): the rows quantised are x's rows
    ``gather`` (zeros at -1), times ``row_weights`` ((M,) fp32) where given and rounded to x's dtype:
    ``quant_act_both(moe_permute(x, plan, row_weights=row_weights))`` for ``gather = plan.src_token``, bit for bit,
    without the gathered rows ever stored (``moe_permute.moe_permute_quant_both``).

    ``out_t``: the transposed pair written into the caller's buffers (``fp8_quant.check_out_t``: any strides, so a
    micro-batch's columns of a wider stash).

    ``dact`` ((M, I) in x's dtype, unit column stride; x then SwiGLU's input h (M, 2I), I % 128 == 0): the rows
    quantised are ``swiglu.swiglu_backward(x, dact)``'s, bit for bit, without d h ever stored
    (``swiglu.swiglu_backward_quant_both``); one program a tile (a persistent ``config`` is refused).

    ``rope`` ((cos, sin, HEAD, NOPE); x then d q (M, H x HEAD) bf16): the rows quantised are
    ``mla_backward.rope_backward(x, cos, sin, HEAD, NOPE)``'s; ``heads`` ((d v, HEAD, NOPE); x then d k (M, H x
    HEAD) bf16, d v (M, H x V) bf16, NOPE and V multiples of 128): ``mla_backward.assemble_heads(x, d v, HEAD,
    NOPE)``'s. Their callers (``mla_backward``) check the shapes; one program a tile, no gather, dact or bound."""
    _check_float_2d(x, "x")
    num_warps, rows, per_sm = _config(config)
    mla = {}
    if rope is not None or heads is not None:
        if (rope is not None and heads is not None) or gather is not None or dact is not None or per_sm \
                or row_bound is not None or out_t is not None or not runs_on(x):
            raise ValueError("rope or heads: one of them, on the Gluon kernel, without a gather, dact, row bound, "
                             "out_t or persistent config")
        if rope is not None:
            cos, sin, head, nope = rope
            mla = dict(cos_ptr=cos, sin_ptr=sin, seq_len=cos.shape[0], HEAD=head, NOPE=nope)
        else:
            dv, head, nope = heads
            mla = dict(b_ptr=dv, stride_bm=dv.stride(0), HEAD=head, NOPE=nope,
                       B_COLS=dv.shape[1] // (x.shape[1] // head))
    if dact is not None and (gather is not None or per_sm or x.shape[1] % (2 * TILE) or dact.dtype != x.dtype
                             or tuple(dact.shape) != (x.shape[0], x.shape[1] // 2) or dact.stride(1) != 1):
        raise ValueError(f"dact must be (M, I) {x.dtype} with unit column stride for x (M, 2I), I % 128 == 0, "
                         f"without a gather or a persistent config; got dact {tuple(dact.shape)} {dact.dtype}, "
                         f"x {tuple(x.shape)}")
    if gather is not None and (gather.dtype != torch.int32 or gather.dim() != 1 or gather.device != x.device
                               or (row_weights is not None and (row_weights.dtype != torch.float32
                                                                or row_weights.shape != gather.shape))):
        raise ValueError("gather must be (M,) int32 on x's device, row_weights None or (M,) float32")
    if not runs_on(x):
        if gather is not None or dact is not None:
            raise ValueError("a gather or dact needs the Gluon kernel (runs_on(x)); their callers fall back")
        return quant_act_both(x, pow2_scale, amax_floor, cast, row_bound, out_t=out_t)
    M, K = (gather.numel(), x.shape[1]) if gather is not None else x.shape
    if heads is not None:
        K = x.shape[1] // mla["HEAD"] * (mla["NOPE"] + mla["B_COLS"])
    (q, s), (qt, st) = rows_output(M, K, x.device), rows_output(K, M, x.device, out_t)
    check_row_bound(row_bound, x.device)
    if not x.numel():
        return (q, s), (qt, st)
    consts = _constexprs(pow2_scale, amax_floor, _cast(x.device, cast), rows, per_sm > 0)
    grid = (cdiv(M, TILE), cdiv(K, TILE)) if dact is None else (cdiv(K, TILE), cdiv(M, TILE))
    if per_sm:
        key = _persistent_key(x, (num_warps, rows, per_sm), consts, row_bound is not None,
                              (gather is not None) + (row_weights is not None))
        sms, sm_regs, sm_shared, sm_threads = _sm_limits(_index(x.device))
        grid = (min(grid[0] * grid[1], _FITS.get(key, per_sm) * sms),)
    kernel = _quant_both_gluon_kernel[grid](
        x, q, s, qt, st, M, K, x.stride(0), q.stride(0), s.stride(0), s.stride(1), qt.stride(0), st.stride(0),
        st.stride(1), num_warps=num_warps, maxnreg=MAX_REGS, bound_ptr=row_bound, src_ptr=gather, w_ptr=row_weights,
        dact_ptr=dact, stride_dm=0 if dact is None else dact.stride(0), **mla, **consts)
    if per_sm and key not in _FITS:
        _FITS[key] = min(per_sm, resident(kernel.n_regs, kernel.metadata.shared, num_warps, sm_regs, sm_shared,
                                          sm_threads))
    return (q, s), (qt, st)


def benchmark(M: int = 4096, K: int = 7168) -> dict[str, float]:
    """GB/s of each config on a CUDA device (the fallback's where ``runs_on`` says no), bytes as
    ``fp8_quant.benchmark`` counts them (bf16 in, both fp8 copies out, scales ignored). The torch references are ``fp8_quant``'s (``quant_act_1x128_ref``, ``quant_act_128x1_t_ref``);
    benchmarks/quant_both_bench.py times the configs against the two single quantisers."""
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    gbytes = 4 * M * K / 1e9
    return {str(c): gbytes / (triton.testing.do_bench(lambda c=c: quant_act_both_gluon(x, config=c),
                                                      return_mode="median") * 1e-3) for c in CONFIGS}


_INT_ARGS = ("M", "K", "stride_xm", "stride_qm", "stride_sm", "stride_sk", "stride_qt", "stride_stk", "stride_stm")


def compile_offline(dtype: torch.dtype = torch.bfloat16, pow2_scale: bool = False, cast: int = 0,
                    config: tuple[int, int, int] | None = None, amax_floor: float = AMAX_FLOOR, capability: int = 90,
                    swizzle_rows: int = SWIZZLE_ROWS, row_bound: bool = False, gather: bool = False,
                    weighted: bool = False, dact: bool = False, rope: bool = False, heads: bool = False,
                    head: int = 192, nope: int = 128, b_cols: int = 128):
    """Compile the kernel for ``sm_{capability}`` without a GPU and return Triton's compiled kernel (its
    ``.asm["ptx"]``). Integers are specialised as Triton does for sizes divisible by 16. Needs a process without
    ``TRITON_INTERPRET`` (the kernel calls ``fp8_quant``'s jit functions, which the interpreter replaces).
    ``swizzle_rows``: another swizzle, for the test that the bank-conflict check fails; ``row_bound``: with a
    bound pointer; ``gather`` (and ``weighted``): with the gather's row index (and weights) pointers; ``rope`` or
    ``heads``: MLA's backward modes at ``head``, ``nope`` (and d v's ``b_cols``) channels a head."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    num_warps, rows, per_sm = _config(config)
    names = {torch.bfloat16: "bf16", torch.float32: "fp32"}
    signature = {"x_ptr": f"*{names[dtype]}", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "qt_ptr": "*fp8e4nv",
                 "st_ptr": "*fp32"} | {n: "i32" for n in _INT_ARGS}
    meta = _constexprs(pow2_scale, amax_floor, cast, rows, per_sm > 0) | {"SWIZZLE_ROWS": swizzle_rows}
    signature |= {n: "constexpr" for n in meta}
    if row_bound:
        signature["bound_ptr"] = "*i32"
    else:
        signature["bound_ptr"], meta["bound_ptr"] = "constexpr", None
    for name, kind, given in (("src_ptr", "*i32", gather), ("w_ptr", "*fp32", gather and weighted),
                              ("dact_ptr", f"*{names[dtype]}", dact)):
        if given:
            signature[name] = kind
        else:
            signature[name], meta[name] = "constexpr", None
    signature["stride_dm"] = "i32" if dact else "constexpr"
    if not dact:
        meta["stride_dm"] = 0
    # MLA's backward (``rope``: RoPE's, ``heads``: the heads' assembly) at V3's head sizes by default
    for name, kind, given in (("cos_ptr", "*fp32", rope), ("sin_ptr", "*fp32", rope), ("seq_len", "i32", rope),
                              ("b_ptr", f"*{names[dtype]}", heads), ("stride_bm", "i32", heads)):
        if given:
            signature[name] = kind
        else:
            signature[name], meta[name] = "constexpr", {"seq_len": 1, "stride_bm": 0}.get(name)
    for name, value in (("HEAD", head if rope or heads else 1), ("NOPE", nope if rope or heads else 0),
                        ("B_COLS", b_cols if heads else 0)):
        signature[name], meta[name] = "constexpr", value
    # what the JIT assumes of a 16-byte-aligned pointer and an integer divisible by 16 (the stride of x along K is
    # not an argument: it is 1)
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5 + len(_INT_ARGS))}
    names_in_order = list(_quant_both_gluon_kernel.arg_names)
    aligned = {"dact_ptr", "stride_dm"} if dact else set()  # d act's pointer and row stride: V3's 2048 columns
    aligned |= {"cos_ptr", "sin_ptr", "seq_len"} if rope else set()  # cos/sin as allocated, 4096 positions
    aligned |= {"b_ptr", "stride_bm"} if heads else set()  # d v's pointer and row stride: 128 heads x 128
    attrs |= {(names_in_order.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = GluonASTSource(_quant_both_gluon_kernel, signature, meta, attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})
