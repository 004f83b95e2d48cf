"""Expert-parallel load balancing: a numpy drop-in for DeepSeek EPLB's ``rebalance_experts``.

``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus) -> (phy2log, log2phy, logcnt)``
has EPLB's signature and output meaning (``simulator/placement/maps.py`` describes the maps), so its maps
can be handed to vLLM or SGLang as EPLB's are. Two policies, chosen as EPLB chooses them:

- hierarchical (``num_groups % num_nodes == 0``): Step 1 packs expert groups onto nodes, equal group
  counts per node; Step 2 replicates experts inside each node, each extra slot to the expert with the
  highest load per replica; Step 3 packs the node's replicas onto its GPUs, equal slot counts. Groups stay
  on one node, so node-limited routing (DeepSeek-V3 TR §2.1.2) still bounds the nodes a token reaches.
- global (otherwise): the same with one group and one node.

Beyond EPLB (both on by default, both switchable off to get EPLB's greedy):
- ``refine``: after each greedy packing, swap items between the heaviest pack and the others while that
  lowers the heaviest pack (``simulator/placement/packing.py``); try holding a few redundant slots back and
  re-target redundant slots to other experts where that lowers the most loaded GPU
  (``simulator/placement/replica_search.py``);
- ``spread_replicas``: never two replicas of one expert on one GPU (deepseek-ai/EPLB issue 22), which also
  caps an expert's replicas at the GPUs it may use.

``place_experts`` returns a ``Placement`` and also accepts a slot count that the GPU count does not
divide (e.g. 32 redundant experts on 64 GPUs): GPUs then hold ``floor`` or ``ceil`` slots, which EPLB's
map format cannot say, so ``rebalance_experts`` rejects it as EPLB does.
"""

from __future__ import annotations

import numpy as np

from moeplan.simulator.placement.maps import Placement, even_slots_per_gpu
from moeplan.simulator.placement.packing import balanced_packing
from moeplan.simulator.placement.replica_search import replicate_and_pack, replicate_experts  # noqa: F401 (re-export)

POLICIES = ("auto", "hierarchical", "global")


def rebalance_experts(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    refine: bool = True,
    spread_replicas: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's entry point on numpy arrays.

    Args:
        weight: ``[layers, logical_experts]`` non-negative load of each expert (e.g. tokens routed to it).
        num_replicas: physical expert slots per layer; a multiple of ``num_gpus``.
        num_groups: expert groups (the model's ``n_group``); must divide ``logical_experts``.
        num_nodes: nodes, where the intra-node network (NVLink) is the fast one.
        num_gpus: GPUs, a multiple of ``num_nodes``.

    Returns:
        phy2log ``[layers, num_replicas]``, log2phy ``[layers, logical_experts, max_replicas]`` (-1 padded),
        logcnt ``[layers, logical_experts]``; all int64.
    """
    if num_gpus > 0 and num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} must be a multiple of num_gpus={num_gpus}")
    placement = place_experts(
        weight, num_replicas, num_groups, num_nodes, num_gpus, refine=refine, spread_replicas=spread_replicas
    )
    return placement.phy2log, placement.log2phy, placement.logcnt


def place_experts(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str = "auto",
    refine: bool = True,
    spread_replicas: bool = True,
) -> Placement:
    """Balance every layer of ``weight`` ``[layers, logical_experts]``; see the module docstring.

    ``policy`` "auto" is EPLB's choice; "hierarchical" or "global" forces one.
    """
    weight = check_sizes(weight, num_replicas, num_groups, num_nodes, num_gpus)
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} must be one of {POLICIES}")
    hierarchical = num_groups % num_nodes == 0 if policy == "auto" else policy == "hierarchical"
    if hierarchical and num_groups % num_nodes:
        raise ValueError(f"policy='hierarchical' needs num_nodes={num_nodes} to divide num_groups={num_groups}")
    if hierarchical and num_replicas % num_nodes:
        raise ValueError(f"num_replicas={num_replicas} must be a multiple of num_nodes={num_nodes} (hierarchical)")
    groups, nodes = (num_groups, num_nodes) if hierarchical else (1, 1)
    slots_per_gpu = even_slots_per_gpu(num_replicas, num_nodes, num_gpus)
    _check_spread(weight.shape[1], slots_per_gpu, groups, nodes, spread_replicas)
    phy2log = np.stack(
        [_place_layer(row, slots_per_gpu, groups, nodes, refine, spread_replicas) for row in weight]
    ).astype(np.int64)
    logcnt = np.stack([np.bincount(row, minlength=weight.shape[1]) for row in phy2log]).astype(np.int64)
    return Placement(
        phy2log=phy2log,
        logcnt=logcnt,
        slots_per_gpu=slots_per_gpu.astype(np.int64),
        num_nodes=num_nodes,
        policy="hierarchical" if hierarchical else "global",
    )


def check_sizes(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    """Validate the arguments of ``rebalance_experts``; return ``weight`` as float64 ``[layers, experts]``."""
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 2 or weight.size == 0:
        raise ValueError(f"weight must be a non-empty [layers, logical_experts] array, got shape {weight.shape}")
    if not np.isfinite(weight).all():
        layer, expert = np.argwhere(~np.isfinite(weight))[0]
        raise ValueError(f"weight[{layer}, {expert}]={weight[layer, expert]} must be finite")
    if (weight < 0).any():
        layer, expert = np.argwhere(weight < 0)[0]
        raise ValueError(f"weight[{layer}, {expert}]={weight[layer, expert]:g} must be >= 0")
    num_logical = weight.shape[1]
    for name, value in (("num_groups", num_groups), ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if value <= 0:
            raise ValueError(f"{name}={value} must be > 0")
    if num_logical % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide logical_experts={num_logical}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}")
    if num_replicas < max(num_logical, num_gpus):
        raise ValueError(
            f"num_replicas={num_replicas} must be >= logical_experts={num_logical} and >= num_gpus={num_gpus}"
        )
    return weight


def _check_spread(num_logical: int, slots_per_gpu: np.ndarray, groups: int, nodes: int, spread: bool) -> None:
    """With one replica per expert per GPU, a GPU cannot hold more slots than its node has experts."""
    experts_per_node = num_logical // nodes
    if spread and slots_per_gpu.max() > experts_per_node:
        raise ValueError(
            f"slots per GPU={int(slots_per_gpu.max())} exceed the {experts_per_node} experts a node holds; "
            "more replicas than that need two copies of one expert on a GPU (spread_replicas=False)"
        )


def _place_layer(
    weight: np.ndarray, slots_per_gpu: np.ndarray, num_groups: int, num_nodes: int, refine: bool, spread: bool
) -> np.ndarray:
    """``[num_replicas]`` phy2log of one layer from its ``[logical]`` weight."""
    num_logical = weight.size
    group_size = num_logical // num_groups
    gpus_per_node = slots_per_gpu.size // num_nodes
    # Step 1: pack groups onto nodes, equal group counts per node.
    group_weight = weight.reshape(num_groups, group_size).sum(axis=1)
    node_of_group = balanced_packing(group_weight, np.full(num_nodes, num_groups // num_nodes), refine=refine)
    phy2log = []
    for node in range(num_nodes):
        groups = np.flatnonzero(node_of_group == node)
        experts = (groups[:, None] * group_size + np.arange(group_size)).ravel()  # [experts_per_node]
        node_slots = slots_per_gpu[node * gpus_per_node : (node + 1) * gpus_per_node]
        # Step 2: replicate inside the node (at most one replica per GPU when spreading).
        # Step 3: pack the node's replicas onto its GPUs, equal slot counts.
        replica_of, gpu = replicate_and_pack(weight[experts], node_slots, spread, refine)
        for local in range(gpus_per_node):
            phy2log.append(np.sort(experts[replica_of[gpu == local]]))
    return np.concatenate(phy2log)
