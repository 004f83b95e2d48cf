"""The budget guard: the whole run's GPU-hours projected from the measured step, against the plan's budget.

``BudgetGuardObserver`` is the worker's ``observer`` (``model.runtime.worker.StepObserver``) on rank 0.
Every ``every`` steps after the warm-up it projects the whole run with ``run_model.project_run`` at the
ratio median(measured step times after the warm-up) / the plan's predicted step time (the projection
``moeplan check`` makes), and compares it with ``inputs.budget.gpu_hours``:

- ``warn``: over budget, it logs one warning, once, and records ``action="warned"`` at that step;
- ``stop``: over budget, it answers "stop": the worker checkpoints and ends the run with
  ``status="stopped"`` (``moeplan launch`` exits ``STOPPED_EXIT_CODE``).

GPU-hours already lost to restarts are not in the projection (the run report adds them; ``check`` does).
The observer is built inside the worker process from the plan (``for_plan``), so nothing unpicklable
crosses Ray.
"""

from __future__ import annotations

import logging
import statistics
from typing import Literal

from moeplan.simulator.contracts.plan_file import PlanFile
from moeplan.simulator.contracts.run_report import BudgetGuard, StepMetrics
from moeplan.simulator.planning.run_model import project_run

log = logging.getLogger(__name__)
Policy = Literal["off", "warn", "stop"]
POLICIES = ("off", "warn", "stop")


def projected_gpu_hours(plan: PlanFile, measured_step_s: float) -> float | None:
    """The whole run's GPU-hours if every step takes ``measured_step_s`` / predicted times the plan's
    (None for a plan without predictions)."""
    pred = plan.predictions
    if pred is None or measured_step_s <= 0:
        return None
    return project_run(plan.inputs, pred.run, measured_step_s / pred.step.step_time_s).gpu_hours_total


def guard_problem(plan: PlanFile, policy: str, every: int) -> str | None:
    """Why ``policy`` cannot guard ``plan`` (one line naming the field), or None."""
    if policy not in POLICIES:
        return f"--budget-guard={policy!r} must be one of {', '.join(POLICIES)}"
    if every < 1:
        return f"--guard-every={every} must be >= 1"
    if policy == "off":
        return None
    if plan.predictions is None:
        return f"--budget-guard {policy}: the plan has no predictions (plan.predictions is null) to project from"
    if plan.inputs.budget.gpu_hours is None:
        return f"--budget-guard {policy}: the plan's inputs.budget.gpu_hours is null: set a budget when planning"
    return None


class BudgetGuardObserver:
    """Rank 0's step observer: the budget guard (see the module docstring)."""

    def __init__(self, plan: PlanFile, policy: Policy, every: int, warmup_steps: int) -> None:
        assert guard_problem(plan, policy, every) is None, guard_problem(plan, policy, every)
        self.plan, self.policy, self.every, self.warmup_steps = plan, policy, every, warmup_steps
        self.budget = plan.inputs.budget.gpu_hours
        self.walls: list[float] = []
        self.checks = 0
        self.last: float | None = None
        self.action: Literal["none", "warned", "stopped"] = "none"
        self.at_step: int | None = None

    def __call__(self, metrics: StepMetrics) -> str:
        self.walls.append(metrics.wall_time_s)
        measured = self.walls[self.warmup_steps:]
        if self.policy == "off" or not measured or len(measured) % self.every:
            return "continue"
        self.checks += 1
        self.last = projected_gpu_hours(self.plan, statistics.median(measured))
        if self.last is None or self.last <= self.budget:
            return "continue"
        if self.policy == "warn":
            if self.action == "none":
                log.warning("step %d: the run projects %.4g GPU-hours, over the budget of %.4g", metrics.step,
                            self.last, self.budget)
                self.action, self.at_step = "warned", metrics.step
            return "continue"
        self.action, self.at_step = "stopped", metrics.step
        return "stop"

    def guard_report(self) -> BudgetGuard:
        return BudgetGuard(policy=self.policy, budget_gpu_hours=self.budget, checks=self.checks,
                           last_projected_gpu_hours=self.last, action=self.action, at_step=self.at_step)
