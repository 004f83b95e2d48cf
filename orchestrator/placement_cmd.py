"""``moeplan placement``: balance expert placement for a model on a cluster and write maps and figures.

Thin shell over ``simulator.placement`` and ``simulator.report``: read inputs, call pure functions,
render every file, then write them all (``outputs.write_outputs``). Bad input is one line, exit code 2,
nothing written (``errors.ReportingGroup``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from moeplan.orchestrator.errors import InputError, error_line
from moeplan.orchestrator.inputs import (
    check_redundant,
    check_zipf,
    finite_float,
    load_cluster,
    load_model,
    moe_layers,
    one_load_source,
    read_load_record,
    read_model_file,
)
from moeplan.orchestrator.outputs import check_out_dir, out_path, strict_json, write_outputs
from moeplan.simulator.contracts.expert_load import ExpertLoadRecord
from moeplan.simulator.contracts.placement import ExpertPlacement
from moeplan.simulator.placement.loads import uniform_load, zipf_load
from moeplan.simulator.placement.maps import contiguous_placement
from moeplan.simulator.placement.migration import rebalance_with_migration
from moeplan.simulator.placement.rebalance import POLICIES, place_experts
from moeplan.simulator.presets.clusters import CLUSTER_PRESETS
from moeplan.simulator.presets.models import MODEL_PRESETS
from moeplan.simulator.report.placement_figures import placement_figure, traffic_figure
from moeplan.simulator.report.placement_summary import DEFAULT_TOKENS_PER_GPU, summarize
from moeplan.simulator.spec.hardware import ClusterSpec
from moeplan.simulator.spec.model import ModelSpec

# The traffic estimate samples this many routings per GPU at most: a sample, whose busiest-GPU share is
# already within about 1% at the default 4096; more only costs time and memory.
MAX_TOKENS_PER_GPU = 2**16


def placement_command(
    model: Annotated[str, typer.Option(help=f"Model preset ({', '.join(MODEL_PRESETS)}) or path to a HF config.json.")],
    cluster: Annotated[str, typer.Option(help=f"Cluster preset: {', '.join(CLUSTER_PRESETS)}.")],
    nodes: Annotated[int, typer.Option(help="Nodes in the expert-parallel group (EP = nodes x GPUs per node).")],
    out: Annotated[Path, typer.Option(help="Output folder for placement.json, summary.json and the HTML figures.",
                                     parser=out_path)],
    load: Annotated[Path | None, typer.Option(help="ExpertLoadRecord JSON of recorded per-expert token counts.")] = None,
    zipf: Annotated[float | None, typer.Option(help="Synthetic Zipf load with this exponent (0 = uniform).",
                                               parser=finite_float)] = None,
    redundant: Annotated[int, typer.Option(help="Redundant expert slots per layer, over all GPUs.")] = 0,
    current: Annotated[Path | None, typer.Option(help="Current placement.json: rebalance moving few experts.")] = None,
    policy: Annotated[str, typer.Option(help=f"One of {', '.join(POLICIES)} (auto = EPLB's choice).")] = "auto",
    tolerance: Annotated[float, typer.Option(help="With --current: accept a most loaded GPU this fraction above the balanced one to move fewer experts.", parser=finite_float)] = 0.0,
    tokens_per_gpu: Annotated[int, typer.Option(help="Tokens per GPU per micro-batch for the traffic model.")] = DEFAULT_TOKENS_PER_GPU,
    seed: Annotated[int, typer.Option(help="Seed of the Zipf ranks and the sampled routings.")] = 0,
) -> None:
    """Balance expert placement (EPLB-compatible) and estimate all-to-all time before and after."""
    check_out_dir(out, "--out")
    if not 0 <= tolerance <= 1e3:
        raise InputError(f"--tolerance {tolerance:g}: must be a fraction >= 0 (at most 1000)")
    if not 0 <= seed < 2**64:
        raise InputError(f"--seed {seed}: must be in 0..2**64-1")
    model_spec, cluster_spec, record, current_placement = _read_inputs(
        model, cluster, nodes, load, zipf, redundant, current, tokens_per_gpu)
    try:
        files = _compute(model_spec, cluster_spec, record, zipf, redundant, current_placement, policy, tolerance,
                         tokens_per_gpu, seed)
    except ValueError as exc:  # the placement functions check their arguments with plain ValueErrors
        raise InputError(error_line(exc)) from exc
    write_outputs({out / name: text for name, text in files.items()})
    typer.echo(files["summary.json"])


def _read_inputs(
    model: str, cluster: str, nodes: int, load: Path | None, zipf: float | None, redundant: int,
    current: Path | None, tokens_per_gpu: int,
) -> tuple[ModelSpec, ClusterSpec, ExpertLoadRecord | None, ExpertPlacement | None]:
    """The options checked, and the files they name read: model, cluster, load record, current placement."""
    model_spec, _ = load_model(model)  # keys of a config.json the model does not use change nothing here
    cluster_spec = load_cluster(cluster, nodes)
    if not 0 < tokens_per_gpu <= MAX_TOKENS_PER_GPU:
        raise InputError(f"--tokens-per-gpu {tokens_per_gpu}: must be in 1..{MAX_TOKENS_PER_GPU}")
    if not model_spec.is_moe:
        raise InputError(f"--model {model!r:.200}: has no routed experts (n_routed_experts=0)")
    check_redundant(redundant, model_spec, "--redundant")
    one_load_source(load, zipf)
    check_zipf(zipf, model_spec)
    layers = moe_layers(model_spec)
    record = read_load_record(load, model_spec, layers) if load is not None else None
    layer_ids = record.layer_ids if record is not None else layers
    num_replicas = model_spec.n_routed_experts + redundant
    placement = _read_current(current, layer_ids, num_replicas) if current is not None else None
    return model_spec, cluster_spec, record, placement


def _compute(
    model: ModelSpec, cluster: ClusterSpec, record: ExpertLoadRecord | None, zipf: float | None, redundant: int,
    current: ExpertPlacement | None, policy: str, tolerance: float, tokens_per_gpu: int, seed: int,
) -> dict[str, str]:
    """Everything the command writes, as ``{file name: text}``; raises ValueError on bad input."""
    rng = np.random.default_rng(seed)
    layer_ids, weight = _load(model, cluster.num_gpus * tokens_per_gpu, record, zipf, rng)
    num_replicas = model.n_routed_experts + redundant
    cross_node_weight = cluster.node.nvlink_bytes_per_s / cluster.node.nic_bytes_per_s
    args = (weight, num_replicas, model.n_group, cluster.nodes, cluster.num_gpus)
    naive = None
    if current is None:
        before = contiguous_placement(len(layer_ids), model.n_routed_experts, cluster.nodes, cluster.num_gpus)
        after = place_experts(*args, policy=policy)
    else:
        before = current.to_placement()
        after = rebalance_with_migration(
            before, weight, model.n_group, cross_node_weight=cross_node_weight, tolerance_frac=tolerance, policy=policy
        )
        naive = place_experts(*args, policy=policy)
    summary, t_before, t_after, row = summarize(
        before, after, weight, layer_ids, model, cluster, rng, tokens_per_gpu, naive, cross_node_weight
    )
    strict_json(summary.model_dump())  # pydantic would write a NaN as null: one here is a bug, not output
    placement_json = ExpertPlacement.from_placement(after, model.n_group, layer_ids).model_dump_json()
    figures = {
        "placement.html": placement_figure({"before": before, "after": after}, weight, row, layer_ids[row]),
        "traffic.html": traffic_figure({"before": t_before, "after": t_after}, model.hidden_size, layer_ids[row]),
    }
    texts = {name: fig.to_html(include_plotlyjs=True, full_html=True) for name, fig in figures.items()}
    return {"placement.json": placement_json, "summary.json": summary.model_dump_json(indent=2), **texts}


def _load(model: ModelSpec, num_tokens: int, record: ExpertLoadRecord | None, zipf: float | None,
          rng: np.random.Generator) -> tuple[list[int], np.ndarray]:
    """Layer ids and ``[layers, experts]`` weight from ``--load``, ``--zipf`` or uniform."""
    if record is not None:
        return record.layer_ids, record.weight()
    layers = moe_layers(model)
    k = model.num_experts_per_tok
    if zipf is not None:
        return layers, zipf_load(len(layers), model.n_routed_experts, num_tokens, k, zipf, rng)
    return layers, uniform_load(len(layers), model.n_routed_experts, num_tokens, k)


def _read_current(path: Path, layer_ids: list[int], num_replicas: int) -> ExpertPlacement:
    """``--current``: a placement of the layers being balanced, with as many slots as ``--redundant`` gives."""
    current = read_model_file(path, ExpertPlacement, "--current")
    if current.layer_ids != layer_ids:
        raise InputError(f"--current {path}: layer_ids={current.layer_ids} differ from the load's {layer_ids}")
    if sum(current.slots_per_gpu) != num_replicas:
        raise InputError(
            f"--current {path}: holds {sum(current.slots_per_gpu)} slots per layer but --redundant gives {num_replicas}"
        )
    return current
