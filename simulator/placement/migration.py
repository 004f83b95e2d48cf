"""Migration-aware rebalancing: EPLB's balance, reached from the current placement with few weight copies.

Re-running EPLB on fresh statistics returns GPU and node labels that bear no relation to where experts
sit now, so nearly every expert moves (deepseek-ai/EPLB issue 25, PR 13). A balanced placement stays
exactly as balanced when its nodes are permuted, or its equal-slot GPUs are permuted (within a node in
hierarchical mode, anywhere in global mode). ``rebalance_with_migration`` therefore:

1. computes the balanced placement with ``place_experts``: its most loaded GPU is the target;
2. per layer, keeps the current layer as is when its most loaded GPU is within ``tolerance_frac`` of
   the target;
3. otherwise builds three candidates: (a) the balanced placement relabelled by minimum-cost matching of
   its nodes and GPUs onto the current ones, where copying an expert onto a GPU costs 1 if some GPU of
   the same node holds it now (an NVLink copy) and ``cross_node_weight`` otherwise (an IB copy; the
   NVLink/IB bandwidth ratio is the natural value), which meets the target exactly; (b) the local search
   of ``simulator/placement/replica_search.py`` started from the current layer, inside each node in hierarchical
   mode, which moves only what its swaps and re-targets touch; (c) the replicas of (a), same counts and
   nodes, re-packed heaviest first onto a GPU that holds the expert now whenever that stays within the
   target (``packing.sticky_packing``). (b) and (c) count only when they meet the target;
4. takes the cheapest candidate and orders each GPU's slots so experts that stay keep their slot index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplan.simulator.placement.maps import Placement, gpu_load
from moeplan.simulator.placement.packing import sticky_packing
from moeplan.simulator.placement.rebalance import place_experts
from moeplan.simulator.placement.replica_search import improve_replicas

_NEVER = 1e12  # cost of matching GPUs whose slot counts differ


def min_cost_assignment(cost: np.ndarray) -> np.ndarray:
    """``[n]`` column matched to each row of the square ``cost`` ``[n, n]``, minimising the summed cost
    (scipy's Jonker-Volgenant solver; rows come back in order, so the columns are the match)."""
    from scipy.optimize import linear_sum_assignment  # imported here: `moeplan` starts without scipy

    rows, cols = linear_sum_assignment(cost)
    assert cost.shape[0] == cost.shape[1] and (rows == np.arange(len(rows))).all(), f"{cost.shape=}"
    return cols


@dataclass(frozen=True)
class MigrationCost:
    """Expert weight copies needed to go from one placement to another, per layer."""

    intra_node_moves: np.ndarray  # [layers] copies whose source is on the same node (NVLink)
    cross_node_moves: np.ndarray  # [layers] copies that must cross IB
    cost: np.ndarray  # [layers] intra + cross_node_weight * cross


def migration_cost(current: Placement, new: Placement, cross_node_weight: float) -> MigrationCost:
    """Copies needed to turn ``current`` into ``new``: a slot of ``new`` whose expert its GPU does not hold
    now needs one copy; it is intra-node when another GPU of that node holds the expert now."""
    _check_same_layout(current, new)
    intra = np.zeros(new.num_layers, dtype=np.int64)
    cross = np.zeros(new.num_layers, dtype=np.int64)
    for layer in range(new.num_layers):
        intra_copies, cross_copies = _copy_counts(new, layer, *_holdings(current, layer))
        intra[layer] = int(np.trace(intra_copies))
        cross[layer] = int(np.trace(cross_copies))
    return MigrationCost(intra, cross, intra + cross_node_weight * cross)


def rebalance_with_migration(
    current: Placement,
    weight: np.ndarray,
    num_groups: int,
    *,
    cross_node_weight: float,
    tolerance_frac: float | None = 0.0,
    policy: str = "auto",
    refine: bool = True,
    spread_replicas: bool = True,
) -> Placement:
    """A placement as balanced as ``place_experts(weight, ...)`` (or within ``tolerance_frac`` of it) that
    moves as few expert weights as the relabelling allows; ``current`` gives the layout and the start.
    ``tolerance_frac=None`` never keeps a current layer as is (always relabel the fresh placement)."""
    if cross_node_weight < 1:
        raise ValueError(f"cross_node_weight={cross_node_weight} must be >= 1 (an IB copy costs at least an NVLink one)")
    if tolerance_frac is not None and tolerance_frac < 0:
        raise ValueError(f"tolerance_frac={tolerance_frac} must be >= 0")
    fresh = place_experts(
        weight, current.num_replicas, num_groups, current.num_nodes, current.num_gpus,
        policy=policy, refine=refine, spread_replicas=spread_replicas,
    )
    _check_same_layout(current, fresh)
    keep = np.zeros(fresh.num_layers, dtype=bool)
    if tolerance_frac is not None:
        keep = gpu_load(current, weight).max(axis=1) <= gpu_load(fresh, weight).max(axis=1) * (1 + tolerance_frac)
    target = gpu_load(fresh, weight).max(axis=1) * (1 + (tolerance_frac or 0.0))
    rows = []
    for layer in range(fresh.num_layers):
        if keep[layer]:
            rows.append(current.phy2log[layer])
            continue
        gpu_perm = _match_gpus(current, fresh, layer, cross_node_weight)
        new_of_current = {int(gpu_perm[x]): e for x, e in enumerate(_slots_of_gpus(fresh, layer))}
        candidates = [_order_slots(current, layer, [new_of_current[g] for g in range(fresh.num_gpus)])]
        sticky = _sticky(current, layer, candidates[0], weight[layer], target[layer], fresh.policy, spread_replicas)
        if sticky is not None:
            candidates.append(sticky)
        if tolerance_frac is not None:
            warm = _warm_start(current, layer, weight[layer], fresh.policy, spread_replicas)
            if warm is not None and _peak(current, warm, weight[layer]) <= target[layer] * (1 + 1e-12):
                candidates.append(warm)
        costs = [_row_cost(current, layer, row, cross_node_weight) for row in candidates]
        rows.append(candidates[int(np.argmin(costs))])
    phy2log = np.stack(rows)
    logcnt = np.stack([np.bincount(r, minlength=fresh.num_logical_experts) for r in phy2log]).astype(np.int64)
    return Placement(phy2log, logcnt, fresh.slots_per_gpu, fresh.num_nodes, fresh.policy)


def _check_same_layout(a: Placement, b: Placement) -> None:
    if a.num_gpus != b.num_gpus or a.num_nodes != b.num_nodes or not np.array_equal(a.slots_per_gpu, b.slots_per_gpu):
        raise ValueError(
            f"current placement has {a.num_gpus} GPUs on {a.num_nodes} nodes with slots {a.slots_per_gpu.tolist()}, "
            f"the new one {b.num_gpus} GPUs on {b.num_nodes} nodes with slots {b.slots_per_gpu.tolist()}"
        )
    if a.num_logical_experts != b.num_logical_experts or a.num_layers != b.num_layers:
        raise ValueError(
            f"current placement has {a.num_layers} layers x {a.num_logical_experts} experts, "
            f"the load {b.num_layers} x {b.num_logical_experts}"
        )


def _slots_of_gpus(placement: Placement, layer: int) -> list[np.ndarray]:
    return np.split(placement.phy2log[layer], np.cumsum(placement.slots_per_gpu)[:-1])


def _holdings(placement: Placement, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """``[gpus, experts]`` and ``[nodes, experts]`` booleans: who holds which expert now."""
    have_gpu = np.zeros((placement.num_gpus, placement.num_logical_experts), dtype=bool)
    for gpu, experts in enumerate(_slots_of_gpus(placement, layer)):
        have_gpu[gpu, experts] = True
    have_node = have_gpu.reshape(placement.num_nodes, placement.gpus_per_node, -1).any(axis=1)
    return have_gpu, have_node


def _copy_counts(new, layer, have_gpu, have_node) -> tuple[np.ndarray, np.ndarray]:
    """``[new GPU, current GPU]`` intra-node and cross-node copies needed to put the new GPU's experts
    where the current GPU is."""
    need = np.zeros((new.num_gpus, new.num_logical_experts))
    for gpu, experts in enumerate(_slots_of_gpus(new, layer)):
        np.add.at(need[gpu], experts, 1.0)
    node_of_gpu = np.arange(new.num_gpus) // new.gpus_per_node
    missing_node = ~have_node[node_of_gpu]  # [current GPU, experts]: no GPU of its node holds it
    missing_gpu_only = ~have_gpu & ~missing_node
    return need @ missing_gpu_only.T, need @ missing_node.T


def _match_gpus(current: Placement, fresh: Placement, layer: int, cross_node_weight: float) -> np.ndarray:
    """``[gpus]`` current GPU taking each fresh GPU's content. Hierarchical: nodes whole, then GPUs inside."""
    have_gpu, have_node = _holdings(current, layer)
    intra, cross = _copy_counts(fresh, layer, have_gpu, have_node)
    mismatch = fresh.slots_per_gpu[:, None] != fresh.slots_per_gpu[None, :]
    cost = np.where(mismatch, _NEVER, intra + cross_node_weight * cross)
    if fresh.policy != "hierarchical":
        return min_cost_assignment(cost)
    per_node = fresh.gpus_per_node
    blocks = cost.reshape(fresh.num_nodes, per_node, fresh.num_nodes, per_node)  # [new node, gpu, cur node, gpu]
    inner = {}
    node_cost = np.zeros((fresh.num_nodes, fresh.num_nodes))
    for a in range(fresh.num_nodes):
        for b in range(fresh.num_nodes):
            inner[a, b] = min_cost_assignment(blocks[a, :, b, :])
            node_cost[a, b] = blocks[a, np.arange(per_node), b, inner[a, b]].sum()
    node_match = min_cost_assignment(node_cost)
    return np.concatenate([node_match[a] * per_node + inner[a, node_match[a]] for a in range(fresh.num_nodes)])


def _order_slots(current: Placement, layer: int, new_by_gpu: list[np.ndarray]) -> np.ndarray:
    """``[num_replicas]`` phy2log with ``new_by_gpu[g]`` on GPU ``g``; experts that stay on a GPU keep
    their current slot."""
    rows = []
    for slots_now, new in zip(_slots_of_gpus(current, layer), new_by_gpu, strict=True):
        todo = list(np.sort(new))
        row = [-1] * len(slots_now)
        for i, expert in enumerate(slots_now):
            if expert in todo:
                row[i] = int(expert)
                todo.remove(expert)
        free = [i for i, e in enumerate(row) if e < 0]
        for i, expert in zip(free, todo, strict=True):
            row[i] = int(expert)
        rows.append(row)
    return np.concatenate(rows).astype(np.int64)


def _with_row(placement: Placement, row: np.ndarray) -> Placement:
    """A one-layer placement holding ``row``."""
    logcnt = np.bincount(row, minlength=placement.num_logical_experts)[None].astype(np.int64)
    return Placement(row[None], logcnt, placement.slots_per_gpu, placement.num_nodes, placement.policy)


def _peak(current: Placement, row: np.ndarray, weight_row: np.ndarray) -> float:
    return float(gpu_load(_with_row(current, row), weight_row[None]).max())


def _row_cost(current: Placement, layer: int, row: np.ndarray, cross_node_weight: float) -> float:
    intra, cross = _copy_counts(_with_row(current, row), 0, *_holdings(current, layer))
    return float(np.trace(intra) + cross_node_weight * np.trace(cross))


def _unit_gpus(current: Placement, row: np.ndarray, policy: str) -> int:
    """GPUs per unit the search may move slots within: a node when the policy is hierarchical and every
    expert of ``row`` sits on one node, else the whole cluster."""
    node_of_slot = current.gpu_of_slot // current.gpus_per_node
    node_sets = [set(row[node_of_slot == n].tolist()) for n in range(current.num_nodes)]
    if policy == "hierarchical" and sum(map(len, node_sets)) == current.num_logical_experts:
        return current.gpus_per_node
    return current.num_gpus


def _sticky(current, layer, relabelled, weight_row, target, policy, spread) -> np.ndarray | None:
    """``[num_replicas]`` phy2log with the relabelled placement's replicas (same counts, same nodes)
    re-packed so that replicas stay on GPUs that hold their expert now, within the target load."""
    gpu_of_slot = current.gpu_of_slot
    have_gpu, _ = _holdings(current, layer)
    count = np.bincount(relabelled, minlength=current.num_logical_experts)
    per_unit = _unit_gpus(current, relabelled, policy)
    new_by_gpu = []
    for first in range(0, current.num_gpus, per_unit):
        here = (gpu_of_slot >= first) & (gpu_of_slot < first + per_unit)
        experts = relabelled[here]
        preferred = have_gpu[first : first + per_unit, experts].T  # [items, unit GPUs]
        pack = sticky_packing(
            weight_row[experts] / count[experts], current.slots_per_gpu[first : first + per_unit],
            experts if spread else None, preferred, target * (1 + 1e-12),
        )
        if pack is None:
            return None
        new_by_gpu += [experts[pack == g] for g in range(per_unit)]
    return _order_slots(current, layer, new_by_gpu)


def _warm_start(current: Placement, layer: int, weight_row: np.ndarray, policy: str, spread: bool) -> np.ndarray | None:
    """``[num_replicas]`` phy2log from the local search started at the current layer, per node when the
    policy is hierarchical and every expert's replicas sit on one node now; None when the current layer
    breaks the spread rule."""
    gpu_of_slot = current.gpu_of_slot
    row_now = current.phy2log[layer]
    if spread and len(set(zip(gpu_of_slot.tolist(), row_now.tolist()))) < row_now.size:
        return None
    per_unit = _unit_gpus(current, row_now, policy)
    new_by_gpu = []
    for first_gpu in range(0, current.num_gpus, per_unit):
        here = (gpu_of_slot >= first_gpu) & (gpu_of_slot < first_gpu + per_unit)
        experts, local = np.unique(row_now[here], return_inverse=True)
        items, gpu = improve_replicas(weight_row[experts], local, gpu_of_slot[here] - first_gpu, per_unit, spread)
        new_by_gpu += [experts[items[gpu == g]] for g in range(per_unit)]
    return _order_slots(current, layer, new_by_gpu)
