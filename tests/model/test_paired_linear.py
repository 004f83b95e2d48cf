"""Two linears that read one input run as a pair (``model.linear.paired``): the same outputs as the two layers,
their output gradients cast in one call and multiplied in one Dgrad, each weight's gradient its layer's own."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moeplan.model import linear
from moeplan.model.fp8 import dequantize_blocks, quantize_blocks, quantize_tiles, reference_ops
from moeplan.model.linear import Linear, PairedLinearFn, paired
from moeplan.model.weight_grad import WeightGradStore, attach_weight_grad_store


@pytest.fixture(autouse=True)
def _pairing_on(monkeypatch):
    monkeypatch.setattr(linear, "PAIRED", True)  # off by default until timed on a GPU (model.linear.PAIRED)


def _layers(na: int, nb: int, k: int, dtype=torch.float32, **kw) -> tuple[Linear, Linear]:
    g = torch.Generator().manual_seed(0)
    a, b = Linear(k, na, dtype=dtype, **kw), Linear(k, nb, dtype=dtype, **kw)
    with torch.no_grad():
        a.weight.copy_(torch.randn(na, k, generator=g))
        b.weight.copy_(torch.randn(nb, k, generator=g))
    return a, b


def _run(a, b, x, dya, dyb, pair: bool):
    x = x.clone().requires_grad_(True)
    a.weight.grad = b.weight.grad = None
    ya, yb = paired(x, a, b) if pair else (a(x), b(x))
    torch.autograd.backward((ya, yb), (dya, dyb))
    return ya.detach(), yb.detach(), x.grad, a.weight.grad.clone(), b.weight.grad.clone()


def _inputs(k: int, na: int, nb: int, tokens: int = 150, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    shape = (2, tokens)
    return (torch.randn(*shape, k, generator=g, dtype=dtype), torch.randn(*shape, na, generator=g, dtype=dtype),
            torch.randn(*shape, nb, generator=g, dtype=dtype))


def _dq_tiles(t: torch.Tensor, block: int) -> torch.Tensor:
    q, s = quantize_tiles(t, block)
    return q.double() * s.double().repeat_interleave(block, dim=-1)[..., : t.shape[-1]]


def test_the_fp8_pair_is_one_cast_and_one_dgrad_over_both_gradients(monkeypatch):
    """FP8 forward and backward (reference ops, 32-wide tiles): outputs and Wgrads bit for bit the two layers'
    (each column's 128x1 tiles along the tokens are its own either way); the input gradient is the float64
    recipe of the side-by-side gradient (1x32 tiles, Na = 64 whole tiles) times [Wa Wb]^T's blocks, one call
    of each kernel where the two layers take two."""
    calls = {"quant_act_both": 0, "gemm": 0}

    def counted(name, fn):
        def call(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)
        return call
    ops = reference_ops(32)
    ops = dataclasses.replace(ops, **{name: counted(name, getattr(ops, name)) for name in calls})
    a, b = _layers(64, 40, 96, fp8=ops, fp8_backward=True)
    x, dya, dyb = _inputs(96, 64, 40)
    alone = _run(a, b, x, dya, dyb, pair=False)
    # forward: x cast once (both tilings, shared), two GEMMs; backward: each gradient cast, two Dgrads, two Wgrads
    assert calls == {"quant_act_both": 1 + 2, "gemm": 2 + 2 + 2}
    calls.update(quant_act_both=0, gemm=0)
    got = _run(a, b, x, dya, dyb, pair=True)
    assert calls == {"quant_act_both": 1 + 1, "gemm": 2 + 1 + 2}  # one cast of (M, 104), one Dgrad
    for i in (0, 1, 3, 4):
        assert torch.equal(got[i], alone[i]), i
    g = torch.cat([dya, dyb], -1).reshape(-1, 104)
    wt = torch.cat([a.weight.detach(), b.weight.detach()]).t().contiguous()  # (96, 104)
    dgrad = _dq_tiles(g, 32) @ dequantize_blocks(*quantize_blocks(wt, 32), 32).double().t()
    err = (got[2].reshape(-1, 96).double() - dgrad).norm() / dgrad.norm()
    assert err < 1e-6
    assert (got[2] - alone[2]).norm() / alone[2].norm() < 1e-2  # the two Dgrads summed: the same up to rounding


def test_the_bf16_pair_adds_its_second_dgrad_inside_the_gemm():
    a, b = _layers(48, 24, 64, dtype=torch.bfloat16)
    x, dya, dyb = _inputs(64, 48, 24, dtype=torch.bfloat16)
    alone, got = _run(a, b, x, dya, dyb, pair=False), _run(a, b, x, dya, dyb, pair=True)
    for i in (0, 1, 3, 4):
        assert torch.equal(got[i], alone[i]), i
    want = dya.reshape(-1, 48).double() @ a.weight.double() + dyb.reshape(-1, 24).double() @ b.weight.double()
    assert ((got[2].reshape(-1, 64).double() - want).norm() / want.norm()) < 1e-2


def test_deferred_weight_gradients_come_with_the_w_step():
    ops = reference_ops(32)
    a, b = _layers(64, 40, 96, fp8=ops, fp8_backward=True)
    x, dya, dyb = _inputs(96, 64, 40)
    now = _run(a, b, x, dya, dyb, pair=True)
    store = WeightGradStore()
    for layer in (a, b):
        attach_weight_grad_store(layer, store)
    xg = x.clone().requires_grad_(True)
    a.weight.grad = b.weight.grad = None
    torch.autograd.backward(paired(xg, a, b), (dya, dyb))
    assert a.weight.grad is None and b.weight.grad is None and len(store) == 2
    store.flush()
    assert torch.equal(a.weight.grad, now[3]) and torch.equal(b.weight.grad, now[4])
    assert torch.equal(xg.grad, now[2])


@pytest.mark.parametrize("why", ["switch off", "bias", "ragged first layer", "different precision"])
def test_layers_that_cannot_pair_run_one_after_the_other(monkeypatch, why):
    ops = reference_ops(32)
    a, b = _layers(64, 40, 96, fp8=ops, fp8_backward=True)
    if why == "switch off":
        monkeypatch.setattr(linear, "PAIRED", False)
    elif why == "bias":
        b = Linear(96, 40, bias=True, fp8=ops, fp8_backward=True)
    elif why == "ragged first layer":  # a 1x32 tile of the side-by-side gradient would hold both layers' columns
        a, b = b, a
    else:
        b = Linear(96, 40, fp8=ops, fp8_backward=False)
    applied = []
    monkeypatch.setattr(PairedLinearFn, "apply", lambda *args: applied.append(args))
    ya, yb = paired(torch.randn(3, 96), a, b)
    assert not applied and ya.shape[-1] == a.out_features and yb.shape[-1] == b.out_features


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                    reason="needs a Hopper GPU (the kernels' casts and GEMMs)")
@pytest.mark.parametrize("na, nb", [(1536, 576), (2048, 2048)])  # V3's q_a and kv_a, its shared expert's gate and up
def test_the_kernels_pair_is_the_two_layers_on_a_hopper_gpu(na, nb):
    """Our casts and GEMMs (``kernel_ops``): outputs bit for bit, Wgrads into FP32 main gradients as the layers' up to
    the GEMMs' summation order, the input gradient one Dgrad over K = Na + Nb (a ragged last tile at 2,112)."""
    from moeplan.model.fp8 import clear_fp8_weight_cache, kernel_ops
    from moeplan.model.runtime.main_grad import attach_main_grads

    ops = kernel_ops()
    with torch.device("cuda"):
        a, b = _layers(na, nb, 7168, dtype=torch.bfloat16, fp8=ops, fp8_backward=True)
    x, dya, dyb = (t.cuda() for t in _inputs(7168, na, nb, tokens=384, dtype=torch.bfloat16))
    results = []
    for pair in (False, True):
        clear_fp8_weight_cache()
        grads = attach_main_grads(torch.nn.ModuleList([a, b]))
        xg = x.clone().requires_grad_(True)
        ya, yb = paired(xg, a, b) if pair else (a(xg), b(xg))
        torch.autograd.backward((ya, yb), (dya, dyb))
        results.append((ya, yb, xg.grad, a.weight.main_grad.clone(), b.weight.main_grad.clone()))
        grads.detach()
    alone, got = results
    assert torch.equal(got[0], alone[0]) and torch.equal(got[1], alone[1])
    for i in (2, 3, 4):
        err = (got[i].double() - alone[i].double()).norm() / alone[i].double().norm()
        assert err < 1e-2, (i, err)


@pytest.mark.parametrize("fp8", [False, True])
def test_a_model_with_its_layers_paired_trains_as_one_without(monkeypatch, fp8):
    """The tiny MoE model (MLA with a query latent, shared and dense MLPs; latents and widths made whole 32-wide
    tiles), FP32, its FP8 reference path with an FP8 backward or not: the same loss, and every gradient the
    unpaired model's up to the paired Dgrads' summation order."""
    from moeplan.model import ModelOptions, Transformer
    from tests.model.hf_reference import derived_spec

    spec = derived_spec(q_lora_rank=64, kv_lora_rank=32, moe_intermediate_size=64, intermediate_size=128)
    options = (ModelOptions(dtype=torch.float32, linear_precision="fp8", fp8_kernel="reference", fp8_backward=True,
                            fp8_block_size=32) if fp8 else ModelOptions(dtype=torch.float32))
    model = Transformer(spec, options)
    model.init_weights(torch.Generator().manual_seed(0))
    tokens = torch.randint(0, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    runs, pairs = [], []
    apply = PairedLinearFn.apply
    monkeypatch.setattr(PairedLinearFn, "apply", lambda *a: pairs.append(a[1].shape) or apply(*a))
    for on in (False, True):
        monkeypatch.setattr(linear, "PAIRED", on)
        model.zero_grad(set_to_none=True)
        logits = model(tokens).logits
        logits.float().square().mean().backward()
        runs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (y0, g0), (y1, g1) = runs
    # every layer's q_a and kv_a and its MLP's (dense, shared expert) gate and up; the MTP layer's too
    assert len(pairs) == 2 * (spec.num_hidden_layers + spec.num_nextn_predict_layers) and (64, spec.hidden_size) in pairs
    assert torch.equal(y0, y1) and g0.keys() == g1.keys()
    for name in g0:
        err = (g1[name] - g0[name]).norm() / g0[name].norm().clamp_min(1e-30)
        assert err < (1e-2 if fp8 else 1e-5), (name, float(err))
