"""MLA's up-projections with the attention's backward glue in their output gradients' casts (``model.attention``:
``QueryUpFn``, ``KeyValueUpFn``; ``kernels.mla_backward``): the same outputs and gradients as autograd's glue then
``LinearFn``'s cast, bit for bit, on the CPU (the casts' fallbacks; the Gluon kernel's modes are checked on a GPU by
tests/kernels/test_mla_backward.py), and only where the memory-bound work is fused and the backward is FP8."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moeplan.model import attention
from moeplan.model.attention import MLA
from moeplan.model.fp8 import kernel_ops, reference_ops
from moeplan.model.linear import LinearFactory
from moeplan.model.rope import RotaryEmbedding
from moeplan.model.weight_grad import WeightGradStore, attach_weight_grad_store
from moeplan.simulator.presets.models import tiny_moe
from tests.kernels import test_kernels

device = test_kernels.device


def _counting(ops):
    calls = []

    def wrap(name, fn):
        return lambda *a, **k: calls.append(name) or fn(*a, **k)

    return replace(ops, rope_backward_quant_both=wrap("rope", ops.rope_backward_quant_both),
                   heads_quant_both=wrap("heads", ops.heads_quant_both)), calls


def _run(spec, ops, glue_in_cast: bool, fuse: bool, deferred: bool, monkeypatch):
    monkeypatch.setattr(attention, "GLUE_IN_CAST", glue_in_cast)
    torch.manual_seed(0)
    attn = MLA(spec, LinearFactory(torch.bfloat16, ops, fp8_backward=True), torch.bfloat16)
    attn.fuse = fuse
    store = WeightGradStore() if deferred else None
    attach_weight_grad_store(attn, store)
    cos, sin = RotaryEmbedding(spec)(torch.arange(64))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, spec.hidden_size, generator=gen).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(2, 64, spec.hidden_size, generator=gen).to(torch.bfloat16)
    out = attn(x, cos, sin)
    out.backward(dy)
    if store is not None:
        store.flush()
    return out.detach(), x.grad, {n: p.grad for n, p in attn.named_parameters()}


@pytest.mark.parametrize("deferred", [False, True])
def test_the_glue_in_the_casts_gives_autograds_outputs_and_gradients(monkeypatch, deferred):
    """Heads of 128 + 64 query channels and 128 value channels (V3's), 2 heads, 2 x 64 tokens, kernel ops (bf16):
    with ``GLUE_IN_CAST`` each up-projection's output gradient is cast once by the glue's cast (one call each), and
    the attention's output, its input's gradient and every parameter's gradient (the W step's, deferred) are the old
    path's bit for bit."""
    spec = tiny_moe().model_copy(update=dict(hidden_size=128, num_attention_heads=2, qk_nope_head_dim=128,
                                             qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=128, kv_lora_rank=128))
    ops, calls = _counting(kernel_ops())
    new = _run(spec, ops, True, True, deferred, monkeypatch)
    assert sorted(calls) == ["heads", "rope"]
    calls.clear()
    old = _run(spec, ops, False, True, deferred, monkeypatch)
    assert calls == []
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
    assert new[2].keys() == old[2].keys()
    for name, g in new[2].items():
        assert g is not None and torch.equal(g, old[2][name]), name


def test_the_glue_stays_autograds_unfused_or_without_the_ops(monkeypatch):
    """Unfused (the runtime's op-by-op path, which the eager cost tables time), or with ops that have no such casts
    (the reference ops), the attention keeps autograd's glue."""
    spec = tiny_moe()
    ops, calls = _counting(kernel_ops())
    _run(spec, ops, True, False, False, monkeypatch)
    assert calls == []
    reference = replace(reference_ops(128), rope_backward_quant_both=None, heads_quant_both=None)
    assert not attention._glue_in_cast(MLA(spec, LinearFactory(torch.float32, reference, True),
                                           torch.float32).q_b_proj, True)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                    reason="needs a Hopper GPU (the Gluon casts)")
def test_on_the_gpu_the_layer_at_v3s_heads_matches_autograds_glue(monkeypatch):
    """V3's MLA (128 heads of 128 + 64 query and 128 value channels, the latents 1536 and 512) compiled and fused on
    the GPU, 4096 tokens: with the glue in the Gluon casts the output is the old path's (its RoPE compiled without
    autograd, to within a BF16 step), and the gradients of the input and every weight agree with its to within FP8's rounding (RoPE's rotated-back values may
    round to the neighbouring BF16, module docstring of ``kernels.mla_backward``)."""
    from moeplan.simulator.presets.models import deepseek_v3

    spec = deepseek_v3()
    results = []
    for glue in (True, False):
        monkeypatch.setattr(attention, "GLUE_IN_CAST", glue)
        torch.manual_seed(0)
        with torch.device("cuda"):
            attn = MLA(spec, LinearFactory(torch.bfloat16, kernel_ops(), fp8_backward=True), torch.bfloat16)
            cos, sin = RotaryEmbedding(spec).cuda()(torch.arange(4096, device="cuda"))
            gen = torch.Generator("cuda").manual_seed(1)
            x = torch.randn(1, 4096, spec.hidden_size, generator=gen, device="cuda").bfloat16().requires_grad_(True)
            dy = torch.randn(1, 4096, spec.hidden_size, generator=gen, device="cuda").bfloat16()
        attn.fuse = True
        out = attn(x, cos, sin)
        out.backward(dy)
        results.append((out.detach(), {"x": x.grad, **{n: p.grad for n, p in attn.named_parameters()}}))
    (new, new_grads), (old, old_grads) = results
    assert ((new.float() - old.float()).norm() / old.float().norm()).item() < 1e-3
    for name, g in new_grads.items():
        rel = ((g.float() - old_grads[name].float()).norm() / old_grads[name].float().norm()).item()
        assert rel < 1e-2, (name, rel)
