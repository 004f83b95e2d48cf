"""``moeplan check RUN``: a run directory measured against its plan, a table (or ``--json``) and ``RUN/run.html``.

Reads ``RUN/run.json`` (``contracts.run_report``), the plan (``--plan``, else the file the report names
inside the run directory or beside it, else ``RUN/plan.json``), the measured traces the report lists
(``RUN/traces/rank{r}.json``; without them the timelines stored in the report), and the plan's simulated
step (``--plan-trace`` from ``moeplan plan --trace``, else ``RUN/plan-trace.json``, the launched plan's, else
simulated again; each only when it reproduces the checked plan's predicted step). Exit 0 when every judged line is within the tolerance, 1 on a miss, 2 on bad input
(a corrupt report, a plan that is not the run's: one line).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from moeplan.orchestrator.errors import InputError
from moeplan.orchestrator.inputs import finite_float
from moeplan.orchestrator.outputs import check_out_file, out_path, strict_json, write_outputs
from moeplan.simulator.contracts.plan_file import PlanFile, read_plan
from moeplan.simulator.contracts.run_report import (
    PLAN_COPY_NAME,
    RankTimeline,
    RunReport,
    RunReportError,
    read_run_report,
)
from moeplan.simulator.costs.tables import CostTables
from moeplan.simulator.report.run_comparison import Comparison, ComparisonError, compare, resimulated_trace
from moeplan.simulator.report.run_html import run_html
from moeplan.simulator.report.trace_analysis import (
    MAX_TRACE_EVENTS,
    Interval,
    TraceError,
    analyse,
    analyse_rank_trace,
    chrome_intervals,
    held_ops,
    intervals_of,
    read_trace,
    trace_ops,
)
from moeplan.simulator.spec.errors import first_error_line

PLAN_TRACE_NAME = "plan-trace.json"
TRACE_RTOL = 1e-6  # a trace is a plan's simulated step when its makespan is the predicted step this closely
MISS_EXIT_CODE = 1
MAX_DRAWN_RANKS = 16  # the measured timeline draws at most this many ranks (one per pipeline rank first)
console = Console(width=140)


def _plan_path(run_dir: Path, report: RunReport, given: Path | None) -> Path:
    if given is not None:
        return given
    name = Path(report.plan_file).name or PLAN_COPY_NAME
    for candidate in (run_dir / name, run_dir.parent / name, run_dir / PLAN_COPY_NAME):
        try:
            if candidate.is_file():
                return candidate
        except OSError:  # a plan_file name the system refuses (too long): not this candidate
            continue
    raise InputError(f"{run_dir}: no plan found (run.json names plan_file={report.plan_file!r:.80}; "
                     f"looked in {run_dir} and {run_dir.parent}): give --plan")


def load_run(run_dir: Path, plan_path: Path | None) -> tuple[RunReport, PlanFile]:
    """The run's report and the plan it ran, checked to belong together (``InputError`` otherwise)."""
    try:
        if not run_dir.is_dir():
            raise InputError(f"RUN {run_dir}: not a run directory")
    except OSError as exc:
        raise InputError(f"RUN {run_dir}: cannot use ({exc.strerror})") from None
    try:
        report = read_run_report(run_dir)
    except RunReportError as exc:
        raise InputError(str(exc)) from None
    path = _plan_path(run_dir, report, plan_path)
    plan = read_plan(path)
    if plan.inputs_sha256 != report.plan_sha256:
        raise InputError(f"{path}: inputs_sha256={plan.inputs_sha256[:12]}... is not the plan this run executed "
                         f"(run.json plan_sha256={report.plan_sha256[:12]}...)")
    return report, plan


def measured_timelines(run_dir: Path, report: RunReport, drawn: Collection[int] = (),
                       ops: set[str] | None = None) -> tuple[list[RankTimeline], list[Interval]]:
    """Per-rank timelines from the run's traces, and the intervals of the ``drawn`` ranks (ranks = global
    ranks; the others' are dropped as each trace is read, so memory does not grow with the world size); the
    report's stored timelines where it lists no trace. ``ops``, where given, gets the traces' layer ops
    (``trace_analysis.trace_ops``)."""
    if not report.traces:
        return list(report.timelines), []
    timelines, intervals = [], []
    for ref in report.traces:
        path = run_dir / ref.path
        try:
            doc = read_trace(path)
            if ops is not None:
                ops |= trace_ops(doc)
            timelines.append(analyse_rank_trace(doc, ref.rank, report.settings.pp_rank_of[ref.rank]))
            if ref.rank in drawn:
                intervals += [Interval(ref.rank, iv.op_class, iv.start_s, iv.end_s) for iv in chrome_intervals(doc)]
        except TraceError as exc:
            raise InputError(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None
        del doc  # one trace's document at a time
    return timelines, intervals


def predicted_intervals(run_dir: Path, plan: PlanFile, given: Path | None = None,
                        held: Mapping[str, str] | None = None) -> list[Interval] | None:
    """The plan's simulated step: ``given`` (``--plan-trace``), else ``RUN/plan-trace.json`` (the launched plan's,
    copied by the launcher), else re-simulated. A trace counts only when its makespan is this plan's predicted
    step: a plan with the run's inputs but other cost tables (``plan --calibration``) predicts another step, and
    the launched plan's trace is not its breakdown. ``held``: ops classed as the run's node that holds them
    (``trace_analysis.held_ops``)."""
    if given is not None:
        if not given.is_file():
            raise InputError(f"--plan-trace {given}: no such file")
        intervals = _plan_trace(given, plan, held)
        if not _reproduces(intervals, plan):
            raise InputError(f"--plan-trace {given}: its step ({_makespan(intervals):.6g} s) is not the plan's "
                             f"predicted step ({plan.predictions.step.step_time_s:.6g} s)")
        return intervals
    launched = run_dir / PLAN_TRACE_NAME
    if launched.is_file():
        intervals = _plan_trace(launched, plan, held)
        if _reproduces(intervals, plan):
            return intervals
    events = resimulated_trace(plan)
    return intervals_of(events, held) if events is not None else None


def _plan_trace(path: Path, plan: PlanFile, held: Mapping[str, str] | None = None) -> list[Interval]:
    try:  # every pipeline rank's events in one file
        return chrome_intervals(read_trace(path, plan.layout.pp * MAX_TRACE_EVENTS), held)
    except TraceError as exc:
        raise InputError(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None


def _makespan(intervals: list[Interval]) -> float:
    return max((iv.end_s for iv in intervals), default=0.0) - min((iv.start_s for iv in intervals), default=0.0)


def _reproduces(intervals: list[Interval], plan: PlanFile) -> bool:
    predicted = plan.predictions.step.step_time_s if plan.predictions is not None else None
    return predicted is not None and abs(_makespan(intervals) - predicted) <= TRACE_RTOL * predicted


def _drawn_ranks(report: RunReport) -> dict[int, str]:
    pp_of = report.settings.pp_rank_of
    traced = [t.rank for t in report.traces]
    firsts = [r for r in traced if pp_of.index(pp_of[r]) == r]
    chosen = sorted((firsts + [r for r in traced if r not in firsts])[:MAX_DRAWN_RANKS])
    return {r: f"rank {r} (pp {pp_of[r]})" for r in chosen}


def comparison_table(comparison: Comparison) -> Table:
    table = Table(title=f"measured vs predicted (median of {comparison.measured_steps} steps after "
                        f"{comparison.warmup_steps} warm-up; tolerance {100 * comparison.tolerance:g}%)")
    for column in ("group", "quantity", "measured", "predicted", "error", "verdict"):
        table.add_column(column, justify="left" if column in ("group", "quantity") else "right")
    style = {"pass": "green", "fail": "bold red", "n/a": "dim"}
    for line in comparison.lines:
        error = "" if line.error is None else f"{100 * line.error:+.2f}% {line.basis}"
        shown = [f"{v:.4g}" if v is not None else "-" for v in (line.measured, line.predicted)]
        table.add_row(line.group, line.name, *shown, error, f"[{style[line.verdict]}]{line.verdict}[/]")
    return table


def _tables_file(path: Path) -> CostTables:
    """``--recalibrate-from FILE``'s tables, read before any work (the recalibration itself imports torch)."""
    try:
        return CostTables.from_file(path)
    except ValidationError as exc:
        raise InputError(first_error_line(exc, f"--recalibrate-from {path}")) from None
    except ValueError as exc:
        raise InputError(f"--recalibrate-from {exc}") from None


def check_command(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="The run directory (holds run.json).")],
    plan: Annotated[Path | None, typer.Option("--plan", help="The plan file; default: the one the run names.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
    tolerance: Annotated[float, typer.Option(help="Largest error that passes (0.05 = 5%).", parser=finite_float)] = 0.05,
    recalibrate: Annotated[Path | None, typer.Option(help="Also write cost tables updated from the run's per-op "
                                                          "durations (for `plan --calibration`).",
                                                     parser=out_path)] = None,
    recalibrate_from: Annotated[Path | None, typer.Option(help="The tables to update (default: the plan's named "
                                                               "tables).")] = None,
    plan_trace: Annotated[Path | None, typer.Option("--plan-trace", help="The plan's simulated step (`moeplan plan "
                                                    "--trace`), for a --plan made with other cost tables than the "
                                                    "run's.")] = None,
) -> int:
    """Check a run against its plan: exit 0 within tolerance, 1 on a miss, 2 on bad input; writes RUN/run.html."""
    if not 0 < tolerance < 1:
        raise InputError(f"--tolerance={tolerance} must be between 0 and 1 (0.05 = 5%)")
    if recalibrate is not None:
        check_out_file(recalibrate, "--recalibrate")
    base = _tables_file(recalibrate_from) if recalibrate_from is not None else None
    report, loaded = load_run(run_dir, plan)
    check_out_file(run_dir / "run.html", "RUN/run.html")  # before the work, not after it
    drawn = _drawn_ranks(report)
    run_ops: set[str] = set()
    measured, measured_events = measured_timelines(run_dir, report, drawn, run_ops)
    # a run that times a plan's op inside another node (HELD_BY) has it compared in that node's class
    predicted_events = predicted_intervals(run_dir, loaded, plan_trace, held_ops(run_ops))
    predicted = analyse(predicted_events) if predicted_events else None
    try:
        comparison = compare(loaded, report, measured, predicted, tolerance)
    except ComparisonError as exc:
        raise InputError(f"{run_dir}: {exc}") from None
    outputs, moved = {}, None
    if recalibrate is not None:  # after compare's checks of the run against the plan (world, pipeline ranks), which
        # the recalibration trusts; imported here: it loads torch, which the rest of the CLI never needs
        from moeplan.orchestrator.calibration.from_run import moved_table, recalibrated

        outputs[recalibrate], moved = recalibrated(run_dir, report, loaded, base)
    if predicted is None:
        comparison = replace(comparison, notes=(*comparison.notes, ("the plan's step could not be simulated again as "
                                                "planned (calibration, load or extrapolation): no predicted timeline "
                                                "or op classes")))
    title = f"moeplan check: {loaded.inputs.model.name} on {loaded.inputs.cluster.name} ({loaded.layout.world} GPUs)"
    html = run_html(comparison, title, predicted_events, measured_events, drawn,
                    loaded.layout.pp, measured, predicted)
    write_outputs({run_dir / "run.html": html, **outputs})
    if json_:
        typer.echo(strict_json(comparison.as_json()))
    else:
        console.print(comparison_table(comparison))
        for note in comparison.notes:
            console.print(f"[dim]{note}[/dim]")
        if moved is not None:
            console.print(moved_table(moved))
        console.print(f"{'PASS' if comparison.passed else 'FAIL'}; wrote {run_dir / 'run.html'}"
                      + (f" and {recalibrate}" if recalibrate is not None else ""))
    return 0 if comparison.passed else MISS_EXIT_CODE  # a verdict, not an error: ReportingGroup exits with it
