"""Routing model and all-to-all traffic: hand-computed cases, exhaustive enumeration, Monte Carlo vs
closed form, node-limited routing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moeplan.simulator.placement.loads import uniform_load, zipf_load
from moeplan.simulator.placement.maps import Placement, contiguous_placement
from moeplan.simulator.placement.rebalance import place_experts
from moeplan.simulator.presets.clusters import h800
from moeplan.simulator.presets.models import tiny_moe
from moeplan.simulator.traffic.all_to_all import (
    combine_bytes_per_token,
    dispatch_bytes_per_token,
    expected_uniform_layer,
    link_times_s,
    simulate_layer,
    traffic_from_hits,
)
from moeplan.simulator.traffic.routing import sample_experts, sample_slots, uniform_hit_probabilities

MODEL = tiny_moe()  # 16 experts in 4 groups, top-2 groups, top-4 experts, hidden 64
CLUSTER = h800(2)  # 2 nodes x 8 GPUs, NVLink 160 GB/s, IB 50 GB/s per GPU


def test_bytes_per_token_follow_fp8_dispatch_and_bf16_combine() -> None:
    assert dispatch_bytes_per_token(7168) == 7168 + 56 * 4  # FP8 + one FP32 scale per 128 elements
    assert combine_bytes_per_token(7168) == 2 * 7168
    assert dispatch_bytes_per_token(100) == 100 + 4  # a partial tile still has a scale


def test_traffic_from_hits_follows_deepseeks_path() -> None:
    # 2 nodes x 2 GPUs. Only GPUs 0 and 1 (node 0) send.
    gpu_hits = np.array([[5, 3, 4, 2], [1, 6, 7, 0], [0] * 4, [0] * 4], dtype=float)
    node_hits = np.array([[6, 5], [6, 7], [0, 0], [0, 0]], dtype=float)
    nvlink, ib = traffic_from_hits(gpu_hits, node_hits, gpus_per_node=2)
    expected_ib = np.zeros((4, 4))
    expected_ib[0, 2] = 5  # GPU 0 -> same index (0) on node 1
    expected_ib[1, 3] = 7  # GPU 1 -> same index (1) on node 1
    expected_nvlink = np.zeros((4, 4))
    expected_nvlink[0, 1] = 3  # direct, inside node 0
    expected_nvlink[1, 0] = 1
    expected_nvlink[2, 3] = 2  # GPU 2 forwards GPU 0's tokens to GPU 3 (its own are already home)
    expected_nvlink[3, 2] = 7  # GPU 3 forwards GPU 1's tokens to GPU 2
    np.testing.assert_array_equal(ib, expected_ib)
    np.testing.assert_array_equal(nvlink, expected_nvlink)


def test_link_time_is_the_larger_of_send_and_receive() -> None:
    tokens = np.array([[0, 10], [2, 0]], dtype=float)
    np.testing.assert_allclose(link_times_s(tokens, 100.0, 1000.0), [1.0, 1.0])  # 10 tokens x 100 B / 1 kB/s
    tokens = np.array([[0, 4, 4], [0, 0, 0], [0, 0, 0]], dtype=float)
    np.testing.assert_allclose(link_times_s(tokens, 1.0, 1.0), [8, 4, 4])


def _exact_hit_probabilities(placement: Placement, n_group: int, topk_group: int, top_k: int):
    """Enumerate every group choice, expert subset and replica choice (uniform load)."""
    experts = placement.num_logical_experts
    size = experts // n_group
    gpu_of_slot = placement.gpu_of_slot
    slots = [np.flatnonzero(placement.phy2log[0] == e) for e in range(experts)]
    p_gpu = np.zeros(placement.num_gpus)
    groups_all = list(itertools.combinations(range(n_group), topk_group))
    for groups in groups_all:
        union = [g * size + i for g in groups for i in range(size)]
        subsets = list(itertools.combinations(union, top_k))
        for subset in subsets:
            choices = list(itertools.product(*(slots[e] for e in subset)))
            for choice in choices:
                hit = set(gpu_of_slot[list(choice)].tolist())
                p_gpu[list(hit)] += 1 / (len(groups_all) * len(subsets) * len(choices))
    return p_gpu


def test_closed_form_matches_exhaustive_enumeration() -> None:
    # 8 experts, 4 groups, 2 groups per token, 3 experts per token; 2 nodes x 2 GPUs, 3 slots each.
    phy2log = np.array([[0, 5, 2, 1, 0, 6, 3, 7, 4, 2, 4, 6]])
    placement = Placement(phy2log, np.bincount(phy2log[0])[None], np.full(4, 3), 2, "global")
    p_gpu, p_node = uniform_hit_probabilities(placement, 0, n_group=4, topk_group=2, top_k=3)
    np.testing.assert_allclose(p_gpu, _exact_hit_probabilities(placement, 4, 2, 3), atol=1e-12)
    assert (p_node >= p_gpu.reshape(2, 2).max(axis=1) - 1e-12).all()


@pytest.mark.parametrize("policy", ["hierarchical", "global"])
def test_monte_carlo_agrees_with_closed_form_for_uniform_load(policy: str) -> None:
    weight = np.random.default_rng(0).random((1, 16))  # only shapes the placement; routing is uniform
    placement = place_experts(weight, 32, 4, 2, 16, policy=policy)
    uniform = uniform_load(1, 16, 1, 4)[0]
    mc = simulate_layer(uniform, placement, 0, MODEL, CLUSTER, 2048, np.random.default_rng(1))
    exact = expected_uniform_layer(placement, 0, MODEL, CLUSTER, 2048)
    assert mc.nodes_per_token == pytest.approx(exact.nodes_per_token, rel=0.01)
    np.testing.assert_allclose(mc.ib_tokens.sum(), exact.ib_tokens.sum(), rtol=0.01)
    np.testing.assert_allclose(mc.nvlink_tokens.sum(), exact.nvlink_tokens.sum(), rtol=0.01)
    np.testing.assert_allclose(mc.expert_tokens, exact.expert_tokens, rtol=0.06)
    # The sampled max over GPUs sits a little above the expectation, never far.
    assert exact.dispatch_s.max() * 0.99 <= mc.dispatch_s.max() <= exact.dispatch_s.max() * 1.08
    assert mc.combine_s.max() / mc.dispatch_s.max() == pytest.approx(128 / 68)  # BF16 64 vs FP8 64 + 4 bytes
    split = mc.bytes_per_gpu()
    np.testing.assert_allclose(split["dispatch_ib_send"], mc.ib_tokens.sum(axis=1) * 68)
    np.testing.assert_allclose(split["combine_nvlink_send"], mc.nvlink_tokens.sum(axis=0) * 128)
    assert split["dispatch_ib_send"].sum() == split["dispatch_ib_recv"].sum() > 0


def test_node_limited_routing_bounds_nodes_only_when_groups_stay_on_nodes() -> None:
    weight = zipf_load(1, 16, 1000, 4, 1.0, np.random.default_rng(2))
    hierarchical = place_experts(weight, 32, 4, 4, 16)  # one group per node (4 nodes x 4 GPUs)
    spread = place_experts(weight, 32, 4, 4, 16, policy="global")
    rng = np.random.default_rng(3)
    experts = sample_experts(weight[0], MODEL.n_group, MODEL.topk_group, MODEL.num_experts_per_tok, 4000, rng)
    assert (np.sort(experts, axis=1)[:, 1:] != np.sort(experts, axis=1)[:, :-1]).all()  # distinct experts
    assert max(len(set(row)) for row in (experts // 4).tolist()) <= MODEL.topk_group  # <= M groups
    nodes = {}
    for name, placement in (("hierarchical", hierarchical), ("global", spread)):
        gpus = placement.gpu_of_slot[sample_slots(experts, placement, 0, rng)]
        nodes[name] = np.array([len(set(row)) for row in (gpus // 4).tolist()])
    assert nodes["hierarchical"].max() <= MODEL.topk_group
    assert nodes["global"].max() > MODEL.topk_group


def test_sampled_routing_follows_the_load() -> None:
    load = np.ones(16)
    load[5] = 8.0  # one hot expert
    experts = sample_experts(load, 1, 1, 4, 20000, np.random.default_rng(4))
    share = np.bincount(experts.ravel(), minlength=16) / experts.shape[0]
    # Plackett-Luce: the hot expert is missed only if the 4 picks all go to the 15 others.
    assert share[5] == pytest.approx(1 - (15 * 14 * 13 * 12) / (23 * 22 * 21 * 20), abs=0.01)
    assert share.sum() == pytest.approx(4)


def test_balancing_a_zipf_load_cuts_all_to_all_and_compute_time() -> None:
    model, cluster = MODEL, h800(2)
    weight = zipf_load(1, 16, 16 * 512, 4, 1.0, np.random.default_rng(5))
    before = contiguous_placement(1, 16, 2, 16)
    after = place_experts(weight, 32, 4, 2, 16)
    t_before = simulate_layer(weight[0], before, 0, model, cluster, 512, np.random.default_rng(6))
    t_after = simulate_layer(weight[0], after, 0, model, cluster, 512, np.random.default_rng(6))
    assert t_after.max_expert_compute_s < 0.7 * t_before.max_expert_compute_s
    assert t_after.all_to_all_s < 0.8 * t_before.all_to_all_s
    # Same routed work, only spread differently.
    assert t_after.expert_tokens.sum() == t_before.expert_tokens.sum() == 16 * 512 * 4


def test_monte_carlo_is_seeded() -> None:
    placement = contiguous_placement(1, 16, 2, 16)
    load = np.arange(1.0, 17.0)
    a = simulate_layer(load, placement, 0, MODEL, CLUSTER, 256, np.random.default_rng(7))
    b = simulate_layer(load, placement, 0, MODEL, CLUSTER, 256, np.random.default_rng(7))
    np.testing.assert_array_equal(a.nvlink_tokens, b.nvlink_tokens)
    np.testing.assert_array_equal(a.ib_tokens, b.ib_tokens)


def test_layout_mismatch_is_rejected() -> None:
    placement = contiguous_placement(1, 16, 1, 8)
    with pytest.raises(ValueError, match="placement spans 8 GPUs .* cluster has 16"):
        simulate_layer(np.ones(16), placement, 0, MODEL, CLUSTER, 16, np.random.default_rng(0))
    with pytest.raises(ValueError, match="tokens_per_gpu=0 must be > 0"):
        expected_uniform_layer(contiguous_placement(1, 16, 2, 16), 0, MODEL, CLUSTER, 0)
