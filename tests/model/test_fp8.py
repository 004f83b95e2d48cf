"""FP8 block quantisation, checkpoint dequantisation, the FP8 linear layer and the kernels adapter.

The layers on the kernels themselves (Triton): test_fp8_kernels.py."""

from __future__ import annotations

import pytest
import torch

from moeplan.kernels.fp8_quant import quant_act_1x128_ref, quant_weight_128x128_ref
from moeplan.model.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    MIN_AMAX,
    _grouped_via_contiguous,
    contiguous_layout,
    dequantize_blocks,
    dequantize_tiles,
    quantize_blocks,
    quantize_tiles,
    reference_fp8_grouped_gemm,
    reference_ops,
)
from moeplan.model.linear import Linear

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


def test_tiny_tiles_keep_full_resolution() -> None:
    """The model floors amax at MIN_AMAX = 1e-12, not at the kernels' 1e-4: a tile of values near 1e-9
    (small gradients) still gets a scale from its own max, so its error stays half a step."""
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(5)) * 1e-9
    x[2, 128:] = 0.0  # and an all-zero tile: finite scale, zeros back
    q, scale = quantize_tiles(x, 128)
    amax = x.abs().unflatten(-1, (2, 128)).amax(-1)
    torch.testing.assert_close(scale, amax.clamp_min(MIN_AMAX) / FP8_MAX, rtol=0, atol=0)
    back = dequantize_tiles(q, scale, 128)
    tile_max = torch.repeat_interleave(amax, 128, dim=-1)
    assert ((back - x).abs() <= tile_max * E4M3_REL_STEP / 2).all()
    assert (back[2, 128:] == 0).all()
    _, kernel_scale = quant_act_1x128_ref(x)  # the kernels' default floor: every scale 1e-4 / 448
    assert (kernel_scale == 1e-4 / FP8_MAX).all()


def test_quantisers_are_the_kernels_references() -> None:
    """One float reference: the model's quantisers are ``kernels.fp8_quant``'s, bit for bit where the
    floor does not matter, in any block size and with leading dimensions."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 7, 300, generator=g) * 3
    q, s = quantize_tiles(x, 64)
    q_ref, s_ref = quant_act_1x128_ref(x.reshape(14, 300), tile=64)
    assert torch.equal(s.reshape(14, -1), s_ref) and torch.equal(q.reshape(14, 300).float(), q_ref.float())
    w = torch.randn(3, 130, 260, generator=g)
    q, s = quantize_blocks(w, 128)
    q_ref, s_ref = quant_weight_128x128_ref(w)
    assert torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float())


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
    fp8 = Linear(256, 96, fp8=reference_ops(128))
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

    def fake_contiguous_gemm(a, a_scale, b, b_scale, m_indices, out_dtype, m_counts=None):
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


# ------------------------------------------------------------------ FP8 backward (TR §3.3, Figure 6)

def _dq_tiles(t: torch.Tensor) -> torch.Tensor:
    return dequantize_tiles(*quantize_tiles(t, 128), 128).double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_fp8_backward_is_the_recipe_emulated_in_float64() -> None:
    """Dgrad: grad tiles (1x128 along N) times the blocked weight; Wgrad: both operands in tiles of
    128 tokens. The layer's gradients equal that recipe computed on dequantised operands, and differ
    from the straight-through (exact) gradients by an FP8-sized error."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 150, 200, generator=g, requires_grad=True)  # 300 tokens: a ragged last tile
    layer = Linear(200, 130, fp8=reference_ops(128), fp8_backward=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(130, 200, generator=g))
    dy = torch.randn(2, 150, 130, generator=g)
    layer(x).backward(dy)
    g2, x2, w = dy.reshape(-1, 130), x.detach().reshape(-1, 200), layer.weight.detach()
    dgrad = _dq_tiles(g2) @ dequantize_blocks(*quantize_blocks(w.t().contiguous(), 128), 128).double().t()
    wgrad = _dq_tiles(g2.t()) @ _dq_tiles(x2.t()).t()
    assert _rel(x.grad.reshape(-1, 200), dgrad) < 1e-6 and _rel(layer.weight.grad, wgrad) < 1e-6
    exact_dx, exact_dw = g2.double() @ w.double(), g2.double().t() @ x2.double()
    for got, exact in ((x.grad.reshape(-1, 200), exact_dx), (layer.weight.grad, exact_dw)):
        assert 1e-3 < _rel(got, exact) < 0.1  # FP8 really used, at its expected error


def _experts(backward_fp8: bool, x, offs, w13, w2):
    from moeplan.model.experts import GroupedExperts

    layer = GroupedExperts(len(offs), x.shape[1], w2.shape[2], torch.float32, backend="fp8",
                           fp8=reference_ops(128), fp8_backward=backward_fp8)
    with torch.no_grad():
        layer.gate_up_proj.copy_(w13)
        layer.down_proj.copy_(w2)
    return layer


def test_fp8_grouped_backward_tiles_never_mix_experts() -> None:
    """Expert segments of 130, 0 and 70 rows: Wgrad tiles of 128 tokens restart at every segment,
    so scaling one expert's rows by 1000 leaves every other expert's weight gradient bit for bit."""
    from moeplan.model.grouped_linear import GroupedLinearFn

    g = torch.Generator().manual_seed(4)
    offs = torch.tensor([130, 130, 200], dtype=torch.int32)
    a = torch.randn(200, 256, generator=g)
    w = torch.randn(3, 136, 256, generator=g, requires_grad=True)
    dy = torch.randn(200, 136, generator=g)

    def grads(a_in, dy_in):
        a_in = a_in.clone().requires_grad_(True)
        w.grad = None
        GroupedLinearFn.apply(a_in, w, offs, False, None, reference_ops(128), True).backward(dy_in)
        return a_in.grad, w.grad.clone()

    da, dw = grads(a, dy)
    # the recipe emulated per expert in float64
    for e, (lo, hi) in enumerate(((0, 130), (130, 130), (130, 200))):
        ref_dw = (_dq_tiles(dy[lo:hi].t()) @ _dq_tiles(a[lo:hi].t()).t() if hi > lo
                  else torch.zeros(136, 256, dtype=torch.float64))
        assert torch.allclose(dw[e].double(), ref_dw, rtol=1e-5, atol=1e-5)
        if hi > lo:
            wt = dequantize_blocks(*quantize_blocks(w[e].detach().t().contiguous(), 128), 128).double()
            assert _rel(da[lo:hi], _dq_tiles(dy[lo:hi]) @ wt.t()) < 1e-6
    loud_dy = dy.clone()
    loud_dy[:130] *= 1000.0
    _, dw_loud = grads(a, loud_dy)
    assert torch.equal(dw_loud[2], dw[2]) and torch.equal(dw_loud[1], dw[1])


def test_fp8_backward_model_option_trains_a_tiny_model() -> None:
    """ModelOptions(fp8_backward=True): every FP8 linear and expert layer back-propagates in FP8. The
    forward is unchanged, the gradients differ from the straight-through ones at FP8 size, and
    training still learns."""
    from moeplan.model import ModelOptions, Transformer, training_loss
    from tests.model.synthetic_task import make_batch, task_spec

    spec = task_spec()
    models, grads = {}, {}
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(spec.vocab_size, generator=gen)
    ids, labels = make_batch(perm, 4, 32, gen)
    for fp8_backward in (False, True):
        opts = ModelOptions(dtype=torch.float32, linear_precision="fp8", expert_backend="fp8", fp8_backward=fp8_backward)
        model = Transformer(spec, opts)
        model.init_weights(torch.Generator().manual_seed(1))
        loss = training_loss(model(ids), labels, mtp_weight=0.3)
        loss.total.backward()
        models[fp8_backward] = (model, loss.total.item())
        grads[fp8_backward] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert models[True][1] == models[False][1]  # same forward
    assert 1e-3 < _rel(grads[True], grads[False]) < 0.2

    model = models[True][0]
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        ids, labels = make_batch(perm, 8, 32, gen)
        loss = training_loss(model(ids), labels, mtp_weight=0.3)
        optim.zero_grad(set_to_none=True)
        loss.total.backward()
        optim.step()
        losses.append(loss.lm.item())
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
