"""The FP8 ``Linear`` with ``Fp8Ops.quant_act_both``: x quantised once in the forward pass for both the forward GEMM
and the Wgrad (its 128-token tiles saved instead of x), the output gradient once for Dgrad and Wgrad, and one
input shared by two layers quantised once (``Fp8InputCache``), all bit for bit the results of quantising each
operand where it is used. Reference ops on the CPU; the kernels' ops tiny through the Triton interpreter."""

from __future__ import annotations

import gc
from dataclasses import replace

import pytest
import torch

from moeplan.model import linear
from moeplan.model.attention import MLA
from moeplan.model.fp8 import FP8_DTYPE, kernel_ops, reference_ops
from moeplan.model.linear import Fp8InputCache, Linear, LinearFactory
from moeplan.model.mlp import MLP
from moeplan.model.rope import RotaryEmbedding
from moeplan.model.weight_grad import WeightGradStore, attach_weight_grad_store
from moeplan.simulator.presets.models import tiny_moe
from tests.kernels import test_kernels
from tests.kernels.test_kernels import rand

device, poisoned = test_kernels.device, test_kernels.poisoned

OPS = {"reference": lambda: reference_ops(128), "kernels": kernel_ops}
DTYPE = {"reference": torch.float32, "kernels": torch.bfloat16}


def _old_path(ops):
    """The ops without ``quant_act_both`` and no input cache: each operand quantised where it is used, as before."""
    return replace(ops, quant_act_both=None)


def _recipe(ops, x, w, dy, fp8_backward):
    """(y, dx, dw) from the ops' quantisers and GEMM called by hand, one operand at a time."""
    x2, g2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    y = ops.gemm(*ops.quant_act(x2), *ops.quant_weight(w), out_dtype=x.dtype).reshape(dy.shape)
    if not fp8_backward:
        return y, dy @ w, g2.t() @ x2
    dx = ops.gemm(*ops.quant_act(g2), *ops.quant_weight(w.t()), out_dtype=dy.dtype).reshape(x.shape)
    return y, dx, ops.gemm(*ops.quant_act_t(g2), *ops.quant_act_t(x2), out_dtype=w.dtype)


def _run_linear(ops, x0, w0, dy, fp8_backward, deferred):
    layer = Linear(w0.shape[1], w0.shape[0], dtype=w0.dtype, fp8=ops, fp8_backward=fp8_backward).to(x0.device)
    with torch.no_grad():
        layer.weight.copy_(w0)
    store = WeightGradStore() if deferred else None
    attach_weight_grad_store(layer, store)
    x = x0.clone().requires_grad_(True)
    y = layer(x)
    saved = y.grad_fn.saved_tensors
    y.backward(dy)
    if store is not None:
        assert layer.weight.grad is None and len(store) == 1
        store.flush()
    return (y.detach(), x.grad, layer.weight.grad), saved


@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("fp8_backward", [False, True])
@pytest.mark.parametrize("kind", ["reference", "kernels"])
def test_linear_is_the_recipe_bit_for_bit(device, kind, fp8_backward, deferred):
    """Output, Dgrad and Wgrad (now or deferred to the W step) equal the ops called one operand at a time, and the
    old path's, bit for bit; ragged tokens (150) and features (136). With an FP8 backward the layer saves x's FP8
    128-token tiles, never x."""
    dtype = DTYPE[kind]
    x0 = rand(2, 75, 136, seed=1, device=device, dtype=dtype, scale=3.0)
    w0 = rand(80, 136, seed=2, device=device, dtype=dtype, scale=0.1)
    dy = rand(2, 75, 80, seed=3, device=device, dtype=dtype)
    ops = OPS[kind]()
    got, saved = _run_linear(ops, x0, w0, dy, fp8_backward, deferred)
    old, _ = _run_linear(_old_path(ops), x0, w0, dy, fp8_backward, deferred)
    want = _recipe(ops, x0, w0, dy, fp8_backward)
    for name, a, b, c in zip(("y", "dx", "dw"), got, old, want, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c), name
    if fp8_backward:  # the weight, x^T in E4M3 (136, 150) and its scales (136, 2)
        assert [tuple(t.shape) for t in saved] == [(80, 136), (136, 150), (136, 2)]
        assert saved[1].dtype == FP8_DTYPE
    else:  # straight-through: the weight and x
        assert [tuple(t.shape) for t in saved] == [(80, 136), (2, 75, 136)]


def test_a_layer_whose_weight_needs_no_gradient_saves_no_input():
    ops = reference_ops(128)
    layer = Linear(128, 64, fp8=ops, fp8_backward=True)
    layer.weight.requires_grad_(False)
    x = torch.randn(3, 128, requires_grad=True)
    y = layer(x)
    assert [tuple(t.shape) for t in y.grad_fn.saved_tensors] == [(64, 128)]
    y.sum().backward()
    want = ops.gemm(*ops.quant_act(torch.ones(3, 64)), *ops.quant_weight(layer.weight.t()), out_dtype=torch.float32)
    assert torch.equal(x.grad, want)


def _counting(ops):
    """The ops with each activation quantiser logging (name, the input's data_ptr) before it runs."""
    calls = []

    def wrap(name, fn):
        return None if fn is None else lambda t: calls.append((name, t.data_ptr())) or fn(t)

    counted = replace(ops, quant_act=wrap("act", ops.quant_act), quant_act_t=wrap("act_t", ops.quant_act_t),
                      quant_act_both=wrap("both", ops.quant_act_both))
    return counted, calls


def test_no_grad_forward_makes_nothing_for_a_backward():
    ops, calls = _counting(reference_ops(128))
    layer = Linear(128, 64, fp8=ops, fp8_backward=True)
    with torch.no_grad():
        y = layer(torch.randn(3, 128))
    assert [name for name, _ in calls] == ["act"] and y.shape == (3, 64)


def test_mla_quantises_its_shared_input_once(monkeypatch):
    """q_a_proj and kv_a_proj_with_mqa read the same normed hidden states: one quantisation (both tilings) in the
    forward pass, and one per output gradient in the backward pass: 4 + 5 calls where the old path made 20, with
    the old path's outputs and gradients bit for bit."""
    ops, calls = _counting(reference_ops(128))
    spec = tiny_moe()
    torch.manual_seed(0)
    attn = MLA(spec, LinearFactory(torch.float32, ops, fp8_backward=True), torch.float32)
    cos, sin = RotaryEmbedding(spec)(torch.arange(8))
    x = torch.randn(2, 8, spec.hidden_size, requires_grad=True)
    dy = torch.randn(2, 8, spec.hidden_size)
    out = attn(x, cos, sin)
    assert [name for name, _ in calls] == ["both"] * 4  # q_a and kv_a (one call), q_b, kv_b, o_proj
    assert [ptr for _, ptr in calls].count(x.data_ptr()) == 1
    calls.clear()
    out.backward(dy)
    assert [name for name, _ in calls] == ["both"] * 5  # each output gradient, for its Dgrad and Wgrad

    monkeypatch.setattr(linear, "FP8_INPUT_CACHE", Fp8InputCache(capacity=0))
    old_ops, old_calls = _counting(_old_path(reference_ops(128)))
    torch.manual_seed(0)
    old_attn = MLA(spec, LinearFactory(torch.float32, old_ops, fp8_backward=True), torch.float32)
    x_old = x.detach().clone().requires_grad_(True)
    old_out = old_attn(x_old, cos, sin)
    assert [name for name, _ in old_calls] == ["act"] * 5
    old_out.backward(dy)
    assert len(old_calls) == 5 + 5 * 3  # Dgrad's 1x128, Wgrad's two 128x1 per layer
    assert torch.equal(out, old_out) and torch.equal(x.grad, x_old.grad)
    for (name, p), p_old in zip(attn.named_parameters(), old_attn.parameters(), strict=True):
        assert torch.equal(p.grad, p_old.grad), name


def test_mlp_quantises_its_input_once_for_gate_and_up():
    ops, calls = _counting(reference_ops(128))
    mlp = MLP(64, 128, LinearFactory(torch.float32, ops))  # straight-through: the 1x128 tiles only
    x = torch.randn(2, 8, 64)
    mlp(x)
    assert [name for name, _ in calls] == ["act", "act"]  # gate_proj and up_proj share one; down_proj
    assert [ptr for _, ptr in calls].count(x.data_ptr()) == 1


def test_tiny_model_gradients_are_the_old_paths(monkeypatch):
    """A whole FP8 model (fp8_backward, FP8 experts) on the reference ops: loss and every gradient bit for bit the
    old path's (``quant_act_both`` None, no input cache)."""
    from moeplan.model import ModelOptions, Transformer, block, training_loss
    from tests.model.synthetic_task import make_batch, task_spec

    spec = task_spec()
    gen = torch.Generator().manual_seed(0)
    ids, labels = make_batch(torch.randperm(spec.vocab_size, generator=gen), 2, 16, gen)
    opts = ModelOptions(dtype=torch.float32, linear_precision="fp8", expert_backend="fp8", fp8_backward=True)
    results, resolve = [], block.resolve_fp8_ops
    for old in (False, True):
        if old:
            monkeypatch.setattr(block, "resolve_fp8_ops", lambda *a: _old_path(resolve(*a)))
            monkeypatch.setattr(linear, "FP8_INPUT_CACHE", Fp8InputCache(capacity=0))
        model = Transformer(spec, opts)
        model.init_weights(torch.Generator().manual_seed(1))
        loss = training_loss(model(ids), labels, mtp_weight=0.3).total
        loss.backward()
        results.append((loss.detach(), [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]))
    (loss, grads), (old_loss, old_grads) = results
    assert torch.equal(loss, old_loss) and len(grads) == len(old_grads) > 10
    for (name, g), (_, g_old) in zip(grads, old_grads, strict=True):
        assert torch.equal(g, g_old), name


# ------------------------------------------------------------------ Fp8InputCache


def _same(a, b) -> bool:
    return torch.equal(a[0].float(), b[0].float()) and torch.equal(a[1], b[1])


def test_cache_hits_the_same_tensor_only_while_it_is_unchanged():
    cache, ops = Fp8InputCache(), reference_ops(128)
    x = torch.randn(2, 3, 200)
    rows, t = cache(ops, x, with_t=True)
    assert _same(rows, ops.quant_act(x.reshape(6, 200))) and _same(t, ops.quant_act_t(x.reshape(6, 200)))
    again, t_again = cache(ops, x, with_t=True)
    assert again is rows and t_again is t and cache.misses == 1
    assert cache(ops, x.view(2, 3, 200), with_t=False) == (rows, None)  # a view of the same elements
    assert cache(ops, x, with_t=True)[0] is rows and cache.misses == 1
    x.mul_(2.0)  # an in-place write: the copy is stale
    rows2, _ = cache(ops, x, with_t=True)
    assert cache.misses == 2 and _same(rows2, ops.quant_act(x.reshape(6, 200)))
    assert cache(replace(ops), x, with_t=False)[0] is not rows2 and cache.misses == 3  # other ops: their own


def test_cache_makes_the_transposed_tiles_when_first_asked():
    cache, ops = Fp8InputCache(), reference_ops(128)
    x = torch.randn(5, 130)
    assert cache(ops, x, with_t=False)[1] is None
    _, t = cache(ops, x, with_t=True)
    assert cache.misses == 2 and _same(t, ops.quant_act_t(x))
    assert cache(ops, x, with_t=True)[1] is t and cache(ops, x, with_t=False)[1] is None and cache.misses == 2


def test_cache_drops_freed_inputs_and_keeps_at_most_capacity():
    cache, ops = Fp8InputCache(capacity=2), reference_ops(128)
    xs = [torch.randn(4, 128) for _ in range(3)]
    for x in xs:
        cache(ops, x, with_t=True)
    assert len(cache._entries) == 2  # the oldest went
    cache(ops, xs[0], with_t=True)
    assert cache.misses == 4
    del xs[1:], x
    gc.collect()
    assert len(cache._entries) == 1  # xs[2]'s and xs[1]'s copies went with them
    for seed in range(3):  # the allocator hands a freed block back: a dead input's copy must never match
        y = torch.randn(4, 128, generator=torch.Generator().manual_seed(seed))
        assert _same(cache(ops, y, with_t=False)[0], ops.quant_act(y))
        del y


def test_cache_passes_inference_tensors_through():
    cache, ops = Fp8InputCache(), reference_ops(128)
    with torch.inference_mode():
        x = torch.randn(4, 128)
        assert _same(cache(ops, x, with_t=False)[0], ops.quant_act(x))
    assert len(cache._entries) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not test_kernels.ON_GPU, reason="needs a Hopper GPU")
@pytest.mark.parametrize("deferred", [False, True])
def test_fp8_weight_gradient_adds_into_the_main_gradient_in_the_epilogue(deferred):
    """With an FP32 main gradient attached (as the runtime does), the FP8 Wgrad adds into it inside the GEMM
    (``weight_grad.fused_main_grad_fp8``), immediately or from the W step: no ``.grad``, and two backward passes
    leave twice the gradient the layer without a main gradient returns."""
    ops = kernel_ops()
    x0 = rand(4, 256, 512, seed=61, device="cuda", dtype=torch.bfloat16)
    w0 = rand(384, 512, seed=62, device="cuda", dtype=torch.bfloat16, scale=512 ** -0.5)
    dy = rand(4, 256, 384, seed=63, device="cuda", dtype=torch.bfloat16)
    (_, _, want), _ = _run_linear(ops, x0, w0, dy, True, False)
    layer = Linear(512, 384, dtype=torch.bfloat16, fp8=ops, fp8_backward=True).cuda()
    with torch.no_grad():
        layer.weight.copy_(w0)
    layer.weight.main_grad = torch.zeros(384, 512, dtype=torch.float32, device="cuda")
    for _ in range(2):
        store = WeightGradStore() if deferred else None
        attach_weight_grad_store(layer, store)
        x = x0.clone().requires_grad_(True)
        layer(x).backward(dy)
        if store is not None:
            store.flush()
        assert layer.weight.grad is None
    err = float((layer.weight.main_grad / 2 - want.float()).norm() / want.float().norm())
    assert err < 1e-2, err
