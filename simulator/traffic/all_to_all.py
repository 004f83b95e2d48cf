"""All-to-all traffic and time of one MoE layer under node-limited routing, per GPU.

Two dispatch paths (``ParallelSpec.ep_backend``); a token is sent once per target GPU however many of its
experts that GPU holds, in both:
- ``deepep`` (DeepSeek-V3 TR §3.2.2, reference §2; DeepEP's normal kernels): a token on GPU (node n,
  index i) goes to each target GPU on its own node over NVLink (none to itself), and once per other target
  node m over IB, to GPU (m, i), which forwards it over NVLink to the target GPUs of node m other than itself;
- ``flat`` (one ``all_to_all_single`` over the EP group, what ``model/runtime/expert_parallel.py`` runs):
  a token goes straight to each target GPU, over NVLink on its own node and over IB once per target GPU on
  another node (no per-node de-duplication, no forwarding).
Combine runs the same path backwards (under ``deepep`` the forwarder sums the node's partial outputs before IB).
IB and NVLink transfers overlap fully (TR §3.2.2), so a GPU's time is the larger of its IB and NVLink
times, each the larger of its send and receive bytes over the link's per-GPU, per-direction bandwidth
(``node.nic_bytes_per_s``, ``node.nvlink_bytes_per_s``). The layer's all-to-all waits for the slowest GPU.

Bytes per token (``WirePayload``): the dispatch payload follows the run's precision. An FP8 run sends FP8,
1 byte per element plus one FP32 scale per 1x128 tile (TR §3.3, DeepEP's FP8 dispatch); a BF16 run sends
its activations, 2 bytes per element (4 where the cost tables run the ``bf16`` precision in FP32: the cpu
tables). Combine is BF16 (TR §3.3), or the activations' dtype. Under ``flat`` each row also carries our
runtime's routing metadata, k weights and k local slot ids as FP32 (``expert_parallel.dispatch``), whose
gradient comes back in the backward; ``deepep``'s top-k indices and weights (k x 12 bytes) are left out.
Expert compute: 3 GEMMs (gate, up, down) of ``2 * hidden * moe_intermediate`` FLOPs per token-expert,
at the GPU's FP8 peak (``gpu.fp8_flops_per_s``; MFU is not modelled here).

Two estimators fill ``LayerTraffic``: ``simulate_layer`` samples routings (``simulator/traffic/routing.py``), and
``expected_uniform_layer`` uses the closed form for equal loads; both go through ``traffic_from_hits``.
``hits_from_routing`` takes recorded routings instead (the runtime's replica rule), for exact comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from moeplan.simulator.placement.maps import Placement
from moeplan.simulator.spec.hardware import ClusterSpec
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.parallel import EpBackend
from moeplan.simulator.traffic.routing import round_robin_slots, sample_experts, sample_slots, uniform_hit_probabilities

FP8_BYTES_PER_ELEMENT = 1  # e4m3 (TR §3.3)
FP8_SCALE_BYTES_PER_TILE = 4  # one FP32 scale per 1x128 activation tile (TR §3.3.2, DeepEP)
FP8_TILE_ELEMENTS = 128
BF16_BYTES_PER_ELEMENT = 2
ROUTING_FIELDS_PER_EXPERT = 2  # flat: a weight and a local slot id per top-k choice (expert_parallel.dispatch)
ROUTING_BYTES_PER_FIELD = 4  # FP32 each (slot ids exact below 2**24)
EXPERT_GEMMS = 3  # SwiGLU expert: gate, up, down projections
FLOPS_PER_MAC = 2


def dispatch_bytes_per_token(hidden_size: int) -> int:
    """FP8 activations plus their per-tile scales."""
    tiles = -(-hidden_size // FP8_TILE_ELEMENTS)
    return hidden_size * FP8_BYTES_PER_ELEMENT + tiles * FP8_SCALE_BYTES_PER_TILE


def combine_bytes_per_token(hidden_size: int, element_bytes: int = BF16_BYTES_PER_ELEMENT) -> int:
    return hidden_size * element_bytes


@dataclass(frozen=True)
class WirePayload:
    """Bytes one row (a token sent to one GPU) carries in each leg of a MoE layer's all-to-all.

    ``dispatch``: the activations forward (their gradient travels back the same size, as DeepEP's
    backward combine does); ``combine``: the partial outputs (and the activations' gradient, backward);
    ``routing``: the metadata that rides with the dispatch (and its gradient, with the backward's
    dispatch-shaped leg)."""

    dispatch_bytes: int
    combine_bytes: int
    routing_bytes: int = 0

    @classmethod
    def of(cls, hidden_size: int, top_k: int, precision: Literal["bf16", "fp8"], backend: EpBackend,
           activation_bytes: int = BF16_BYTES_PER_ELEMENT) -> WirePayload:
        """The module docstring's rule; ``activation_bytes`` is the element size of a non-FP8 run's
        activations (2 for BF16, 4 where ``bf16`` runs in FP32)."""
        dispatch = dispatch_bytes_per_token(hidden_size) if precision == "fp8" else hidden_size * activation_bytes
        routing = top_k * ROUTING_FIELDS_PER_EXPERT * ROUTING_BYTES_PER_FIELD if backend == "flat" else 0
        return cls(dispatch, combine_bytes_per_token(hidden_size, activation_bytes), routing)


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
    payload: WirePayload
    dispatch_s: np.ndarray  # [gpus]
    combine_s: np.ndarray  # [gpus]
    expert_compute_s: np.ndarray  # [gpus]

    @property
    def dispatch_bytes_per_token(self) -> int:
        return self.payload.dispatch_bytes + self.payload.routing_bytes

    @property
    def combine_bytes_per_token(self) -> int:
        return self.payload.combine_bytes

    @property
    def all_to_all_s(self) -> float:
        """Dispatch plus combine of the layer: each waits for its slowest GPU."""
        return float(self.dispatch_s.max() + self.combine_s.max())

    @property
    def max_expert_compute_s(self) -> float:
        return float(self.expert_compute_s.max())

    def bytes_per_gpu(self) -> dict[str, np.ndarray]:
        """``[gpus]`` bytes of each GPU by phase, link and direction, e.g. ``"dispatch_ib_send"``; phases
        ``dispatch`` (activations), ``routing`` (metadata, dispatch-shaped) and ``combine`` (dispatch reversed:
        a GPU's combine send is its dispatch receive)."""
        out = {}
        pay = self.payload
        for link, tokens in (("nvlink", self.nvlink_tokens), ("ib", self.ib_tokens)):
            sent, received = tokens.sum(axis=1), tokens.sum(axis=0)
            out[f"dispatch_{link}_send"] = sent * pay.dispatch_bytes
            out[f"dispatch_{link}_recv"] = received * pay.dispatch_bytes
            out[f"routing_{link}_send"] = sent * pay.routing_bytes
            out[f"routing_{link}_recv"] = received * pay.routing_bytes
            out[f"combine_{link}_send"] = received * pay.combine_bytes
            out[f"combine_{link}_recv"] = sent * pay.combine_bytes
        return out


def traffic_from_hits(gpu_hits: np.ndarray, node_hits: np.ndarray, gpus_per_node: int,
                      backend: EpBackend = "deepep") -> tuple[np.ndarray, np.ndarray]:
    """NVLink and IB ``[gpus, gpus]`` token copies from per-source hit counts.

    Args:
        gpu_hits: ``[gpus (source), gpus]`` tokens of each source GPU that reach each GPU.
        node_hits: ``[gpus (source), nodes]`` tokens of each source GPU that reach each node (``deepep`` only).
    """
    num_gpus, num_nodes = gpu_hits.shape[0], node_hits.shape[1]
    node_of = np.arange(num_gpus) // gpus_per_node
    same_node = node_of[:, None] == node_of[None, :]  # [gpus, gpus]
    if backend == "flat":  # straight to every target GPU: NVLink on the node, IB off it
        nvlink = np.where(same_node, gpu_hits, 0.0).astype(float)
        np.fill_diagonal(nvlink, 0.0)  # a GPU's own tokens do not move
        return nvlink, np.where(same_node, 0.0, gpu_hits).astype(float)
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
    model: ModelSpec, cluster: ClusterSpec, payload: WirePayload | None = None, backend: EpBackend = "deepep",
) -> LayerTraffic:
    """Times from hit counts; see ``traffic_from_hits`` for the arguments. ``payload`` None: an FP8 run."""
    nvlink, ib = traffic_from_hits(gpu_hits, node_hits, cluster.node.gpus_per_node, backend)
    node = cluster.node
    pay = payload or WirePayload.of(model.hidden_size, model.num_experts_per_tok, "fp8", backend)

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
        payload=pay,
        dispatch_s=phase_s(pay.dispatch_bytes + pay.routing_bytes),
        combine_s=phase_s(pay.combine_bytes),
        expert_compute_s=expert_tokens * expert_flops_per_token(model) / cluster.gpu.fp8_flops_per_s,
    )


def simulate_layer(
    expert_load: np.ndarray, placement: Placement, layer: int, model: ModelSpec, cluster: ClusterSpec,
    tokens_per_gpu: int, rng: np.random.Generator, payload: WirePayload | None = None, backend: EpBackend = "deepep",
) -> LayerTraffic:
    """Monte Carlo: ``tokens_per_gpu`` sampled routings on every GPU; ``expert_load`` is ``[experts]``."""
    _check_layout(placement, model, cluster, tokens_per_gpu)
    gpu_of_slot = placement.gpu_of_slot
    gpus = []
    for _ in range(placement.num_gpus):
        experts = sample_experts(
            expert_load, model.n_group, model.topk_group, model.num_experts_per_tok, tokens_per_gpu, rng
        )
        gpus.append(gpu_of_slot[sample_slots(experts, placement, layer, rng)])  # [T, k]
    return layer_traffic(*_hits(gpus, placement), model, cluster, payload, backend)


def recorded_layer(
    experts_by_gpu: list[np.ndarray], placement: Placement, layer: int, model: ModelSpec, cluster: ClusterSpec,
    payload: WirePayload, backend: EpBackend,
) -> LayerTraffic:
    """Traffic of recorded routings: ``experts_by_gpu[g]`` is ``[T_g, k]``, the logical experts each token of
    GPU ``g`` chose; replicas as the runtime picks them (``routing.round_robin_slots``). Exact, no sampling."""
    _check_layout(placement, model, cluster, 1)
    gpu_of_slot = placement.gpu_of_slot
    gpus = [gpu_of_slot[round_robin_slots(np.asarray(e, dtype=np.int64), placement, layer, src)]
            for src, e in enumerate(experts_by_gpu)]
    return layer_traffic(*_hits(gpus, placement), model, cluster, payload, backend)


def _hits(gpus: list[np.ndarray], placement: Placement) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(gpu_hits, node_hits, expert_tokens, nodes_per_token) from ``gpus[src]`` ``[T, k]``, the GPU serving
    each (token, choice) of source GPU ``src``."""
    num_gpus, num_nodes = placement.num_gpus, placement.num_nodes
    gpu_hits = np.zeros((num_gpus, num_gpus))
    node_hits = np.zeros((num_gpus, num_nodes))
    expert_tokens = np.zeros(num_gpus)
    for src, served in enumerate(gpus):
        hit = np.zeros((served.shape[0], num_gpus), dtype=bool)
        np.put_along_axis(hit, served, True, axis=1)
        gpu_hits[src] = hit.sum(axis=0)
        node_hits[src] = hit.reshape(served.shape[0], num_nodes, -1).any(axis=2).sum(axis=0)
        expert_tokens += np.bincount(served.ravel(), minlength=num_gpus)
    tokens = sum(served.shape[0] for served in gpus)
    return gpu_hits, node_hits, expert_tokens, node_hits.sum() / max(tokens, 1)


def expected_uniform_layer(
    placement: Placement, layer: int, model: ModelSpec, cluster: ClusterSpec, tokens_per_gpu: int,
    payload: WirePayload | None = None, backend: EpBackend = "deepep",
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
    return layer_traffic(gpu_hits, node_hits, expert_tokens, p_node.sum(), model, cluster, payload, backend)


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
