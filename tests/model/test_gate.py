"""Router variants against brute-force oracles and transformers' DeepSeek-V2 router."""

from __future__ import annotations

import pytest
import torch

from moeplan.model.gate import Gate
from tests.model.hf_reference import derived_spec


def _gate(seed: int, **update) -> tuple[Gate, torch.Tensor]:
    spec = derived_spec(**update)
    gen = torch.Generator().manual_seed(seed)
    gate = Gate(spec)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen))
        if gate.e_score_correction_bias is not None:
            gate.e_score_correction_bias.copy_(0.3 * torch.randn(spec.n_routed_experts, generator=gen))
    return gate, torch.randn(40, spec.hidden_size, generator=gen) * 0.2


def _oracle_noaux_tc(scores, bias, n_group, topk_group, top_k):
    """Per token: best group subset by the sum of each group's two best biased scores, then top-k."""
    out = []
    for s, b in zip(scores.tolist(), (scores + bias).tolist()):
        size = len(s) // n_group
        group_score = [sum(sorted(b[g * size:(g + 1) * size])[-2:]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
        out.append(set(sorted(allowed, key=lambda e: -b[e])[:top_k]))
    return out


@pytest.mark.parametrize("n_group,topk_group,top_k", [(4, 2, 4), (8, 3, 3), (1, 1, 2), (2, 1, 8)])
def test_noaux_tc_matches_oracle(n_group: int, topk_group: int, top_k: int) -> None:
    gate, x = _gate(n_group * 10 + top_k, n_group=n_group, topk_group=topk_group, num_experts_per_tok=top_k)
    routing = gate(x)
    expected = _oracle_noaux_tc(routing.scores, gate.e_score_correction_bias, n_group, topk_group, top_k)
    assert [set(row) for row in routing.indices.tolist()] == expected
    # weights: unbiased sigmoid scores of the chosen experts, normalised, times the route scale
    chosen = routing.scores.gather(1, routing.indices)
    torch.testing.assert_close(routing.weights, chosen / chosen.sum(-1, keepdim=True) * gate.route_scale)


def test_bias_moves_selection_not_weights() -> None:
    gate, x = _gate(1)
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
    plain = gate(x)
    with torch.no_grad():
        gate.e_score_correction_bias[0] = 10.0  # expert 0 always wins selection
    biased = gate(x)
    assert (biased.indices == 0).any(-1).all()
    assert not (plain.indices == 0).any(-1).all()
    torch.testing.assert_close(biased.scores, plain.scores)  # affinities themselves unchanged
    w0 = biased.weights[biased.indices == 0]
    assert w0.max() < 0.99 * gate.route_scale  # the +10 never enters the gating weight


@pytest.mark.parametrize("method,n_group,topk_group", [("greedy", 1, 1), ("group_limited_greedy", 4, 2)])
def test_softmax_variants_match_transformers_v2_router(method: str, n_group: int, topk_group: int) -> None:
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    gate, x = _gate(7, scoring_func="softmax", topk_method=method, n_group=n_group, topk_group=topk_group,
                    norm_topk_prob=False, routed_scaling_factor=16.0)
    assert gate.e_score_correction_bias is None
    config = DeepseekV2Config(hidden_size=x.shape[1], n_routed_experts=gate.num_experts, num_experts_per_tok=gate.top_k,
                              topk_method=method, n_group=n_group, topk_group=topk_group, routed_scaling_factor=16.0)
    ref = DeepseekV2TopkRouter(config)
    with torch.no_grad():
        ref.weight.copy_(gate.weight)
    _, ref_w, ref_i = ref(x)
    ours = gate(x)
    order_ref, order_ours = ref_i.argsort(-1), ours.indices.argsort(-1)
    assert torch.equal(ref_i.gather(1, order_ref), ours.indices.gather(1, order_ours))
    torch.testing.assert_close(ref_w.gather(1, order_ref), ours.weights.gather(1, order_ours))


def test_group_limit_keeps_experts_inside_topk_groups() -> None:
    gate, x = _gate(5, n_group=8, topk_group=2, num_experts_per_tok=4)
    groups = gate(x).indices // (gate.num_experts // 8)
    assert all(len(set(row)) <= 2 for row in groups.tolist())
    combos = {tuple(sorted(set(row))) for row in groups.tolist()}
    assert len(combos) > 3, "routing collapsed onto few groups; the test would not discriminate"
