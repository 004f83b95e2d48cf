"""``model.fused``: each memory-bound function captures as one graph (fullgraph, forward and backward) and
computes what the eager code computes; ``ModelOptions.fuse_memory_bound`` reaches every module that calls
one. The Inductor kernels themselves run on the GPU only (benchmarks/model_step.py)."""

from __future__ import annotations

import pytest
import torch

from moeplan.model import fused
from moeplan.model.options import ModelOptions
from moeplan.model.stage import StageSpec
from moeplan.model.transformer import build_rank
from moeplan.simulator.presets.models import tiny_moe

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


def test_the_option_reaches_every_norm_attention_mlp_and_experts_and_cpu_runs_eager():
    spec = tiny_moe()
    stage = StageSpec(0, spec.num_hidden_layers, True, True)
    plain = build_rank(spec, [stage], ModelOptions(dtype=torch.float32))[0]
    fast = build_rank(spec, [stage], ModelOptions(dtype=torch.float32, fuse_memory_bound=True))[0]
    kinds = {type(m).__name__ for m in fast.modules() if isinstance(m, fused.Fusable) and m.fuse}
    assert kinds == {"RMSNorm", "MLA", "MLP", "GroupedExperts"}
    assert not any(m.fuse for m in plain.modules() if isinstance(m, fused.Fusable))
    plain.init_weights(torch.Generator().manual_seed(0))
    fast.load_state_dict(plain.state_dict())
    ids = torch.randint(0, spec.vocab_size, (2, 16), generator=g)
    assert torch.equal(plain(ids).logits, fast(ids).logits)  # CPU: the flag changes nothing
