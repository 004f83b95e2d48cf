"""Grouped GEMMs for MoE experts in the contiguous layout (DeepGEMM's ``m_grouped ... contiguous``).

Tokens routed to the experts are stacked in one ``(M_total, K)`` matrix, expert by expert, each
expert's segment padded to a multiple of 128 rows; ``m_indices (M_total,)`` names each row's expert
(-1 for padding rows). Every 128-row tile then belongs to one expert, so the grouped GEMM is the
dense kernel of ``fp8_gemm.py`` with B's pointer moved to that expert's weights (``MODE_GROUPED_M``).
Padding tiles are skipped; padding rows are written as zeros.

The weight gradient reduces over each expert's own segment: ``dW[e] = dy[seg e]ᵀ · x[seg e]``, the
same kernel with K split at ``seg_offsets (E + 1,)`` and one output matrix per expert
(``MODE_GROUPED_K``). FP8 versions use 1×128 / 128×128 scales like ``fp8_gemm``; the BF16 versions
are the same kernels with the scaling compiled out.

``backend="auto"`` (on CUDA) times the Triton kernel once per problem size against the
alternatives and keeps the fastest: for FP8 the warp-specialised Gluon kernel of ``fp8_gemm_ws.py``
in its grouped mode (Hopper) and a loop of block-scaled ``torch._scaled_mm`` over the experts (good
when experts are few and large), for BF16 ``torch._grouped_mm``. The built-ins compute padding rows as
a · b, zero when a's padding rows are zero (``moe_permute`` writes zeros there); Triton writes zeros.
"""

import torch

from .fp8_gemm import (
    HAVE_GLUON,
    INTERPRET,
    MODE_GROUPED_K,
    MODE_GROUPED_M,
    TILE,
    fp8_gemm_triton,
    check_fp8_operands,
    fp8_gemm_torch,
    fp8_gemm_ws,
    gluon_config,
    launch_gemm,
    pick_faster,
    scaled_mm_reliable,
)
from .fp8_gemm_ws import fp8_wgrad_ws, runs_on
from .fp8_quant import quant_act_1x128, quant_weight_128x128
from .triton_compat import next_power_of_2, triton


def _resolve(backend: str, a: torch.Tensor, gluon: bool = False) -> str:
    names = ("auto", "triton", "gluon", "torch") if gluon else ("auto", "triton", "torch")
    if backend not in names:
        raise ValueError(f"backend={backend!r} must be one of {', '.join(map(repr, names))}")
    if backend == "auto" and (not a.is_cuda or INTERPRET):
        return "triton"
    return backend


def segment_rows(m_indices: torch.Tensor, num_experts: int) -> list[tuple[int, int, int]]:
    """(first row, real rows, padded rows) per expert of a contiguous layout; one host sync."""
    counts = torch.bincount(m_indices.long() + 1, minlength=num_experts + 1)[1:].tolist()
    return segments_from_counts(counts)


def segments_from_counts(counts) -> list[tuple[int, int, int]]:
    """(first row, real rows, padded rows) per expert from host-side row counts (no device access)."""
    rows, first = [], 0
    for count in counts:
        padded = -(-int(count) // TILE) * TILE
        rows.append((first, int(count), padded))
        first += padded
    return rows


def _check_layout(m_total: int, m_indices: torch.Tensor, num_experts: int) -> None:
    if m_total % TILE != 0:
        raise ValueError(f"M_total={m_total} must be a multiple of {TILE} (contiguous layout)")
    if tuple(m_indices.shape) != (m_total,) or m_indices.dtype != torch.int32:
        raise ValueError(f"m_indices must be int32 ({m_total},), got {tuple(m_indices.shape)} {m_indices.dtype}")
    assert num_experts >= 1, f"{num_experts=}"


def _grouped_fp8_torch(a, a_scale, b, b_scale, m_indices, out_dtype, m_counts=None):
    """One block-scaled ``torch._scaled_mm`` per expert, launched back to back.

    With ``m_counts`` on the host nothing here waits for the GPU. cuBLAS wants each expert's 1×128
    scales M-major and rejects strided views of one transposed copy ("Invalid scaling
    configuration", measured on the H200), so each expert gets its own small copy.
    """
    segments = segments_from_counts(m_counts) if m_counts is not None else segment_rows(m_indices, b.shape[0])
    if not scaled_mm_reliable(b.shape[1], a_scale.shape[1]):
        raise ValueError(f"torch._scaled_mm block scaling is unreliable for K/128={a_scale.shape[1]} "
                         "(not a multiple of 4)")
    c = torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype, device=a.device)
    b_scale_t = b_scale.contiguous().transpose(1, 2)  # (E, K/128, N/128), unit stride along K/128 (cuBLAS)
    for e, (first, count, padded) in enumerate(segments):
        if count:  # whole 128-aligned segments: cuBLAS refuses some ragged row counts
            rows = slice(first, first + padded)
            torch._scaled_mm(a[rows], b[e].t(), scale_a=a_scale[rows].t().contiguous().t(), scale_b=b_scale_t[e],
                             out_dtype=out_dtype, out=c[rows])
            if padded > count:
                c[first + count: first + padded] = 0
    covered = segments[-1][0] + segments[-1][2] if segments else 0
    if covered < c.shape[0]:  # whole padding tiles after the last expert (e.g. every count 0)
        c[covered:] = 0
    return c


def _grouped_fp8_triton(a, a_scale, b, b_scale, m_indices, out_dtype):
    c = torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype, device=a.device)
    launch_gemm(a, b, c.unsqueeze(0), a_scale, b_scale, m_indices, MODE_GROUPED_M)
    return c


def _grouped_fp8_gluon(a, a_scale, b, b_scale, m_indices, out_dtype):
    """The warp-specialised Gluon kernel (``fp8_gemm_ws.py``) in its grouped mode: B is the experts'
    contiguous (E*N, K) stack and each 128-row tile takes its expert's rows. ValueError where it
    does not apply (off Hopper, operands TMA cannot read), so the auto dispatch drops it."""
    if (not HAVE_GLUON or INTERPRET or not a.is_cuda or a.stride(1) != 1 or a.shape[1] % 16
            or not b.is_contiguous() or m_indices.dtype != torch.int32):
        raise ValueError("the Gluon kernel needs Hopper, a K-contiguous, contiguous experts' weights and int32 m_indices")
    key = ("grouped gluon width", next_power_of_2(a.shape[0]), tuple(b.shape), out_dtype)
    config = gluon_config(key, lambda c: fp8_gemm_ws(a, a_scale, b, b_scale, out_dtype, config=c, m_indices=m_indices))
    return fp8_gemm_ws(a, a_scale, b, b_scale, out_dtype, config=config, m_indices=m_indices)


def grouped_gemm_fp8(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    m_indices: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
    m_counts=None,
) -> torch.Tensor:
    """c (M_total, N): row r is (a[r] * a_scale[r]) · (b[e] * b_scale[e])ᵀ with e = m_indices[r].

    a (M_total, K) E4M3, a_scale (M_total, ceil(K/128)); b (E, N, K) E4M3 (any strides), b_scale
    (E, ceil(N/128), ceil(K/128)). Padding rows (m_indices = -1) come out as zeros.
    backend: "auto" | "triton" | "gluon" (the warp-specialised Hopper kernel) | "torch" (per-expert
    torch._scaled_mm).
    m_counts: real rows per expert on the host, if the caller has them (DeepEP's dispatch returns
    them as a list); the per-expert loop then never waits for the GPU to learn the segments. Without
    them "auto" leaves that loop out, so that nothing here waits for the GPU either way.
    """
    check_fp8_operands(a, a_scale, b, b_scale)
    if b.dim() != 3:
        raise ValueError(f"b must be (E, N, K), got shape={tuple(b.shape)}")
    _check_layout(a.shape[0], m_indices, b.shape[0])
    if m_counts is not None:
        m_counts = [int(n) for n in m_counts]
        padded = sum(-(-n // TILE) * TILE for n in m_counts)
        if len(m_counts) != b.shape[0] or min(m_counts) < 0 or padded > a.shape[0]:
            raise ValueError(f"m_counts={m_counts[:8]}{'...' if len(m_counts) > 8 else ''} must hold {b.shape[0]} "
                             f"non-negative row counts whose 128-padded sum fits M_total={a.shape[0]}")
    args = (a, a_scale, b, b_scale, m_indices, out_dtype)
    backend = _resolve(backend, a, gluon=True)
    runs = {"triton": lambda: _grouped_fp8_triton(*args), "gluon": lambda: _grouped_fp8_gluon(*args),
            "torch": lambda: _grouped_fp8_torch(*args, m_counts)}
    if backend == "auto":
        # Without the counts on the host the per-expert loop would wait for the GPU at every call (it reads
        # the segments there): auto then picks between the kernels that read m_indices on the device.
        key = ("grouped_fp8", next_power_of_2(a.shape[0]), tuple(b.shape), b.stride(), out_dtype, m_counts is None)
        backend = pick_faster(key, runs if m_counts is not None else {k: runs[k] for k in ("triton", "gluon")})
    return runs[backend]()


def grouped_gemm_bf16(a: torch.Tensor, b: torch.Tensor, m_indices: torch.Tensor,
                      seg_offsets: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """BF16 variant: a (M_total, K), b (E, N, K) (any strides) → c (M_total, N) bf16, fp32 accumulation.

    backend "torch" (torch._grouped_mm) needs seg_offsets; without them "auto" means "triton".
    """
    if a.dim() != 2 or b.dim() != 3 or a.shape[1] != b.shape[2]:
        raise ValueError(f"need a (M, K) and b (E, N, K), got {tuple(a.shape)} and {tuple(b.shape)}")
    _check_layout(a.shape[0], m_indices, b.shape[0])

    def run_triton():
        c = torch.empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16, device=a.device)
        launch_gemm(a, b, c.unsqueeze(0), None, None, m_indices, MODE_GROUPED_M)
        return c

    def run_torch():
        return torch._grouped_mm(a, b.transpose(1, 2), offs=seg_offsets[1:])

    backend = _resolve(backend if seg_offsets is not None else "triton", a)
    if backend == "auto":
        key = ("grouped_bf16", next_power_of_2(a.shape[0]), tuple(b.shape), b.stride())
        backend = pick_faster(key, {"triton": run_triton, "torch": run_torch})
    return run_torch() if backend == "torch" else run_triton()


def _check_segments(seg_offsets: torch.Tensor, m_total: int) -> None:
    if seg_offsets.dim() != 1 or seg_offsets.dtype != torch.int32 or seg_offsets.numel() < 2:
        raise ValueError(f"seg_offsets must be int32 (E + 1,), got {tuple(seg_offsets.shape)} {seg_offsets.dtype}")
    if m_total % TILE != 0:
        raise ValueError(f"M_total={m_total} must be a multiple of {TILE} (contiguous layout)")


def _grouped_wgrad_fp8_torch(a_t, a_t_scale, b_t, b_t_scale, seg_offsets, out_dtype):
    bounds = seg_offsets.tolist()
    c = torch.empty((len(bounds) - 1, a_t.shape[0], b_t.shape[0]), dtype=out_dtype, device=a_t.device)
    for e, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        if hi == lo:
            c[e] = 0
            continue
        tiles = slice(lo // TILE, hi // TILE)
        args = (a_t[:, lo:hi], a_t_scale[:, tiles], b_t[:, lo:hi], b_t_scale[:, tiles], out_dtype)
        if scaled_mm_reliable(b_t.shape[0], (hi - lo) // TILE):
            fp8_gemm_torch(*args, out=c[e])
        else:  # a segment of 128 or 256 rows: cuBLAS gets it wrong (fp8_gemm.scaled_mm_reliable)
            c[e] = fp8_gemm_triton(*args)
    return c


def _grouped_wgrad_triton(a_t, a_t_scale, b_t, b_t_scale, seg_offsets, out_dtype):
    E = seg_offsets.numel() - 1
    c = torch.empty((E, a_t.shape[0], b_t.shape[0]), dtype=out_dtype, device=a_t.device)
    sb = b_t_scale.unsqueeze(0) if b_t_scale is not None else None
    launch_gemm(a_t, b_t.unsqueeze(0), c, a_t_scale, sb, seg_offsets, MODE_GROUPED_K, E)
    return c


def grouped_wgrad_fp8(
    a_t: torch.Tensor, a_t_scale: torch.Tensor, b_t: torch.Tensor, b_t_scale: torch.Tensor,
    seg_offsets: torch.Tensor, out_dtype: torch.dtype = torch.float32, backend: str = "auto",
) -> torch.Tensor:
    """dW (E, N, K): dW[e] = Σ over rows r in [seg_offsets[e], seg_offsets[e+1]) of a_t[:, r] b_t[:, r]ᵀ.

    a_t = dyᵀ (N, M_total) and b_t = xᵀ (K, M_total), E4M3 with 128×1 scales (from
    ``quant_act_128x1_t``): (N, M_total/128) and (K, M_total/128). Offsets are multiples of 128.
    backend: "auto" | "triton" | "gluon" (the warp-specialised Hopper kernel in its K-grouped mode, one
    launch, the bounds read on the GPU; N a multiple of 128) | "torch" (per-expert torch._scaled_mm, the
    bounds read on the host: pass them as a CPU tensor to avoid a sync).
    """
    check_fp8_operands(a_t, a_t_scale, b_t, b_t_scale)
    _check_segments(seg_offsets, a_t.shape[1])
    args = (a_t, a_t_scale, b_t, b_t_scale, seg_offsets, out_dtype)
    backend = _resolve(backend, a_t, gluon=True)
    runs = {"triton": lambda: _grouped_wgrad_triton(*args), "torch": lambda: _grouped_wgrad_fp8_torch(*args)}
    if runs_on(a_t.device):
        runs["gluon"] = lambda: _grouped_wgrad_gluon(*args)
    if backend == "auto":
        key = ("grouped_wgrad_fp8", next_power_of_2(a_t.shape[1]), seg_offsets.numel(), a_t.shape[0], b_t.shape[0],
               out_dtype, seg_offsets.is_cuda)
        backend = pick_faster(key, runs)
    if backend not in runs:
        raise RuntimeError(f"grouped_wgrad_fp8 backend={backend!r} needs Triton's Gluon on a Hopper GPU")
    return runs[backend]()


def _grouped_wgrad_gluon(a_t, a_t_scale, b_t, b_t_scale, seg_offsets, out_dtype):
    if not seg_offsets.is_cuda:  # host bounds (the "torch" backend's): one small copy, no sync
        seg_offsets = seg_offsets.to(a_t.device, non_blocking=True)
    return fp8_wgrad_ws(a_t, a_t_scale, b_t, b_t_scale, seg_offsets, out_dtype)


def grouped_wgrad_bf16(a_t: torch.Tensor, b_t: torch.Tensor, seg_offsets: torch.Tensor,
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """BF16 variant of ``grouped_wgrad_fp8`` (Triton); a_t (N, M_total) and b_t (K, M_total) may be views."""
    _check_segments(seg_offsets, a_t.shape[1])
    return _grouped_wgrad_triton(a_t, None, b_t, None, seg_offsets, out_dtype)


# ----------------------------------------------------------------------------- torch references


def grouped_gemm_ref(a: torch.Tensor, b: torch.Tensor, m_indices: torch.Tensor) -> torch.Tensor:
    """Float64 reference on already dequantised (or bf16) operands; padding rows give zeros."""
    a64, b64 = a.double(), b.double()
    out = torch.zeros((a.shape[0], b.shape[1]), dtype=torch.float64, device=a.device)
    for e in range(b.shape[0]):
        rows = m_indices == e
        out[rows] = a64[rows] @ b64[e].t()
    return out


def grouped_wgrad_ref(a_t: torch.Tensor, b_t: torch.Tensor, seg_offsets: torch.Tensor) -> torch.Tensor:
    """Float64 reference of the grouped weight gradient on dequantised operands."""
    bounds = seg_offsets.tolist()
    return torch.stack([a_t[:, lo:hi].double() @ b_t[:, lo:hi].double().t() for lo, hi in zip(bounds, bounds[1:])])


def make_problem(groups: int, m_per_group: int, N: int, K: int, device: str = "cuda") -> dict:
    """Random equal-sized groups: bf16 x (M, K), w (E, N, K), their fp8 forms, m_indices, offs (ends)."""
    M = groups * m_per_group
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    w = torch.randn(groups, N, K, device=device, dtype=torch.bfloat16)
    a, sa = quant_act_1x128(x)
    b, sb, _ = quant_weight_128x128(w)
    m_indices = torch.arange(groups, device=device, dtype=torch.int32).repeat_interleave(m_per_group)
    offs = torch.arange(1, groups + 1, device=device, dtype=torch.int32) * m_per_group
    return {"x": x, "w": w, "a": a, "sa": sa, "b": b, "sb": sb, "m_indices": m_indices, "offs": offs}


def benchmark(groups: int, m_per_group: int, N: int, K: int) -> dict[str, float]:
    """TFLOPS of the FP8 and BF16 grouped kernels and of torch._grouped_mm (BF16) on CUDA."""
    p = make_problem(groups, m_per_group, N, K)
    runs = {
        "fp8_triton": lambda: grouped_gemm_fp8(p["a"], p["sa"], p["b"], p["sb"], p["m_indices"]),
        "bf16_triton": lambda: grouped_gemm_bf16(p["x"], p["w"], p["m_indices"]),
        "bf16_torch": lambda: torch._grouped_mm(p["x"], p["w"].transpose(1, 2), offs=p["offs"]),
    }
    flops = 2.0 * groups * m_per_group * N * K
    return {name: flops / (triton.testing.do_bench(fn, return_mode="median") * 1e-3) / 1e12
            for name, fn in runs.items()}
