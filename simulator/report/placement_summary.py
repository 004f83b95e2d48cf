"""Before/after numbers of a placement: load balance per GPU and node, all-to-all and expert compute time.

Pure: takes placements, loads and specs, returns a JSON-able ``PlacementSummary``.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from moeplan.simulator.placement.maps import Placement, gpu_load, max_over_mean, node_load
from moeplan.simulator.placement.migration import migration_cost
from moeplan.simulator.placement.rebalance import place_experts
from moeplan.simulator.spec.hardware import ClusterSpec
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.traffic.all_to_all import LayerTraffic, simulate_layer

DEFAULT_TOKENS_PER_GPU = 4096  # DeepEP's normal-kernel benchmark batch (reference §11.1)


class BalanceStats(BaseModel):
    """max / mean load (1.0 = perfect), from the load file or model: mean over layers and worst layer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu_max_over_mean: float
    gpu_max_over_mean_worst: float
    node_max_over_mean: float
    node_max_over_mean_worst: float


class TrafficStats(BaseModel):
    """One layer's forward all-to-all from sampled routings (``simulator/traffic/all_to_all.py``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nodes_per_token: float
    dispatch_s: float
    combine_s: float
    all_to_all_s: float
    max_expert_compute_s: float
    mean_expert_compute_s: float
    expert_tokens_max_over_mean: float
    max_dispatch_ib_send_bytes: float = Field(..., description="Combine receives the same tokens, in BF16.")
    max_dispatch_ib_recv_bytes: float
    max_dispatch_nvlink_send_bytes: float
    max_dispatch_nvlink_recv_bytes: float


class MigrationStats(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    intra_node_moves: int = Field(..., description="Expert copies over NVLink, all layers.")
    cross_node_moves: int = Field(..., description="Expert copies over IB, all layers.")
    naive_intra_node_moves: int = Field(..., description="The same for a fresh placement that ignores the current one.")
    naive_cross_node_moves: int


class PlacementSummary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = 1
    num_gpus: int
    num_nodes: int
    num_replicas: int
    policy: str
    traffic_layer: int = Field(..., description="Model layer index whose traffic is simulated.")
    tokens_per_gpu: int
    before: BalanceStats
    after: BalanceStats
    traffic_before: TrafficStats
    traffic_after: TrafficStats
    migration: MigrationStats | None = None


def balance_stats(placement: Placement, weight: np.ndarray) -> BalanceStats:
    per_gpu = max_over_mean(gpu_load(placement, weight))
    per_node = max_over_mean(node_load(placement, weight))
    return BalanceStats(
        gpu_max_over_mean=float(per_gpu.mean()),
        gpu_max_over_mean_worst=float(per_gpu.max()),
        node_max_over_mean=float(per_node.mean()),
        node_max_over_mean_worst=float(per_node.max()),
    )


def traffic_stats(traffic: LayerTraffic) -> TrafficStats:
    mean_tokens = traffic.expert_tokens.mean()
    per_gpu = traffic.bytes_per_gpu()
    return TrafficStats(
        nodes_per_token=traffic.nodes_per_token,
        dispatch_s=float(traffic.dispatch_s.max()),
        combine_s=float(traffic.combine_s.max()),
        all_to_all_s=traffic.all_to_all_s,
        max_expert_compute_s=traffic.max_expert_compute_s,
        mean_expert_compute_s=float(traffic.expert_compute_s.mean()),
        expert_tokens_max_over_mean=float(traffic.expert_tokens.max() / mean_tokens) if mean_tokens else 1.0,
        max_dispatch_ib_send_bytes=float(per_gpu["dispatch_ib_send"].max()),
        max_dispatch_ib_recv_bytes=float(per_gpu["dispatch_ib_recv"].max()),
        max_dispatch_nvlink_send_bytes=float(per_gpu["dispatch_nvlink_send"].max()),
        max_dispatch_nvlink_recv_bytes=float(per_gpu["dispatch_nvlink_recv"].max()),
    )


def worst_layer(placement: Placement, weight: np.ndarray) -> int:
    """Row index of the layer whose GPU load is the most unbalanced under ``placement``."""
    return int(np.argmax(max_over_mean(gpu_load(placement, weight))))


def summarize(
    before: Placement,
    after: Placement,
    weight: np.ndarray,
    layer_ids: list[int],
    model: ModelSpec,
    cluster: ClusterSpec,
    rng: np.random.Generator,
    tokens_per_gpu: int = DEFAULT_TOKENS_PER_GPU,
    naive: Placement | None = None,
    cross_node_weight: float = 1.0,
) -> tuple[PlacementSummary, LayerTraffic, LayerTraffic, int]:
    """Balance of both placements over all layers, traffic of the worst layer (under ``before``) for both,
    and, when ``naive`` (a fresh placement) is given, the migration from ``before`` to ``after`` and to it.

    Returns the summary, the two ``LayerTraffic`` (before, after) and the row of the traffic layer.
    """
    row = worst_layer(before, weight)
    traffic = [simulate_layer(weight[row], p, row, model, cluster, tokens_per_gpu, rng) for p in (before, after)]
    migration = None
    if naive is not None:
        ours, fresh = migration_cost(before, after, cross_node_weight), migration_cost(before, naive, cross_node_weight)
        migration = MigrationStats(
            intra_node_moves=int(ours.intra_node_moves.sum()),
            cross_node_moves=int(ours.cross_node_moves.sum()),
            naive_intra_node_moves=int(fresh.intra_node_moves.sum()),
            naive_cross_node_moves=int(fresh.cross_node_moves.sum()),
        )
    summary = PlacementSummary(
        num_gpus=after.num_gpus,
        num_nodes=after.num_nodes,
        num_replicas=after.num_replicas,
        policy=after.policy,
        traffic_layer=layer_ids[row],
        tokens_per_gpu=tokens_per_gpu,
        before=balance_stats(before, weight),
        after=balance_stats(after, weight),
        traffic_before=traffic_stats(traffic[0]),
        traffic_after=traffic_stats(traffic[1]),
        migration=migration,
    )
    return summary, traffic[0], traffic[1], row


class SweepPoint(BaseModel):
    """Balance bought by ``redundant`` extra slots per layer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    redundant: int
    balance: BalanceStats


def redundancy_sweep(
    weight: np.ndarray, redundant: list[int], num_groups: int, num_nodes: int, num_gpus: int, policy: str = "auto"
) -> list[SweepPoint]:
    """Balance after ``place_experts`` for each redundant slot count (0 = balancing without replicas)."""
    return [
        SweepPoint(
            redundant=extra,
            balance=balance_stats(
                place_experts(weight, weight.shape[1] + extra, num_groups, num_nodes, num_gpus, policy=policy), weight
            ),
        )
        for extra in redundant
    ]
