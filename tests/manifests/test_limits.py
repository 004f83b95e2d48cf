"""The deadline and restart arithmetic (``manifests.limits``) against its closed form, over many plans' figures."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplan.manifests.limits import DAY_S, job_limits
from moeplan.manifests.target import K8sTarget, ManifestError


def _with(plan, days: float, used: float, budget: float | None):
    """``plan`` with its predicted run and budget replaced (the figures limits reads)."""
    run = plan.predictions.run.model_copy(update={"wall_clock_days": days, "gpu_hours_total": used})
    report = plan.budget_report.model_copy(update={"gpu_hours_total": used, "budget_gpu_hours": budget})
    return plan.model_copy(update={"predictions": plan.predictions.model_copy(update={"run": run}),
                                   "budget_report": report})


def test_v3_figures(v3) -> None:
    limits = job_limits(v3.plan, K8sTarget())
    t = v3.plan.predictions.run.wall_clock_days * DAY_S
    assert limits.deadline_s == math.floor(t * 2_788_000 / v3.plan.budget_report.gpu_hours_total)
    assert limits.restarts == math.floor((limits.deadline_s - t) / 4500)
    assert limits.deadline_s * 2048 / 3600 <= 2_788_000  # the deadline spends at most the budget


@settings(max_examples=200, deadline=None)
@given(days=st.floats(1e-3, 1e3), margin=st.floats(0.0, 0.9), loss=st.floats(60, 1e5))
def test_restarts_fit_the_budget_and_no_more_would(tiny, days, margin, loss) -> None:
    gpus = tiny.plan.layout.world
    used = days * 24 * gpus
    plan = _with(tiny.plan, days, used, used / (1 - margin))
    limits = job_limits(plan, K8sTarget(checkpoint_interval_s=loss, restart_overhead_s=0))
    t = days * DAY_S
    assert math.ceil(t) <= limits.deadline_s <= max(t / (1 - margin), math.ceil(t))
    assert limits.deadline_s * gpus / 3600 <= used / (1 - margin) + gpus / 3600  # within the budget (+1 s rounding)
    assert t + limits.restarts * loss <= limits.deadline_s < t + (limits.restarts + 1) * loss


def test_no_budget_uses_the_slack_and_over_budget_is_refused(tiny) -> None:
    plan = _with(tiny.plan, 1.0, 24.0 * 16, None)
    assert job_limits(plan, K8sTarget(deadline_slack_frac=0.5)).deadline_s == math.ceil(1.5 * DAY_S)
    with pytest.raises(ManifestError, match=r"exceeds budget_gpu_hours=300: no deadline"):
        job_limits(_with(tiny.plan, 1.0, 24.0 * 16, 300.0), K8sTarget())
