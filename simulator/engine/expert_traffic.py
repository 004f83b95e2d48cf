"""One expert-parallel group's all-to-all bytes and expert rows per micro-batch, from the
expert-placement capability's traffic model (``simulator/traffic/all_to_all.py``).

The group is ``ep`` GPUs on ``ep / gpus_per_node`` whole nodes (or part of one node when ``ep`` is
smaller). Every GPU routes ``tokens`` tokens; the step waits for the slowest GPU, so the engine
uses the largest per-GPU IB and NVLink bytes (max of send and receive) and the largest expert row
count. Uniform routing uses the closed form; a per-expert load samples routings (seeded). The
backend (``deepep`` or ``flat``) and the bytes per row (``WirePayload``) are the traffic room's.

The all-to-all as it runs (issue 21, capability 3). The engine prices one leg on the busiest GPU as
``notify + busiest link bytes / bandwidth`` (``engine/step.py``): ``notify`` is the tables' fixed cost
of one collective (``collective_latency_s``: DeepEP's normal dispatch first exchanges every rank's
counts and synchronises, ``notify_dispatch``; the combine synchronises on the cached layout), and a
leg ends only when the slowest peer's bytes are in, so its transfer is the busiest link's: this
GPU's own plus the wait for the slowest peer. The compute before a leg waits for the slowest peer
the same way: the engine's rank computes the busiest GPU's expert rows. Uniform routing's closed form gives every
GPU the *expected* counts, a perfectly balanced load with no wait at all; but each micro-batch routes
its own random tokens, and the slowest of ``ep`` peers sits above the mean. ``peer_wait`` adds that:
each count (expert rows, IB and NVLink link tokens) becomes the expected maximum over the ``ep`` peers
(``slowest_peer``), so the excess is the load imbalance of one routing, not of the expectation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from statistics import NormalDist

import numpy as np

from moeplan.simulator.placement.maps import Placement
from moeplan.simulator.placement.rebalance import place_experts
from moeplan.simulator.spec.hardware import ClusterSpec, NodeSpec
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.parallel import EpBackend
from moeplan.simulator.traffic.all_to_all import LayerTraffic, WirePayload, expected_uniform_layer, simulate_layer

MONTE_CARLO_TOKENS = 4096  # routings sampled per GPU for a skewed load


@dataclass(frozen=True)
class ExpertTraffic:
    """Per micro-batch and MoE layer, for the slowest GPU of the group (forward direction). The routing
    metadata (``flat`` only) rides with the dispatch; its gradient goes back with the backward's combine-shaped leg."""

    dispatch_ib_bytes: float
    dispatch_nvlink_bytes: float
    combine_ib_bytes: float
    combine_nvlink_bytes: float
    routing_ib_bytes: float
    routing_nvlink_bytes: float
    expert_rows_max: float  # token-expert pairs computed on the busiest GPU
    expert_rows_mean: float
    experts_per_gpu: int
    nodes_per_token: float

    @property
    def imbalance(self) -> float:
        return self.expert_rows_max / self.expert_rows_mean if self.expert_rows_mean else 1.0


def group_cluster(cluster: ClusterSpec, ep: int) -> ClusterSpec:
    """The EP group as a cluster of its own: whole nodes, or a slice of one node."""
    per_node = cluster.node.gpus_per_node
    if ep >= per_node:
        if ep % per_node:
            raise ValueError(f"ep={ep} must be a multiple of gpus_per_node={per_node} when it spans nodes")
        return cluster.model_copy(update={"nodes": ep // per_node})
    node = NodeSpec.model_validate({**cluster.node.model_dump(), "gpus_per_node": ep})
    return cluster.model_copy(update={"node": node, "nodes": 1})


def slowest_peer(mean: float, peers: int) -> float:
    """Expected largest of ``peers`` counts of mean ``mean`` that one random routing makes: each a sum of
    many rare, independent hits (Poisson, variance = mean: an upper bound for a sum of independent hits),
    its largest at Blom's normal order statistic ``Phi^-1((n - 3/8) / (n + 1/4))`` standard deviations
    above the mean (Blom 1958, *Statistical Estimates and Transformed Beta-Variables*)."""
    if peers <= 1 or mean <= 0:
        return mean
    return mean + NormalDist().inv_cdf((peers - 0.375) / (peers + 0.25)) * math.sqrt(mean)


# Rows: the contiguous layout pads each expert's segment to a multiple of this (``kernels.moe_permute``, the
# grouped GEMMs' 128-row tiles; DeepGEMM's contiguous layout aligns its segments to its M block, 128, the same way)
SEGMENT_ALIGN = 128


@lru_cache(maxsize=4096)
def padded_rows(mean: float, align: int = SEGMENT_ALIGN) -> float:
    """Expected rows of one expert's segment in the contiguous layout: its routed rows, a count of mean ``mean``
    (Poisson, as ``slowest_peer``), padded up to a multiple of ``align``; an expert no row reached has none. At
    4096 tokens, top-8 of 256 experts (128 rows an expert on average) that is 1.48x the rows; of 32 experts (1,024
    on average) 1.06x; many tiles an expert, ``align / 2`` rows more."""
    if mean <= 0:
        return 0.0
    spread = 12 * math.sqrt(mean) + align
    lo, hi = max(0, math.floor(mean - spread)), math.ceil(mean + spread)
    n = np.arange(lo, hi + 1, dtype=np.float64)
    log_p = lo * math.log(mean) - mean - math.lgamma(lo + 1) + np.concatenate(
        ([0.0], np.cumsum(math.log(mean) - np.log(n[1:]))))
    p = np.exp(log_p - log_p.max())
    return float((p * np.ceil(n / align) * align).sum() / p.sum())


def _max_link_tokens(tokens: np.ndarray) -> float:
    return float(np.maximum(tokens.sum(axis=0), tokens.sum(axis=1)).max())


def _from_layer(t: LayerTraffic, experts_per_gpu: int, peers: int = 1) -> ExpertTraffic:
    """The busiest GPU's traffic; ``peers`` > 1 (closed-form counts only) takes each count to the slowest
    of ``peers`` random routings (``slowest_peer``)."""
    d, c, r = t.payload.dispatch_bytes, t.payload.combine_bytes, t.payload.routing_bytes
    ib, nvl = (slowest_peer(_max_link_tokens(x), peers) for x in (t.ib_tokens, t.nvlink_tokens))
    return ExpertTraffic(
        dispatch_ib_bytes=ib * d, dispatch_nvlink_bytes=nvl * d,
        combine_ib_bytes=ib * c, combine_nvlink_bytes=nvl * c,
        routing_ib_bytes=ib * r, routing_nvlink_bytes=nvl * r,
        expert_rows_max=slowest_peer(float(t.expert_tokens.max()), peers), expert_rows_mean=float(t.expert_tokens.mean()),
        experts_per_gpu=experts_per_gpu, nodes_per_token=t.nodes_per_token,
    )


def expert_traffic(
    model: ModelSpec, cluster: ClusterSpec, ep: int, tokens: int, redundant: int = 0,
    load: tuple[float, ...] | None = None, seed: int = 0, payload: WirePayload | None = None,
    backend: EpBackend = "deepep", peer_wait: bool = True,
) -> ExpertTraffic:
    """Traffic of one MoE layer for a micro-batch of ``tokens`` tokens per GPU.

    ``load``: relative per-expert load (``[n_routed_experts]``); None means uniform routing. The
    placement is balanced for that load with ``redundant`` extra slots (EPLB-style). ``payload``
    None: an FP8 run's (``WirePayload.of``). ``peer_wait``: uniform routing's busiest GPU is the slowest
    of ``ep`` random routings (module docstring); False = every GPU at the expectation (no wait)."""
    payload = payload or WirePayload.of(model.hidden_size, model.num_experts_per_tok, "fp8", backend)
    return _cached(model, cluster, ep, tokens, redundant, load, seed, payload, backend, peer_wait)


@lru_cache(maxsize=64)
def group_placement(model: ModelSpec, cluster: ClusterSpec, ep: int, redundant: int = 0,
                    load: tuple[float, ...] | None = None) -> Placement:
    """One layer's placement over the EP group, balanced (EPLB-style) for ``load``."""
    group = group_cluster(cluster, ep)
    experts = model.n_routed_experts
    weight = np.ones((1, experts)) if load is None else np.asarray(load, dtype=float)[None, :]
    if weight.shape[1] != experts:
        raise ValueError(f"load has {weight.shape[1]} experts but n_routed_experts={experts}")
    return place_experts(weight, experts + redundant, model.n_group, group.nodes, ep)


@lru_cache(maxsize=256)
def _cached(model, cluster, ep, tokens, redundant, load, seed, payload, backend, peer_wait) -> ExpertTraffic:
    group = group_cluster(cluster, ep)
    replicas = model.n_routed_experts + redundant
    placement = group_placement(model, cluster, ep, redundant, load)
    if load is None:
        return _from_layer(expected_uniform_layer(placement, 0, model, group, tokens, payload, backend), replicas // ep,
                           ep if peer_wait else 1)
    # Sample at most MONTE_CARLO_TOKENS routings per GPU and scale the counts to ``tokens``: the
    # busiest GPU's share is then estimated from a sample, which keeps long-context phases cheap.
    sampled = min(tokens, MONTE_CARLO_TOKENS)
    layer = simulate_layer(np.asarray(load, dtype=float), placement, 0, model, group, sampled,
                           np.random.default_rng(seed), payload, backend)
    return _scaled(_from_layer(layer, replicas // ep), tokens / sampled)


def _scaled(t: ExpertTraffic, factor: float) -> ExpertTraffic:
    if factor == 1.0:
        return t
    scaled = ("dispatch_ib_bytes", "dispatch_nvlink_bytes", "combine_ib_bytes", "combine_nvlink_bytes",
              "routing_ib_bytes", "routing_nvlink_bytes", "expert_rows_max", "expert_rows_mean")
    return replace(t, **{name: getattr(t, name) * factor for name in scaled})
