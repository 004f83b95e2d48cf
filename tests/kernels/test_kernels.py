"""kernels/ against their torch references: on an H200 (CUDA) or, tiny, through the Triton interpreter.

Tolerances (docs/design/kernels.md has the table and where each comes from): relative Frobenius error
against float64 on the dequantised inputs. Outputs are poisoned (NaN, fp8 NaN, -7) before every
launch, so an unwritten element fails the test.
"""


import pytest  # noqa: E402
import torch

from moeplan.kernels import triton_compat  # noqa: E402
from moeplan.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref  # noqa: E402
from moeplan.kernels.fp8_quant import (  # noqa: E402
    dequant_blocks,
    dequant_rows,
    quant_act_1x128,
    quant_act_1x128_ref,
    quant_act_128x1_t,
    quant_act_128x1_t_ref,
    quant_weight_128x128,
    quant_weight_128x128_ref,
)
from moeplan.kernels.grouped_gemm import (  # noqa: E402
    grouped_gemm_bf16,
    grouped_gemm_fp8,
    grouped_gemm_ref,
    grouped_wgrad_bf16,
    grouped_wgrad_fp8,
    grouped_wgrad_ref,
)
from moeplan.kernels.moe_permute import (  # noqa: E402
    MoEPermute,
    MoEUnpermute,
    make_dispatch_plan,
    moe_permute,
    moe_permute_ref,
    moe_unpermute,
    moe_unpermute_ref,
)
from moeplan.kernels.swiglu import SwiGLUFunction, swiglu, swiglu_ref  # noqa: E402

ON_GPU = torch.cuda.is_available()
# Relative Frobenius error bounds against float64 (docs/design/kernels.md, "Tolerances").
TOL_FP32_OUT = 1e-3 if ON_GPU else 1e-5  # fp8 products are exact; tensor-core partial sums are not
TOL_BF16_OUT = 6e-3  # one bf16 rounding of each output element (2**-9 relative, ~1/sqrt(3) rms)


@pytest.fixture
def device():
    pytest.importorskip("triton")
    if not ON_GPU and not triton_compat.INTERPRET:
        raise AssertionError("moeplan.kernels was imported before tests/conftest.py set TRITON_INTERPRET=1")
    return "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every torch.empty / empty_like in the wrappers comes back full of NaN (or -7)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.dtype == torch.float8_e4m3fn:
            t.view(torch.uint8).fill_(0x7F)  # E4M3 NaN
        elif t.is_floating_point():
            t.fill_(float("nan"))
        else:
            t.fill_(-7)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "unwritten (poisoned) or non-finite output"
    return float((out - ref).norm() / ref.norm())


def rand(*shape, seed: int, device: str, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# Odd sizes exercise every mask; the GPU adds sizes that fill the chip.
SMALL_SHAPES = [(1, 128), (37, 300), (130, 257)]
SHAPES = SMALL_SHAPES + ([(1000, 7168), (4096, 1536)] if ON_GPU else [])


@pytest.mark.parametrize("pow2_scale", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantisers_bit_exact(device, shape, pow2_scale):
    x = rand(*shape, seed=shape[0], device=device, dtype=torch.bfloat16, scale=3.0)
    for fn, ref in ((quant_act_1x128, quant_act_1x128_ref), (quant_act_128x1_t, quant_act_128x1_t_ref)):
        q, s = fn(x, pow2_scale)
        q_ref, s_ref = ref(x, pow2_scale)
        assert torch.equal(s, s_ref) and same_bits(q, q_ref), fn.__name__
    w = rand(2, *shape, seed=7, device=device)
    q, s, qt = quant_weight_128x128(w, pow2_scale, transposed=True)
    q_ref, s_ref = quant_weight_128x128_ref(w, pow2_scale)
    assert torch.equal(s, s_ref) and same_bits(q, q_ref) and same_bits(qt, q_ref.mT.contiguous())


@pytest.mark.parametrize("shape", [(130, 257), *([(4096, 2048)] if ON_GPU else [])])
def test_every_autotune_candidate_of_the_quantisers_is_bit_exact(device, shape):
    """The autotuner keeps whichever candidate runs fastest, so each one must give the reference's bits."""
    from moeplan.kernels import fp8_quant

    x = rand(*shape, seed=3, device=device, dtype=torch.bfloat16, scale=3.0)
    for view, ref in ((x, quant_act_1x128_ref(x)), (x.t(), quant_act_128x1_t_ref(x))):
        R, C = view.shape
        for block_r, warps in ((16, 2), (32, 4), (64, 8), (128, 8)) if ON_GPU else ((16, 4), (64, 4)):
            q = torch.empty((R, C), dtype=torch.float8_e4m3fn, device=device)
            s = torch.empty((R, -(-C // 128)), dtype=torch.float32, device=device)
            fp8_quant._quant_rows_kernel.fn[(-(-R // block_r), -(-C // 128))](
                view, q, s, R, C, 0, *view.stride(), *q.stride(), *s.stride(), POW2=False,
                FLOOR=fp8_quant.AMAX_FLOOR, ROW_MAJOR=view.stride(1) == 1, CAST=0, BLOCK_R=block_r, BLOCK_C=128,
                num_warps=warps)
            assert torch.equal(s, ref[1]) and same_bits(q, ref[0]), (view.stride(), block_r)
    w = rand(2, *shape, seed=7, device=device)
    E, N, K = w.shape
    q_ref, s_ref = quant_weight_128x128_ref(w)
    for trans in (False, True):
        for warps in (4, 8, 16) if ON_GPU else (4,):
            q = torch.empty((E, N, K), dtype=torch.float8_e4m3fn, device=device)
            qt = torch.empty((E, K, N), dtype=torch.float8_e4m3fn, device=device)
            s = torch.empty_like(s_ref)
            fp8_quant._quant_blocks_kernel.fn[(-(-N // 128), -(-K // 128), E)](
                w, q, qt, s, N, K, *w.stride(), *q.stride(), *qt.transpose(1, 2).stride(), *s.stride(), POW2=False,
                FLOOR=fp8_quant.AMAX_FLOOR, BLOCK=128, WRITE_Q=True, WRITE_T=True, CAST=0, TRANS_STORE=trans,
                num_warps=warps)
            assert torch.equal(s, s_ref) and same_bits(q, q_ref) and same_bits(qt, q_ref.mT.contiguous()), trans


GEMM_SHAPES = [(37, 50, 300), (130, 200, 129), (48, 50, 272)] + ([(512, 2112, 7168), (300, 7168, 2048)] if ON_GPU else [])
BACKENDS = ["triton"] + (["torch", "auto"] if ON_GPU else [])


def _gemm_operands(M, N, K, recipe, device):
    """(a, sa, b, sb) for the three training GEMMs of y = x·Wᵀ with x (M, K), W (N, K)."""
    x, w, dy = rand(M, K, seed=1, device=device), rand(N, K, seed=2, device=device), rand(M, N, seed=3, device=device)
    if recipe == "forward":
        b, sb, _ = quant_weight_128x128(w)
        return (*quant_act_1x128(x), b, sb)
    if recipe == "dgrad":
        _, sb, bt = quant_weight_128x128(w, transposed=True)
        return (*quant_act_1x128(dy), bt, sb.mT)
    return (*quant_act_128x1_t(dy), *quant_act_128x1_t(x))  # wgrad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recipe", ["forward", "dgrad", "wgrad"])
@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
def test_fp8_gemm_matches_float64(device, M, N, K, recipe, backend):
    a, sa, b, sb = _gemm_operands(M, N, K, recipe, device)
    ref = fp8_gemm_ref(a, sa, b, sb)
    if backend != "triton" and (K % 128 or M % 128 or N % 128):
        pytest.skip("torch._scaled_mm wants 128-aligned sizes")
    for out_dtype, tol in ((torch.float32, TOL_FP32_OUT), (torch.bfloat16, TOL_BF16_OUT)):
        out = fp8_gemm(a, sa, b, sb, out_dtype=out_dtype, backend=backend)
        assert out.dtype == out_dtype and rel_err(out, ref) < tol, (recipe, out_dtype)


def test_e4m3_rounding_is_nearest_even_at_every_tie(device):
    """Every E4M3 value, every midpoint between neighbours, and one fp32 ulp either side of it."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[~codes.isnan()].sort().values
    mid = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mid, mid.nextafter(torch.full_like(mid, 1e9)), mid.nextafter(torch.full_like(mid, -1e9))])
    x = torch.nn.functional.pad(x, (0, -x.numel() % 127)).view(-1, 127)
    x = torch.cat([torch.full((x.shape[0], 1), 448.0), x], dim=1).to(device)  # amax 448: scale exactly 1
    q, s = quant_act_1x128(x)
    q_ref, s_ref = quant_act_1x128_ref(x)
    assert (s == 1).all() and same_bits(q, q_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_fp32_promotion_at_long_k():
    """All-positive operands, so partial sums grow with K: a tensor-core accumulator that is never
    promoted loses precision as K grows (TR §3.3: ~2% at K = 4096). Promoted every 128, the error
    stays at the one-chunk level whatever K is."""
    errors = {}
    for K in (1024, 16384):
        x = rand(256, K, seed=11, device="cuda").abs()
        w = rand(256, K, seed=12, device="cuda").abs()
        a, sa = quant_act_1x128(x)
        b, sb, _ = quant_weight_128x128(w)
        out = fp8_gemm(a, sa, b, sb, out_dtype=torch.float32, backend="triton")
        errors[K] = rel_err(out, fp8_gemm_ref(a, sa, b, sb))
    assert errors[16384] < TOL_FP32_OUT and errors[16384] < 1.5 * errors[1024], errors


def _contiguous_layout(counts, device):
    """m_indices and seg_offsets for experts with `counts` tokens each, segments padded to 128."""
    m_indices, offsets = [], [0]
    for e, c in enumerate(counts):
        padded = -(-c // 128) * 128
        m_indices += [e] * c + [-1] * (padded - c)
        offsets.append(offsets[-1] + padded)
    as_int = dict(dtype=torch.int32, device=device)
    return torch.tensor(m_indices, **as_int), torch.tensor(offsets, **as_int)


GROUP_COUNTS = [[100, 0, 130]] + ([[1000, 3, 0, 4096, 700]] if ON_GPU else [])


@pytest.mark.parametrize("backend", ["triton"] + (["torch", "auto"] if ON_GPU else []))
@pytest.mark.parametrize("counts", GROUP_COUNTS)
@pytest.mark.parametrize("N,K", [(72, 200)] + ([(4096, 7168), (7168, 2048)] if ON_GPU else []))
def test_grouped_gemms(device, counts, N, K, backend):
    if backend != "triton" and (N % 128 or K % 128):
        pytest.skip("the torch built-ins want 128-aligned N and K")
    m_indices, offsets = _contiguous_layout(counts, device)
    E, M = len(counts), m_indices.numel()
    pad = (m_indices < 0)[:, None]
    x = rand(M, K, seed=4, device=device).masked_fill(pad, 0)
    dy = rand(M, N, seed=5, device=device).masked_fill(pad, 0)
    w = rand(E, N, K, seed=6, device=device)
    a, sa = quant_act_1x128(x)
    b, sb, bt = quant_weight_128x128(w, transposed=True)
    ref = grouped_gemm_ref(dequant_rows(a, sa), dequant_blocks(b, sb), m_indices)
    assert rel_err(grouped_gemm_fp8(a, sa, b, sb, m_indices, torch.float32, backend), ref) < TOL_FP32_OUT
    out = grouped_gemm_fp8(a, sa, b, sb, m_indices, torch.float32, backend, m_counts=counts)  # host counts
    assert rel_err(out, ref) < TOL_FP32_OUT
    d, sd = quant_act_1x128(dy)  # dgrad through the transposed weight copy
    ref = grouped_gemm_ref(dequant_rows(d, sd), dequant_blocks(bt, sb.mT), m_indices)
    out = grouped_gemm_fp8(d, sd, bt, sb.mT, m_indices, backend=backend)
    assert rel_err(out, ref) < TOL_BF16_OUT and (out[m_indices < 0] == 0).all()
    dt, sdt = quant_act_128x1_t(dy)
    xt, sxt = quant_act_128x1_t(x)
    ref = grouped_wgrad_ref(dequant_rows(dt, sdt), dequant_rows(xt, sxt), offsets)
    assert rel_err(grouped_wgrad_fp8(dt, sdt, xt, sxt, offsets, backend=backend), ref) < TOL_FP32_OUT
    xb, wb, dyb = x.bfloat16(), w.bfloat16(), dy.bfloat16()
    out = grouped_gemm_bf16(xb, wb, m_indices, offsets, backend=backend)
    assert rel_err(out, grouped_gemm_ref(xb, wb, m_indices)) < TOL_BF16_OUT
    ref = grouped_wgrad_ref(dyb.t(), xb.t(), offsets)
    assert rel_err(grouped_wgrad_bf16(dyb.t(), xb.t(), offsets), ref) < TOL_FP32_OUT


@pytest.mark.parametrize("m_counts", [[100, 0], [100, 0, -1], [100, 0, 300]])
def test_grouped_gemm_refuses_bad_m_counts(device, m_counts):
    m_indices, _ = _contiguous_layout([100, 0, 130], device)
    a, sa = quant_act_1x128(rand(m_indices.numel(), 256, seed=1, device=device))
    b, sb, _ = quant_weight_128x128(rand(3, 128, 256, seed=2, device=device))
    with pytest.raises(ValueError, match="m_counts"):
        grouped_gemm_fp8(a, sa, b, sb, m_indices, m_counts=m_counts)


def _plan(T, topk, E, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(T)])
    return make_dispatch_plan(ids.to(device), E)


@pytest.mark.parametrize("T,H,topk,E", [(20, 136, 2, 4)] + ([(4096, 7168, 8, 32)] if ON_GPU else []))
def test_permute_and_unpermute(device, T, H, topk, E):
    plan = _plan(T, topk, E, device)
    x = rand(T, H, seed=8, device=device, dtype=torch.bfloat16)
    x_ref = moe_permute_ref(x, plan)
    assert torch.equal(moe_permute(x, plan), x_ref)
    q, s = moe_permute(x, plan, quantize=True, pow2_scale=True)
    q_ref, s_ref = quant_act_1x128_ref(x_ref, pow2_scale=True)
    assert torch.equal(s, s_ref) and same_bits(q, q_ref)
    w = rand(T, topk, seed=9, device=device).abs()
    y = rand(plan.num_rows, H, seed=10, device=device, dtype=torch.bfloat16)
    assert rel_err(moe_unpermute(y, plan, w), moe_unpermute_ref(y, plan, w)) < TOL_BF16_OUT


def test_permute_autograd(device):
    T, H, topk, E = 24, 160, 3, 5
    plan = _plan(T, topk, E, device, seed=1)
    x = rand(T, H, seed=11, device=device, dtype=torch.bfloat16).requires_grad_()
    w = rand(T, topk, seed=12, device=device).abs().requires_grad_()
    scale = rand(plan.num_rows, 1, seed=13, device=device, dtype=torch.bfloat16)  # makes dy depend on the row
    grad = rand(T, H, seed=14, device=device, dtype=torch.bfloat16)
    MoEUnpermute.apply(MoEPermute.apply(x, plan) * scale, w, plan).backward(grad)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    out64 = moe_unpermute_ref(moe_permute_ref(x64, plan) * scale.double(), plan, w64)
    out64.backward(grad.double())
    assert rel_err(x.grad, x64.grad) < TOL_BF16_OUT
    assert rel_err(w.grad, w64.grad) < 1e-2  # the dot of bf16 rows


@pytest.mark.parametrize("M,I", [(33, 136)] + ([(8192, 2048)] if ON_GPU else []))
def test_swiglu(device, M, I):
    h = rand(M, 2 * I, seed=15, device=device, dtype=torch.bfloat16, scale=2.0).requires_grad_()
    ref = swiglu_ref(h.detach())
    assert rel_err(swiglu(h.detach()), ref) < TOL_BF16_OUT
    q, s = swiglu(h.detach(), quantize=True)
    q_ref, s_ref = quant_act_1x128_ref(ref.float())
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert rel_err(dequant_rows(q, s), dequant_rows(q_ref, s_ref)) < 1e-3  # rare one-ulp flips
    dact = rand(M, I, seed=16, device=device, dtype=torch.bfloat16)
    SwiGLUFunction.apply(h).backward(dact)
    h64 = h.detach().double().requires_grad_()
    swiglu_ref(h64).backward(dact.double())
    assert rel_err(h.grad, h64.grad) < TOL_BF16_OUT


def test_bf16_grouped_backward_gemms_take_views(device):
    """The grouped BF16 GEMMs in a layer's backward, on views (no copies): dgrad through B = Wᵀ, a
    transposed (E, K, N) view of the weights, and wgrad on dyᵀ and xᵀ."""
    m_indices, offsets = _contiguous_layout([50, 128, 0], device)
    M, K, N = m_indices.numel(), 96, 80
    x = rand(M, K, seed=20, device=device, dtype=torch.bfloat16).masked_fill((m_indices < 0)[:, None], 0)
    w = rand(3, N, K, seed=21, device=device, dtype=torch.bfloat16)
    dy = rand(M, N, seed=22, device=device, dtype=torch.bfloat16).masked_fill((m_indices < 0)[:, None], 0)
    dx = grouped_gemm_bf16(dy, w.transpose(1, 2), m_indices, offsets)
    dw = grouped_wgrad_bf16(dy.t(), x.t(), offsets)
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    grouped_gemm_ref(x64, w64, m_indices).backward(dy.double())
    for ours, ref in ((dx, x64.grad), (dw, w64.grad)):
        assert rel_err(ours, ref) < TOL_BF16_OUT
