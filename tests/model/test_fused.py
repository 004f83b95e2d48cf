"""``model.fused``: each memory-bound function captures as one graph (fullgraph, forward and backward) and
computes what the eager code computes; ``ModelOptions.fuse_memory_bound`` reaches every module that calls
one. The Inductor kernels themselves run on the GPU only (benchmarks/model_step.py); the router's also once on
the CPU (slow) and on a GPU against its eager selection."""

from __future__ import annotations

import pytest
import torch

from moeplan.model import fused
from moeplan.model.gate import Gate
from moeplan.model.options import ModelOptions
from moeplan.model.stage import StageSpec
from moeplan.model.transformer import build_rank
from moeplan.simulator.presets.models import tiny_moe
from tests.model.hf_reference import derived_spec

g = torch.Generator().manual_seed(0)


def _r(*shape):
    return torch.randn(*shape, generator=g).requires_grad_()


CASES = {
    "rms_norm": (fused.rms_norm, lambda: (_r(2, 5, 64), _r(64), 1e-6)),
    "mla_query": (fused.mla_query, lambda: (_r(2, 5, 4, 24), torch.rand(5, 4, generator=g),
                                           torch.rand(5, 4, generator=g), 16)),
    "mla_key": (fused.mla_key, lambda: (_r(2, 5, 4, 16), _r(2, 5, 8), torch.rand(5, 4, generator=g),
                                       torch.rand(5, 4, generator=g))),
    "swiglu": (fused.swiglu, lambda: (_r(3, 7), _r(3, 7))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_function_is_one_graph_with_the_eager_result_and_gradients(name):
    fn, make = CASES[name]
    args = make()
    graph = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)  # a graph break raises
    eager, compiled = fn(*args), graph(*args)
    assert torch.equal(eager, compiled)
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    dy = torch.randn(eager.shape, generator=g)
    want = torch.autograd.grad(eager, tensors, dy)
    got = torch.autograd.grad(compiled, tensors, dy)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


def test_mla_key_value_is_one_graph_the_split_and_keys_and_its_values_own_their_memory():
    """The keys as ``mla_key`` makes them from kv's first channels, the values kv's last ones in memory of their
    own (a view would be regenerated outside a compiled graph, and the KV split's backward with it), and one graph
    with the eager result and kv's gradient (the keys' and the values' put back together)."""
    kv, k_rope = _r(2, 5, 4, 16 + 12), _r(2, 5, 8)
    cos, sin = torch.rand(5, 4, generator=g), torch.rand(5, 4, generator=g)
    k, v = fused.mla_key_value(kv, k_rope, cos, sin, 16)
    assert torch.equal(k, fused.mla_key(kv[..., :16], k_rope, cos, sin)) and torch.equal(v, kv[..., 16:])
    assert v.is_contiguous() and v.untyped_storage().data_ptr() != kv.untyped_storage().data_ptr()
    graph = torch.compile(fused.mla_key_value, backend="aot_eager", fullgraph=True, dynamic=False)
    gk, gv = graph(kv, k_rope, cos, sin, 16)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    dk, dv = torch.randn(k.shape, generator=g), torch.randn(v.shape, generator=g)
    want = torch.autograd.grad((k, v), (kv, k_rope), (dk, dv))
    got = torch.autograd.grad((gk, gv), (kv, k_rope), (dk, dv))
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert torch.equal(want[0][..., 16:], dv)


def test_the_option_reaches_every_norm_attention_mlp_and_experts_and_cpu_runs_eager():
    spec = tiny_moe()
    stage = StageSpec(0, spec.num_hidden_layers, True, True)
    plain = build_rank(spec, [stage], ModelOptions(dtype=torch.float32))[0]
    fast = build_rank(spec, [stage], ModelOptions(dtype=torch.float32, fuse_memory_bound=True))[0]
    kinds = {type(m).__name__ for m in fast.modules() if isinstance(m, fused.Fusable) and m.fuse}
    assert kinds == {"RMSNorm", "MLA", "MLP", "GroupedExperts", "Gate"}
    assert not any(m.fuse for m in plain.modules() if isinstance(m, fused.Fusable))
    plain.init_weights(torch.Generator().manual_seed(0))
    fast.load_state_dict(plain.state_dict())
    ids = torch.randint(0, spec.vocab_size, (2, 16), generator=g)
    assert torch.equal(plain(ids).logits, fast(ids).logits)  # CPU: the flag changes nothing


# (scoring_func, topk_method, n_group, topk_group, top_k, norm_topk_prob): V3, V2, V2-Lite
ROUTERS = [("sigmoid", "noaux_tc", 4, 2, 4, True), ("softmax", "group_limited_greedy", 4, 2, 3, False),
           ("softmax", "greedy", 1, 1, 2, False)]


def _gate(scoring_func, topk_method, n_group, topk_group, top_k, norm_topk_prob, seed=0) -> tuple[Gate, torch.Tensor]:
    """A Gate of 16 experts with a random correction bias (V3's), and FP32 logits (6, 16) needing gradients."""
    spec = derived_spec(n_routed_experts=16, scoring_func=scoring_func, topk_method=topk_method, n_group=n_group,
                        topk_group=topk_group, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob,
                        routed_scaling_factor=2.5)
    gen = torch.Generator().manual_seed(seed)
    gate = Gate(spec)
    if gate.e_score_correction_bias is not None:
        gate.e_score_correction_bias.copy_(0.3 * torch.randn(16, generator=gen))
    return gate, torch.randn(6, 16, generator=gen).requires_grad_()


def _route_kwargs(gate: Gate) -> dict:
    return dict(scoring_func=gate.scoring_func, topk_method=gate.topk_method, n_group=gate.n_group,
                topk_group=gate.topk_group, top_k=gate.top_k, norm_topk_prob=gate.norm_topk_prob,
                route_scale=gate.route_scale)


def _same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> None:
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _same_routing(gate: Gate, logits: torch.Tensor, route, exact: bool) -> None:
    """``route``'s (weights, indices, scores) against the eager Gate's, and the logits' gradient through the
    weights: bit for bit (``exact``) or within FP32 rounding; the indices always identical."""
    want = gate.route(logits)
    weights, indices, scores = route(logits, gate.e_score_correction_bias, **_route_kwargs(gate))
    assert torch.equal(indices, want.indices)
    _same(weights, want.weights, exact)
    _same(scores, want.scores, exact)
    dy = torch.randn(want.weights.shape, generator=g).to(logits.device)
    (grad_want,) = torch.autograd.grad(want.weights, logits, dy)
    (grad_got,) = torch.autograd.grad(weights, logits, dy)
    _same(grad_got, grad_want, exact)


@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: r[1])
def test_the_route_is_one_graph_with_the_gates_selection_and_gradients(router):
    gate, logits = _gate(*router)
    graph = torch.compile(fused.route, backend="aot_eager", fullgraph=True, dynamic=False)  # a graph break raises
    _same_routing(gate, logits, graph, exact=True)
    gate.fuse = True  # on the CPU the flag changes nothing
    assert torch.equal(gate.route(logits).weights, _gate(*router)[0].route(logits).weights)


@pytest.mark.slow
def test_inductors_route_on_the_cpu_selects_as_the_gate_and_weighs_within_fp32_rounding():
    gate, logits = _gate(*ROUTERS[0], seed=3)
    _same_routing(gate, logits, torch.compile(fused.route, fullgraph=True, dynamic=False), exact=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_fused_gate_on_a_gpu_selects_as_the_eager_one_without_host_sync():
    """V3's router (256 experts, 8 groups, top 8) on 4096 tokens of distinct scores: the compiled route picks the
    eager route's experts, weighs them within FP32 rounding, and (once compiled) never waits for the GPU."""
    spec = derived_spec(n_routed_experts=256, n_group=8, topk_group=4, num_experts_per_tok=8)
    eager = Gate(spec).cuda()
    eager.e_score_correction_bias.copy_(0.01 * torch.randn(256, generator=g).cuda())
    fast = Gate(spec).cuda()
    fast.load_state_dict(eager.state_dict())
    fast.fuse = True
    ranks = torch.rand(4096, 256, generator=g).argsort(dim=-1).float()  # a permutation of 0..255 a token
    logits = (ranks / 64 - 2).cuda().requires_grad_()  # distinct, 1/64 apart

    def compiled(x, *_, **__):
        r = fast.route(x)
        return r.weights, r.indices, r.scores
    _same_routing(eager, logits, compiled, exact=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fast.route(logits).weights.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
