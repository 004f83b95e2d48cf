"""``moeplan placement``: balance expert placement for a model on a cluster and write maps and figures.

Thin shell over ``simulator.placement`` / ``simulator.migration`` / ``simulator.placement_report``: read
inputs, call pure functions, write outputs atomically (temporary file, then ``os.replace``). Bad input
prints one line naming the field and value, exits with code 2 and writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from pydantic import BaseModel, ValidationError

from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.contracts.expert_load import ExpertLoadRecord, one_line_error
from moeplan.simulator.contracts.placement import ExpertPlacement
from moeplan.simulator.placement.loads import uniform_load, zipf_load
from moeplan.simulator.placement.maps import contiguous_placement
from moeplan.simulator.placement.migration import rebalance_with_migration
from moeplan.simulator.placement.rebalance import POLICIES, place_experts
from moeplan.simulator.presets.clusters import CLUSTER_PRESETS
from moeplan.simulator.presets.models import MODEL_PRESETS
from moeplan.simulator.report.placement_figures import placement_figure, traffic_figure
from moeplan.simulator.report.placement_summary import DEFAULT_TOKENS_PER_GPU, summarize

BAD_INPUT_EXIT_CODE = 2


def placement_command(
    model: Annotated[str, typer.Option(help=f"Model preset: {', '.join(MODEL_PRESETS)}.")],
    cluster: Annotated[str, typer.Option(help=f"Cluster preset: {', '.join(CLUSTER_PRESETS)}.")],
    nodes: Annotated[int, typer.Option(help="Nodes in the expert-parallel group (EP = nodes x GPUs per node).")],
    out: Annotated[Path, typer.Option(help="Output folder for placement.json, summary.json and the HTML figures.")],
    load: Annotated[Path | None, typer.Option(help="ExpertLoadRecord JSON of recorded per-expert token counts.")] = None,
    zipf: Annotated[float | None, typer.Option(help="Synthetic Zipf load with this exponent (0 = uniform).")] = None,
    redundant: Annotated[int, typer.Option(help="Redundant expert slots per layer, over all GPUs.")] = 0,
    current: Annotated[Path | None, typer.Option(help="Current placement.json: rebalance moving few experts.")] = None,
    policy: Annotated[str, typer.Option(help=f"One of {', '.join(POLICIES)} (auto = EPLB's choice).")] = "auto",
    tolerance: Annotated[float, typer.Option(help="With --current: accept a most loaded GPU this fraction above the balanced one to move fewer experts.")] = 0.0,
    tokens_per_gpu: Annotated[int, typer.Option(help="Tokens per GPU per micro-batch for the traffic model.")] = DEFAULT_TOKENS_PER_GPU,
    seed: Annotated[int, typer.Option(help="Seed of the Zipf ranks and the sampled routings.")] = 0,
) -> None:
    """Balance expert placement (EPLB-compatible) and estimate all-to-all time before and after."""
    try:
        outputs = _compute(model, cluster, nodes, load, zipf, redundant, current, policy, tolerance, tokens_per_gpu, seed)
    except (ValueError, ValidationError) as exc:
        message = one_line_error(exc) if isinstance(exc, ValidationError) else str(exc)
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(BAD_INPUT_EXIT_CODE) from None
    out.mkdir(parents=True, exist_ok=True)
    for name, text in outputs.items():
        write_atomic(out / name, text)
    typer.echo(outputs["summary.json"])


def _compute(
    model_name, cluster_name, nodes, load, zipf, redundant, current, policy, tolerance, tokens_per_gpu, seed
) -> dict[str, str]:
    """Everything the command writes, as ``{file name: text}``; raises ValueError on bad input."""
    if model_name not in MODEL_PRESETS:
        raise ValueError(f"--model={model_name!r} is not a preset; choose one of {', '.join(MODEL_PRESETS)}")
    if cluster_name not in CLUSTER_PRESETS:
        raise ValueError(f"--cluster={cluster_name!r} is not a preset; choose one of {', '.join(CLUSTER_PRESETS)}")
    if nodes <= 0:
        raise ValueError(f"--nodes={nodes} must be > 0")
    if redundant < 0:
        raise ValueError(f"--redundant={redundant} must be >= 0")
    if tokens_per_gpu <= 0:
        raise ValueError(f"--tokens-per-gpu={tokens_per_gpu} must be > 0")
    model = MODEL_PRESETS[model_name]()
    if not model.is_moe:
        raise ValueError(f"--model={model_name!r} has no routed experts (n_routed_experts=0)")
    spec = CLUSTER_PRESETS[cluster_name](nodes)
    rng = np.random.default_rng(seed)
    layer_ids, weight = _load(model, spec.num_gpus * tokens_per_gpu, load, zipf, rng)
    num_replicas = model.n_routed_experts + redundant
    cross_node_weight = spec.node.nvlink_bytes_per_s / spec.node.nic_bytes_per_s
    args = (weight, num_replicas, model.n_group, nodes, spec.num_gpus)
    naive = None
    if current is None:
        before = contiguous_placement(len(layer_ids), model.n_routed_experts, nodes, spec.num_gpus)
        after = place_experts(*args, policy=policy)
    else:
        before = _read_current(current, layer_ids, num_replicas)
        after = rebalance_with_migration(
            before, weight, model.n_group, cross_node_weight=cross_node_weight, tolerance_frac=tolerance, policy=policy
        )
        naive = place_experts(*args, policy=policy)
    summary, t_before, t_after, row = summarize(
        before, after, weight, layer_ids, model, spec, rng, tokens_per_gpu, naive, cross_node_weight
    )
    placement_json = ExpertPlacement.from_placement(after, model.n_group, layer_ids).model_dump_json()
    figures = {
        "placement.html": placement_figure({"before": before, "after": after}, weight, row, layer_ids[row]),
        "traffic.html": traffic_figure({"before": t_before, "after": t_after}, model.hidden_size, layer_ids[row]),
    }
    texts = {name: fig.to_html(include_plotlyjs=True, full_html=True) for name, fig in figures.items()}
    return {"placement.json": placement_json, "summary.json": summary.model_dump_json(indent=2), **texts}


def _load(model, num_tokens, load, zipf, rng) -> tuple[list[int], np.ndarray]:
    """Layer ids and ``[layers, experts]`` weight from ``--load``, ``--zipf`` or uniform."""
    moe_layers = [i for i in range(model.num_hidden_layers) if model.is_moe_layer(i)]
    k = model.num_experts_per_tok
    if load is not None and zipf is not None:
        raise ValueError(f"give --load={load} or --zipf={zipf}, not both")
    if zipf is not None:
        return moe_layers, zipf_load(len(moe_layers), model.n_routed_experts, num_tokens, k, zipf, rng)
    if load is None:
        return moe_layers, uniform_load(len(moe_layers), model.n_routed_experts, num_tokens, k)
    record = read_model_file(load, ExpertLoadRecord, "--load")
    if record.n_routed_experts != model.n_routed_experts:
        raise ValueError(
            f"--load={load}: n_routed_experts={record.n_routed_experts} but the model has {model.n_routed_experts}"
        )
    for layer in record.layer_ids:
        if layer not in moe_layers:
            raise ValueError(f"--load={load}: layer={layer} is not a MoE layer of {model.name} ({moe_layers[0]}..{moe_layers[-1]})")
    return record.layer_ids, record.weight()


def _read_current(path: Path, layer_ids: list[int], num_replicas: int):
    current = read_model_file(path, ExpertPlacement, "--current")
    if current.layer_ids != layer_ids:
        raise ValueError(f"--current={path}: layer_ids={current.layer_ids} differ from the load's {layer_ids}")
    if sum(current.slots_per_gpu) != num_replicas:
        raise ValueError(
            f"--current={path}: holds {sum(current.slots_per_gpu)} slots per layer but --redundant gives {num_replicas}"
        )
    return current.to_placement()


def read_model_file(path: Path, cls: type[BaseModel], option: str) -> BaseModel:
    """Parse a JSON file into ``cls``; every failure is one ValueError line naming the option and file."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{option}={path}: cannot read ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{option}={path}: malformed JSON ({exc.msg} at line {exc.lineno})") from exc
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{option}={path}: {one_line_error(exc)}") from exc


