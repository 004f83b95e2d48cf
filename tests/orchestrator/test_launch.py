"""``moeplan launch`` through a real local Ray on CPU (gloo): the same losses as the runtime's own
multiprocess run, a worker killed at step 3 resumed from its checkpoint with identical losses, a run that
keeps failing ending with one line and its directory intact (then ``--resume``), the budget guard
stopping a run after a checkpoint, ``moeplan check`` on a launched run's real traces, and bad input or
an infeasible request as one line, exit 2, with nothing written.

One Ray cluster serves the module (started in this process: ``moeplan launch`` run in process joins it);
one test starts ``moeplan launch`` as a process of its own, which starts and stops its own local cluster."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeplan.model.runtime.checkpoint import latest_checkpoint
from moeplan.model.runtime.worker import RunConfig, train
from moeplan.orchestrator.cli import app
from moeplan.orchestrator.errors import BAD_INPUT_EXIT_CODE, RUN_FAILED_EXIT_CODE
from moeplan.orchestrator.launch_cmd import FAULT_ENV, STOPPED_EXIT_CODE
from moeplan.simulator.contracts.plan_file import PlanFile, read_plan
from moeplan.simulator.contracts.run_report import read_metrics, read_run_report
from moeplan.simulator.schedules import schedule_kind
from tests.model.runtime.harness import run_ranks

pytestmark = pytest.mark.ray
runner = CliRunner()
STEPS = 5
OPTIMIZER = ("moment_bytes=4", "lr.peak_lr=3e-3", "lr.warmup_steps=2", "grad_clip_norm=0.5")


def cpu_plan(tmp: Path, kind: str, pp: int, dp: int = 1, ep: int = 1, budget_gpu_hours: float | None = None,
             cluster: str = "cpu") -> Path:
    """``moeplan plan`` of the tiny model on one node of ``pp * dp`` processes (FP32 moments, a learning rate
    that moves the loss in a few steps); returns ``tmp/plan.json``."""
    m = schedule_kind(kind).smallest_valid(pp, 2 * pp)
    args = ["plan", "--model", "tiny-moe", "--cluster", cluster, "--nodes", "1", "--no-search", "--micro-batch-size",
            "1", "--seq-len", "16", "--pp", str(pp), "--dp", str(dp), "--ep", str(ep), "--schedule", kind,
            "--global-batch", str(dp * m), "--microbatches", str(m), "--set", f"cluster.node.gpus_per_node={pp * dp}",
            *[a for kv in OPTIMIZER for a in ("--set", f"training.optimizer.{kv}")], "--out", str(tmp)]
    if budget_gpu_hours is not None:
        args += ["--budget-gpu-hours", str(budget_gpu_hours)]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tmp / "plan.json"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=5, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    yield
    ray.shutdown()


def launch(*args: str, env: dict | None = None):
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return runner.invoke(app, ["launch", *args], catch_exceptions=False)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _train(rank: int, plan: PlanFile, run_dir: Path, steps: int) -> None:
    train(plan, run_dir, RunConfig(steps=steps, dtype="fp32"), rank)


@pytest.fixture(scope="module")
def pp2_dp2(ray_cluster, tmp_path_factory):
    """A PP2 x DP2 plan launched through Ray (fp32, STEPS steps, checkpoint every 2) and the runtime's
    own 4-process run of it: (plan path, Ray run dir, multiprocess losses)."""
    tmp = tmp_path_factory.mktemp("pp2dp2")
    path = cpu_plan(tmp / "plan", "1f1b", pp=2, dp=2)
    result = launch(str(path), "--steps", str(STEPS), "--dtype", "fp32", "--checkpoint-every", "2",
                    "--run-dir", str(tmp / "run"), "--json")
    assert result.exit_code == 0, result.output
    run_ranks(4, _train, read_plan(path), tmp / "mp", STEPS, tmp=tmp / "ranks")
    return path, tmp / "run", [m.loss for m in read_metrics(tmp / "mp")]


def test_pp2_dp2_through_ray_equals_the_multiprocess_run(pp2_dp2):
    _, run, expected = pp2_dp2
    report = read_run_report(run)
    assert report.status == "completed" and report.settings.backend == "gloo"
    assert [m.loss for m in report.steps] == expected
    assert expected[-1] < expected[0] - 0.05, f"the run must learn for the comparison to mean anything: {expected}"
    assert report.settings.pp_rank_of == (0, 0, 1, 1)
    assert (run / "plan.json").is_file() and (run / "plan-trace.json").is_file()
    assert latest_checkpoint(run).steps_done == STEPS


@pytest.mark.slow
def test_pp2_ep2_through_ray_equals_the_multiprocess_run(ray_cluster, tmp_path):
    """Also a restart under expert parallelism: each EP rank's experts come back from their own keys."""
    path = cpu_plan(tmp_path / "plan", "1f1b", pp=2, dp=2, ep=2)
    result = launch(str(path), "--steps", "4", "--dtype", "fp32", "--run-dir", str(tmp_path / "run"), "--json",
                    "--checkpoint-every", "2", "--max-failures", "1", env={FAULT_ENV: "2:3"})
    assert result.exit_code == 0, result.output
    run_ranks(4, _train, read_plan(path), tmp_path / "mp", 4, tmp=tmp_path / "ranks")
    expected = [m.loss for m in read_metrics(tmp_path / "mp")]
    report = read_run_report(tmp_path / "run")
    assert [m.loss for m in report.steps] == expected and len(set(expected)) == 4
    assert [r.at_step for r in report.restarts] == [2]


def test_a_worker_killed_at_step_3_resumes_with_identical_losses(pp2_dp2, tmp_path):
    path, _, expected = pp2_dp2
    run = tmp_path / "run"
    result = launch(str(path), "--steps", str(STEPS), "--dtype", "fp32", "--checkpoint-every", "2",
                    "--max-failures", "1", "--run-dir", str(run), "--json", env={FAULT_ENV: "1:3"})
    assert result.exit_code == 0, result.output
    assert (run / "fault-injected-rank1-step3").is_file(), "the fault was injected"
    report = read_run_report(run)
    assert [m.loss for m in report.steps] == expected
    (restart,) = report.restarts
    assert restart.at_step == 2 and restart.reason.startswith("worker failure: rank 1")
    assert restart.lost_gpu_hours > 4 * report.steps[2].wall_time_s / 3600  # step 2 redone at least
    assert json.loads(result.stdout)["restarts"] == 1


@pytest.mark.slow
def test_a_run_that_keeps_failing_ends_in_one_line_and_resumes(pp2_dp2, tmp_path):
    path, _, expected = pp2_dp2
    run = tmp_path / "run"
    result = launch(str(path), "--steps", str(STEPS), "--dtype", "fp32", "--checkpoint-every", "2",
                    "--run-dir", str(run), env={FAULT_ENV: "0:3"})
    assert result.exit_code == RUN_FAILED_EXIT_CODE, result.output
    # one line for the failed attempt (the rank, its crash log: 7406bed), one for the run
    attempt, line = result.stderr.strip().splitlines()
    assert attempt.startswith("moeplan: rank 0: ") and "(traceback in " in attempt, attempt
    assert line.startswith("moeplan: run failed: the run failed 1 time(s) (--max-failures 0); last: rank 0"), line
    failed = read_run_report(run)
    assert failed.status == "failed" and [m.step for m in failed.steps] == [0, 1, 2]
    assert latest_checkpoint(run).steps_done == 2
    resumed = launch("--resume", str(run), "--json")
    assert resumed.exit_code == 0, resumed.output
    report = read_run_report(run)
    assert [m.loss for m in report.steps] == expected
    assert [r.reason for r in report.restarts] == ["moeplan launch --resume"]


def test_check_reads_a_launched_run(pp2_dp2):
    _, run, _ = pp2_dp2
    result = runner.invoke(app, ["check", str(run), "--json"], catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    lines = {line["name"]: line for line in json.loads(result.stdout)["lines"]}
    report = read_run_report(run)
    median = statistics.median(m.wall_time_s for m in report.measured_steps)
    assert lines["step time"]["measured"] == pytest.approx(median, rel=1e-12)
    assert lines["idle (bubble + exposed comm)"]["predicted"] is not None  # the copied plan trace was read
    assert 0 <= lines["idle (bubble + exposed comm)"]["measured"] < 1  # analysed from the real traces
    assert (run / "run.html").is_file()


def test_the_budget_guard_stops_a_run_over_budget(tmp_path):
    """``moeplan launch`` as its own process, starting its own local Ray cluster."""
    path = cpu_plan(tmp_path / "plan", "1f1b", pp=2, budget_gpu_hours=1e-3)
    run = tmp_path / "run"
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-P", "-m", "moeplan.orchestrator.cli", "launch", str(path), "--steps", "8",
           "--budget-guard", "stop", "--guard-every", "1", "--run-dir", str(run), "--json"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == STOPPED_EXIT_CODE, done.stderr[-3000:]
    report = read_run_report(run)
    assert report.status == "stopped" and len(report.steps) == 2  # warm-up, then the first check stops it
    guard = report.budget_guard
    assert (guard.policy, guard.action, guard.at_step, guard.checks) == ("stop", "stopped", 1, 1)
    assert guard.last_projected_gpu_hours > guard.budget_gpu_hours == 1e-3
    assert latest_checkpoint(run).steps_done == 2
    assert json.loads(done.stdout)["status"] == "stopped"


def _one_line_exit_2(result, *expected: str) -> None:
    assert result.exit_code == BAD_INPUT_EXIT_CODE, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("moeplan: error: ") and all(e in line for e in expected), line


def test_the_address_probe_takes_a_real_ray_gcs(ray_cluster):
    """``ray_address.check_address`` asks as gRPC does: Ray's own GCS must pass it (and quickly)."""
    import ray

    from moeplan.orchestrator.ray_address import check_address

    start = time.monotonic()
    check_address(ray.get_runtime_context().gcs_address)
    assert time.monotonic() - start < 1.0


def test_an_infeasible_request_exits_2_quickly(ray_cluster, tmp_path):
    big = cpu_plan(tmp_path / "big", "1f1b", pp=2, dp=4)  # 8 processes; the module's cluster has 5 CPUs
    start = time.monotonic()
    result = launch(str(big), "--steps", "2", "--run-dir", str(tmp_path / "run"), "--address", "auto")
    assert time.monotonic() - start < 10
    _one_line_exit_2(result, "the plan needs 1 node(s) of 8 processes (CPU)", "CPU=5")
    gpus = cpu_plan(tmp_path / "gpu", "1f1b", pp=2, cluster="h200")  # GPUs on this CPU machine: refused before Ray
    _one_line_exit_2(launch(str(gpus), "--steps", "2", "--run-dir", str(tmp_path / "run")), "needs 2 GPUs")
    assert not (tmp_path / "run").exists()


def test_bad_plans_and_options_are_one_line_before_ray(tmp_path):
    path = cpu_plan(tmp_path / "plan", "1f1b", pp=2)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(path.read_text()[:-40])
    run = tmp_path / "run"
    _one_line_exit_2(launch(str(corrupt), "--steps", "2", "--run-dir", str(run)), "corrupt.json")
    no_schedule = json.loads(path.read_text()) | {"schedule": None}
    (tmp_path / "ns.json").write_text(json.dumps(no_schedule))
    _one_line_exit_2(launch(str(tmp_path / "ns.json"), "--steps", "2", "--run-dir", str(run)), "schedule")
    _one_line_exit_2(launch(str(path), "--steps", "0", "--run-dir", str(run)), "steps=0")
    _one_line_exit_2(launch(str(path), "--steps", "2", "--budget-guard", "stop", "--run-dir", str(run)),
                     "budget.gpu_hours")
    _one_line_exit_2(launch(str(path), "--steps", "2", "--dtype", "fp8", "--run-dir", str(run)), "dtype='fp8'")
    _one_line_exit_2(launch("--resume", str(tmp_path)), "launch.json")
    assert not run.exists()
    run.mkdir()
    (run / "x").write_text("")
    _one_line_exit_2(launch(str(path), "--steps", "2", "--run-dir", str(run)), "not an empty directory")
