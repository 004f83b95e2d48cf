"""``plan --tp/--sp``: a tensor-parallel plan is written, shown and round-trips; a tp the model or the node
cannot take is one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.simulator.contracts.plan_file import read_plan

runner = CliRunner()
TINY = ["--model", "tiny-dense", "--cluster", "h800", "--nodes", "1", "--pp", "2", "--schedule", "1f1b",
        "--micro-batch-size", "1", "--recompute", "none"]


def test_a_tp_plan_round_trips_through_show(tmp_path):
    res = runner.invoke(app, ["plan", *TINY, "--tp", "2", "--sp", "--out", str(tmp_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "x TP2 SP, ZeRO-1" in res.output
    plan = read_plan(tmp_path / "plan.json")
    assert (plan.inputs.parallel.tp, plan.inputs.parallel.sp, plan.layout.tp) == (2, True, 2)
    assert plan.layout.pp * plan.layout.dp * plan.layout.tp == plan.layout.world == 8
    shown = json.loads(runner.invoke(app, ["show", str(tmp_path), "--json"], catch_exceptions=False).output)
    assert (shown["tp"], shown["sp"], shown["pp"], shown["dp"]) == (2, True, 2, 2)
    assert shown["step_time_s"] == pytest.approx(plan.predictions.step.step_time_s)
    again = tmp_path / "again"
    res = runner.invoke(app, ["plan", *TINY, "--tp", "2", "--sp", "--out", str(again)], catch_exceptions=False)
    assert res.exit_code == 0 and read_plan(again / "plan.json").inputs_sha256 == plan.inputs_sha256


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--tp", "4"], "tp=4 must divide num_key_value_heads=2"),
     (["--tp", "3"], "parallel.tp: Input should be 1, 2, 4 or 8 (got 3)"),
     (["--tp", "16"], "parallel.tp: Input should be 1, 2, 4 or 8 (got 16)"),
     (["--tp", "8", "--set", "cluster.node.gpus_per_node=4", "--nodes", "2"], "tp=8 must divide the 4 GPUs of a node"),
     (["--sp"], "sp=true needs tp > 1"),
     (["--tp", "2", "--search"], None)],
)
def test_a_tp_that_cannot_run_is_one_line_exit_2(tmp_path, args, message):
    if message is None:  # the fixed tp is kept by the search (a valid control)
        res = runner.invoke(app, ["plan", "--model", "tiny-dense", "--cluster", "h800", "--nodes", "1", "--seq-len", "1024", *args,
                                  "--out", str(tmp_path / "ok"), "--json"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["tp"] == 2
        return
    out = tmp_path / "out"
    res = runner.invoke(app, ["plan", *TINY[:6], *args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], res.output
    assert not out.exists()
