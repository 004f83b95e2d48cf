"""Which simulated step ``moeplan check`` compares a run with: the checked plan's own (``--plan-trace``, else the
launched plan's ``RUN/plan-trace.json``), never another plan's. A plan with the run's inputs but other cost tables
(``plan --calibration``) predicts another step: the launched plan's breakdown is not its breakdown."""

from __future__ import annotations

import json

import pytest

from moeplan.orchestrator.check_cmd import PLAN_TRACE_NAME, predicted_intervals
from moeplan.orchestrator.errors import InputError
from moeplan.simulator.contracts.plan_file import read_plan
from tests.orchestrator.run_dirs import synthetic_run, tiny_plan  # noqa: F401 -- the session fixture


def _with_step(plan, factor: float):
    pred = plan.predictions
    step = pred.step.model_copy(update={"step_time_s": pred.step.step_time_s * factor})
    return plan.model_copy(update={"predictions": pred.model_copy(update={"step": step})})


def _scaled_trace(src, dst, factor: float):
    doc = json.loads(src.read_text())
    for e in doc["traceEvents"]:
        if e.get("ph") == "X":
            e["ts"], e["dur"] = e["ts"] * factor, e["dur"] * factor
    dst.write_text(json.dumps(doc))
    return dst


def test_the_runs_plan_trace_counts_only_for_the_plan_it_reproduces(tmp_path, tiny_plan) -> None:  # noqa: F811
    run = synthetic_run(tmp_path / "run", tiny_plan)
    (run / PLAN_TRACE_NAME).write_text((tiny_plan / "trace.json").read_text())
    plan = read_plan(tiny_plan)
    own = predicted_intervals(run, plan)
    assert own and max(iv.end_s for iv in own) == pytest.approx(plan.predictions.step.step_time_s, rel=1e-9)
    other = _with_step(plan, 1.1)  # the same inputs priced by other tables
    resimulated = predicted_intervals(run, other)
    assert resimulated is None  # the launched plan's trace is not its step, and no simulation reproduces it
    given = _scaled_trace(tiny_plan / "trace.json", tmp_path / "other-trace.json", 1.1)
    theirs = predicted_intervals(run, other, given)
    assert max(iv.end_s for iv in theirs) == pytest.approx(1.1 * plan.predictions.step.step_time_s, rel=1e-6)
    with pytest.raises(InputError, match="--plan-trace .* is not the plan's predicted step"):
        predicted_intervals(run, plan, given)
    with pytest.raises(InputError, match="no such file"):
        predicted_intervals(run, plan, tmp_path / "missing.json")
