"""Migration-aware rebalancing and the assignment solver it uses."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moeplan.simulator.placement.maps import Placement, gpu_load
from moeplan.simulator.placement.migration import migration_cost, min_cost_assignment, rebalance_with_migration
from moeplan.simulator.placement.rebalance import place_experts

CROSS = 3.2  # NVLink / IB per-GPU bandwidth on H800 (TR §3.2.2)


def _relabel(placement: Placement, rng: np.random.Generator) -> Placement:
    """The same placement with nodes shuffled and GPUs shuffled inside nodes (equal slot counts)."""
    per_node, per_gpu = placement.gpus_per_node, int(placement.slots_per_gpu[0])
    rows = []
    for row in placement.phy2log:
        gpus = row.reshape(placement.num_nodes, per_node, per_gpu)
        gpus = gpus[rng.permutation(placement.num_nodes)][:, rng.permutation(per_node)]
        rows.append(gpus.reshape(-1))
    return Placement(np.stack(rows), placement.logcnt, placement.slots_per_gpu, placement.num_nodes, placement.policy)


def _zipf(layers: int, experts: int, rng: np.random.Generator) -> np.ndarray:
    return (np.arange(1, experts + 1) ** -1.0)[np.argsort(rng.random((layers, experts)), axis=1)]


def test_hungarian_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(1, 7))
        cost = rng.integers(0, 9, size=(n, n)).astype(float)
        match = min_cost_assignment(cost)
        assert sorted(match.tolist()) == list(range(n))
        best = min(cost[np.arange(n), list(p)].sum() for p in itertools.permutations(range(n)))
        assert cost[np.arange(n), match].sum() == best


def test_relabelled_current_placement_needs_no_moves() -> None:
    rng = np.random.default_rng(1)
    weight = _zipf(3, 64, rng)
    fresh = place_experts(weight, 80, 8, 2, 16)
    current = _relabel(fresh, rng)
    # x2 is exact in floating point, so the fresh placement is the same; None forces the relabelling path.
    moved = rebalance_with_migration(current, weight * 2, 8, cross_node_weight=CROSS, tolerance_frac=None)
    cost = migration_cost(current, moved, CROSS)
    assert cost.cost.sum() == 0
    assert migration_cost(current, fresh, CROSS).cost.sum() > 0  # the naive re-run moves experts


@pytest.mark.parametrize("policy", ["hierarchical", "global"])
def test_same_balance_fewer_weighted_moves_than_a_fresh_placement(policy: str) -> None:
    rng = np.random.default_rng(2)
    weight = _zipf(4, 64, rng)
    current = place_experts(weight, 96, 8, 2, 16, policy=policy)
    drifted = weight * np.exp(0.5 * rng.standard_normal(weight.shape))
    fresh = place_experts(drifted, 96, 8, 2, 16, policy=policy)
    moved = rebalance_with_migration(current, drifted, 8, cross_node_weight=CROSS, policy=policy)
    assert (gpu_load(moved, drifted).max(axis=1) <= gpu_load(fresh, drifted).max(axis=1) * (1 + 1e-12)).all()
    ours, naive = migration_cost(current, moved, CROSS), migration_cost(current, fresh, CROSS)
    assert (ours.cost <= naive.cost).all() and ours.cost.sum() < 0.8 * naive.cost.sum()
    assert (moved.logcnt >= 1).all() and moved.policy == policy
    assert ours.cross_node_moves.sum() <= naive.cross_node_moves.sum()


def test_one_group_per_node_migrates_without_ib_copies() -> None:
    # DeepSeek-V3's shape: as many groups as nodes, so a group's node only needs relabelling.
    rng = np.random.default_rng(4)
    weight = _zipf(3, 64, rng)
    current = place_experts(weight, 96, 2, 2, 16)
    drifted = weight[:, ::-1] * np.exp(0.1 * rng.standard_normal(weight.shape))  # the groups swap loads
    moved = rebalance_with_migration(current, drifted, 2, cross_node_weight=CROSS)
    fresh = place_experts(drifted, 96, 2, 2, 16)
    assert migration_cost(current, moved, CROSS).cross_node_moves.sum() == 0
    assert migration_cost(current, fresh, CROSS).cross_node_moves.sum() > 0


def test_tolerance_keeps_a_good_enough_layer() -> None:
    rng = np.random.default_rng(3)
    weight = _zipf(2, 32, rng)
    current = place_experts(weight, 48, 4, 2, 8)
    slightly = weight * (1 + 0.01 * rng.random(weight.shape))
    kept = rebalance_with_migration(current, slightly, 4, cross_node_weight=CROSS, tolerance_frac=0.05)
    assert np.array_equal(kept.phy2log, current.phy2log)


def test_migration_cost_counts_intra_and_cross_node_copies() -> None:
    # 2 nodes x 2 GPUs x 1 slot; experts 0..3 one per GPU.
    current = Placement(np.array([[0, 1, 2, 3]]), np.ones((1, 4), dtype=np.int64), np.ones(4, dtype=np.int64), 2, "global")
    swapped_in_node = Placement(np.array([[1, 0, 2, 3]]), current.logcnt, current.slots_per_gpu, 2, "global")
    swapped_across = Placement(np.array([[2, 1, 0, 3]]), current.logcnt, current.slots_per_gpu, 2, "global")
    in_node = migration_cost(current, swapped_in_node, CROSS)
    across = migration_cost(current, swapped_across, CROSS)
    assert (in_node.intra_node_moves.tolist(), in_node.cross_node_moves.tolist()) == ([2], [0])
    assert (across.intra_node_moves.tolist(), across.cross_node_moves.tolist()) == ([0], [2])
    assert across.cost.tolist() == [2 * CROSS]


def test_bad_migration_input_is_rejected() -> None:
    weight = np.ones((1, 16))
    current = place_experts(weight, 16, 4, 2, 8)
    with pytest.raises(ValueError, match="cross_node_weight=0.5 must be >= 1"):
        rebalance_with_migration(current, weight, 4, cross_node_weight=0.5)
    with pytest.raises(ValueError, match="tolerance_frac=-1 must be >= 0"):
        rebalance_with_migration(current, weight, 4, cross_node_weight=2, tolerance_frac=-1)
    with pytest.raises(ValueError, match="1 layers x 16 experts, the load 2 x 16"):
        rebalance_with_migration(current, np.ones((2, 16)), 4, cross_node_weight=2)
