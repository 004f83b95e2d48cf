"""``moeplan plan``: inputs -> (search) -> accounting, memory, simulated step, whole run, budget."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moeplan.orchestrator.errors import USER_ERRORS, fail
from moeplan.orchestrator.inputs import InputError, build_request, validation_message
from moeplan.orchestrator.placement_cmd import read_model_file
from moeplan.orchestrator.render import plan_tables
from moeplan.simulator.accounting.layout import LayoutError
from moeplan.simulator.contracts.expert_load import ExpertLoadRecord
from moeplan.simulator.contracts.plan_file import write_atomic, write_plan
from moeplan.simulator.costs.tables import NAMED_TABLES, CostTables, named_tables
from moeplan.simulator.engine.build import SimOptions
from moeplan.simulator.engine.trace import chrome_trace
from moeplan.simulator.planning.planner import plan_with_predictions, summary
from moeplan.simulator.planning.predict import simulate_at
from moeplan.simulator.planning.search import search
from moeplan.simulator.report.plan_html import plan_html
from moeplan.simulator.spec.model import ModelSpec

console = Console(width=140)
_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}

# CLI flag -> plan-input key it sets (the specs hold the defaults; the CLI declares none)
FLAG_KEYS = {
    "pp": "parallel.pp", "ep": "parallel.ep", "dp": "parallel.dp", "cp": "parallel.cp", "schedule": "parallel.schedule",
    "microbatches": "parallel.microbatches", "micro_batch_size": "parallel.micro_batch_size",
    "recompute": "parallel.recompute", "seq_len": "parallel.seq_len_tokens",
    "precision": "training.precision", "global_batch": "training.phases.0.global_batch_seqs",
    "tokens": "training.phases.0.tokens", "budget_gpu_hours": "budget.gpu_hours",
    "price_per_gpu_hour": "budget.usd_per_gpu_hour",
}


def parse_count(text: str, flag: str) -> float:
    """``14.8T`` -> 1.48e13; plain numbers pass through."""
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?\d+)?)\s*([KMBGT]?)\s*", text)
    if not match:
        raise InputError(f"{flag} {text!r}: expected a number such as 14.8T, 469B or 1e12")
    return float(match.group(1)) * _SUFFIX.get(match.group(2), 1.0)


def _layer_loads(path: Path, model: ModelSpec) -> tuple[tuple[int, tuple[float, ...]], ...]:
    """Per-layer expert loads from a recorded load file (``simulator.expert_load.ExpertLoadRecord``)."""
    try:
        record = read_model_file(path, ExpertLoadRecord, "--load")
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if record.n_routed_experts != model.n_routed_experts:
        raise InputError(f"--load {path}: n_routed_experts={record.n_routed_experts} but the model has {model.n_routed_experts}")
    moe = set(i for i in range(model.num_hidden_layers) if model.is_moe_layer(i))
    moe |= set(range(model.num_hidden_layers, model.num_hidden_layers + model.num_nextn_predict_layers))
    stray = sorted(set(record.layer_ids) - moe)
    if stray:
        raise InputError(f"--load {path}: layer={stray[0]} is not an MoE layer of {model.name}")
    return tuple((e.layer, tuple(float(c) for c in e.tokens_per_expert)) for e in record.layers)


def _tables(calibration: Path | None, cost_tables: str | None, gpu_name: str) -> CostTables | None:
    """The cost tables the options name; None = the GPU's defaults."""
    if calibration is not None and cost_tables is not None:
        raise InputError(f"--calibration {calibration} and --cost-tables {cost_tables}: give one cost-table source, not both")
    if cost_tables is not None:
        try:
            return named_tables(cost_tables, gpu_name)
        except ValueError as exc:
            raise InputError(f"--cost-tables {cost_tables!r}: unknown (choose {', '.join(NAMED_TABLES)})") from exc
    if calibration is None:
        return None
    try:
        return CostTables.from_file(calibration)
    except ValidationError as exc:
        raise InputError(validation_message(exc, f"--calibration {calibration}")) from exc
    except OSError as exc:
        raise InputError(f"--calibration {calibration}: cannot read ({exc.strerror})") from exc


def _sim_options(tables: CostTables | None, zipf: float | None, redundant: int, n_experts: int,
                 layer_loads: tuple = ()) -> SimOptions:
    load = None
    if zipf is not None:
        if zipf < 0 or n_experts == 0:
            raise InputError(f"--zipf {zipf}: needs a model with routed experts and an exponent >= 0")
        load = tuple(float(x) for x in 1.0 / np.arange(1, n_experts + 1) ** zipf)
    if redundant < 0:
        raise InputError(f"--redundant-experts {redundant}: must be >= 0")
    return SimOptions(tables=tables, redundant_experts=redundant, expert_load=load, layer_loads=layer_loads)


def plan_command(
    model: Annotated[str, typer.Option(help="Model preset or path to a HF config.json.")] = "deepseek-v3",
    cluster: Annotated[str, typer.Option(help="Cluster preset (see `moeplan presets`).")] = "h800",
    nodes: Annotated[int | None, typer.Option(help="Nodes; default: the cluster preset's.")] = None,
    pp: Annotated[int | None, typer.Option(help="Pipeline ranks.")] = None,
    ep: Annotated[int | None, typer.Option(help="Expert-parallel size.")] = None,
    dp: Annotated[int | None, typer.Option(help="Data-parallel size.")] = None,
    cp: Annotated[int | None, typer.Option(help="Context-parallel size of the main layout (GPUs per sequence).")] = None,
    schedule: Annotated[str | None, typer.Option(help="1f1b, interleaved, zb1p, dualpipe or dualpipev.")] = None,
    microbatches: Annotated[int | None, typer.Option(help="Micro-batches per step per pipeline.")] = None,
    micro_batch_size: Annotated[int | None, typer.Option(help="Sequences per micro-batch.")] = None,
    recompute: Annotated[str | None, typer.Option(help="none, selective or full.")] = None,
    precision: Annotated[str | None, typer.Option(help="bf16 or fp8.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Sequence length (tokens).")] = None,
    global_batch: Annotated[int | None, typer.Option(help="Global batch (sequences), first phase.")] = None,
    tokens: Annotated[str | None, typer.Option(help="Tokens of the first phase, e.g. 14.8T.")] = None,
    budget_gpu_hours: Annotated[str | None, typer.Option(help="GPU-hour budget, e.g. 2.788M.")] = None,
    price_per_gpu_hour: Annotated[float | None, typer.Option(help="USD per GPU-hour.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any setting: a.b=value (repeatable).")] = None,
    search_: Annotated[bool | None, typer.Option("--search/--no-search", help="Search the layout (default: when none is published).")] = None,
    zipf: Annotated[float | None, typer.Option(help="Skewed expert load: Zipf exponent (default uniform routing).")] = None,
    load: Annotated[Path | None, typer.Option(help="Recorded per-layer expert loads (JSON, the format training writes).")] = None,
    redundant_experts: Annotated[int, typer.Option(help="Redundant expert slots per MoE layer (EPLB).")] = 0,
    calibration: Annotated[Path | None, typer.Option(help="Cost tables JSON (a calibration file).")] = None,
    cost_tables: Annotated[str | None, typer.Option(help=f"Named cost tables: {', '.join(NAMED_TABLES)} "
                                                         "(default: the GPU's).")] = None,
    trace: Annotated[Path | None, typer.Option(help="Also write the simulated step as a Chrome/Perfetto trace.")] = None,
    out: Annotated[Path, typer.Option(help="Directory for plan.json.")] = Path("out"),
    json_: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Plan a training run: layout (searched when not given), memory, simulated step, whole run, budget."""
    flags = dict(pp=pp, ep=ep, dp=dp, cp=cp, schedule=schedule, microbatches=microbatches, micro_batch_size=micro_batch_size,
                 recompute=recompute, seq_len=seq_len, precision=precision, global_batch=global_batch,
                 price_per_gpu_hour=price_per_gpu_hour)
    try:
        sets = [f"{FLAG_KEYS[k]}={json.dumps(v)}" for k, v in flags.items() if v is not None]
        if tokens is not None:
            sets.append(f"{FLAG_KEYS['tokens']}={parse_count(tokens, '--tokens')}")
        if budget_gpu_hours is not None:
            sets.append(f"{FLAG_KEYS['budget_gpu_hours']}={parse_count(budget_gpu_hours, '--budget-gpu-hours')}")
        req = build_request(model, cluster, nodes, sets + list(set_ or []))
        if load is not None and zipf is not None:
            raise InputError("--load and --zipf: give one expert-load source, not both")
        loads = _layer_loads(load, req.inputs.model) if load is not None else ()
        tables = _tables(calibration, cost_tables, req.inputs.cluster.gpu.name)
        opts = _sim_options(tables, zipf, redundant_experts, req.inputs.model.n_routed_experts, loads)
        do_search = search_ if search_ is not None else not req.published
        inputs, searched = req.inputs, None
        source = "published" if req.published and not req.fixed else "given"
        if do_search:
            searched = _run_search(req.inputs, req.fixed, opts, quiet=json_)
            inputs = inputs.model_copy(update={"parallel": searched.best})
            source = "searched"
        plan = plan_with_predictions(inputs, tuple(req.ignored), source, searched, opts, tuple(sorted(req.fixed)))
    except USER_ERRORS as exc:
        fail(str(exc))
    lay = plan.layout
    events = simulate_at(plan.inputs, lay.dp, lay.microbatches, plan.inputs.parallel.seq_len_tokens, opts, trace=True).events
    html = plan_html(plan, events)  # everything is rendered before the first file is written
    trace_text = json.dumps(chrome_trace(events)) if trace is not None else None
    write_plan(plan, out / "plan.json")
    write_atomic(out / "plan.html", html)
    if trace is not None:
        write_atomic(trace, trace_text)
    if json_:
        typer.echo(json.dumps(summary(plan), indent=2))
        return
    if req.ignored:
        console.print(f"[dim]config keys not modelled (ignored): {', '.join(req.ignored)}[/dim]")
    console.print(plan_tables(plan))
    console.print(f"wrote {out / 'plan.json'}, {out / 'plan.html'}" + (f" and {trace}" if trace else ""))


def _run_search(inputs, fixed, opts, quiet: bool):
    columns = (TextColumn("searching layouts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=quiet) as bar:
        task = bar.add_task("search", total=None)
        result = search(inputs, fixed, opts, progress=lambda done, total: bar.update(task, completed=done, total=total))
    if not result.ranked:
        raise LayoutError("search found no layout")
    return result
