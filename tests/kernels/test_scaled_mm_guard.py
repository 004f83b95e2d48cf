"""torch._scaled_mm with 128x128 weight blocks returned wrong results on the H200 (torch 2.11) when
K/128 was 1 or 2 and N spanned several blocks (relative error 0.2 to 265, measured 2026-11-28); the
torch backend refuses such shapes so ``backend="auto"`` falls back to the Triton kernel."""

from __future__ import annotations

import pytest
import torch

from moeplan.kernels.fp8_gemm import fp8_gemm_torch


@pytest.mark.parametrize(("n", "k"), [(256, 128), (384, 256), (7168, 2112)])
def test_torch_backend_refuses_unreliable_block_shapes(n, k):
    a = torch.ones(128, k).to(torch.float8_e4m3fn)
    b = torch.ones(n, k).to(torch.float8_e4m3fn)
    a_scale = torch.ones(128, -(-k // 128))
    b_scale = torch.ones(-(-n // 128), -(-k // 128))
    with pytest.raises(ValueError, match=r"K/128=\d+ \(not a multiple of 4\)"):
        fp8_gemm_torch(a, a_scale, b, b_scale, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("m", "n", "k"), [(128, 256, 128), (200, 384, 256), (256, 384, 640)])
def test_auto_backend_is_right_where_torch_was_wrong(m, n, k):
    from moeplan.kernels.fp8_gemm import fp8_gemm
    from moeplan.kernels.fp8_quant import quant_act_1x128, quant_weight_128x128

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = torch.randn(n, k, device="cuda", generator=gen).bfloat16()
    a, sa = quant_act_1x128(x)
    b, sb, _ = quant_weight_128x128(w)
    ref = (a.float() * sa.repeat_interleave(128, 1)[:, :k]) @ (
        b.float() * sb.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]).t()
    got = fp8_gemm(a, sa, b, sb, backend="auto").float()
    assert ((got - ref).norm() / ref.norm()).item() < 5e-3
