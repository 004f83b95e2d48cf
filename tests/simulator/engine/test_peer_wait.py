"""The all-to-all waits for its slowest peer (issue 21, capability 3): closed form against hand-computed
values and against sampled routings; a balanced load waits for nothing, a skewed one costs more."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moeplan.simulator.engine.expert_traffic import expert_traffic, group_cluster, group_placement, slowest_peer
from moeplan.simulator.presets.clusters import h800
from moeplan.simulator.presets.models import deepseek_v2_lite, deepseek_v3
from moeplan.simulator.traffic.all_to_all import WirePayload, simulate_layer


def test_slowest_peer_hand_computed():
    # Blom: n = 64 -> Phi^-1(63.625 / 64.25) = Phi^-1(0.990272) = 2.3367 (Phi^-1(0.99) = 2.3263, + 0.000272 / phi(2.3263) = 0.000272 / 0.02665); sqrt(10000) = 100
    assert slowest_peer(10_000, 64) == pytest.approx(10_000 + 233.67, abs=0.05)
    # n = 2 -> Phi^-1(1.625 / 2.25) = Phi^-1(0.72222) = 0.5894; sqrt(400) = 20
    assert slowest_peer(400, 2) == pytest.approx(400 + 11.79, abs=0.01)


def test_one_peer_or_no_load_waits_for_nothing():
    assert slowest_peer(1234.0, 1) == 1234.0
    assert slowest_peer(0.0, 64) == 0.0


def test_slowest_peer_grows_with_peers_and_shrinks_relative_to_the_load():
    excess = [slowest_peer(1e4, n) - 1e4 for n in (2, 8, 64, 256)]
    assert excess == sorted(excess) and excess[0] > 0
    # relative excess falls as 1 / sqrt(mean): 4x the load, half the relative wait
    assert (slowest_peer(4e4, 64) / 4e4 - 1) == pytest.approx((slowest_peer(1e4, 64) / 1e4 - 1) / 2)


def test_balanced_load_has_zero_wait_and_the_default_adds_the_slowest_peer():
    m, c = deepseek_v3(), h800()
    balanced = expert_traffic(m, c, 64, 4096, peer_wait=False)
    assert balanced.expert_rows_max == balanced.expert_rows_mean == 4096 * 8  # every GPU the expectation
    waited = expert_traffic(m, c, 64, 4096)
    assert waited.expert_rows_max == pytest.approx(32768 + 2.33669 * math.sqrt(32768), rel=1e-5)
    for field in ("dispatch_ib_bytes", "dispatch_nvlink_bytes", "combine_ib_bytes", "combine_nvlink_bytes"):
        assert getattr(waited, field) > getattr(balanced, field)


def test_skewed_load_costs_more_than_uniform():
    m, c = deepseek_v3(), h800()
    zipf = tuple(float(x) for x in 1 / np.arange(1, 257) ** 1.0)
    skewed = expert_traffic(m, c, 64, 4096, load=zipf)
    uniform = expert_traffic(m, c, 64, 4096)
    assert skewed.expert_rows_max > uniform.expert_rows_max
    assert skewed.dispatch_ib_bytes + skewed.dispatch_nvlink_bytes > uniform.dispatch_ib_bytes + uniform.dispatch_nvlink_bytes


def test_closed_form_against_sampled_routings():
    """The closed form's excess over the mean is of the size sampled uniform routings show (Poisson is an
    upper bound for sums of independent hits; node-limited routing sits close to it)."""
    m, c = deepseek_v2_lite(), h800()
    ep, tokens = 16, 2048
    group, placement = group_cluster(c, ep), group_placement(m, c, ep)
    payload = WirePayload.of(m.hidden_size, m.num_experts_per_tok, "fp8", "deepep")
    rows_max, nvl_max = [], []
    for seed in range(6):
        layer = simulate_layer(np.ones(m.n_routed_experts), placement, 0, m, group, tokens,
                               np.random.default_rng(seed), payload, "deepep")
        rows_max.append(layer.expert_tokens.max())
        nvl_max.append(np.maximum(layer.nvlink_tokens.sum(0), layer.nvlink_tokens.sum(1)).max())
    balanced = expert_traffic(m, c, ep, tokens, peer_wait=False, payload=payload)
    waited = expert_traffic(m, c, ep, tokens, payload=payload)
    sampled_excess = np.mean(rows_max) - balanced.expert_rows_max
    closed_excess = waited.expert_rows_max - balanced.expert_rows_max
    assert 0.5 * sampled_excess < closed_excess < 2.0 * sampled_excess
    nvl_bal = balanced.dispatch_nvlink_bytes / payload.dispatch_bytes
    nvl_wait = waited.dispatch_nvlink_bytes / payload.dispatch_bytes
    assert 0.5 * (np.mean(nvl_max) - nvl_bal) < nvl_wait - nvl_bal < 2.0 * (np.mean(nvl_max) - nvl_bal)
