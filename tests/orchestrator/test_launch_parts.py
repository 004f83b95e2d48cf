"""The launcher's pure parts, without Ray running: the budget guard's decisions against ``project_run``, the
resource check's one line, the topology check, and the progress bar's tail of ``metrics.jsonl``."""

from __future__ import annotations

import logging
import math

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator import launch_cmd
from moeplan.orchestrator.budget_guard import BudgetGuardObserver, guard_problem, projected_gpu_hours
from moeplan.orchestrator.cli import app
from moeplan.orchestrator.errors import RunFailedError
from moeplan.orchestrator.launch_progress import MetricsTail, mfu_frac
from moeplan.orchestrator.ray_launch import _innermost_frame, check_topology, missing_resources
from moeplan.simulator.contracts.plan_file import read_plan
from moeplan.simulator.contracts.run_report import StepMetrics, append_metrics
from moeplan.simulator.planning.run_model import project_run
from tests.orchestrator.run_dirs import tiny_plan  # noqa: F401 -- the session fixture (h200, pp2 ep4, budget 50)


@pytest.fixture(scope="module")
def plan(tiny_plan):  # noqa: F811
    return read_plan(tiny_plan)


def _metrics(step: int, wall: float, tokens: int = 1024, world: int = 8) -> StepMetrics:
    return StepMetrics(step=step, wall_time_s=wall, tokens=tokens, loss=1.0, lr=1e-3,
                       tokens_per_s_per_gpu=tokens / wall / world)


def test_the_projection_is_check_s(plan):
    predicted = plan.predictions.step.step_time_s
    assert projected_gpu_hours(plan, predicted) == pytest.approx(plan.predictions.run.gpu_hours_total, rel=1e-12)
    assert projected_gpu_hours(plan, 2 * predicted) == project_run(plan.inputs, plan.predictions.run, 2.0).gpu_hours_total


def _walls_over(plan, budget_frac: float) -> float:
    """A step time whose projection is ``budget_frac`` of the budget (the projection is linear in it)."""
    predicted = plan.predictions.step.step_time_s
    return predicted * budget_frac * plan.inputs.budget.gpu_hours / projected_gpu_hours(plan, predicted)


def test_stop_answers_stop_at_the_first_check_over_budget(plan):
    guard = BudgetGuardObserver(plan, "stop", every=2, warmup_steps=1)
    under, over = _walls_over(plan, 0.9), _walls_over(plan, 1.2)
    decisions = [guard(_metrics(s, w)) for s, w in enumerate([100.0, under, under, over, over, over])]
    # warm-up step 0 (100 s) left out; checks after 2 and 4 measured steps: medians under, then (under, under,
    # over, over) -> median = mean of under and over = 1.05 x budget
    assert decisions == ["continue"] * 4 + ["stop", "continue"]
    report = guard.guard_report()
    assert (report.action, report.at_step, report.checks) == ("stopped", 4, 2)
    assert report.last_projected_gpu_hours == pytest.approx(1.05 * plan.inputs.budget.gpu_hours, rel=1e-9)


def test_warn_logs_once_and_never_stops(plan, caplog):
    guard = BudgetGuardObserver(plan, "warn", every=1, warmup_steps=0)
    with caplog.at_level(logging.WARNING):
        decisions = [guard(_metrics(s, _walls_over(plan, 2.0))) for s in range(4)]
    assert decisions == ["continue"] * 4
    assert len([r for r in caplog.records if "over the budget" in r.message]) == 1
    report = guard.guard_report()
    assert (report.action, report.at_step, report.checks) == ("warned", 0, 4)


def test_off_never_projects(plan):
    guard = BudgetGuardObserver(plan, "off", every=1, warmup_steps=0)
    assert guard(_metrics(0, 1e6)) == "continue" and guard.guard_report().checks == 0


def test_guard_problems_are_one_line(plan):
    assert guard_problem(plan, "stop", 1) is None
    assert "one of off, warn, stop" in guard_problem(plan, "halt", 1)
    assert "--guard-every=0" in guard_problem(plan, "warn", 0)
    no_budget = plan.model_copy(update={"inputs": plan.inputs.model_copy(
        update={"budget": plan.inputs.budget.model_copy(update={"gpu_hours": None})})})
    assert "inputs.budget.gpu_hours is null" in guard_problem(no_budget, "stop", 1)
    assert "no predictions" in guard_problem(plan.model_copy(update={"predictions": None}), "warn", 1)


def test_missing_resources_names_what_is_missing(plan):
    node = {"CPU": 64.0, "GPU": 8.0}
    assert missing_resources(plan, [node]) is None
    line = missing_resources(plan, [{"CPU": 64.0, "GPU": 4.0}, {"CPU": 64.0}])
    assert line == ("the plan needs 1 node(s) of 8 GPUs (8 ranks: CPU=8, GPU=8 per node) but the Ray cluster has 0 "
                    "such node(s) (2 node(s) in all, CPU=128, GPU=4)")
    # eight GPUs spread over two hosts are not one node of eight
    assert "has 0 such node(s)" in missing_resources(plan, [{"CPU": 8.0, "GPU": 4.0}] * 2)


def _place(node: str, gpu: str | None = None) -> dict:
    return {"node_id": node, "hostname": f"host-{node}", "gpus": [gpu] if gpu else []}


def test_topology_one_host_per_plan_node():
    check_topology([_place("a", "0"), _place("a", "1"), _place("b", "0"), _place("b", "1")], 2, gpus=True)
    with pytest.raises(RunFailedError, match=r"plan node 0: ranks 0..1 landed on hosts \['host-a', 'host-b'\]"):
        check_topology([_place("a"), _place("b"), _place("b"), _place("b")], 2, gpus=False)
    with pytest.raises(RunFailedError, match="not one distinct each"):
        check_topology([_place("a", "0"), _place("a", "0")], 2, gpus=True)
    with pytest.raises(RunFailedError, match="2 plan nodes share hosts"):
        check_topology([_place("a"), _place("a"), _place("a"), _place("a")], 2, gpus=False)


def test_the_tail_reads_whole_lines_and_starts_again_after_a_rewind(tmp_path, plan):
    tail = MetricsTail(tmp_path)
    assert tail.poll() == []
    for s in range(3):
        append_metrics(tmp_path / "metrics.jsonl", _metrics(s, 1.0))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "wall')  # the step in flight
    assert [m.step for m in tail.poll()] == [0, 1, 2] and tail.poll() == []
    (tmp_path / "metrics.jsonl").write_text(_metrics(0, 1.0).model_dump_json() + "\n")  # rewound
    assert [m.step for m in tail.poll()] == [0]
    rate = 1000.0
    assert math.isclose(mfu_frac(plan, rate),
                        rate * plan.flops.model_flops_per_token / plan.inputs.cluster.gpu.bf16_flops_per_s)


def test_a_failed_rank_is_named_with_the_innermost_frame_of_our_code():
    remote = '''Traceback (most recent call last):
  File "/tmp/site/ray/_private/worker.py", line 10, in run
  File "/site-packages/moeplan/model/runtime/rank.py", line 321, in step
    x = y
  File "/root/repo/model/stage.py", line 44, in forward
  File "/opt/torch/site-packages/torch/nn/functional.py", line 99, in linear
RuntimeError: Expected all tensors to be on the same device'''
    assert _innermost_frame(remote) == " (at model/stage.py:44 in forward)"
    assert _innermost_frame('  File "/x/y.py", line 3, in f') == " (at /x/y.py:3 in f)"
    assert _innermost_frame("no frames") == ""


def test_a_model_the_runtime_cannot_build_is_one_line_before_ray(tmp_path, monkeypatch):
    """launch asks the runtime's own check (``rank.check_plan_for_world``), before Ray starts and nothing written."""
    def ray_started(*args):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(launch_cmd, "_resources", ray_started)
    made = CliRunner().invoke(app, ["plan", "--model", "tiny-dense", "--cluster", "cpu", "--nodes", "1", "--no-search",
                                    "--seq-len", "16", "--out", str(tmp_path / "plan"), "--json"])
    assert made.exit_code == 0, made.stderr
    res = CliRunner().invoke(app, ["launch", str(tmp_path / "plan"), "--steps", "2", "--run-dir", str(tmp_path / "run")])
    assert (res.exit_code, res.stdout) == (2, ""), res.output
    line = "moeplan: error: model 'tiny-dense': kv_lora_rank=None; the runtime builds MLA models only"
    assert res.stderr.splitlines() == [line + " (the plan is for the simulator only)"]
    assert not (tmp_path / "run").exists()
