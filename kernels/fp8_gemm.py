"""Block-scaled FP8 GEMM ``C = A · Bᵀ`` with FP32 promotion every 128 elements of K (TR §3.3).

``A`` is ``(M, K)`` E4M3 with 1×128 scales ``(M, ceil(K/128))``. ``B`` is ``(N, K)`` E4M3 (any
strides) with either 128×128 block scales ``(ceil(N/128), ceil(K/128))`` (a weight) or 1×128 row
scales ``(N, ceil(K/128))`` (an activation, for weight gradients). Each 128-deep slice of K is one
``tl.dot`` whose partial sum is scaled and added to an fp32 accumulator in registers: the tensor
cores' own accumulator never sums more than 128 products, which is DeepSeek's ``N_C = 128``.

The same kernel serves the three training GEMMs of ``y = x · Wᵀ``:
  forward  ``y  = x  · Wᵀ``   a = x (M, K),      b = W (N, K)            block scales
  dgrad    ``dx = dy · W``    a = dy (M, N),     b = Wᵀ copy (K, N)      block scales ``.mT``
  wgrad    ``dW = dyᵀ · x``   a = dyᵀ (N, M),    b = xᵀ (K, M)           row scales (128×1 tiles)
and, through ``MODE``, the grouped GEMMs of ``grouped_gemm.py``.

Dense products whose operands TMA can read (K contiguous, K % 16 == 0) on Hopper, or in the
interpreter, go to the persistent TMA kernel of ``fp8_gemm_tma.py`` instead: it is 1.4-2.0x faster
than this one on the H200 (docs/results/kernels-sweep.md). ``backend="auto"`` times the Triton kernel, the
warp-specialised Gluon kernel (``fp8_gemm_ws.py``, where it applies) and ``torch._scaled_mm``
(cuBLAS block-scaled) once per shape (``pick_faster``) and keeps the fastest (a near-tie, within
``PICK_MARGIN``, the same way every time: ``PICK_PREFERENCE``); ``"triton"`` /
``"gluon"`` / ``"torch"`` force one.
"""

import functools
import statistics

import torch

from .fp8_gemm_tma import fp8_gemm_tma
from .fp8_gemm_ws import HAVE_GLUON, WIDTHS, fp8_gemm_ws
from .fp8_quant import cast_for_store, quant_act_1x128, quant_weight_128x128, row_scaled
from .triton_compat import INTERPRET, cdiv, next_power_of_2, tl, triton

TILE = 128

MODE_DENSE = 0
MODE_GROUPED_M = 1  # rows of A in per-expert segments (contiguous layout), B indexed by expert
MODE_GROUPED_K = 2  # reduction split in per-expert segments, one output matrix per expert


def gemm_configs(scaled: bool) -> list[triton.Config]:
    """Autotune candidates. BLOCK_M divides 128 (contiguous-layout segments); scaled needs BLOCK_K=128.

    DEFER (scaled only) promotes block k's partial sum while block k+1's MMA is in flight, at the
    cost of a second partial accumulator in registers.
    """
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128 if scaled else 64, "GROUP_M": 4,
                               "DEFER": scaled})]
    block_k = 128 if scaled else 64
    shapes = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages, DEFER)
        (128, 128, 8, 4, False), (128, 128, 8, 4, True), (128, 256, 8, 3, False), (128, 128, 4, 4, False),
    ] if scaled else [(128, 256, 8, 3, False), (128, 128, 8, 4, False), (128, 128, 4, 4, False)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": block_k, "GROUP_M": 8, "DEFER": defer},
                      num_warps=w, num_stages=s)
        for bm, bn, w, s, defer in shapes
    ]


@triton.jit
def _load_tile(ptrs, k_mask, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    if EVEN_K:
        t = tl.load(ptrs)
    else:
        t = tl.load(ptrs, mask=k_mask, other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


def _make_gemm_kernel(scaled: bool):
    @triton.autotune(configs=gemm_configs(scaled), key=["m_bucket", "N", "k_key", "MODE", "SB_N_DIV"])
    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0 or args["MODE"] == 2})
    @triton.jit
    def kernel(
        # pointers: A (M, K), B ([E,] N, K), C ([E,] M, N), scales, per-row expert ids or segment bounds
        a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, group_ptr,
        # sizes (m_bucket, k_key only key the autotuner: a new token count must not re-tune)
        M, N, K, m_bucket, k_key,
        # strides
        stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_ce, stride_cm, stride_cn,
        stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk,
        # meta
        SCALED: tl.constexpr, SB_N_DIV: tl.constexpr, MODE: tl.constexpr, UPCAST: tl.constexpr,
        EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, DEFER: tl.constexpr,
    ):
        # Step 1: tile (pid_m, pid_n), grouped along M so that B tiles stay in L2 (tutorial 03).
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        group_id = pid // (GROUP_M * num_pid_n)
        first_m = group_id * GROUP_M
        group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
        pid_n = (pid % (GROUP_M * num_pid_n)) // group_size

        # Step 2: which expert, and which slice of K.
        k_lo = 0
        k_hi = K
        if MODE == 1:
            expert = tl.load(group_ptr + pid_m * BLOCK_M)  # segments are 128-aligned: one expert per tile
            k_hi = tl.where(expert < 0, 0, K)  # a padding-only tile computes nothing and writes zeros
            expert = tl.maximum(expert, 0).to(tl.int64)
            b_ptr += expert * stride_be
            sb_ptr += expert * stride_sbe
        if MODE == 2:
            g = tl.program_id(1)
            k_lo = tl.load(group_ptr + g)
            k_hi = tl.load(group_ptr + g + 1)
            c_ptr += g.to(tl.int64) * stride_ce

        # Step 3: pointers. Rows past M / N wrap (modulo) instead of masking; the store masks them.
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + (k_lo + offs_k)[None, :] * stride_ak
        b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + (k_lo + offs_k)[:, None] * stride_bk
        sa_ptrs = sa_ptr + offs_m * stride_sam + (k_lo // BLOCK_K) * stride_sak
        sb_ptrs = sb_ptr + (offs_n // SB_N_DIV) * stride_sbn + (k_lo // BLOCK_K) * stride_sbk

        # Step 4: main loop. Scaled: each 128-deep dot is promoted into the fp32 accumulator.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        prev = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # DEFER: last block's unscaled partial sum
        sa_prev = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sb_prev = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            k_mask = (k + offs_k) < k_hi
            a = _load_tile(a_ptrs, k_mask[None, :], EVEN_K, UPCAST)  # (BLOCK_M, BLOCK_K)
            b = _load_tile(b_ptrs, k_mask[:, None], EVEN_K, UPCAST)  # (BLOCK_K, BLOCK_N)
            if SCALED:
                sa = tl.load(sa_ptrs)  # (BLOCK_M,)
                sb = tl.load(sb_ptrs)  # (BLOCK_N,)
                if DEFER:
                    part = tl.dot(a, b)
                    acc += prev * (sa_prev[:, None] * sb_prev[None, :])
                    prev, sa_prev, sb_prev = part, sa, sb
                else:
                    acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
                sa_ptrs += stride_sak
                sb_ptrs += stride_sbk
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if DEFER:
            acc += prev * (sa_prev[:, None] * sb_prev[None, :])

        # Step 5: store; padding rows of the contiguous layout are written as zeros.
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if MODE == 1:
            row_expert = tl.load(group_ptr + rows, mask=rows < M, other=-1)
            acc = tl.where(row_expert[:, None] >= 0, acc, 0.0)
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, cast_for_store(acc, c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))

    return kernel


_gemm_kernel_fp8 = _make_gemm_kernel(scaled=True)
_gemm_kernel_bf16 = _make_gemm_kernel(scaled=False)


def launch_gemm(a, b, c, a_scale, b_scale, group, mode: int, num_groups: int = 1) -> None:
    """Launch the shared kernel on prepared views. a (M, K), b (E, N, K), c (E, M, N); scales 2-D / 3-D."""
    M, K = a.shape
    N = b.shape[1]
    scaled = a_scale is not None
    if scaled:
        sb_n_div = TILE if b_scale.shape[1] != N or N == 1 else 1
        sa, sb = a_scale, b_scale
        sa_strides = (sa.stride(0), sa.stride(1))
        sb_strides = (sb.stride(0), sb.stride(1), sb.stride(2))
    else:
        sb_n_div, sa, sb, sa_strides, sb_strides = 1, a, b, (0, 0), (0, 0, 0)
    group = group if group is not None else a  # unused placeholder pointer in dense mode
    kernel = _gemm_kernel_fp8 if scaled else _gemm_kernel_bf16

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), num_groups)

    kernel[grid](
        a, b, c, sa, sb, group,
        M, N, K, next_power_of_2(M), next_power_of_2(K) if mode == MODE_GROUPED_K else K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1), c.stride(2),
        *sa_strides, *sb_strides,
        SCALED=scaled, SB_N_DIV=sb_n_div, MODE=mode, UPCAST=INTERPRET,
    )


def check_fp8_operands(a, a_scale, b, b_scale) -> None:
    """Shapes of a (M, K) with (M, ceil(K/128)) scales and b ([E,] N, K) with block or row scales."""
    M, K = a.shape
    N, Kb = b.shape[-2:]
    kt = cdiv(K, TILE)
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn:
        raise ValueError(f"a and b must be float8_e4m3fn, got a.dtype={a.dtype} b.dtype={b.dtype}")
    if Kb != K:
        raise ValueError(f"reduction sizes differ: a.shape={tuple(a.shape)} b.shape={tuple(b.shape)}")
    if tuple(a_scale.shape) != (M, kt) or a_scale.dtype != torch.float32:
        raise ValueError(f"a_scale must be float32 {(M, kt)}, got {tuple(a_scale.shape)} {a_scale.dtype}")
    lead = tuple(b.shape[:-2])
    if tuple(b_scale.shape) not in (lead + (cdiv(N, TILE), kt), lead + (N, kt)):
        raise ValueError(f"b_scale must be {lead + (cdiv(N, TILE), kt)} (128x128 blocks) or "
                         f"{lead + (N, kt)} (1x128 rows), got {tuple(b_scale.shape)}")


def tma_eligible(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether TMA can read both operands: K contiguous, 16-byte rows and base, and a Hopper GPU."""
    K = a.shape[1]
    if K % 16 or a.stride(1) != 1 or b.stride(1) != 1 or a.stride(0) % 16 or b.stride(0) % 16:
        return False
    if a.data_ptr() % 16 or b.data_ptr() % 16:
        return False
    if INTERPRET:
        return True
    return a.is_cuda and _capability_major(a.device.index) >= 9


@functools.lru_cache(maxsize=None)
def _capability_major(index: int | None) -> int:
    """A CUDA device's compute capability major (cached: this is on every launch's host path)."""
    return torch.cuda.get_device_capability(index)[0]


def tma_config(K: int) -> tuple:
    """The TMA kernel's configuration by reduction size, from the H200 sweep (docs/results/kernels-sweep.md).

    Short K (a few 128-steps per tile) gains from flattening the tile loop into the K loop, so the
    next tile's loads start while this one finishes (709 vs 557 TFLOPS at N x K = 32768 x 512); longer
    K is fastest with 64x128 tiles, two programs per SM (906 vs 875 TFLOPS at 7168 x 16384).
    """
    if K <= 1024:
        return (128, 128, 8, 4, True, False, False, 8, 1)
    return (64, 128, 4, 3, False, False, False, 8, 2)


def fp8_gemm_triton(a, a_scale, b, b_scale, out_dtype):
    M, N = a.shape[0], b.shape[0]
    if tma_eligible(a, b):
        return fp8_gemm_tma(a, a_scale, b, b_scale, out_dtype, config=tma_config(a.shape[1]))
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    launch_gemm(a, b.unsqueeze(0), c.unsqueeze(0), a_scale, b_scale.unsqueeze(0), None, MODE_DENSE)
    return c


def fp8_gemm_gluon(a, a_scale, b, b_scale, out_dtype):
    """The warp-specialised Gluon kernel (``fp8_gemm_ws.py``) where TMA reads the operands; ValueError
    elsewhere, so the auto dispatch drops it. With 128x128 weight blocks its tile width is timed per
    problem; 1x128-row B scales (the weight gradient) take 128-wide tiles."""
    if not HAVE_GLUON or INTERPRET or not tma_eligible(a, b):
        raise ValueError("the Gluon kernel needs Hopper and TMA-readable operands")
    if row_scaled(b.shape[0], b_scale):  # fp8_gemm_ws's default config for them: no width to time
        return fp8_gemm_ws(a, a_scale, b, b_scale, out_dtype)
    key = ("gluon width", tuple(a.shape), tuple(b.shape), out_dtype)
    config = gluon_config(key, lambda c: fp8_gemm_ws(a, a_scale, b, b_scale, out_dtype, config=c))
    return fp8_gemm_ws(a, a_scale, b, b_scale, out_dtype, config=config)


def gluon_config(key: tuple, run) -> tuple:
    """The Gluon kernel's config for a problem, its tile width timed once per ``key`` (``run(config)``
    launches it): 256-wide tiles move less data per FLOP, 128-wide ones waste less where N is not
    a multiple of 256 (2112 columns: docs/results/kernels.md)."""
    width = _BACKEND_CACHE.get(key) or pick_faster(key, {str(w): (lambda c=c: run(c)) for w, c in WIDTHS.items()})
    return WIDTHS[int(width)]


def scaled_mm_reliable(N: int, k_blocks: int) -> bool:
    """Whether block-scaled ``torch._scaled_mm`` is right for N output columns and K/128 = k_blocks.

    Measured on the H200 (torch 2.11, cuBLAS): with K/128 = 1 or 2 and more than one 128-wide N
    block the result is wrong (relative error 0.2 to 265); K/128 = 4, 12, 56 are right.
    """
    return N <= TILE or k_blocks % 4 == 0


def fp8_gemm_torch(a, a_scale, b, b_scale, out_dtype, out=None):
    """torch._scaled_mm with 1×128 × (128×128 | 1×128) scales; scales outer-dim-major as cuBLAS wants.

    ``out``: a contiguous (M, N) tensor to write into (saves a copy when filling slices of a larger one).
    """
    sa = a_scale.t().contiguous().t()  # (M, K/128), M-major
    row_scales = row_scaled(b.shape[0], b_scale)
    k_blocks = a_scale.shape[1]
    if not scaled_mm_reliable(b.shape[0], k_blocks):
        raise ValueError(f"torch._scaled_mm block scaling is unreliable for K/128={k_blocks} (not a multiple of 4)")
    # (K/128, N) row-major for 1×128 rows; (K/128, N/128) with unit stride along K/128 for blocks.
    sb = b_scale.t().contiguous() if row_scales else b_scale.contiguous().t()
    if out is None:
        return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, out=out)


_BACKEND_CACHE: dict[tuple, str] = {}
PICK_ROUNDS = 4
# A near-tie goes to the candidate named first here (our Gluon kernel, then cuBLAS, then the Triton kernel; the wider
# Gluon tile), unless another is faster by more than PICK_MARGIN: timed per process, near-ties had flipped between
# cuBLAS and Gluon from run to run, the forward GEMMs of one step 6.54 against 6.76 ms (H100, 2026-12-07 22:27 UTC,
# docs/results/model-step.md), so that two processes ran different kernels for the same shapes.
PICK_PREFERENCE = ("gluon", "torch", "triton", "256", "128")
PICK_MARGIN = 0.03
_BACKENDS = {"triton": fp8_gemm_triton, "gluon": fp8_gemm_gluon, "torch": fp8_gemm_torch}  # "triton" first: it never refuses


def pick_faster(key: tuple, candidates: dict) -> str:
    """Name of the fastest of ``candidates`` (name → no-argument callable), timed once per key.

    A candidate that raises (a built-in refusing a layout) is dropped; the first one must not raise.
    The candidates are timed in ``PICK_ROUNDS`` rounds, the order reversed every other round, and
    compared by their median: a long FP8 GEMM heats an H200 into its power cap within seconds, so
    one pass in a fixed order favours whichever runs first (docs/design/kernels.md). The pick is the
    first in ``PICK_PREFERENCE`` order whose median is within ``PICK_MARGIN`` of the fastest (names
    not listed come last, in the order given), so that a near-tie is decided the same way every time.
    """
    if key not in _BACKEND_CACHE:
        runnable = {}
        for name, fn in candidates.items():
            try:
                fn()
            except (RuntimeError, ValueError, TypeError):
                continue
            runnable[name] = fn
        times = {name: [] for name in runnable}
        for rnd in range(PICK_ROUNDS):
            for name in (list(runnable) if rnd % 2 == 0 else list(runnable)[::-1]):
                times[name].append(triton.testing.do_bench(runnable[name], rep=10, return_mode="median"))
        medians = {name: statistics.median(t) for name, t in times.items()}
        fastest = min(medians.values())
        order = sorted(medians, key=lambda n: PICK_PREFERENCE.index(n) if n in PICK_PREFERENCE else len(PICK_PREFERENCE))
        _BACKEND_CACHE[key] = next(n for n in order if medians[n] <= fastest * (1 + PICK_MARGIN))
    return _BACKEND_CACHE[key]


def _choose_backend(a, a_scale, b, b_scale, out_dtype) -> str:
    key = ("dense", tuple(a.shape), tuple(b.shape), b.stride(), tuple(b_scale.shape), out_dtype)
    return pick_faster(key, {name: (lambda fn=fn: fn(a, a_scale, b, b_scale, out_dtype)) for name, fn in _BACKENDS.items()})


def fp8_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
) -> torch.Tensor:
    """C (M, N) = (a * a_scale) · (b * b_scale)ᵀ for a (M, K), b (N, K) E4M3; fp32 accumulation.

    a_scale: (M, ceil(K/128)) fp32. b_scale: (ceil(N/128), ceil(K/128)) for 128×128 blocks or
    (N, ceil(K/128)) for 1×128 rows. backend: "auto" | "triton" | "gluon" (the warp-specialised
    Hopper kernel) | "torch" (torch._scaled_mm).
    """
    check_fp8_operands(a, a_scale, b, b_scale)
    if backend not in ("auto", *_BACKENDS):
        raise ValueError(f"backend={backend!r} must be 'auto', 'triton', 'gluon' or 'torch'")
    if backend == "auto":
        backend = _choose_backend(a, a_scale, b, b_scale, out_dtype) if a.is_cuda and not INTERPRET else "triton"
    return _BACKENDS[backend](a, a_scale, b, b_scale, out_dtype)


def chosen_backend(a, a_scale, b, b_scale, out_dtype=torch.bfloat16) -> str:
    """The backend that ``fp8_gemm(..., backend="auto")`` uses for these operands."""
    return _choose_backend(a, a_scale, b, b_scale, out_dtype)


def fp8_gemm_ref(a, a_scale, b, b_scale, dtype: torch.dtype = torch.float64, tile: int = TILE) -> torch.Tensor:
    """Reference: dequantise both operands and multiply in ``dtype`` (float64 by default).

    Also the model's reference FP8 GEMM (``dtype=torch.float32``, any ``tile``): FP32 products of
    exact FP8 values and FP32 scales, so it is what a tensor-core GEMM computes up to summation order.
    """
    def dequant(q, s):
        s = s.repeat_interleave(tile, dim=-1)[..., : q.shape[-1]]
        if s.shape[-2] != q.shape[-2]:  # tile x tile blocks, else 1 x tile rows (the same at N = 1)
            s = s.repeat_interleave(tile, dim=-2)[..., : q.shape[-2], :]
        return q.to(dtype) * s.to(dtype)

    return dequant(a, a_scale) @ dequant(b, b_scale).mT


def benchmark(M: int, N: int, K: int) -> dict[str, float]:
    """TFLOPS of the Triton kernel and of torch._scaled_mm on random operands (CUDA)."""
    a, sa = quant_act_1x128(torch.randn(M, K, device="cuda"))
    b, sb, _ = quant_weight_128x128(torch.randn(N, K, device="cuda"))
    flops = 2.0 * M * N * K
    out = {}
    for name in ("triton", "torch"):
        ms = triton.testing.do_bench(lambda n=name: fp8_gemm(a, sa, b, sb, backend=n), return_mode="median")
        out[name] = flops / (ms * 1e-3) / 1e12
    return out
