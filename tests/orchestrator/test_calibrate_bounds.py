"""How long ``moeplan calibrate`` may take: the measurements a plan asks for, listed without running them, and a
timed loop's stop by count or by time (``calibration.timing``).

The V3 stage of ``benchmarks/one_gpu_loop.py`` (one H100, seq 4096) once ran past 160 s without finishing: its
GEMM operands were drawn on one CPU thread and its optimizer class stepped 2.2G parameters on the CPU. Its list is
built here for a CUDA device on a machine that may have none: building it must run nothing."""

from __future__ import annotations

import importlib.util
import json
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moeplan.orchestrator.calibration import compute, timing
from moeplan.orchestrator.calibration.measure import KINDS, MAX_MEASUREMENTS, Setup, measurements
from moeplan.orchestrator.calibration.shapes import plan_shapes
from moeplan.orchestrator.cli import app
from moeplan.simulator.contracts.plan_file import read_plan
from moeplan.simulator.costs.optimizer_step import one_shard_bytes_per_param
from moeplan.simulator.spec.training import OptimizerSpec

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("one_gpu_loop", ROOT / "benchmarks" / "one_gpu_loop.py")
loop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loop)


def _v3_stage_plan(tmp_path, *extra: str):
    config = tmp_path / "v3-stage.json"
    config.write_text(json.dumps(loop.stage_spec().model_dump(mode="json")))
    res = CliRunner().invoke(app, ["plan", "--model", str(config), "--cluster", "h100", "--nodes", "1", "--set",
                                   "cluster.node.gpus_per_node=1", "--pp", "1", "--ep", "1", "--dp", "1", "--schedule",
                                   "1f1b", "--microbatches", "4", "--micro-batch-size", "1", "--seq-len", "4096",
                                   "--global-batch", "4", "--tokens", "1B", "--no-search", "--out", str(tmp_path / "p"), *extra])
    assert res.exit_code == 0, res.output
    return read_plan(tmp_path / "p" / "plan.json")


def test_the_v3_stage_asks_for_a_bounded_list_of_measurements_and_building_it_runs_none(tmp_path):
    plan = _v3_stage_plan(tmp_path)
    shapes = plan_shapes(plan.inputs, plan.layout.dp, 2)
    setup = Setup(spec=plan.inputs.model, device=torch.device("cuda"), dtype=torch.bfloat16, reps=10, threads=1,
                  backend="nccl", label="[CAL] test", optimizer=plan.inputs.training.optimizer)
    items = measurements(shapes, setup, plan.inputs.cluster.gpu.hbm_bytes_per_s)  # no CUDA needed: nothing ran
    kinds = Counter(i.kind for i in items)
    assert len(items) <= MAX_MEASUREMENTS and set(kinds) == set(KINDS), kinds
    # one GEMM per priced shape (38: dense forward, input and weight gradients, 6 grouped), 24 memory classes
    # (the fused loss, qk_cat, the fused RoPE and router and the FP8 weights' quantisation too; this eager BF16 plan
    # also the five op-by-op classes it is priced at), the host's two, one each of the rest (collectives: the
    # send/recv pair, skipped on one GPU)
    assert kinds == {"gemm": len(shapes.gemms), "attention": 1, "host": 2, "copy": 1, "memory": 24, "optimizer": 1,
                     "beside": 1, "links": 1}, kinds
    (tmp_path / "fused").mkdir()
    fused = plan_shapes(_v3_stage_plan(tmp_path / "fused", "--set", "training.kernels.fusion=fused").inputs, 1, 2)
    assert Counter(i.kind for i in measurements(fused, setup, 1.0))["memory"] == 19  # a fused plan: none of them
    assert len(shapes.gemms) == 38 and len({i.what for i in items}) == len(items)
    # the optimizer class steps a bounded shard, not the stage's 2.2G-parameter half
    assert compute.optimizer_params(plan.inputs.model) == compute.OPTIMIZER_MAX_PARAMS < 2.2e9


def test_a_gpu_loop_settles_back_to_back_for_its_seconds_before_the_timed_calls():
    calls, phases = [], []

    def call() -> None:
        calls.append(time.perf_counter())
        time.sleep(0.01)

    cpu = torch.device("cpu")
    timing.median_s(call, cpu, reps=3, warmup=2, max_s=10.0)
    assert len(calls) == 2 + 3  # a CPU does not settle by default: what it times runs as the runtime's ranks do
    calls.clear()
    timing.median_s(call, cpu, reps=3, warmup=2, max_s=10.0, settle_s=0.1)
    # the warm-up (2), then 0.1 s of calls back to back at the last warm-up call's >= 10 ms, then the 3 timed
    assert 2 + 1 + 3 <= len(calls) <= 2 + 10 + 3, len(calls)
    assert timing._settle(lambda: phases.append(1), cpu, 0.01, 0.1) == len(phases) == 10
    phases.clear()
    assert timing.SETTLE_S > 0 and timing._settle(lambda: phases.append(1), cpu, 0.0, 1.0) == timing.SETTLE_MAX_CALLS
    assert len(phases) == timing.SETTLE_MAX_CALLS  # a call too short to time is capped, not launched for ever


def test_a_timed_loop_stops_at_its_count_or_its_time(monkeypatch):
    calls = []

    def slow() -> None:
        calls.append(time.perf_counter())
        time.sleep(0.02)

    cpu = torch.device("cpu")
    start = time.perf_counter()
    s = timing.median_s(slow, cpu, reps=1000, warmup=100, max_s=0.1)
    spent = time.perf_counter() - start
    # the first call, warm-up until 0.1 s was spent (at most 5 more calls of 20 ms), then 0.1 s of timed calls
    assert len(calls) <= 1 + 5 + 5 and spent < 0.5, (len(calls), spent)
    assert s >= 0.02
    calls.clear()
    timing.median_s(slow, cpu, reps=2, warmup=3, max_s=10.0)
    assert len(calls) == 3 + 2  # the count stops first: all warm-up calls, then reps
    calls.clear()
    timing.median_s(slow, cpu, reps=10, warmup=2, max_s=0.001)
    assert len(calls) == 2 + timing.MIN_REPS  # a call longer than max_s: still a median of MIN_REPS


@pytest.mark.parametrize(("reps", "call_s", "max_s", "n"), [(10, 0.001, 1.0, 10), (10, 0.2, 1.0, 5), (10, 2.0, 1.0, 3),
                                                            (2, 2.0, 1.0, 2), (10, 0.0, 1.0, 10)])
def test_timed_calls_fit_the_time_and_keep_a_median(reps, call_s, max_s, n):
    assert timing.timed_calls(reps, call_s, max_s) == n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_optimizer_class_steps_the_runtimes_kernel_over_a_bounded_shard():
    spec = loop.stage_spec()
    row = compute.optimizer_row(spec, 3, 1.0, torch.device("cuda"))  # a bandwidth of 1 B/s: hbm_frac = B/s
    assert row["implementation"].startswith("kernels.adamw") and row["shape"] == f"{compute.OPTIMIZER_MAX_PARAMS:,} parameters"
    assert row["fwd"]["bytes"] == one_shard_bytes_per_param(OptimizerSpec()) * compute.OPTIMIZER_MAX_PARAMS
    assert row["fwd"]["bytes_per_s"] == row["fwd"]["hbm_frac"] > 0
