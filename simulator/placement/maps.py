"""Expert placement maps and the loads they imply.

A placement puts ``num_replicas`` physical expert slots on GPUs, GPU by GPU: GPU ``g`` holds the slots
``offsets[g] .. offsets[g] + slots_per_gpu[g] - 1``. With equal ``slots_per_gpu`` this is EPLB's rule
"slot s lives on GPU s // (num_replicas / num_gpus)", and the maps are EPLB's:

- ``phy2log`` ``[layers, num_replicas]``: the logical expert held by each slot;
- ``log2phy`` ``[layers, logical_experts, max_replicas]``: the slots of each expert, padded with -1;
- ``logcnt`` ``[layers, logical_experts]``: the number of slots of each expert.

Tokens routed to an expert are assumed spread evenly over its replicas (EPLB's load model), so a slot's
load is ``weight[expert] / logcnt[expert]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Placement:
    """One placement of every MoE layer's experts; arrays are int64, shapes in the module docstring."""

    phy2log: np.ndarray  # [layers, num_replicas]
    logcnt: np.ndarray  # [layers, logical_experts]
    slots_per_gpu: np.ndarray  # [num_gpus]
    num_nodes: int
    policy: str  # "hierarchical", "global" or "contiguous"

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_replicas(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def num_logical_experts(self) -> int:
        return int(self.logcnt.shape[1])

    @property
    def num_gpus(self) -> int:
        return int(self.slots_per_gpu.size)

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes

    @property
    def equal_slots(self) -> bool:
        """True when every GPU has the same slot count, i.e. the maps are EPLB's format exactly."""
        return bool((self.slots_per_gpu == self.slots_per_gpu[0]).all())

    @property
    def gpu_of_slot(self) -> np.ndarray:
        """``[num_replicas]`` GPU index of each slot."""
        return np.repeat(np.arange(self.num_gpus), self.slots_per_gpu)

    @property
    def log2phy(self) -> np.ndarray:
        return build_log2phy(self.phy2log, self.num_logical_experts)


def build_log2phy(phy2log: np.ndarray, num_logical_experts: int) -> np.ndarray:
    """``[layers, logical, max_replicas]`` slot ids of each expert in slot order, padded with -1."""
    num_layers, num_replicas = phy2log.shape
    logcnt = count_replicas(phy2log, num_logical_experts)
    log2phy = np.full((num_layers, num_logical_experts, int(logcnt.max())), -1, dtype=np.int64)
    for layer in range(num_layers):
        order = np.argsort(phy2log[layer], kind="stable")  # slots grouped by expert, ascending slot id
        experts = phy2log[layer, order]
        first = np.searchsorted(experts, experts)  # index of each expert's first slot in `order`
        log2phy[layer, experts, np.arange(num_replicas) - first] = order
    return log2phy


def count_replicas(phy2log: np.ndarray, num_logical_experts: int) -> np.ndarray:
    """``[layers, logical]`` number of slots holding each expert."""
    return np.stack([np.bincount(row, minlength=num_logical_experts) for row in phy2log])


def even_slots_per_gpu(num_replicas: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    """``[num_gpus]`` slot counts: nodes get equal shares (the first ones one more when it does not divide),
    then the GPUs of a node likewise. Equal everywhere when ``num_gpus`` divides ``num_replicas``."""
    gpus_per_node = num_gpus // num_nodes
    node_share = num_replicas // num_nodes + (np.arange(num_nodes) < num_replicas % num_nodes)
    local = np.arange(gpus_per_node)
    return np.concatenate([share // gpus_per_node + (local < share % gpus_per_node) for share in node_share])


def contiguous_placement(num_layers: int, num_logical_experts: int, num_nodes: int, num_gpus: int) -> Placement:
    """The placement without balancing: experts in id order, one replica each, GPU by GPU (DeepSeek-V3
    training: 256 experts over EP64, 4 per GPU, one group of 32 per node). When ``num_gpus`` does not divide
    the experts, GPUs hold ``floor`` or ``ceil`` of the share as in ``even_slots_per_gpu``."""
    if num_logical_experts < num_gpus:
        raise ValueError(f"num_gpus={num_gpus} exceeds num_logical_experts={num_logical_experts}: a GPU would hold none")
    phy2log = np.tile(np.arange(num_logical_experts, dtype=np.int64), (num_layers, 1))
    return Placement(
        phy2log=phy2log,
        logcnt=np.ones((num_layers, num_logical_experts), dtype=np.int64),
        slots_per_gpu=even_slots_per_gpu(num_logical_experts, num_nodes, num_gpus).astype(np.int64),
        num_nodes=num_nodes,
        policy="contiguous",
    )


def slot_load(placement: Placement, weight: np.ndarray) -> np.ndarray:
    """``[layers, num_replicas]`` load of each slot: its expert's weight over its replica count."""
    rows = np.arange(placement.num_layers)[:, None]
    return weight[rows, placement.phy2log] / placement.logcnt[rows, placement.phy2log]


def gpu_load(placement: Placement, weight: np.ndarray) -> np.ndarray:
    """``[layers, num_gpus]`` summed slot load of each GPU."""
    per_slot = slot_load(placement, weight)
    offsets = np.concatenate([[0], np.cumsum(placement.slots_per_gpu)[:-1]])
    return np.add.reduceat(per_slot, offsets, axis=1)


def node_load(placement: Placement, weight: np.ndarray) -> np.ndarray:
    """``[layers, num_nodes]`` summed GPU load of each node."""
    per_gpu = gpu_load(placement, weight)
    return per_gpu.reshape(placement.num_layers, placement.num_nodes, -1).sum(axis=2)


def max_over_mean(load: np.ndarray) -> np.ndarray:
    """``[layers]`` max / mean of each row of a ``[layers, units]`` load (1.0 = perfect balance)."""
    mean = load.mean(axis=1)
    return np.divide(load.max(axis=1), mean, out=np.ones_like(mean), where=mean > 0)
