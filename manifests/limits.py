"""Deadline and restart limits from the plan's predicted wall time and its budget (pure arithmetic).

With a budget of ``B`` GPU-hours and a predicted ``P`` GPU-hours over ``T`` seconds of wall time, the
budget buys ``T * B / P`` seconds at the plan's size: that is the deadline ``D`` (``activeDeadlineSeconds``),
so a job stopped by it has spent at most the budget. Each restart loses at most ``L`` seconds (the
checkpoint interval plus the restart's own overhead), so ``k = floor((D - T) / L)`` restarts fit in the
margin: ``T + k * L <= D``. That ``k`` is RayJob ``backoffLimit`` and JobSet ``failurePolicy.maxRestarts``.
Without a budget the deadline is ``T * (1 + slack)``. A plan over its budget (``P > B``) has no deadline
that lets it finish, and is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeplan.manifests.target import K8sTarget, ManifestError
from moeplan.simulator.contracts.plan_file import PlanFile

DAY_S = 86400.0


@dataclass(frozen=True)
class JobLimits:
    """What the manifests carry (``deadline_s``, ``restarts``) and the figures they come from."""

    predicted_s: float  # T: the whole run's predicted wall time
    deadline_s: int  # D: activeDeadlineSeconds
    restarts: int  # k: backoffLimit / maxRestarts
    restart_loss_s: float  # L: checkpoint interval + restart overhead
    gpus: int
    budget_gpu_hours: float | None  # B
    predicted_gpu_hours: float  # P

    def arithmetic(self) -> list[str]:
        """The derivation, one line each, as the manifests' header comment states it."""
        t, d, k, loss = self.predicted_s, self.deadline_s, self.restarts, self.restart_loss_s
        if self.budget_gpu_hours is None:
            first = f"activeDeadlineSeconds = T x (1 + slack) = {d} s  (T = predicted wall time {t:.0f} s; no budget)"
        else:
            first = (f"activeDeadlineSeconds = floor(T x B / P) = floor({t:.0f} s x {self.budget_gpu_hours:g} / "
                     f"{self.predicted_gpu_hours:.1f} GPU-h) = {d} s: what the budget buys at {self.gpus} GPUs")
        return [first,
                (f"restarts = floor((D - T) / L) = floor(({d} - {t:.0f}) / {loss:g}) = {k}  "
                 f"(L = checkpoint interval + restart overhead = {loss:g} s lost per restart)"),
                f"check: T + restarts x L = {t + k * loss:.0f} s <= D = {d} s"]


def job_limits(plan: PlanFile, target: K8sTarget) -> JobLimits:
    """The deadline and restart count of ``plan`` on ``target`` (``ManifestError`` without predictions, or
    over budget)."""
    if plan.predictions is None or plan.budget_report is None:
        raise ManifestError("plan: predictions=null: the plan was made without simulating the run; "
                            "re-run `moeplan plan`")
    run = plan.predictions.run
    predicted_s = run.wall_clock_days * DAY_S
    predicted_gpu_hours = plan.budget_report.gpu_hours_total
    budget = plan.budget_report.budget_gpu_hours
    if predicted_s <= 0 or predicted_gpu_hours <= 0:
        raise ManifestError(f"plan: predictions.run.wall_clock_days={run.wall_clock_days} predicts no run time")
    if budget is None:
        deadline_s = math.ceil(predicted_s * (1.0 + target.deadline_slack_frac))
    elif predicted_gpu_hours > budget:
        raise ManifestError(f"plan: budget_report.gpu_hours_total={predicted_gpu_hours:.1f} exceeds budget_gpu_hours="
                            f"{budget:g}: no deadline lets the run finish within the budget; re-plan")
    else:
        # At a zero margin the floor may fall a fraction of a second short of T: round up to T there.
        deadline_s = max(math.floor(predicted_s * budget / predicted_gpu_hours), math.ceil(predicted_s))
    loss_s = target.checkpoint_interval_s + target.restart_overhead_s
    restarts = max(0, math.floor((deadline_s - predicted_s) / loss_s))
    assert predicted_s + restarts * loss_s <= deadline_s, f"{predicted_s=} {restarts=} {loss_s=} {deadline_s=}"
    return JobLimits(predicted_s=predicted_s, deadline_s=deadline_s, restarts=restarts, restart_loss_s=loss_s,
                     gpus=plan.layout.world, budget_gpu_hours=budget, predicted_gpu_hours=predicted_gpu_hours)
