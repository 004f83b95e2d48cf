"""rebalance_experts / place_experts: EPLB compatibility, invariants, optimality on tiny inputs, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplan.simulator.placement.maps import (
    Placement,
    build_log2phy,
    contiguous_placement,
    count_replicas,
    gpu_load,
    max_over_mean,
    node_load,
)
from moeplan.simulator.placement.rebalance import place_experts, rebalance_experts, replicate_experts

# deepseek-ai/EPLB README example: 2 layers x 12 experts, 16 slots, 4 groups, 2 nodes, 8 GPUs.
EPLB_WEIGHT = np.array(
    [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
)
EPLB_PHY2LOG = np.array(
    [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
)


def _per_gpu_sets(phy2log: np.ndarray, num_gpus: int) -> list[list[list[int]]]:
    return [[sorted(gpu.tolist()) for gpu in np.split(row, num_gpus)] for row in phy2log]


def test_greedy_mode_reproduces_eplb_readme_example() -> None:
    phy2log, log2phy, logcnt = rebalance_experts(EPLB_WEIGHT, 16, 4, 2, 8, refine=False, spread_replicas=False)
    # Same experts on every GPU as EPLB (slot order inside a GPU is free).
    assert _per_gpu_sets(phy2log, 8) == _per_gpu_sets(EPLB_PHY2LOG, 8)
    assert logcnt.tolist() == [np.bincount(r, minlength=12).tolist() for r in EPLB_PHY2LOG]
    assert log2phy.shape == (2, 12, 2)


def test_default_mode_is_at_least_as_balanced_as_eplb_on_its_example() -> None:
    eplb = Placement(EPLB_PHY2LOG, count_replicas(EPLB_PHY2LOG, 12), np.full(8, 2), 2, "hierarchical")
    ours = place_experts(EPLB_WEIGHT, 16, 4, 2, 8)
    ours_max, eplb_max = gpu_load(ours, EPLB_WEIGHT).max(axis=1), gpu_load(eplb, EPLB_WEIGHT).max(axis=1)
    assert (ours_max <= eplb_max).all()


def test_retargeting_fixes_eplbs_replica_choice() -> None:
    weight = np.array([[403.0, 31.0, 375.0]])  # 2 GPUs x 2 slots: one expert must be replicated
    greedy = place_experts(weight, 4, 1, 1, 2, refine=False)
    refined = place_experts(weight, 4, 1, 1, 2)
    assert greedy.logcnt.tolist() == [[2, 1, 1]] and gpu_load(greedy, weight).max() == 375 + 403 / 2
    assert refined.logcnt.tolist() == [[1, 2, 1]] and gpu_load(refined, weight).max() == 403 + 31 / 2


def _check_invariants(weight, phy2log, log2phy, logcnt, num_groups, num_nodes, num_gpus, hierarchical, spread):
    layers, experts = weight.shape
    num_replicas = phy2log.shape[1]
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == np.int64
    assert (logcnt >= 1).all(), "every logical expert keeps a replica"
    assert (logcnt.sum(axis=1) == num_replicas).all()
    for layer in range(layers):
        assert np.bincount(phy2log[layer], minlength=experts).tolist() == logcnt[layer].tolist()
        for e in range(experts):
            slots = log2phy[layer, e]
            real = slots[slots >= 0]
            assert real.size == logcnt[layer, e] and (slots[real.size :] == -1).all()
            assert (phy2log[layer, real] == e).all()
    per_gpu = num_replicas // num_gpus  # equal slots per GPU is the slot -> GPU rule itself
    gpu_of_slot = np.arange(num_replicas) // per_gpu
    if spread:
        for layer in range(layers):
            pairs = set(zip(gpu_of_slot.tolist(), phy2log[layer].tolist(), strict=True))
            assert len(pairs) == num_replicas, "two replicas of one expert on one GPU"
    if hierarchical:
        node_of_slot = gpu_of_slot // (num_gpus // num_nodes)
        group_of = np.arange(experts) // (experts // num_groups)
        for layer in range(layers):
            for g in range(num_groups):
                nodes = set(node_of_slot[group_of[phy2log[layer]] == g].tolist())
                assert len(nodes) == 1, f"group {g} spans nodes {nodes}"


@st.composite
def _problems(draw):
    num_nodes = draw(st.integers(1, 3))
    gpus_per_node = draw(st.integers(1, 4))
    num_gpus = num_nodes * gpus_per_node
    groups_per_node = draw(st.integers(1, 3))
    hierarchical = draw(st.booleans())
    num_groups = num_nodes * groups_per_node if hierarchical else draw(st.integers(1, 4))
    if not hierarchical and num_groups % num_nodes == 0:
        num_groups = num_nodes + 1 if num_nodes > 1 else 1
    group_size = draw(st.integers(1, 4))
    experts = num_groups * group_size
    hierarchical = num_groups % num_nodes == 0
    unit_experts = experts // num_nodes if hierarchical else experts  # experts a node may hold
    min_per_gpu = -(-max(experts, num_gpus) // num_gpus)
    per_gpu = draw(st.integers(min_per_gpu, max(min_per_gpu, min(unit_experts, min_per_gpu + 2))))
    if hierarchical and per_gpu * gpus_per_node < unit_experts:
        per_gpu = -(-unit_experts // gpus_per_node)
    layers = draw(st.integers(1, 3))
    values = draw(st.lists(st.floats(0, 1e4), min_size=layers * experts, max_size=layers * experts))
    weight = np.array(values).reshape(layers, experts)
    return weight, per_gpu * num_gpus, num_groups, num_nodes, num_gpus


@settings(max_examples=150, deadline=None, derandomize=True)
@given(_problems(), st.booleans())
def test_invariants_over_many_sizes(problem, spread: bool) -> None:
    weight, num_replicas, num_groups, num_nodes, num_gpus = problem
    hierarchical = num_groups % num_nodes == 0
    if spread and num_replicas // num_gpus > weight.shape[1] // (num_nodes if hierarchical else 1):
        with pytest.raises(ValueError, match="slots per GPU"):
            rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, spread_replicas=spread)
        return
    maps = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, spread_replicas=spread)
    _check_invariants(weight, *maps, num_groups, num_nodes, num_gpus, hierarchical, spread)


# ---- exhaustive optimum (test oracle) -----------------------------------------------------------
def _compositions(total: int, parts: int, cap: int):
    """Replica counts: ``parts`` integers in 1..cap summing to ``total``."""
    if parts == 1:
        if 1 <= total <= cap:
            yield (total,)
        return
    for first in range(1, min(cap, total - parts + 1) + 1):
        for rest in _compositions(total - first, parts - 1, cap):
            yield (first, *rest)


def _best_split(items: list[int], load: np.ndarray, num_gpus: int, slots: int, best: float) -> float:
    """Smallest max GPU load over splits of ``items`` (expert ids) into GPUs of ``slots`` distinct experts."""
    if num_gpus == 1:
        return max(float(load[items].sum()), 0.0) if len(set(items)) == len(items) else np.inf
    first, rest = items[0], items[1:]
    result = best
    for others in set(itertools.combinations(rest, slots - 1)):
        gpu = (first, *others)
        if len(set(gpu)) < slots:
            continue
        here = float(load[list(gpu)].sum())
        if here >= result:
            continue
        remaining = list(rest)
        for e in others:
            remaining.remove(e)
        result = min(result, max(here, _best_split(remaining, load, num_gpus - 1, slots, result)))
    return result


def optimal_max_gpu_load(weight: np.ndarray, num_replicas: int, num_gpus: int) -> float:
    """Global policy optimum for one layer ``weight`` ``[experts]``: replica counts and an equal-slot
    packing with at most one replica of an expert per GPU, minimising the most loaded GPU."""
    n = weight.size
    slots = num_replicas // num_gpus
    best = np.inf
    for counts in _compositions(num_replicas, n, num_gpus):
        load = weight / np.asarray(counts)
        if load.max() >= best:
            continue
        items = [e for e, c in enumerate(counts) for _ in range(c)]
        best = min(best, _best_split(items, load, num_gpus, slots, best))
    return best


# Seeded tiny instances; the exhaustive optimum respects the same constraints (equal slots, spread).
def _tiny_instances(count: int, seed: int):
    rng = np.random.default_rng(seed)
    while count:
        n, gpus = int(rng.integers(3, 7)), int(rng.integers(2, 4))
        per_gpu = int(rng.integers(-(-n // gpus), 4))
        if gpus * per_gpu < n or per_gpu > n:
            continue
        hot = (rng.random(n) < 0.3) * rng.integers(100, 400, size=n)
        yield rng.integers(0, 100, size=n).astype(float) + hot, gpus * per_gpu, gpus
        count -= 1


# Measured, not proven: worst 1.022 on these 200 instances; EPLB's plain greedy reaches 1.38 on them.
OPTIMALITY_BOUND = 1.05


def test_within_bound_of_brute_force_optimum() -> None:
    ratios, greedy_ratios = [], []
    for weight, num_replicas, gpus in _tiny_instances(200, seed=0):
        best = optimal_max_gpu_load(weight, num_replicas, gpus)
        ours = gpu_load(place_experts(weight[None], num_replicas, 1, 1, gpus), weight[None]).max()
        greedy = place_experts(weight[None], num_replicas, 1, 1, gpus, refine=False)
        ratios.append(ours / best)
        greedy_ratios.append(gpu_load(greedy, weight[None]).max() / best)
    ratios = np.array(ratios)
    assert (ratios >= 1 - 1e-9).all(), "better than the exhaustive optimum: the oracle is wrong"
    assert ratios.max() <= OPTIMALITY_BOUND
    assert ratios.mean() <= 1.005
    assert np.mean(ratios <= 1 + 1e-9) >= 0.9  # optimal on most instances
    assert max(greedy_ratios) > ratios.max()  # the refinement is what buys the bound


def test_holding_slots_back_keeps_hot_experts_apart() -> None:
    # 4 GPUs x 3 slots, two hot experts. EPLB replicates them 4 + 2 times: two GPUs hold both (56).
    weight = np.array([[100.0, 60, 1, 1, 1, 1, 1, 1]])
    greedy = place_experts(weight, 12, 1, 1, 4, refine=False)
    refined = place_experts(weight, 12, 1, 1, 4)
    assert gpu_load(greedy, weight).max() == 56
    assert gpu_load(refined, weight).max() < 52  # exhaustive optimum: 51
    assert optimal_max_gpu_load(weight[0], 12, 4) == 51


def test_refinement_never_worse_than_greedy_on_zipf() -> None:
    rng = np.random.default_rng(1)
    weight = (np.arange(1, 65) ** -1.0)[np.argsort(rng.random((6, 64)), axis=1)]
    for num_replicas in (64, 80, 96):
        refined = gpu_load(place_experts(weight, num_replicas, 8, 2, 16), weight).max(axis=1)
        greedy = gpu_load(place_experts(weight, num_replicas, 8, 2, 16, refine=False), weight).max(axis=1)
        assert (refined <= greedy + 1e-12).all()


def test_balancing_lowers_gpu_imbalance_and_keeps_node_loads_in_hierarchical_mode() -> None:
    rng = np.random.default_rng(2)
    weight = (np.arange(1, 257) ** -1.0)[np.argsort(rng.random((4, 256)), axis=1)]
    before = contiguous_placement(4, 256, 8, 64)
    after = place_experts(weight, 320, 8, 8, 64)
    assert max_over_mean(gpu_load(after, weight)).max() < 0.5 * max_over_mean(gpu_load(before, weight)).min()
    # One group per node: node loads are the group loads, in some order.
    np.testing.assert_allclose(np.sort(node_load(after, weight)), np.sort(node_load(before, weight)))
    global_ = place_experts(weight, 320, 8, 8, 64, policy="global")
    assert max_over_mean(node_load(global_, weight)).max() < 1.05


def test_uneven_slots_when_gpus_do_not_divide_replicas() -> None:
    weight = np.random.default_rng(3).random((2, 256))
    placement = place_experts(weight, 288, 8, 8, 64)  # 32 redundant on EP64: 4.5 slots per GPU
    assert sorted(set(placement.slots_per_gpu.tolist())) == [4, 5]
    assert placement.slots_per_gpu.reshape(8, 8).sum(axis=1).tolist() == [36] * 8
    assert not placement.equal_slots
    with pytest.raises(ValueError, match="num_replicas=288 must be a multiple of num_gpus=64"):
        rebalance_experts(weight, 288, 8, 8, 64)


def test_contiguous_layout_splits_experts_evenly() -> None:
    v3 = contiguous_placement(2, 256, 8, 64)
    assert v3.slots_per_gpu.tolist() == [4] * 64 and v3.gpu_of_slot[[0, 3, 4, 255]].tolist() == [0, 0, 1, 63]
    odd = contiguous_placement(1, 256, 3, 24)  # 256 experts on 24 GPUs: 10 or 11 each
    assert odd.slots_per_gpu.sum() == 256 and set(odd.slots_per_gpu.tolist()) == {10, 11}
    with pytest.raises(ValueError, match="num_gpus=24 exceeds num_logical_experts=16"):
        contiguous_placement(1, 16, 3, 24)


def test_replicate_experts_minimises_the_largest_load_per_replica() -> None:
    replica_of, count = replicate_experts(np.array([10.0, 4.0, 1.0]), 6)
    assert count.tolist() == [3, 2, 1] and replica_of[:3].tolist() == [0, 1, 2]
    _, capped = replicate_experts(np.array([10.0, 4.0, 1.0]), 6, max_count=2)
    assert capped.tolist() == [2, 2, 2]


def test_build_log2phy_orders_slots_and_pads() -> None:
    log2phy = build_log2phy(np.array([[2, 0, 2, 1, 2]]), 3)
    assert log2phy.tolist() == [[[1, -1, -1], [3, -1, -1], [0, 2, 4]]]


@pytest.mark.parametrize(
    "weight, args, message",
    [
        (np.ones((1, 12)), (16, 5, 2, 8), "num_groups=5 must divide logical_experts=12"),
        (np.ones((1, 12)), (16, 4, 3, 8), "num_gpus=8 must be a multiple of num_nodes=3"),
        (np.ones((1, 12)), (18, 4, 2, 8), "num_replicas=18 must be a multiple of num_gpus=8"),
        (np.ones((1, 12)), (8, 4, 2, 8), "num_replicas=8 must be >= logical_experts=12"),
        (np.ones((1, 12)), (16, 4, 0, 8), "num_nodes=0 must be > 0"),
        (np.array([[1.0, -2.0, 3.0, 4.0]]), (4, 1, 1, 2), r"weight\[0, 1\]=-2 must be >= 0"),
        (np.array([[1.0, np.nan, 3.0, 4.0]]), (4, 1, 1, 2), r"weight\[0, 1\]=nan must be finite"),
        (np.array([[1.0, 2.0, np.inf, 4.0]]), (4, 1, 1, 2), r"weight\[0, 2\]=inf must be finite"),
        (np.ones(12), (16, 4, 2, 8), r"\[layers, logical_experts\] array, got shape \(12,\)"),
        (np.ones((1, 4)), (16, 1, 1, 2), "slots per GPU=8 exceed the 4 experts"),
    ],
)
def test_bad_input_is_rejected_naming_field_and_value(weight, args, message) -> None:
    with pytest.raises(ValueError, match=message):
        rebalance_experts(weight, *args)


def test_bad_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="policy='nodes' must be one of"):
        place_experts(np.ones((1, 12)), 16, 4, 2, 8, policy="nodes")
    with pytest.raises(ValueError, match="needs num_nodes=2 to divide num_groups=3"):
        place_experts(np.ones((1, 12)), 16, 3, 2, 8, policy="hierarchical")
