"""``moeplan plan --trace``: the trace is the step the plan's predictions simulated, at no extra simulation."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.simulator.contracts.plan_file import read_plan
from moeplan.simulator.engine.build import SimOptions
from moeplan.simulator.engine.step import StepSimulation
from moeplan.simulator.engine.trace import chrome_trace
from moeplan.simulator.planning.planner import plan_with_predictions
from moeplan.simulator.planning.predict import EXACT_MICROBATCHES, simulate_at

TINY = ["plan", "--model", "tiny-moe", "--cluster", "h200", "--nodes", "1", "--no-search"]
LAYOUTS = {
    "extrapolated": [],  # 1f1b, 512 micro-batches: above EXACT_MICROBATCHES, two simulations per step
    "exact": ["--pp", "2", "--ep", "4", "--schedule", "dualpipe", "--seq-len", "256", "--global-batch", "32"],
}


@pytest.fixture
def simulations(monkeypatch) -> list[bool]:
    """Every step simulation run from now on, as its ``trace`` flag."""
    runs: list[bool] = []
    run = StepSimulation.run

    def counted(self):
        runs.append(self.events is not None)
        return run(self)

    monkeypatch.setattr(StepSimulation, "run", counted)
    return runs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_trace_costs_no_extra_simulation(tmp_path, simulations, layout):
    """The CLI simulates exactly what the plan's predictions need; the traced run is one of those."""
    trace = tmp_path / "step.trace.json"
    args = [*TINY, *LAYOUTS[layout], "--out", str(tmp_path / "o"), "--trace", str(trace), "--json"]
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    by_cli = list(simulations)
    plan = read_plan(tmp_path / "o")
    assert (plan.layout.microbatches > EXACT_MICROBATCHES) == (layout == "extrapolated")
    simulations.clear()
    plan_with_predictions(plan.inputs, (), "given")  # the predictions alone, no trace asked
    assert len(by_cli) == len(simulations) > 0
    assert by_cli.count(True) == 1 and simulations.count(True) == 0


def test_the_trace_is_the_planned_step(tmp_path):
    trace = tmp_path / "step.trace.json"
    args = [*TINY, *LAYOUTS["exact"], "--out", str(tmp_path / "o"), "--trace", str(trace)]
    assert CliRunner().invoke(app, args, catch_exceptions=False).exit_code == 0
    plan = read_plan(tmp_path / "o")
    lay = plan.layout
    again = simulate_at(plan.inputs, lay.dp, lay.microbatches, plan.inputs.parallel.seq_len_tokens, SimOptions(), trace=True)
    assert again.step_time_s == plan.predictions.step.step_time_s
    assert trace.read_text() == json.dumps(chrome_trace(again.events))
    assert any(e["ph"] == "X" for e in json.loads(trace.read_text())["traceEvents"])
