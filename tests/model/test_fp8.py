"""FP8 block quantisation, checkpoint dequantisation, the FP8 linear layer and the kernels adapter."""

from __future__ import annotations

import pytest
import torch

from model.fp8 import (FP8_DTYPE, FP8_MAX, _grouped_via_contiguous, contiguous_layout, dequantize_blocks,
                       dequantize_tiles, quantize_blocks, quantize_tiles, reference_fp8_gemm,
                       reference_fp8_grouped_gemm)
from model.linear import Linear

E4M3_REL_STEP = 2.0 ** -3  # 3 mantissa bits: adjacent values differ by at most 1/8 relative


@pytest.mark.parametrize("shape", [(5, 128), (3, 300), (2, 7, 64)])
def test_tile_roundtrip_error_is_half_a_step(shape) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    q, scale = quantize_tiles(x, 128)
    assert q.dtype == FP8_DTYPE and scale.shape == (*shape[:-1], -(-shape[-1] // 128))
    back = dequantize_tiles(q, scale, 128)
    tile_max = torch.repeat_interleave(scale * FP8_MAX, 128, dim=-1)[..., : shape[-1]]
    # error relative to the tile's max: <= half a step at the top binade
    assert ((back - x).abs() <= tile_max * E4M3_REL_STEP / 2 + 1e-12).all()
    assert (back - x).abs().max() > 0  # quantisation really happened


def test_block_scales_are_per_128x128_block() -> None:
    w = torch.ones(200, 130)
    w[:128, :128] *= 1000.0  # one block far larger: only its scale may change
    q, scale = quantize_blocks(w, 128)
    assert scale.shape == (2, 2)
    torch.testing.assert_close(scale, torch.tensor([[1000.0, 1.0], [1.0, 1.0]]) / FP8_MAX)
    torch.testing.assert_close(dequantize_blocks(q, scale, 128), w)


def test_checkpoint_dequantisation_uses_weight_scale_inv_as_multiplier() -> None:
    q = torch.full((256, 130), 2.0).to(FP8_DTYPE)
    scale_inv = torch.tensor([[0.5, 3.0], [1.0, 0.25]])
    w = dequantize_blocks(q, scale_inv, 128)
    assert w[0, 0] == 1.0 and w[0, 129] == 6.0 and w[200, 0] == 2.0 and w[255, 129] == 0.5
    with pytest.raises(ValueError, match="weight_scale_inv shape"):
        dequantize_blocks(q, scale_inv[:1], 128)


def test_fp8_linear_forward_and_straight_through_backward() -> None:
    gen = torch.Generator().manual_seed(1)
    plain = Linear(256, 96)
    fp8 = Linear(256, 96, fp8_gemm=reference_fp8_gemm)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(96, 256, generator=gen) * 0.05)
        fp8.weight.copy_(plain.weight)
    x = torch.randn(4, 10, 256, generator=gen)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_plain, y_fp8 = plain(x1), fp8(x2)
    rel = float((y_fp8 - y_plain).detach().norm() / y_plain.detach().norm())
    assert 1e-3 < rel < 0.06, rel
    g = torch.randn(y_plain.shape, generator=gen)
    y_plain.backward(g)
    y_fp8.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad)  # gradients against the unquantised tensors
    torch.testing.assert_close(fp8.weight.grad, plain.weight.grad)


def test_contiguous_layout_adapter_matches_reference() -> None:
    """The kernels' grouped GEMM takes 128-row-padded segments; the adapter must reproduce ``offs`` rows."""
    gen = torch.Generator().manual_seed(2)
    offs = torch.tensor([5, 5, 140, 141], dtype=torch.int32)
    dest, m_indices = contiguous_layout(offs, 141, 128)
    assert m_indices.numel() == 128 * 4 and (m_indices[dest] == torch.tensor([0] * 5 + [2] * 135 + [3])).all()
    assert (m_indices == -1).sum() == 128 * 4 - 141

    def fake_contiguous_gemm(a, a_scale, b, b_scale, m_indices, out_dtype):
        assert a.shape[0] % 128 == 0
        rows = (m_indices >= 0).nonzero().flatten()
        out = torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype)
        for r in rows.tolist():  # test oracle only
            e = int(m_indices[r])
            out[r] = dequantize_tiles(a[r:r + 1], a_scale[r:r + 1], 128)[0] @ dequantize_blocks(b[e], b_scale[e]).t()
        return out

    a, b = torch.randn(141, 64, generator=gen), torch.randn(4, 32, 64, generator=gen)
    aq, s_a = quantize_tiles(a, 128)
    bq, s_b = quantize_blocks(b, 128)
    got = _grouped_via_contiguous(fake_contiguous_gemm, 128)(aq, s_a, bq, s_b, offs, out_dtype=torch.float32)
    want = reference_fp8_grouped_gemm(aq, s_a, bq, s_b, offs, out_dtype=torch.float32)
    torch.testing.assert_close(got, want)
