"""FP8 E4M3 quantisation with DeepSeek-V3 fine-grained scales (TR §3.3).

Three tilings, each with one fp32 scale per tile (``x ≈ x_fp8 * scale``):

* ``quant_act_1x128``: activations ``(M, K)`` in 1×128 tiles along K → scales ``(M, ceil(K/128))``.
* ``quant_act_128x1_t``: the same activations re-tiled 128×1 (128 rows of one column), written
  transposed, ``(K, M)`` with scales ``(K, ceil(M/128))``. Weight gradients reduce over tokens, so
  both of their operands need scales along M, and FP8 wgmma wants the reduction dim contiguous.
* ``quant_act_both``: both of the above, for an activation or gradient that a forward GEMM or Dgrad and a
  Wgrad both multiply, by ``ONE_READ``: on a Hopper GPU one read of x by default (one program per 128×128 tile,
  both amaxes on chip, the tile in shared memory: ``fp8_quant_gluon``), else the two quantisers (or in
  registers, True: measured slower than either).
* ``quant_weight_128x128``: weights ``([E,] N, K)`` in 128×128 blocks → scales ``([E,] ceil(N/128),
  ceil(K/128))``; optionally also the transposed copy ``([E,] K, N)`` that the input gradient needs
  (a 128×128 block's scale is the same either way round, so its scales are ``scale.mT``).

Scales are online max-abs (no delayed scaling), ``max(amax, amax_floor) / 448`` or, with
``pow2_scale``, the next power of two at or above it (exact in any format; DeepSeek uses it for
dispatch). ``amax_floor`` keeps an all-zero tile from 0/0: DeepSeek's 1e-4 by default; the model
passes its own (``model.fp8.MIN_AMAX``) so that tiles of tiny gradients keep E4M3's resolution.
"""

import torch

from .e4m3_cast import CASTS, FP8_DTYPE, cast_for_device, e4m3_cast
from .triton_compat import INTERPRET, INTERPRET_C, cdiv, tl, triton

FP8_MAX = 448.0
TILE = 128
# A zero tile would give scale 0 and 0/0 in the cast; DeepSeek clamps amax the same way.
AMAX_FLOOR = 1e-4


@triton.jit
def scale_from_amax(amax, POW2: tl.constexpr, FLOOR: tl.constexpr):
    """fp32 scale with ``amax / scale <= 448``; IEEE division so the torch reference is bit-exact."""
    scale = tl.math.div_rn(tl.maximum(amax, FLOOR), 448.0)
    if POW2:
        # Round up to a power of two by bits: exact, unlike log2/ceil/exp2.
        bits = scale.to(tl.int32, bitcast=True)
        exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale = (exponent << 23).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def past_bound(first, bound_ptr):
    """Whether a tile whose first row is ``first`` starts at or after ``*bound_ptr`` (int32 on the device): the
    rows in use of a buffer sized for the worst case (``moe_permute.DispatchPlan.rows_bound``). The memory-bound
    kernels on such buffers keep their worst-case grid, so the host never learns the bound, and a program whose
    tile lies past it returns at once, writing nothing (what makes that safe is the caller's to say)."""
    return first >= tl.load(bound_ptr)


@triton.jit
def quantize_e4m3(x, scale, POW2: tl.constexpr = False, CAST: tl.constexpr = 0):
    """x / scale as E4M3 (round to nearest even, ±448 beyond), bit for bit the torch reference's
    ``(x / scale).clamp(-448, 448).to(float8_e4m3fn)`` on finite and infinite inputs.

    POW2 (scale from ``scale_from_amax(..., POW2=True)``: 0, 2**k with k in [-126, 127], or inf):
    x times 1/scale, one multiply per element instead of an IEEE division. 1/2**k is exact (a normal
    or subnormal fp32; 1/0 = inf, 1/inf = 0), so x * (1/scale) and x / scale are the correct rounding
    of the same real number, both IEEE without flush to zero (``mul.f32``, ``div.rn.f32`` in the PTX):
    the same bits, signed zeros, infinities and NaNs (0 * inf, inf * 0) included. Any other scale
    keeps the division: a reciprocal multiply is one ulp off for some x.

    CAST: the E4M3 path (``e4m3_cast``: 0 the integer emulation, else a hardware cvt, only where
    ``cast_for_device`` found it bit for bit the emulation on the device).
    """
    if POW2:
        q = x * tl.math.div_rn(1.0, scale)
    else:
        q = tl.math.div_rn(x, scale)
    return e4m3_cast(q, CAST)


@triton.jit
def cast_for_store(x, dtype: tl.constexpr):
    """fp32 → dtype. The interpreter truncates to bf16; round to nearest even there first, as a GPU does."""
    if INTERPRET_C and dtype == tl.bfloat16:
        biased_exp = tl.minimum((x.to(tl.int32, bitcast=True) >> 23) & 0xFF, 254 - 16)
        magic = (((biased_exp + 16) << 23) | 0x400000).to(tl.float32, bitcast=True)  # 1.5 * 2**23 * bf16 ulp
        x = (x + magic) - magic
    return x.to(dtype)


@triton.jit
def store_rows(out_ptrs, scale_ptrs, x, mask, row_mask, QUANT: tl.constexpr, POW2: tl.constexpr,
               FLOOR: tl.constexpr, CAST: tl.constexpr = 0):
    """Epilogue for a (rows, 128) fp32 tile: store it as E4M3 with one scale per row (amax floored at
    FLOOR), or as out's dtype. CAST as in ``quantize_e4m3``."""
    if QUANT:
        scale = scale_from_amax(tl.max(tl.abs(x), axis=1), POW2, FLOOR)
        tl.store(out_ptrs, quantize_e4m3(x, scale[:, None], POW2, CAST), mask=mask)
        tl.store(scale_ptrs, scale, mask=row_mask)
    else:
        tl.store(out_ptrs, cast_for_store(x, out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def store_t(q_ptr, x, scale, rows, cols, mask, stride_q, POW2: tl.constexpr, CAST: tl.constexpr = 0):
    """A (R rows, C cols) fp32 tile with one scale per column (``scale`` (C,)), stored transposed as E4M3:
    q[col, row] at ``q_ptr + col * stride_q + row``. (Storing ``tl.trans(q)`` instead gave the same PTX in
    ``_quant_both_kernel``, sm_90a, Triton 3.6: the coalescing pass lays the store out along the contiguous rows.)"""
    q = quantize_e4m3(x, scale[None, :], POW2, CAST)
    tl.store(q_ptr + cols[None, :].to(tl.int64) * stride_q + rows[:, None], q, mask=mask)


@triton.jit
def store_cols_t(q_ptr, s_ptr, x, rows, cols, mask, col_mask, stride_q, stride_s, tile,
                 POW2: tl.constexpr, FLOOR: tl.constexpr, CAST: tl.constexpr = 0):
    """Epilogue for a (128 rows, C cols) fp32 tile in 128x1 tiles (one scale per column, amax floored at
    FLOOR), written transposed: q[col, row] at ``q_ptr + col * stride_q + row``, the scale at
    ``s_ptr + col * stride_s + tile``; what ``quant_act_128x1_t`` makes of the tile, without storing it first."""
    scale = scale_from_amax(tl.max(tl.abs(x), axis=0), POW2, FLOOR)  # (C,)
    store_t(q_ptr, x, scale, rows, cols, mask, stride_q, POW2, CAST)
    tl.store(s_ptr + cols * stride_s + tile, scale, mask=col_mask)


def empty_cols_t_output(rows: int, cols: int, device, out: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs for ``store_cols_t``: (fp8 (cols, rows), fp32 scales (cols, ceil(rows/128))); ``out`` (checked by
    ``check_out_t``) where the caller gives them."""
    if out is not None:
        check_out_t(out, rows, cols, device, scale_rows_unit=True)
        return out
    return (torch.empty((cols, rows), dtype=FP8_DTYPE, device=device),
            torch.empty((cols, cdiv(rows, TILE)), dtype=torch.float32, device=device))


def check_out_t(out: tuple[torch.Tensor, torch.Tensor], rows: int, cols: int, device,
                scale_rows_unit: bool = False) -> None:
    """A caller's buffers for a transposed 128x1 output of ``rows`` x ``cols``: (E4M3 (cols, rows) with unit
    stride along rows, fp32 scales (cols, ceil(rows/128)) on ``device``; ``scale_rows_unit``: unit stride along
    the scales' rows too, as ``store_cols_t`` stores them). Views into wider buffers are what it is for: a
    micro-batch's columns of a stash of several, which a K-grouped Wgrad then reads as one operand
    (``model.weight_grad.ExpertWgradBatch``)."""
    q, s = out
    want_s = (cols, cdiv(rows, TILE))
    if (tuple(q.shape) != (cols, rows) or q.dtype != FP8_DTYPE or q.device != torch.device(device)
            or (rows > 1 and q.stride(1) != 1) or tuple(s.shape) != want_s or s.dtype != torch.float32
            or s.device != torch.device(device) or (scale_rows_unit and want_s[1] > 1 and s.stride(1) != 1)):
        raise ValueError(f"out must be (E4M3 {(cols, rows)} with unit stride along its rows, float32 {want_s}"
                         f"{' with unit stride along its rows' if scale_rows_unit else ''}) on {device}; got "
                         f"{q.dtype} {tuple(q.shape)} {q.stride()} on {q.device}, {s.dtype} {tuple(s.shape)} "
                         f"{s.stride()} on {s.device}")


def _autotune_bench(kernel_call, quantiles):
    """Times one autotune candidate: 5 ms of warm-up and 25 of timed runs (Triton's default 25 + 100 ms).
    A quantiser takes 10 us to 3 ms, so each candidate still runs 8 times or more, and the first step
    of a run (and benchmarks/quant_speed.py, ~30 tunings) spends a quarter of the time tuning."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _rows_configs() -> list:
    """Autotune candidates for ``_quant_rows_kernel`` (one in the interpreter). A transposed view reads
    BLOCK_R contiguous elements of each of 128 rows of x: 32 bf16 are half a 128-byte line, hence taller tiles."""
    if INTERPRET:
        return [triton.Config({"BLOCK_R": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_R": r}, num_warps=w) for r, w in ((32, 4), (64, 4), (64, 8), (128, 8), (16, 2))]


def _blocks_configs() -> list:
    """Autotune candidates for ``_quant_blocks_kernel``: a 128x128 block's 16K values over 4, 8 or 16 warps,
    the transposed copy stored as is or through ``tl.trans`` (one in the interpreter)."""
    if INTERPRET:
        return [triton.Config({"TRANS_STORE": False}, num_warps=4)]
    return [triton.Config({"TRANS_STORE": t}, num_warps=w) for w in (4, 8, 16) for t in (False, True)]


def _both_configs() -> list:
    """Autotune candidates for ``_quant_both_kernel`` (one in the interpreter; the tests run several). SUB 128: the
    128x128 tile whole in registers, read once, but ptxas spills ~300 bytes a thread even over 16 warps (sm_90a,
    Triton 3.6), SUB 64 ~200; chunks of 32 or 16 rows (read twice, the second time from L2) spill nothing. 32
    rows and more write whole 32-byte sectors of the transposed copy."""
    if INTERPRET:
        return [triton.Config({"SUB": 32}, num_warps=4)]
    return [triton.Config({"SUB": sub}, num_warps=w) for sub, w in ((128, 16), (64, 16), (32, 16), (32, 8), (16, 8),
                                                                     (16, 4))]


@triton.autotune(configs=_rows_configs(), key=["size_key", "ROW_MAJOR", "CAST"], do_bench=_autotune_bench)
@triton.jit
def _quant_rows_kernel(
    # pointers: input (R, C), fp8 output, fp32 scales (R, ceil(C/128))
    x_ptr, q_ptr, s_ptr,
    # sizes (size_key, the bit length of R * C, only keys the autotuner: a new token count must not re-tune)
    R, C, size_key,
    # strides
    stride_xr, stride_xc, stride_qr, stride_qc, stride_sr, stride_sc,
    # meta
    POW2: tl.constexpr, FLOOR: tl.constexpr, ROW_MAJOR: tl.constexpr, CAST: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    # a worst-case-sized buffer's rows in use, (1,) int32 on the device, or None; BOUND_COLS: a transposed view's
    # (its columns are the buffer's rows); last, with defaults, so that the positional launches stay as they were
    bound_ptr=None, BOUND_COLS: tl.constexpr = False,
):
    """One scale per (row, 128 columns) of an (R, C) view; a transposed view (swapped strides)
    gives the 128×1 tiling. Tiles at or after ``*bound_ptr`` are not written (``past_bound``)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    if bound_ptr is not None:
        if past_bound(pid_c * BLOCK_C if BOUND_COLS else pid_r * BLOCK_R, bound_ptr):
            return
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    x = tl.load(x_ptr + offs_r[:, None] * stride_xr + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
    x = x.to(tl.float32)  # (BLOCK_R, 128); fp32 at once: the interpreter mishandles bf16 math
    scale = scale_from_amax(tl.max(tl.abs(x), axis=1), POW2, FLOOR)  # (BLOCK_R,)
    q = quantize_e4m3(x, scale[:, None], POW2, CAST)
    tl.store(q_ptr + offs_r[:, None] * stride_qr + offs_c[None, :] * stride_qc, q, mask=mask)
    tl.store(s_ptr + offs_r * stride_sr + pid_c * stride_sc, scale, mask=offs_r < R)


@triton.autotune(configs=_blocks_configs(), key=["N", "K", "WRITE_Q", "WRITE_T", "CAST"], do_bench=_autotune_bench)
@triton.jit
def _quant_blocks_kernel(
    # pointers: weights (E, N, K), fp8 copy, its transpose (E, K, N), scales (E, N/128, K/128)
    w_ptr, q_ptr, qt_ptr, s_ptr,
    # sizes
    N, K,
    # strides (the transpose's as element [e, n, k] of it: (K*N, 1, N) when contiguous)
    stride_we, stride_wn, stride_wk, stride_qe, stride_qn, stride_qk, stride_te, stride_tn, stride_tk,
    stride_se, stride_sn, stride_sk,
    # meta
    POW2: tl.constexpr, FLOOR: tl.constexpr, BLOCK: tl.constexpr, WRITE_Q: tl.constexpr, WRITE_T: tl.constexpr,
    CAST: tl.constexpr, TRANS_STORE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(w_ptr + e * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                mask=mask, other=0.0).to(tl.float32)
    scale = scale_from_amax(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2, FLOOR)
    q = quantize_e4m3(w, scale, POW2, CAST)
    if WRITE_Q:
        tl.store(q_ptr + e * stride_qe + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk, q, mask=mask)
    if WRITE_T:  # the same block, stored at its transposed place: contiguous along n there
        if TRANS_STORE:  # as a (k, n) tile, so that the register layout runs along the contiguous n
            tl.store(qt_ptr + e * stride_te + offs_k[:, None] * stride_tk + offs_n[None, :] * stride_tn,
                     tl.trans(q), mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))
        else:
            tl.store(qt_ptr + e * stride_te + offs_n[:, None] * stride_tn + offs_k[None, :] * stride_tk, q,
                     mask=mask)
    tl.store(s_ptr + e * stride_se + pid_n * stride_sn + pid_k * stride_sk, scale)


@triton.jit
def _load_rows_f32(x_ptr, rows, cols, mask, stride_xm, stride_xk):
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    return x.to(tl.float32)  # fp32 at once: the interpreter mishandles bf16 math


@triton.autotune(configs=_both_configs(), key=["size_key", "ROW_MAJOR", "CAST"], do_bench=_autotune_bench)
@triton.jit
def _quant_both_kernel(
    # pointers: input (M, K); fp8 copy (M, K) and its scales (M, ceil(K/128)); fp8 transpose (K, M) and its
    # scales (K, ceil(M/128))
    x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr,
    # sizes (size_key as in _quant_rows_kernel)
    M, K, size_key,
    # strides (the transpose's row stride only: it is contiguous along M)
    stride_xm, stride_xk, stride_qm, stride_qk, stride_sm, stride_sk, stride_qt, stride_stk, stride_stm,
    # meta
    POW2: tl.constexpr, FLOOR: tl.constexpr, ROW_MAJOR: tl.constexpr, CAST: tl.constexpr, BLOCK: tl.constexpr,
    SUB: tl.constexpr,
    # a worst-case-sized buffer's rows in use (M), (1,) int32 on the device, or None (as in _quant_rows_kernel)
    bound_ptr=None,
):
    """One BLOCK x BLOCK tile of x per program: one scale per row of it (1x128 tiles, stored as is) and one per
    column (128x1 tiles, stored transposed). SUB == BLOCK: the tile is loaded once and both epilogues of the
    single-tiling kernels run on it. SUB < BLOCK: the columns' amax over chunks of SUB rows, then each chunk
    again (32 KB of bf16 a program, read from L2, not HBM) for its rows' scales and both quantisations: fewer
    live registers, the same bits (a max is exact in any order)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    if bound_ptr is not None:
        if past_bound(pid_m * BLOCK, bound_ptr):
            return
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    col_mask = cols < K
    if SUB == BLOCK:
        rows = pid_m * BLOCK + tl.arange(0, BLOCK)
        mask = (rows < M)[:, None] & col_mask[None, :]
        x = _load_rows_f32(x_ptr, rows, cols, mask, stride_xm, stride_xk)  # (BLOCK, BLOCK)
        store_rows(q_ptr + rows[:, None].to(tl.int64) * stride_qm + cols[None, :] * stride_qk,
                   s_ptr + rows * stride_sm + pid_k * stride_sk, x, mask, rows < M, True, POW2, FLOOR, CAST)
        store_cols_t(qt_ptr, st_ptr, x, rows, cols, mask, col_mask, stride_qt, stride_stk, pid_m * stride_stm,
                     POW2, FLOOR, CAST)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for r in tl.range(0, BLOCK, SUB):
            rows = pid_m * BLOCK + r + tl.arange(0, SUB)
            mask = (rows < M)[:, None] & col_mask[None, :]
            x = _load_rows_f32(x_ptr, rows, cols, mask, stride_xm, stride_xk)  # (SUB, BLOCK)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
        scale_t = scale_from_amax(amax, POW2, FLOOR)  # (BLOCK,): the 128x1 tiles' scales
        for r in tl.range(0, BLOCK, SUB):
            rows = pid_m * BLOCK + r + tl.arange(0, SUB)
            mask = (rows < M)[:, None] & col_mask[None, :]
            x = _load_rows_f32(x_ptr, rows, cols, mask, stride_xm, stride_xk)
            store_rows(q_ptr + rows[:, None].to(tl.int64) * stride_qm + cols[None, :] * stride_qk,
                       s_ptr + rows * stride_sm + pid_k * stride_sk, x, mask, rows < M, True, POW2, FLOOR, CAST)
            store_t(qt_ptr, x, scale_t, rows, cols, mask, stride_qt, POW2, CAST)
        tl.store(st_ptr + cols * stride_stk + pid_m * stride_stm, scale_t, mask=col_mask)


def empty_rows_output(rows: int, cols: int, dtype: torch.dtype, quantize: bool, device) -> tuple:
    """Outputs for ``store_rows``: (fp8 (rows, cols), fp32 scales (rows, ceil(cols/128))) when
    quantising, else ((rows, cols) of dtype, the same tensor as an unused scale pointer)."""
    if not quantize:
        out = torch.empty((rows, cols), dtype=dtype, device=device)
        return out, out
    return (torch.empty((rows, cols), dtype=FP8_DTYPE, device=device),
            torch.empty((rows, cdiv(cols, TILE)), dtype=torch.float32, device=device))


def _check_float_2d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a 2-D float tensor, got shape={tuple(x.shape)} dtype={x.dtype}")


def _cast(device: torch.device, cast: str | None) -> int:
    """The E4M3 path a quantiser call takes: ``cast_for_device``'s for the device unless named."""
    if cast is None:
        return cast_for_device(device)
    if cast not in CASTS:
        raise ValueError(f"cast={cast!r} must be one of {sorted(CASTS)} or None")
    if cast != "emulated" and (INTERPRET or device.type != "cuda"):
        raise ValueError(f"cast={cast!r} needs a CUDA device and no Triton interpreter, got device={device} "
                         f"TRITON_INTERPRET={int(INTERPRET)}")
    return CASTS[cast]


def _empty_mn_major_scales(rows: int, cols: int, device) -> torch.Tensor:
    """fp32 scales (rows, ceil(cols/128)) with strides (1, rows rounded up to 4): see ``_quant_rows``."""
    return torch.empty((cdiv(cols, TILE), cdiv(rows, 4) * 4), dtype=torch.float32, device=device)[:, :rows].t()


def rows_output(rows: int, cols: int, device, out: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A row quantiser's outputs for (rows, cols): E4M3 (rows, cols) and MN-major scales (``_empty_mn_major_scales``),
    or ``out``, the caller's, checked as the transposed output of a (cols, rows) tensor (``check_out_t``)."""
    if out is not None:
        check_out_t(out, cols, rows, device)
        return out
    return torch.empty((rows, cols), dtype=FP8_DTYPE, device=device), _empty_mn_major_scales(rows, cols, device)


def _quant_rows(view: torch.Tensor, pow2_scale: bool, amax_floor: float, cast: str | None = None,
                bound: torch.Tensor | None = None, bound_cols: bool = False,
                out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the rows of a 2-D view (any strides) in 1×128 tiles into a new contiguous tensor.

    The scales come MN-major, (R, ceil(C/128)) with strides (1, R rounded up to 4): one K block's
    scales contiguous at a 16-byte pitch, the layout cuBLAS's block scaling and the Gluon GEMM's
    TMA read without a copy (row-major readers take any strides). ``bound``: (1,) int32 on the device, the rows
    (``bound_cols``: columns) of the view in use; the tiles after it are left unwritten, values and scales.
    ``out``: the caller's (values, scales) instead, any strides (``check_out_t`` of the view's transpose)."""
    R, C = view.shape
    q, s = rows_output(R, C, view.device, out)
    check_row_bound(bound, view.device)
    _quant_rows_kernel[lambda meta: (cdiv(R, meta["BLOCK_R"]), cdiv(C, TILE))](
        view, q, s, R, C, (R * C).bit_length(),
        view.stride(0), view.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
        POW2=pow2_scale, FLOOR=amax_floor, ROW_MAJOR=view.stride(1) == 1, CAST=_cast(view.device, cast),
        BLOCK_C=TILE, bound_ptr=bound, BOUND_COLS=bound_cols,
    )
    return q, s


def check_row_bound(bound: torch.Tensor | None, device: torch.device) -> None:
    """A row bound is None or (1,) int32 on ``device``: read there by the kernels, never by the host."""
    if bound is not None and (bound.shape != (1,) or bound.dtype != torch.int32 or bound.device != device):
        raise ValueError(f"row_bound must be (1,) int32 on {device}, got {tuple(bound.shape)} {bound.dtype} "
                         f"on {bound.device}")


def quant_act_1x128(x: torch.Tensor, pow2_scale: bool = False, amax_floor: float = AMAX_FLOOR, cast: str | None = None,
                    row_bound: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float → (x_fp8 (M, K), scale (M, ceil(K/128)) fp32), one scale per 1×128 tile.

    ``cast`` (every quantiser here): the E4M3 path by name (``e4m3_cast.CASTS``: "emulated", "hardware",
    "hardware_f16"), or None for the one ``e4m3_cast.cast_for_device`` chose for x's device; the same bits
    wherever the device's probe passed. ``row_bound`` (the activation quantisers): (1,) int32 on x's device, the
    rows of x in use (a worst-case-sized buffer's, ``moe_permute.DispatchPlan.rows_bound``), read on the device;
    the outputs' tiles of the rows after it, values and scales, are left unwritten."""
    _check_float_2d(x, "x")
    return _quant_rows(x, pow2_scale, amax_floor, cast, row_bound)


def quant_act_128x1_t(x: torch.Tensor, pow2_scale: bool = False, amax_floor: float = AMAX_FLOOR,
                      cast: str | None = None, row_bound: torch.Tensor | None = None,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float → (x^T fp8 (K, M) contiguous, scale (K, ceil(M/128)) fp32), 128×1 tiles; ``out``: written
    into the caller's buffers instead (``check_out_t``: views of a wider stash are fine)."""
    _check_float_2d(x, "x")
    return _quant_rows(x.t(), pow2_scale, amax_floor, cast, row_bound, bound_cols=True, out=out)  # x's rows: columns


# How ``quant_act_both`` reads x. "gluon" (the default): ``fp8_quant_gluon.quant_act_both_gluon`` (the tile in
# shared memory, x read once) where it runs (a Hopper GPU, bf16 or fp32 rows), else as False. False: the two single
# quantisers, x read twice. True: ``_quant_both_kernel`` (x read once, in registers). benchmarks/quant_both_bench.py
# (docs/results/quant-both.md, H100, 2026-12-07 05:28 UTC, L2 flushed) at 4096x7168, 34560x7168 and 34560x4096
# bf16: Gluon 59.5, 427 and 249 us (60-71% of HBM at the one read's bytes), the two 68.2, 543 and 311 us, True's
# best 111, 866 and 499 us; every candidate bit-exact. Inside the FP8 step (benchmarks/model_step.py, workload A,
# K = 16, H100, 05:45 UTC) the casts took 8.06 ms a micro-batch with Gluon against 8.37 ms with the two (05:27,
# the same kind of card): the two's second read partly hits L2 there. The GPU tests
# (tests/kernels/test_fp8_quant_gluon.py -m gpu) passed: 83 and, in an earlier call cut by its timeout, 63.
ONE_READ: bool | str = "gluon"
ONE_READ_CHOICES = {"two": False, "triton": True, "gluon": "gluon"}  # names for ONE_READ (benchmarks' flags)


def quant_act_both(
    x: torch.Tensor, pow2_scale: bool = False, amax_floor: float = AMAX_FLOOR, cast: str | None = None,
    row_bound: torch.Tensor | None = None, out_t: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """x (M, K) float → ((x_fp8 (M, K), scale (M, ceil(K/128))), (x^T fp8 (K, M), scale_t (K, ceil(M/128)))):
    ``quant_act_1x128(x)`` and ``quant_act_128x1_t(x)`` bit for bit, in the same layouts (MN-major scales),
    from one read of x instead of two where ``ONE_READ``. For a tensor that a GEMM multiplies along K and a weight
    gradient along M: a linear layer's input (forward, then Wgrad) and its output gradient (Dgrad, then Wgrad).
    ``out_t``: the transposed pair written into the caller's buffers (``check_out_t``), every path."""
    _check_float_2d(x, "x")
    if ONE_READ == "gluon":
        from . import fp8_quant_gluon  # imports this module: not at the top

        if fp8_quant_gluon.runs_on(x):
            return fp8_quant_gluon.quant_act_both_gluon(x, pow2_scale, amax_floor, cast, row_bound, out_t=out_t)
    if ONE_READ is not True:
        return (_quant_rows(x, pow2_scale, amax_floor, cast, row_bound),
                _quant_rows(x.t(), pow2_scale, amax_floor, cast, row_bound, bound_cols=True, out=out_t))
    M, K = x.shape
    (q, s), (qt, st) = rows_output(M, K, x.device), rows_output(K, M, x.device, out_t)
    check_row_bound(row_bound, x.device)
    if x.numel():
        _quant_both_kernel[(cdiv(M, TILE), cdiv(K, TILE))](
            x, q, s, qt, st, M, K, (M * K).bit_length(),
            x.stride(0), x.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1), qt.stride(0),
            st.stride(0), st.stride(1),
            POW2=pow2_scale, FLOOR=amax_floor, ROW_MAJOR=x.stride(1) == 1, CAST=_cast(x.device, cast), BLOCK=TILE,
            bound_ptr=row_bound,
        )
    return (q, s), (qt, st)


def _quant_blocks(w: torch.Tensor, pow2_scale: bool, amax_floor: float, write_q: bool, write_t: bool,
                  cast: str | None = None):
    """One pass over w ([E,] N, K): (q ([E,] N, K) or None, q^T ([E,] K, N) contiguous or None, scale ([E,] N/128,
    K/128)). The transposed copy is stored from the same registers, so w is read once and never transposed."""
    if w.dim() not in (2, 3) or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D or 3-D float tensor, got shape={tuple(w.shape)} dtype={w.dtype}")
    w3 = w if w.dim() == 3 else w.unsqueeze(0)  # (E, N, K)
    E, N, K = w3.shape
    q = torch.empty((E, N, K) if write_q else (1, 1, 1), dtype=FP8_DTYPE, device=w.device)
    qt = torch.empty((E, K, N) if write_t else (1, 1, 1), dtype=FP8_DTYPE, device=w.device)
    s = torch.empty((E, cdiv(N, TILE), cdiv(K, TILE)), dtype=torch.float32, device=w.device)
    grid = (cdiv(N, TILE), cdiv(K, TILE), E)
    _quant_blocks_kernel[grid](w3, q, qt, s, N, K, *w3.stride(), *q.stride(), *qt.transpose(1, 2).stride(),
                               *s.stride(), POW2=pow2_scale, FLOOR=amax_floor, BLOCK=TILE, WRITE_Q=write_q,
                               WRITE_T=write_t, CAST=_cast(w.device, cast))
    if w.dim() == 2:
        q, qt, s = q[0], qt[0], s[0]
    return (q if write_q else None), (qt if write_t else None), s


def quant_weight_128x128(
    w: torch.Tensor, pow2_scale: bool = False, transposed: bool = False, amax_floor: float = AMAX_FLOOR,
    cast: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w ([E,] N, K) float → (w_fp8 ([E,] N, K), scale ([E,] ceil(N/128), ceil(K/128)), w_fp8^T or None).

    The transposed copy is ([E,] K, N) contiguous, for the input gradient; its scales are ``scale.mT``.
    """
    q, qt, s = _quant_blocks(w, pow2_scale, amax_floor, True, transposed, cast)
    return q, s, qt


def quant_weight_128x128_t(
    w: torch.Tensor, pow2_scale: bool = False, amax_floor: float = AMAX_FLOOR, cast: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantisation of w^T, read from w ([E,] N, K) in its own layout: (q ([E,] K, N) contiguous, scale
    ([E,] ceil(K/128), ceil(N/128)) contiguous). Bit-identical to ``quant_weight_128x128(w.mT)`` (square
    blocks aligned at 0 hold the same elements either way), without its strided read of w."""
    _, qt, s = _quant_blocks(w, pow2_scale, amax_floor, False, True, cast)
    return qt, s.mT.contiguous()


# ----------------------------------------------------------------------------- torch references
# Also the float quantisers of the model (``model/fp8.py``), which quantise in any ``tile`` size
# (``ModelOptions.fp8_block_size``) with their own ``amax_floor``; the defaults are the kernels'.


def _pow2_ceil(r: torch.Tensor) -> torch.Tensor:
    mantissa, exponent = torch.frexp(r)  # r = mantissa * 2**exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ones_like(r), exponent - (mantissa == 0.5).to(exponent.dtype))


def _ref_scale(amax: torch.Tensor, pow2_scale: bool, amax_floor: float) -> torch.Tensor:
    amax = amax.float().clamp_min(amax_floor)
    # Divide by a tensor: CUDA torch turns division by a Python scalar into a multiply by its
    # reciprocal, one ulp away from the kernel's IEEE division.
    scale = amax / torch.full_like(amax, FP8_MAX)
    return _pow2_ceil(scale) if pow2_scale else scale


def quant_act_1x128_ref(
    x: torch.Tensor, pow2_scale: bool = False, tile: int = TILE, amax_floor: float = AMAX_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of ``quant_act_1x128`` (bit-exact): x (..., K) → (q (..., K), scale (..., ceil(K/tile)))."""
    K = x.shape[-1]
    kt = cdiv(K, tile)
    xp = torch.nn.functional.pad(x.float(), (0, kt * tile - K)).unflatten(-1, (kt, tile))  # (..., K/tile, tile)
    scale = _ref_scale(xp.abs().amax(dim=-1), pow2_scale, amax_floor)  # (..., K/tile)
    q = (xp / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    # No copy: q keeps x's memory layout (a transposed x gives a transposed q), as the model's
    # quantisers always did; the kernels' GEMMs choose their kernel by the operands' strides.
    return q.flatten(-2)[..., :K], scale


def quant_act_128x1_t_ref(x: torch.Tensor, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of ``quant_act_128x1_t`` (bit-exact)."""
    return quant_act_1x128_ref(x.t(), pow2_scale)


def quant_weight_128x128_ref(
    w: torch.Tensor, pow2_scale: bool = False, tile: int = TILE, amax_floor: float = AMAX_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of ``quant_weight_128x128`` (bit-exact): w (..., N, K) → (q, scale (..., N/tile, K/tile))."""
    *lead, N, K = w.shape
    w3 = w.reshape(-1, N, K)  # (E, N, K), E = the product of the leading dims
    E = w3.shape[0]
    nt, kt = cdiv(N, tile), cdiv(K, tile)
    wp = torch.nn.functional.pad(w3.float(), (0, kt * tile - K, 0, nt * tile - N))
    blocks = wp.view(E, nt, tile, kt, tile)  # (E, N/tile, tile, K/tile, tile)
    scale = _ref_scale(blocks.abs().amax(dim=(2, 4)), pow2_scale, amax_floor)  # (E, N/tile, K/tile)
    q = (blocks / scale[:, :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.view(E, nt * tile, kt * tile)[:, :N, :K]  # no copy, as in quant_act_1x128_ref
    return q.view(*lead, N, K), scale.view(*lead, nt, kt)


def dequant_rows(q: torch.Tensor, scale: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """(..., C) fp8 with 1×tile row scales (..., ceil(C/tile)) → float32."""
    return q.float() * scale.repeat_interleave(tile, dim=-1)[..., : q.shape[-1]]


def dequant_blocks(q: torch.Tensor, scale: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """(..., N, K) fp8 with tile×tile block scales (..., ceil(N/tile), ceil(K/tile)) → float32."""
    s = scale.repeat_interleave(tile, dim=-2).repeat_interleave(tile, dim=-1)
    return q.float() * s[..., : q.shape[-2], : q.shape[-1]]


def benchmark(M: int = 4096, K: int = 7168) -> dict[str, float]:
    """GB/s of each quantiser on a CUDA device (bytes: bf16 in, fp8 out (twice for the two-tiling ones), scales
    ignored)."""
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    gbytes = 3 * M * K / 1e9
    results = {}
    for name, fn in (("act_1x128", quant_act_1x128), ("act_128x1_t", quant_act_128x1_t), ("act_both", quant_act_both),
                     ("weight_128x128_t", lambda t: quant_weight_128x128(t, transposed=True))):
        extra = M * K / 1e9 if name in ("act_both", "weight_128x128_t") else 0.0  # a second fp8 copy
        ms = triton.testing.do_bench(lambda fn=fn: fn(x), return_mode="median")
        results[name] = (gbytes + extra) / (ms * 1e-3)
    return results


def row_scaled(n: int, b_scale: torch.Tensor) -> bool:
    """Whether B's scales are 1x128 rows ``(N, K/128)`` rather than 128x128 blocks (the same shape at N = 1)."""
    return b_scale.shape[-2] == n and n > 1
