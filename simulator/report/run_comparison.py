"""A run measured against its plan: one line per quantity, with its error and a pass/fail verdict.

Pure: takes the plan, the run report and the per-rank timelines (``trace_analysis``), returns a
``Comparison``; ``moeplan check`` prints it and ``run_html`` draws it. Statistics are medians over the
steps after the warm-up. How each line is judged (``basis``):

- ``relative``: (measured - predicted) / predicted within the tolerance (step time, tokens/s/GPU, MFU,
  HFU, peak memory per pipeline rank, the run's projected GPU-hours);
- ``of step``: shares of the step (idle, bubble, exposed communication, each op class's seconds) differ
  by (measured - predicted) / predicted step time, within the tolerance: their own relative error is
  unstable near zero, so they are judged by how much of the step they move;
- ``exact``: tokens per step must equal the plan's (else no other line means anything);
- ``at most``: the projected GPU-hours must not exceed the budget.

Bubble and exposed communication are judged against the analyser's reading of the plan's simulated
trace (the same definitions on both sides); the plan's own bubble (re-simulated with free
communication) is not comparable with a measured trace, so without the predicted trace only their sum
(idle) is judged.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from moeplan.simulator.contracts.plan_file import PlanFile
from moeplan.simulator.contracts.run_report import OP_CLASSES, RankTimeline, RunReport
from moeplan.simulator.contracts.trace import TraceEvent
from moeplan.simulator.costs.tables import plan_named_tables
from moeplan.simulator.engine.build import SimOptions
from moeplan.simulator.planning.predict import predict_step
from moeplan.simulator.planning.run_model import SECONDS_PER_HOUR, project_run
from moeplan.simulator.report.trace_analysis import mean_fracs

Basis = Literal["relative", "of step", "exact", "at most", "info"]
Verdict = Literal["pass", "fail", "n/a"]


class ComparisonError(ValueError):
    """A run that cannot be compared with the plan (nothing measured after the warm-up, no predictions)."""


@dataclass(frozen=True)
class Line:
    group: str
    name: str
    unit: str
    measured: float | None
    predicted: float | None
    basis: Basis
    error: float | None  # the number judged: relative error, or the difference as a share of the step
    verdict: Verdict
    note: str = ""


@dataclass(frozen=True)
class Comparison:
    plan_sha256: str
    tolerance: float
    warmup_steps: int
    measured_steps: int
    lines: tuple[Line, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return all(line.verdict != "fail" for line in self.lines)

    def as_json(self) -> dict:
        return {"schema": "moeplan-check/1", "passed": self.passed, **asdict(self)}


def _judge(group: str, name: str, unit: str, measured: float | None, predicted: float | None, basis: Basis,
           tolerance: float, step_s: float, note: str = "") -> Line:
    """One line: its error under ``basis`` and the verdict (n/a when either side is missing)."""
    if measured is None or predicted is None or basis == "info":
        return Line(group, name, unit, measured, predicted, basis, None, "n/a", note)
    if basis == "exact":
        error = 0.0 if measured == predicted else (measured - predicted) / predicted
        return Line(group, name, unit, measured, predicted, basis, error, "pass" if error == 0 else "fail", note)
    if basis == "of step":
        error = (measured - predicted) / step_s
    else:
        error = (measured - predicted) / predicted if predicted else None
    if basis == "at most":
        ok = measured <= predicted
    else:
        ok = error is not None and abs(error) <= tolerance
    return Line(group, name, unit, measured, predicted, basis, error, "pass" if ok else "fail", note)


def _step_lines(plan: PlanFile, report: RunReport, tol: float) -> list[Line]:
    pred = plan.predictions.step
    steps = report.measured_steps
    gpu = plan.inputs.cluster.gpu
    wall = statistics.median(s.wall_time_s for s in steps)
    rate = statistics.median(s.tokens_per_s_per_gpu for s in steps)
    tokens = statistics.median(s.tokens for s in steps)
    mfu, hfu = (rate * f / gpu.bf16_flops_per_s for f in (plan.flops.model_flops_per_token,
                                                          plan.flops.hardware_flops_per_token))
    p = pred.step_time_s
    return [
        _judge("step", "step time", "s", wall, p, "relative", tol, p),
        _judge("step", "tokens per step", "tokens", tokens, pred.tokens_per_step, "exact", tol, p),
        _judge("step", "tokens/s/GPU", "tokens/s", rate, pred.tokens_per_s_per_gpu, "relative", tol, p),
        _judge("step", "MFU", "frac", mfu, pred.mfu_frac, "relative", tol, p, plan.flops.mfu_definition[:60] + "..."),
        _judge("step", "HFU", "frac", hfu, pred.hfu_frac, "relative", tol, p),
    ]


def _timeline_lines(plan: PlanFile, measured: Sequence[RankTimeline], predicted: Sequence[RankTimeline] | None,
                    tol: float) -> list[Line]:
    step = plan.predictions.step
    p = step.step_time_s
    if not measured:
        return [_judge("timeline", "idle (bubble + exposed comm)", "frac", None, step.bubble_frac + step.exposed_comm_frac,
                       "of step", tol, p, "no measured trace")]
    m = mean_fracs(measured)
    lines = [_judge("timeline", "idle (bubble + exposed comm)", "frac", m["idle_frac"],
                    step.bubble_frac + step.exposed_comm_frac, "of step", tol, 1.0)]
    if predicted:
        q = mean_fracs(predicted)
        lines += [_judge("timeline", "bubble", "frac", m["bubble_frac"], q["bubble_frac"], "of step", tol, 1.0),
                  _judge("timeline", "exposed communication", "frac", m["exposed_comm_frac"], q["exposed_comm_frac"],
                         "of step", tol, 1.0),
                  _judge("timeline", "hidden communication", "frac", m.get("hidden_comm_frac"),
                         q.get("hidden_comm_frac"), "info", tol, 1.0, "share of communication under compute")]
        for k in OP_CLASSES:
            mean_m = statistics.fmean(t.op_class_s.get(k, 0.0) for t in measured)
            mean_p = statistics.fmean(t.op_class_s.get(k, 0.0) for t in predicted)
            lines.append(_judge("op class", k, "s", mean_m, mean_p, "of step", tol, p, "mean over ranks"))
    else:
        note = "plan's definition (free communication) differs; judged through idle"
        lines += [_judge("timeline", "bubble", "frac", m["bubble_frac"], step.bubble_frac, "info", tol, p, note),
                  _judge("timeline", "exposed communication", "frac", m["exposed_comm_frac"], step.exposed_comm_frac,
                         "info", tol, p, note)]
    return lines


def _memory_lines(plan: PlanFile, report: RunReport, tol: float) -> list[Line]:
    peaks = report.step_totals.peak_memory_bytes  # [global rank] over the steps after the warm-up
    lines = []
    for p, rank in enumerate(plan.memory.per_rank):
        mine = [r for r, q in enumerate(report.settings.pp_rank_of) if q == p]
        peak = max((peaks[r] for r in mine), default=None) if peaks else None
        lines.append(_judge("memory", f"peak memory, pipeline rank {p}", "bytes", peak, rank.total_bytes, "relative",
                            tol, 1.0, "" if peaks else "not measured (no CUDA)"))
    return lines


def _run_lines(plan: PlanFile, report: RunReport, tol: float) -> tuple[list[Line], list[str]]:
    pred = plan.predictions
    wall = statistics.median(s.wall_time_s for s in report.measured_steps)
    run = project_run(plan.inputs, pred.run, wall / pred.step.step_time_s)
    projected = run.gpu_hours_total + report.lost_gpu_hours
    spent = report.step_totals.wall_time_s * report.settings.world_size / SECONDS_PER_HOUR
    budget = plan.inputs.budget.gpu_hours
    lines = [
        _judge("run", "GPU-hours, whole run (projected)", "GPU-h", projected, pred.run.gpu_hours_total, "relative", tol,
               1.0, f"from measured throughput, {report.lost_gpu_hours:.4g} lost to restarts included"),
        _judge("run", "GPU-hours vs budget", "GPU-h", projected, budget, "at most", tol, 1.0,
               "" if budget else "no budget in the plan"),
        _judge("run", "GPU-hours spent by this run", "GPU-h", spent + report.lost_gpu_hours, None, "info", tol, 1.0,
               f"{len(report.restarts)} restart(s)"),
    ]
    notes = [f"whole run projected at {run.wall_clock_days:.4g} days"
             + (f", ${run.cost_usd:,.0f}" if run.cost_usd is not None else "")]
    return lines, notes


def compare(plan: PlanFile, report: RunReport, measured: Sequence[RankTimeline],
            predicted: Sequence[RankTimeline] | None, tolerance: float = 0.05) -> Comparison:
    """Every line of the comparison. ``measured``: the run's per-rank timelines (empty if none were
    traced); ``predicted``: the analyser's reading of the plan's simulated step (None if unavailable)."""
    if plan.predictions is None:
        raise ComparisonError("the plan has no predictions (planned without the simulator): nothing to compare")
    if not report.measured_steps:
        raise ComparisonError(f"run.json holds {report.step_totals.count} step(s), all within warmup_steps="
                              f"{report.settings.warmup_steps}: no step to compare")
    if report.settings.world_size != plan.layout.world:
        raise ComparisonError(f"settings.world_size={report.settings.world_size} but the plan's layout has "
                              f"world={plan.layout.world}")
    if max(report.settings.pp_rank_of) >= plan.layout.pp:
        raise ComparisonError(f"settings.pp_rank_of names pipeline rank {max(report.settings.pp_rank_of)} but the "
                              f"plan has pp={plan.layout.pp}")
    lines = _step_lines(plan, report, tolerance) + _timeline_lines(plan, measured, predicted, tolerance)
    lines += _memory_lines(plan, report, tolerance)
    run_lines, notes = _run_lines(plan, report, tolerance)
    return Comparison(plan_sha256=plan.inputs_sha256, tolerance=tolerance, warmup_steps=report.settings.warmup_steps,
                      measured_steps=len(report.measured_steps), lines=tuple(lines + run_lines), notes=tuple(notes))


MAKESPAN_RTOL = 1e-6  # a re-simulated step is the plan's when its makespan is its predicted step time this closely


def resimulated_trace(plan: PlanFile) -> list[TraceEvent] | None:
    """The plan's simulated step again (its inputs and named cost tables, default simulation options), or
    None when that is not the step the plan predicted (it was planned with a calibration file, a skewed
    or recorded load, redundant experts, or extrapolated above the exact micro-batch count)."""
    pred, gpu = plan.predictions, plan.inputs.cluster.gpu.name
    if pred is None:
        return None
    tables = plan_named_tables(pred.cost_tables, gpu)
    if tables is None:
        return None
    _, events = predict_step(plan.inputs, plan.layout.dp, plan.layout.microbatches, opts=SimOptions(tables=tables),
                             trace=True)
    makespan = max((e.end_s for e in events), default=0.0)
    return events if abs(makespan - pred.step.step_time_s) <= MAKESPAN_RTOL * pred.step.step_time_s else None
