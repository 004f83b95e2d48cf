"""DeepSeek-V3 expert placement on its training layout (EP64 = 8 nodes x 8 H800): balance and all-to-all
before and after balancing a Zipf load with 0, 32 and 64 redundant experts. Writes docs/results/placement.md.

    .venv/bin/python benchmarks/placement_v3.py [--zipf 1.0 0.5] [--seed 0] [--out docs/results/placement.md]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from moeplan.simulator.placement.loads import drifting_load, zipf_load
from moeplan.simulator.placement.maps import contiguous_placement
from moeplan.simulator.placement.migration import migration_cost, rebalance_with_migration
from moeplan.simulator.placement.rebalance import place_experts
from moeplan.simulator.presets.clusters import h800
from moeplan.simulator.presets.models import deepseek_v3
from moeplan.simulator.report.placement_summary import (
    DEFAULT_TOKENS_PER_GPU,
    balance_stats,
    redundancy_sweep,
    worst_layer,
)
from moeplan.simulator.traffic.all_to_all import simulate_layer

NODES = 8
REDUNDANT = (0, 32, 64)
SWEEP = (0, 8, 16, 24, 32, 40, 48, 56, 64, 96, 128)
MS = 1e3  # display only
DRIFT_SIGMA = 0.2  # per-window log-normal drift of each expert's load, for the migration rows


def _row(label, redundant, stats_before, stats_after, t_before, t_after) -> str:
    return (
        f"| {label} | {redundant} | {stats_before.gpu_max_over_mean:.2f} | {stats_after.gpu_max_over_mean:.2f} "
        f"| {stats_before.node_max_over_mean:.2f} | {stats_after.node_max_over_mean:.2f} "
        f"| {t_before.all_to_all_s * MS:.2f} | {t_after.all_to_all_s * MS:.2f} "
        f"| {t_before.nodes_per_token:.2f} | {t_after.nodes_per_token:.2f} "
        f"| {t_before.max_expert_compute_s * MS:.2f} | {t_after.max_expert_compute_s * MS:.2f} |"
    )


def zipf_section(exponent: float, seed: int) -> list[str]:
    model, cluster = deepseek_v3(), h800(NODES)
    num_gpus, layers = cluster.num_gpus, model.num_moe_layers
    tokens = DEFAULT_TOKENS_PER_GPU
    weight = zipf_load(layers, model.n_routed_experts, num_gpus * tokens, model.num_experts_per_tok, exponent,
                       np.random.default_rng(seed))
    before = contiguous_placement(layers, model.n_routed_experts, NODES, num_gpus)
    row = worst_layer(before, weight)

    def traffic(placement):  # paired: every placement sees the same sampled routings
        return simulate_layer(weight[row], placement, row, model, cluster, tokens, np.random.default_rng(seed + 1))

    t_before, s_before = traffic(before), balance_stats(before, weight)
    lines = [
        f"### Zipf exponent {exponent:g}",
        "",
        f"Traffic columns: MoE layer {model.first_k_dense_replace + row} (the most unbalanced before balancing), "
        f"{tokens} tokens per GPU, sampled routings (seed {seed + 1}). Balance columns: mean over the {layers} MoE layers.",
        "",
        "| policy | redundant | GPU max/mean before | after | node max/mean before | after "
        "| all-to-all ms before | after | nodes/token before | after | max expert compute ms before | after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for policy in ("hierarchical", "global"):
        for redundant in REDUNDANT:
            after = place_experts(weight, model.n_routed_experts + redundant, model.n_group, NODES, num_gpus,
                                  policy=policy)
            lines.append(_row(policy, redundant, s_before, balance_stats(after, weight), t_before, traffic(after)))
    lines += ["", "Redundancy sweep (hierarchical; GPU and node max/mean, mean over layers):", "",
              "| redundant | " + " | ".join(str(r) for r in SWEEP) + " |",
              "|---|" + "---|" * len(SWEEP)]
    sweep = redundancy_sweep(weight, list(SWEEP), model.n_group, NODES, num_gpus)
    lines.append("| GPU | " + " | ".join(f"{p.balance.gpu_max_over_mean:.2f}" for p in sweep) + " |")
    lines.append("| node | " + " | ".join(f"{p.balance.node_max_over_mean:.2f}" for p in sweep) + " |")
    return lines + [""]


def migration_section(exponent: float, seed: int) -> list[str]:
    """Re-balancing after the load drifts: weighted copies with and without migration awareness."""
    model, cluster = deepseek_v3(), h800(NODES)
    rng = np.random.default_rng(seed)
    layers = model.num_moe_layers
    weight = zipf_load(layers, model.n_routed_experts, cluster.num_gpus * DEFAULT_TOKENS_PER_GPU,
                       model.num_experts_per_tok, exponent, rng)
    drifted = np.stack([drifting_load(w, 2, DRIFT_SIGMA, rng)[1] for w in weight])
    cross = cluster.node.nvlink_bytes_per_s / cluster.node.nic_bytes_per_s
    lines = [f"### Migration after drift (Zipf {exponent:g}, log-normal drift sigma {DRIFT_SIGMA}, IB copy weight {cross:g})",
             "", "| policy | redundant | copies NVLink / IB, fresh EPLB-style | copies NVLink / IB, migration-aware "
             "| GPU max/mean fresh | migration-aware |", "|---|---|---|---|---|---|"]
    for policy in ("hierarchical", "global"):
        for redundant in (32, 64):
            args = (model.n_routed_experts + redundant, model.n_group, NODES, cluster.num_gpus)
            current = place_experts(weight, *args, policy=policy)
            fresh = place_experts(drifted, *args, policy=policy)
            moved = rebalance_with_migration(current, drifted, model.n_group, cross_node_weight=cross, policy=policy)
            naive, ours = migration_cost(current, fresh, cross), migration_cost(current, moved, cross)
            lines.append(
                f"| {policy} | {redundant} | {naive.intra_node_moves.sum()} / {naive.cross_node_moves.sum()} "
                f"| {ours.intra_node_moves.sum()} / {ours.cross_node_moves.sum()} "
                f"| {balance_stats(fresh, drifted).gpu_max_over_mean:.3f} "
                f"| {balance_stats(moved, drifted).gpu_max_over_mean:.3f} |"
            )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zipf", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/placement.md"))
    args = parser.parse_args()
    start = time.perf_counter()
    lines = [
        "# DeepSeek-V3 expert placement: results",
        "",
        "Generated by `.venv/bin/python benchmarks/placement_v3.py "
        f"--zipf {' '.join(f'{z:g}' for z in args.zipf)} --seed {args.seed}`; do not edit by hand. "
        "Model: `deepseek-v3` preset (256 routed experts, 8 groups, top-4 groups, top-8). "
        f"Cluster: `h800` preset, {NODES} nodes x 8 GPUs = EP64, NVLink 160 GB/s and IB 50 GB/s per GPU. "
        "Before = the unbalanced layout (expert e on GPU e // 4, one group per node). "
        "Method and constants: docs/design/placement.md.",
        "",
    ]
    for exponent in args.zipf:
        lines += zipf_section(exponent, args.seed)
    lines += migration_section(args.zipf[0], args.seed)
    lines.append(f"Wall time: {time.perf_counter() - start:.0f} s.")
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
