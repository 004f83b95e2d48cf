"""Routing model: which experts, GPUs and nodes a token reaches under DeepSeek-V3's group-limited routing.

DeepSeek-V3 (TR §2.1.2, reference §1.1 and §2) puts its ``n_routed_experts`` in ``n_group`` groups, keeps
the ``topk_group`` (= M) best groups per token and picks the ``num_experts_per_tok`` (= k) best experts
inside them. With one group per node this bounds the nodes a token reaches by M.

We do not have the router's affinities, only per-expert loads, so a token is drawn as:
1. M groups without replacement, each with probability proportional to its total load;
2. k experts without replacement from the chosen groups, proportional to their loads;
3. for each expert, one of its replicas uniformly (EPLB's even spreading).
Steps 1-2 are Plackett-Luce draws, sampled with the Gumbel top-k trick. With equal loads the expected
hits have a closed form (``uniform_hit_probabilities``): groups are a uniform M-subset, experts a uniform
k-subset of their union, and ``E[prod over chosen experts of x_e]`` is an elementary symmetric polynomial.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from moeplan.simulator.placement.maps import Placement

_MIN_SHARE = 1e-12  # zero-load experts get this share so a draw of k experts always exists
_MAX_GROUP_SUBSETS = 20_000  # closed form enumerates the C(n_group, topk_group) group choices


def sample_experts(
    expert_load: np.ndarray, n_group: int, topk_group: int, top_k: int, num_tokens: int, rng: np.random.Generator
) -> np.ndarray:
    """``[num_tokens, top_k]`` logical experts of each token (steps 1-2); ``expert_load`` is ``[experts]``."""
    share = np.asarray(expert_load, dtype=np.float64)
    share = np.maximum(share / share.sum(), _MIN_SHARE)
    num_experts = share.size
    group_size = num_experts // n_group
    log_group = np.log(share.reshape(n_group, group_size).sum(axis=1))  # [groups]
    group_keys = log_group + rng.gumbel(size=(num_tokens, n_group))  # [T, groups]
    chosen = np.argpartition(-group_keys, topk_group - 1, axis=1)[:, :topk_group]  # [T, M]
    allowed = np.zeros((num_tokens, n_group), dtype=bool)
    np.put_along_axis(allowed, chosen, True, axis=1)
    expert_keys = np.log(share) + rng.gumbel(size=(num_tokens, num_experts))  # [T, experts]
    expert_keys[~np.repeat(allowed, group_size, axis=1)] = -np.inf
    return np.argpartition(-expert_keys, top_k - 1, axis=1)[:, :top_k]


def sample_slots(experts: np.ndarray, placement: Placement, layer: int, rng: np.random.Generator) -> np.ndarray:
    """``[T, k]`` slot serving each (token, expert): a uniform replica of the expert (step 3)."""
    log2phy = placement.log2phy[layer]  # [experts, max_replicas]
    count = placement.logcnt[layer][experts]  # [T, k]
    pick = np.floor(rng.random(experts.shape) * count).astype(np.int64)
    return log2phy[experts, pick]


def round_robin_slots(experts: np.ndarray, placement: Placement, layer: int, source_gpu: int) -> np.ndarray:
    """``[T, k]`` slot serving each (token, expert) of GPU ``source_gpu`` as the runtime picks it: replica
    ``(token + source_gpu) mod replicas`` in slot order (``model/runtime/ep_slots.py``, ``replica_of``), the
    deterministic form of step 3's uniform choice; ``token`` is the row of ``experts``."""
    count = placement.logcnt[layer][experts]  # [T, k]
    token = np.arange(experts.shape[0])[:, None]
    return placement.log2phy[layer][experts, (token + source_gpu) % count]


def uniform_hit_probabilities(
    placement: Placement, layer: int, n_group: int, topk_group: int, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Closed form for equal expert loads: ``[num_gpus]`` and ``[num_nodes]`` probabilities that a token
    reaches each GPU / node (i.e. sends it at least one of its k experts).

    For a unit u (GPU or node) let ``x_e = 1 - (replicas of e on u) / (replicas of e)``, the chance that
    expert e, if chosen, is served elsewhere. Given groups A, ``P(u missed | A) = e_k(x over A's experts)
    / C(|A's experts|, k)``; averaging over the equally likely A gives ``P(u missed)``.
    """
    num_experts = placement.num_logical_experts
    group_size = num_experts // n_group
    num_subsets = math.comb(n_group, topk_group)
    if num_subsets > _MAX_GROUP_SUBSETS:
        raise ValueError(f"closed form enumerates C(n_group={n_group}, topk_group={topk_group})={num_subsets} choices")
    gpu_of_slot = placement.gpu_of_slot
    on_gpu = np.zeros((placement.num_gpus, num_experts))  # [gpus, experts] replicas of e on g
    np.add.at(on_gpu, (gpu_of_slot, placement.phy2log[layer]), 1.0)
    on_node = on_gpu.reshape(placement.num_nodes, placement.gpus_per_node, num_experts).sum(axis=1)
    count = placement.logcnt[layer].astype(np.float64)
    miss_gpu = np.zeros(placement.num_gpus)
    miss_node = np.zeros(placement.num_nodes)
    for groups in itertools.combinations(range(n_group), topk_group):
        experts = (np.asarray(groups)[:, None] * group_size + np.arange(group_size)).ravel()
        norm = math.comb(experts.size, top_k)
        miss_gpu += _elementary_symmetric(1 - on_gpu[:, experts] / count[experts], top_k) / norm
        miss_node += _elementary_symmetric(1 - on_node[:, experts] / count[experts], top_k) / norm
    return 1 - miss_gpu / num_subsets, 1 - miss_node / num_subsets


def _elementary_symmetric(x: np.ndarray, k: int) -> np.ndarray:
    """``[units]`` e_k of each row of ``x`` ``[units, n]`` (sum over k-subsets of the product)."""
    e = np.zeros((x.shape[0], k + 1))
    e[:, 0] = 1.0
    for j in range(x.shape[1]):
        e[:, 1:] = e[:, 1:] + x[:, j : j + 1] * e[:, :-1]
    return e[:, k]
