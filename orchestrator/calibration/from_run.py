"""``moeplan check RUN --recalibrate OUT``: the files and the table around ``recalibrate``.

The tables updated are ``--recalibrate-from FILE`` (a calibration file), else the ones the plan was priced
with when they have a name (``plan_named_tables``); the traces are those ``RUN/run.json`` lists (the profiled
step, after the run's warm-up). Bad input (no traces, unnamed tables and no file) raises ``InputError``.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from moeplan.orchestrator.calibration.recalibrate import Moved, recalibrate
from moeplan.orchestrator.calibration.tables_out import now
from moeplan.orchestrator.errors import InputError
from moeplan.orchestrator.outputs import strict_json
from moeplan.simulator.contracts.plan_file import PlanFile
from moeplan.simulator.contracts.run_report import RunReport
from moeplan.simulator.costs.tables import CostTables, plan_named_tables
from moeplan.simulator.report.trace_analysis import TraceError, read_trace


def base_tables(plan: PlanFile, given: CostTables | None) -> CostTables:
    """The tables to update: ``given`` (``--recalibrate-from``'s, read by ``check_cmd`` before any work), else
    the ones the plan was priced with, by name."""
    if given is not None:
        return given
    name = plan.predictions.cost_tables if plan.predictions else "default"
    tables = plan_named_tables(name, plan.inputs.cluster.gpu.name)
    if tables is None:
        raise InputError(f"the plan was priced with cost tables {name!r}, which have no name to load: give "
                         "--recalibrate-from FILE (the calibration file it was planned with)")
    return tables


def recalibrated(run_dir: Path, report: RunReport, plan: PlanFile, given: CostTables | None) -> tuple[str, list[Moved]]:
    """The updated tables as JSON text, and what moved."""
    if not report.traces:
        raise InputError(f"{run_dir}: run.json lists no traces: nothing measured per op to recalibrate from")
    traces = {}
    for ref in report.traces:
        try:
            traces[ref.rank] = read_trace(run_dir / ref.path)
        except TraceError as exc:
            raise InputError(str(exc)) from None
    label = f"[RUN] moeplan check --recalibrate {now()}: {run_dir.name}, plan {plan.inputs_sha256[:12]}"
    tables, moved = recalibrate(plan, base_tables(plan, given), traces, report.settings.pp_rank_of, label)
    return strict_json(tables.model_dump(mode="json"), indent=1) + "\n", moved


def moved_table(moved: list[Moved]) -> Table:
    table = Table(title="recalibrated entries (each from its own op's measurements)")
    for column in ("entry", "before", "after", "change", "samples"):
        table.add_column(column, justify="left" if column == "entry" else "right")
    for m in moved:
        shown = (lambda v: "-" if v is None else f"{v * 1e3:.4g} ms") if m.unit == "s" else (
            lambda v: "-" if v is None else f"{v:.3%}")
        change = f"{m.after / m.before:.2f}x" if m.before else "new"
        table.add_row(m.entry, shown(m.before), shown(m.after), change, str(m.samples))
    return table
