"""``moeplan plan``: inputs -> (search) -> accounting, memory, simulated step, whole run, budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moeplan.orchestrator.errors import InputError, note
from moeplan.orchestrator.inputs import PlanRequest, finite_float, flag_overrides
from moeplan.orchestrator.outputs import check_out_dir, check_out_file, out_path, strict_json, write_outputs
from moeplan.orchestrator.rank_entry import on_cpu
from moeplan.orchestrator.render import plan_tables, shown
from moeplan.orchestrator.search_progress import SearchProgress
from moeplan.orchestrator.sim_options import (
    check_placeable,
    parse_techniques,
    request_with_techniques,
    sim_options,
    techniques_search,
)
from moeplan.simulator.accounting.layout import LayoutError
from moeplan.simulator.contracts.plan_file import PlanFile, dump_plan
from moeplan.simulator.costs.tables import NAMED_TABLES
from moeplan.simulator.engine.build import SimOptions
from moeplan.simulator.engine.trace import chrome_trace
from moeplan.simulator.planning.planner import plan_with_trace, summary
from moeplan.simulator.planning.search import SearchResult, search, search_workers
from moeplan.simulator.planning.techniques import TECHNIQUES
from moeplan.simulator.planning.wgrad_batch import WgradBatchChoice, with_wgrad_batch
from moeplan.simulator.report.plan_html import plan_html

console = Console(width=140)


def plan_command(
    model: Annotated[str, typer.Option(help="Model preset or path to a HF config.json.")] = "deepseek-v3",
    cluster: Annotated[str, typer.Option(help="Cluster preset (see `moeplan presets`).")] = "h800",
    nodes: Annotated[int | None, typer.Option(help="Nodes; default: the cluster preset's.")] = None,
    pp: Annotated[int | None, typer.Option(help="Pipeline ranks.")] = None,
    ep: Annotated[int | None, typer.Option(help="Expert-parallel size.")] = None,
    dp: Annotated[int | None, typer.Option(help="Data-parallel size.")] = None,
    cp: Annotated[int | None, typer.Option(help="Context-parallel size of the main layout (GPUs per sequence).")] = None,
    tp: Annotated[int | None, typer.Option(help="Tensor-parallel size: 1, 2, 4 or 8 GPUs of a node.")] = None,
    sp: Annotated[bool | None, typer.Option("--sp/--no-sp", help="Sequence parallelism (needs --tp > 1).")] = None,
    schedule: Annotated[str | None, typer.Option(help="1f1b, interleaved, zb1p, dualpipe or dualpipev.")] = None,
    microbatches: Annotated[int | None, typer.Option(help="Micro-batches per step per pipeline.")] = None,
    micro_batch_size: Annotated[int | None, typer.Option(help="Sequences per micro-batch.")] = None,
    recompute: Annotated[str | None, typer.Option(help="none, selective or full.")] = None,
    precision: Annotated[str | None, typer.Option(help="bf16 or fp8.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Sequence length (tokens).")] = None,
    global_batch: Annotated[int | None, typer.Option(help="Global batch (sequences), first phase.")] = None,
    tokens: Annotated[str | None, typer.Option(help="Tokens of the first phase, e.g. 14.8T.")] = None,
    budget_gpu_hours: Annotated[str | None, typer.Option(help="GPU-hour budget, e.g. 2.788M.")] = None,
    price_per_gpu_hour: Annotated[float | None, typer.Option(help="USD per GPU-hour.", parser=finite_float)] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any setting: a.b=value (repeatable).")] = None,
    search_: Annotated[bool | None, typer.Option("--search/--no-search", help="Search the layout (default: when none is published).")] = None,
    zipf: Annotated[float | None, typer.Option(help="Skewed expert load: Zipf exponent (default uniform routing).",
                                               parser=finite_float)] = None,
    load: Annotated[Path | None, typer.Option(help="Recorded per-layer expert loads (JSON, the format training writes).")] = None,
    redundant_experts: Annotated[int, typer.Option(help="Redundant expert slots per MoE layer (EPLB).")] = 0,
    calibration: Annotated[Path | None, typer.Option(help="Cost tables JSON (a calibration file).")] = None,
    cost_tables: Annotated[str | None, typer.Option(help=f"Named cost tables: {', '.join(NAMED_TABLES)} "
                                                         "(default: the GPU's).")] = None,
    techniques: Annotated[str | None, typer.Option(help="Techniques to leave out, comma-separated, to reproduce an "
                                                       f"earlier setup: {', '.join(TECHNIQUES)}.")] = None,
    trace: Annotated[Path | None, typer.Option(help="Also write the simulated step as a Chrome/Perfetto trace.",
                                               parser=out_path)] = None,
    out: Annotated[Path, typer.Option(help="Directory for plan.json.", parser=out_path)] = Path("out"),
    json_: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Plan a training run: layout (searched when not given), memory, simulated step, whole run, budget."""
    check_out_dir(out, "--out")
    if trace is not None:
        check_out_file(trace, "--trace")
    flags = dict(pp=pp, ep=ep, dp=dp, cp=cp, schedule=schedule, microbatches=microbatches, micro_batch_size=micro_batch_size,
                 recompute=recompute, seq_len=seq_len, precision=precision, global_batch=global_batch, tokens=tokens,
                 budget_gpu_hours=budget_gpu_hours, price_per_gpu_hour=price_per_gpu_hour)
    techs = parse_techniques(techniques)
    req = request_with_techniques(techs, model, cluster, nodes, flag_overrides(flags)
                                  + [f"parallel.{k}={str(v).lower()}" for k, v in (("tp", tp), ("sp", sp)) if v is not None]
                                  + list(set_ or []))
    do_search = techniques_search(techs, req, search_ if search_ is not None else not req.published, search_)
    opts = sim_options(req.inputs.model, req.inputs.cluster.gpu, zipf=zipf, load=load,
                       redundant_experts=redundant_experts, calibration=calibration, table_name=cost_tables,
                       precision=req.inputs.training.precision)
    if not do_search:
        check_placeable(req.inputs, redundant_experts)
    # a searched layout's expert Wgrad batch is the cost model's, unless the user set it: each finalist at its best
    searched = (_run_search(req, opts, quiet=json_, schedules=techs.schedules, wgrad_batch=not req.wgrad_batch_set)
                if do_search else None)
    inputs, source = req.planned(searched)
    wgrad_batch = None if searched is None else searched.wgrad_batch
    if wgrad_batch is not None:
        inputs = with_wgrad_batch(inputs, wgrad_batch.chosen)
    # the step simulated for the predictions is the one drawn and traced: no second simulation
    plan, events = plan_with_trace(inputs, tuple(req.ignored), source, searched, opts, tuple(sorted(req.fixed)))
    if techs.off:
        plan = plan.model_copy(update={"predictions": plan.predictions.model_copy(update={"techniques": techs.off})})
    files = {out / "plan.json": dump_plan(plan), out / "plan.html": plan_html(plan, events)}
    if trace is not None:
        files[trace] = strict_json(chrome_trace(events), indent=None)
    write_outputs(files)
    for line in plan_notes(plan, redundant_experts) + wgrad_batch_notes(wgrad_batch):
        note(line)
    if json_:
        typer.echo(strict_json(summary(plan)))
        return
    if req.ignored:
        console.print(f"[dim]config keys not modelled (ignored): {shown(', '.join(req.ignored))}[/dim]")
    console.print(plan_tables(plan))
    console.print(f"wrote {out / 'plan.json'}, {out / 'plan.html'}" + (f" and {trace}" if trace else ""))


def _run_search(req: PlanRequest, opts: SimOptions, quiet: bool, schedules: tuple[str, ...],
                stderr: Console | None = None, wgrad_batch: bool = False) -> SearchResult:
    """The layout search, with its progress on stderr (``search_progress``); ``wgrad_batch``: the finalists ranked
    at their best expert Wgrad batch (``search``)."""
    stderr = stderr or Console(stderr=True)
    try:
        workers = search_workers()  # MOEPLAN_SEARCH_WORKERS, else the CPUs this process may use
    except ValueError as exc:
        raise InputError(str(exc)) from None
    # off unless stderr is a terminal: elsewhere rich leaves a blank line behind, and errors are one line
    with SearchProgress(stderr, enabled=not quiet and stderr.is_terminal) as progress:
        result = search(req.inputs, req.fixed, opts, progress=progress, schedules=schedules,
                        simulated=progress.simulated, wgrad_batch=wgrad_batch, workers=workers)
    if not result.ranked:
        raise LayoutError("search found no layout")
    return result


def wgrad_batch_notes(choice: WgradBatchChoice | None) -> list[str]:
    """The planner's expert Wgrad batch, what each size simulated to and what its stash cost, in one line."""
    if choice is None:
        return []
    base = choice.step_s[1]  # None where even 1 does not fit (the chosen size fits: some smaller one may not)

    def step(s: float | None) -> str:
        if s is None:
            return "does not fit"
        return f"{s:.4g} s" + ("" if base is None else f" ({(s / base - 1) * 100:+.3g}%)")

    sizes = ", ".join(f"{size}: {step(s)}, {choice.peak_bytes[size] / 2**30:.1f} GiB"
                      for size, s in choice.step_s.items())
    return [f"training.kernels.expert_wgrad_batch={choice.chosen} chosen for the searched layout (step, peak memory by "
            f"size: {sizes}; each finalist was ranked at its best size); --set training.kernels.expert_wgrad_batch=N "
            "keeps another"]


def plan_notes(plan: PlanFile, redundant_experts: int) -> list[str]:
    """What the plan assumed where the inputs disagree with each other without being unusable: one line each."""
    inp, lay = plan.inputs, plan.layout
    par, first, model = inp.parallel, inp.training.phases[0], inp.model
    notes = []
    seqs = lay.microbatches * lay.dp * par.micro_batch_size
    if par.microbatches is not None and seqs != first.global_batch_seqs:
        notes.append(f"microbatches={par.microbatches} x dp={lay.dp} x micro_batch_size={par.micro_batch_size} = {seqs} "
                     f"sequences per step, not global_batch_seqs={first.global_batch_seqs}: the step shown is "
                     f"simulated at {par.microbatches} micro-batches; the run is priced at {first.global_batch_seqs} "
                     "sequences per step on its step line")
    longest = max([par.seq_len_tokens] + [p.seq_len_tokens or 0 for p in inp.training.phases])
    if longest > model.max_position_embeddings:
        notes.append(f"sequences of {longest:,} tokens exceed {model.name}'s max_position_embeddings="
                     f"{model.max_position_embeddings:,}: planned as given (as if its positions were extended)")
    if redundant_experts and lay.ep == 1:
        notes.append(f"--redundant-experts {redundant_experts} has no effect at ep=1 (no expert parallelism)")
    kernels = inp.training.kernels
    fused = [f"training.kernels.{k}=fused" for k in ("fusion", "loss") if getattr(kernels, k) == "fused"]
    if fused and on_cpu(plan):  # model.fused and kernels.cross_entropy need a GPU (torch.compile, Triton)
        notes.append(f"{' and '.join(fused)} on a cpu cluster: priced as fused kernels, but the runtime runs the "
                     "eager ones there (compiled and Triton kernels are for GPUs), so a launch is slower than planned")
    return notes
