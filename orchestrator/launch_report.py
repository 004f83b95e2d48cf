"""What ``moeplan launch`` says about a finished run, and the report it writes for a run that failed.

``launch_summary``: the run's status, steps, last loss, medians after the warm-up (step time,
tokens/s/GPU, MFU), the whole run's projected GPU-hours and those lost to restarts.
``failed_report``: when the ranks kept failing, no rank is left to write ``run.json``: the driver writes
it with ``status="failed"``, the steps ``metrics.jsonl`` recorded and the restarts, so the run
directory stays readable (``moeplan check`` reads it; its checkpoints remain for ``--resume``).
"""

from __future__ import annotations

import platform
import socket
import statistics
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from moeplan.model.runtime.checkpoint import latest_checkpoint
from moeplan.model.runtime.groups import process_groups
from moeplan.model.runtime.resume import read_restarts
from moeplan.orchestrator.budget_guard import projected_gpu_hours
from moeplan.orchestrator.launch_progress import mfu_frac
from moeplan.orchestrator.rank_entry import on_cpu
from moeplan.simulator.contracts.plan_file import PlanFile
from moeplan.simulator.contracts.run_report import (
    METRICS_NAME,
    PLAN_COPY_NAME,
    BudgetGuard,
    Environment,
    RunReport,
    RunSettings,
    StepTotals,
    fold_metrics,
    write_run_report,
)


def launch_summary(plan: PlanFile, run_dir: Path, report: RunReport) -> dict:
    steps = report.measured_steps or report.steps
    step_s = statistics.median(s.wall_time_s for s in steps) if steps else None
    rate = statistics.median(s.tokens_per_s_per_gpu for s in steps) if steps else None
    projected = projected_gpu_hours(plan, step_s) if step_s else None
    latest = latest_checkpoint(run_dir)
    return {
        "status": report.status, "run_dir": str(run_dir), "steps": report.step_totals.count,
        "final_loss": report.steps[-1].loss if report.steps else None, "median_step_s": step_s,
        "tokens_per_s_per_gpu": rate, "mfu_frac": mfu_frac(plan, rate) if rate else None,
        "projected_gpu_hours": projected, "budget_gpu_hours": plan.inputs.budget.gpu_hours,
        "lost_gpu_hours": report.lost_gpu_hours, "restarts": len(report.restarts),
        "budget_guard": report.budget_guard.action, "checkpoint": latest.path if latest else None,
    }


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def failed_report(plan: PlanFile, run_dir: Path, settings: dict) -> RunReport:
    """Write ``RUN/run.json`` for a run whose ranks kept failing (see the module docstring)."""
    lay, g = plan.layout, plan.inputs.cluster.node.gpus_per_node
    groups = process_groups(lay, g)
    metrics, warmup = run_dir / METRICS_NAME, min(1, settings["steps"] - 1)
    steps, totals = fold_metrics(metrics, warmup) if metrics.is_file() else ((), StepTotals())  # any run's length
    report = RunReport(
        plan_sha256=plan.inputs_sha256, plan_file=PLAN_COPY_NAME, status="failed",
        environment=Environment(moeplan_version=_installed("moeplan"), python_version=platform.python_version(),
                                torch_version=_installed("torch"), ray_version=_installed("ray"),
                                hostnames=(socket.gethostname(),)),
        settings=RunSettings(steps=settings["steps"], warmup_steps=warmup,
                             world_size=lay.world, backend="gloo" if on_cpu(plan) else "nccl",
                             pp_rank_of=tuple(groups.coords(r).pp_rank for r in range(lay.world))),
        steps=steps, step_totals=totals, restarts=read_restarts(run_dir),
        budget_guard=BudgetGuard(policy=settings["budget_guard"],
                                 budget_gpu_hours=plan.inputs.budget.gpu_hours),
    )
    write_run_report(run_dir, report)
    return report
