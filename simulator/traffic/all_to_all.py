"""All-to-all traffic and time of one MoE layer under node-limited routing, per GPU.

Dispatch path (DeepSeek-V3 TR §3.2.2, reference §2): a token on GPU (node n, index i) goes
- to each target GPU on its own node over NVLink (none to itself);
- once per other target node m over IB, to GPU (m, i), which forwards it over NVLink to the target GPUs
  of node m other than itself.
A token is sent once per target GPU however many of its experts that GPU holds, and once per target node
over IB. Combine runs the same path backwards (the forwarder sums the node's partial outputs before IB).
IB and NVLink transfers overlap fully (TR §3.2.2), so a GPU's time is the larger of its IB and NVLink
times, each the larger of its send and receive bytes over the link's per-GPU, per-direction bandwidth
(``node.nic_bytes_per_s``, ``node.nvlink_bytes_per_s``). The layer's all-to-all waits for the slowest GPU.

Bytes per token: FP8 dispatch, 1 byte per element plus one FP32 scale per 1x128 tile (TR §3.3, DeepEP);
BF16 combine, 2 bytes per element. The top-k indices and weights (k x 12 bytes) are left out.
Expert compute: 3 GEMMs (gate, up, down) of ``2 * hidden * moe_intermediate`` FLOPs per token-expert,
at the GPU's FP8 peak (``gpu.fp8_flops_per_s``; MFU is not modelled here).

Two estimators fill ``LayerTraffic``: ``simulate_layer`` samples routings (``simulator/traffic/routing.py``), and
``expected_uniform_layer`` uses the closed form for equal loads; both go through ``traffic_from_hits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplan.simulator.placement.maps import Placement
from moeplan.simulator.spec.hardware import ClusterSpec
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.traffic.routing import sample_experts, sample_slots, uniform_hit_probabilities

FP8_BYTES_PER_ELEMENT = 1  # e4m3 (TR §3.3)
FP8_SCALE_BYTES_PER_TILE = 4  # one FP32 scale per 1x128 activation tile (TR §3.3.2, DeepEP)
FP8_TILE_ELEMENTS = 128
BF16_BYTES_PER_ELEMENT = 2
EXPERT_GEMMS = 3  # SwiGLU expert: gate, up, down projections
FLOPS_PER_MAC = 2


def dispatch_bytes_per_token(hidden_size: int) -> int:
    """FP8 activations plus their per-tile scales."""
    tiles = -(-hidden_size // FP8_TILE_ELEMENTS)
    return hidden_size * FP8_BYTES_PER_ELEMENT + tiles * FP8_SCALE_BYTES_PER_TILE


def combine_bytes_per_token(hidden_size: int) -> int:
    return hidden_size * BF16_BYTES_PER_ELEMENT


def expert_flops_per_token(model: ModelSpec) -> float:
    """Forward FLOPs of one token through one routed expert."""
    return EXPERT_GEMMS * FLOPS_PER_MAC * model.hidden_size * model.moe_intermediate_size


@dataclass(frozen=True)
class LayerTraffic:
    """One MoE layer's forward all-to-all and expert compute; token counts are token copies."""

    nvlink_tokens: np.ndarray  # [gpus, gpus] dispatch token copies over NVLink, sender -> receiver
    ib_tokens: np.ndarray  # [gpus, gpus] dispatch token copies over IB, sender -> receiver
    expert_tokens: np.ndarray  # [gpus] token-expert pairs computed on each GPU
    nodes_per_token: float  # mean distinct nodes a token reaches (its own included)
    dispatch_bytes_per_token: int
    combine_bytes_per_token: int
    dispatch_s: np.ndarray  # [gpus]
    combine_s: np.ndarray  # [gpus]
    expert_compute_s: np.ndarray  # [gpus]

    @property
    def all_to_all_s(self) -> float:
        """Dispatch plus combine of the layer: each waits for its slowest GPU."""
        return float(self.dispatch_s.max() + self.combine_s.max())

    @property
    def max_expert_compute_s(self) -> float:
        return float(self.expert_compute_s.max())

    def bytes_per_gpu(self) -> dict[str, np.ndarray]:
        """``[gpus]`` bytes of each GPU by phase, link and direction, e.g. ``"dispatch_ib_send"``.
        Combine is dispatch reversed: a GPU's combine send is its dispatch receive, in BF16."""
        out = {}
        for link, tokens in (("nvlink", self.nvlink_tokens), ("ib", self.ib_tokens)):
            sent, received = tokens.sum(axis=1), tokens.sum(axis=0)
            out[f"dispatch_{link}_send"] = sent * self.dispatch_bytes_per_token
            out[f"dispatch_{link}_recv"] = received * self.dispatch_bytes_per_token
            out[f"combine_{link}_send"] = received * self.combine_bytes_per_token
            out[f"combine_{link}_recv"] = sent * self.combine_bytes_per_token
        return out


def traffic_from_hits(gpu_hits: np.ndarray, node_hits: np.ndarray, gpus_per_node: int) -> tuple[np.ndarray, np.ndarray]:
    """NVLink and IB ``[gpus, gpus]`` token copies from per-source hit counts.

    Args:
        gpu_hits: ``[gpus (source), gpus]`` tokens of each source GPU that reach each GPU.
        node_hits: ``[gpus (source), nodes]`` tokens of each source GPU that reach each node.
    """
    num_gpus, num_nodes = gpu_hits.shape[0], node_hits.shape[1]
    node_of = np.arange(num_gpus) // gpus_per_node
    local_of = np.arange(num_gpus) % gpus_per_node
    nvlink = np.zeros((num_gpus, num_gpus))
    ib = np.zeros((num_gpus, num_gpus))
    for src in range(num_gpus):
        home = node_of[src]
        same = node_of == home
        nvlink[src, same] += gpu_hits[src, same]  # direct NVLink inside the source node
        for node in range(num_nodes):
            if node == home:
                continue
            forwarder = node * gpus_per_node + local_of[src]
            ib[src, forwarder] += node_hits[src, node]
            there = node_of == node
            nvlink[forwarder, there] += gpu_hits[src, there]  # forwarded over NVLink
    np.fill_diagonal(nvlink, 0.0)  # a token already on (or forwarded to) its expert GPU moves no further
    return nvlink, ib


def link_times_s(tokens: np.ndarray, bytes_per_token: float, bytes_per_s: float) -> np.ndarray:
    """``[gpus]`` time of each GPU on one link class: max of its send and receive bytes over bandwidth."""
    send = tokens.sum(axis=1) * bytes_per_token
    recv = tokens.sum(axis=0) * bytes_per_token
    return np.maximum(send, recv) / bytes_per_s


def layer_traffic(
    gpu_hits: np.ndarray, node_hits: np.ndarray, expert_tokens: np.ndarray, nodes_per_token: float,
    model: ModelSpec, cluster: ClusterSpec,
) -> LayerTraffic:
    """Times from hit counts; see ``traffic_from_hits`` for the arguments."""
    nvlink, ib = traffic_from_hits(gpu_hits, node_hits, cluster.node.gpus_per_node)
    node = cluster.node
    dispatch_bytes = dispatch_bytes_per_token(model.hidden_size)
    combine_bytes = combine_bytes_per_token(model.hidden_size)

    def phase_s(bytes_per_token: float) -> np.ndarray:
        # Combine is dispatch transposed; max(send, recv) per GPU is the same, so only the bytes differ.
        return np.maximum(
            link_times_s(nvlink, bytes_per_token, node.nvlink_bytes_per_s),
            link_times_s(ib, bytes_per_token, node.nic_bytes_per_s),
        )

    return LayerTraffic(
        nvlink_tokens=nvlink,
        ib_tokens=ib,
        expert_tokens=expert_tokens,
        nodes_per_token=float(nodes_per_token),
        dispatch_bytes_per_token=dispatch_bytes,
        combine_bytes_per_token=combine_bytes,
        dispatch_s=phase_s(dispatch_bytes),
        combine_s=phase_s(combine_bytes),
        expert_compute_s=expert_tokens * expert_flops_per_token(model) / cluster.gpu.fp8_flops_per_s,
    )


def simulate_layer(
    expert_load: np.ndarray, placement: Placement, layer: int, model: ModelSpec, cluster: ClusterSpec,
    tokens_per_gpu: int, rng: np.random.Generator,
) -> LayerTraffic:
    """Monte Carlo: ``tokens_per_gpu`` sampled routings on every GPU; ``expert_load`` is ``[experts]``."""
    _check_layout(placement, model, cluster, tokens_per_gpu)
    num_gpus, num_nodes = placement.num_gpus, placement.num_nodes
    gpu_of_slot = placement.gpu_of_slot
    gpu_hits = np.zeros((num_gpus, num_gpus))
    node_hits = np.zeros((num_gpus, num_nodes))
    expert_tokens = np.zeros(num_gpus)
    for src in range(num_gpus):
        experts = sample_experts(
            expert_load, model.n_group, model.topk_group, model.num_experts_per_tok, tokens_per_gpu, rng
        )
        gpus = gpu_of_slot[sample_slots(experts, placement, layer, rng)]  # [T, k]
        hit = np.zeros((tokens_per_gpu, num_gpus), dtype=bool)
        np.put_along_axis(hit, gpus, True, axis=1)
        gpu_hits[src] = hit.sum(axis=0)
        node_hits[src] = hit.reshape(tokens_per_gpu, num_nodes, -1).any(axis=2).sum(axis=0)
        expert_tokens += np.bincount(gpus.ravel(), minlength=num_gpus)
    nodes_per_token = node_hits.sum() / (num_gpus * tokens_per_gpu)
    return layer_traffic(gpu_hits, node_hits, expert_tokens, nodes_per_token, model, cluster)


def expected_uniform_layer(
    placement: Placement, layer: int, model: ModelSpec, cluster: ClusterSpec, tokens_per_gpu: int
) -> LayerTraffic:
    """Closed form for equal expert loads: expected hit counts instead of sampled ones."""
    _check_layout(placement, model, cluster, tokens_per_gpu)
    p_gpu, p_node = uniform_hit_probabilities(
        placement, layer, model.n_group, model.topk_group, model.num_experts_per_tok
    )
    num_gpus = placement.num_gpus
    gpu_hits = np.tile(tokens_per_gpu * p_gpu, (num_gpus, 1))
    node_hits = np.tile(tokens_per_gpu * p_node, (num_gpus, 1))
    # Each token-expert pair lands on a slot with probability 1 / (experts * replicas of its expert).
    per_slot = 1.0 / (placement.num_logical_experts * placement.logcnt[layer][placement.phy2log[layer]])
    share = np.bincount(placement.gpu_of_slot, weights=per_slot, minlength=num_gpus)
    expert_tokens = num_gpus * tokens_per_gpu * model.num_experts_per_tok * share
    return layer_traffic(gpu_hits, node_hits, expert_tokens, p_node.sum(), model, cluster)


def _check_layout(placement: Placement, model: ModelSpec, cluster: ClusterSpec, tokens_per_gpu: int) -> None:
    if placement.num_logical_experts != model.n_routed_experts:
        raise ValueError(
            f"placement has {placement.num_logical_experts} experts but n_routed_experts={model.n_routed_experts}"
        )
    if placement.num_gpus != cluster.num_gpus or placement.gpus_per_node != cluster.node.gpus_per_node:
        raise ValueError(
            f"placement spans {placement.num_gpus} GPUs ({placement.gpus_per_node} per node) but the cluster has "
            f"{cluster.num_gpus} ({cluster.node.gpus_per_node} per node)"
        )
    if tokens_per_gpu <= 0:
        raise ValueError(f"tokens_per_gpu={tokens_per_gpu} must be > 0")
