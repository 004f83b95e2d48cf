"""Test fixtures for ``moeplan check``: a real tiny plan (``moeplan plan --trace``, in process, once per
session) and run directories of SYNTHETIC measurements made from it.

The synthetic runs are fixtures for the judging logic only, labelled ``synthetic`` in their environment:
their steps and traces are the plan's own simulated step, scaled by a seeded slowdown, with seeded noise.
The runtime (``moeplan launch``) writes the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.simulator.contracts.plan_file import PlanFile, read_plan
from moeplan.simulator.contracts.run_report import (
    BudgetGuard,
    Environment,
    RunReport,
    RunSettings,
    StepMetrics,
    TraceRef,
    append_metrics,
    trace_path,
    write_run_report,
)

TINY_PLAN_ARGS = ["plan", "--model", "tiny-moe", "--cluster", "h200", "--nodes", "1", "--no-search", "--pp", "2",
                  "--ep", "4", "--schedule", "dualpipev", "--seq-len", "256", "--global-batch", "32", "--tokens", "1B",
                  "--budget-gpu-hours", "50"]
NOISE_FRAC = 0.005  # seeded per-step noise on the synthetic wall times, well inside the 5% tolerance


@pytest.fixture(scope="session")
def tiny_plan(tmp_path_factory) -> Path:
    """A folder with a real tiny plan's ``plan.json`` and its simulated step's ``trace.json``."""
    out = tmp_path_factory.mktemp("tiny-plan")
    result = CliRunner().invoke(app, [*TINY_PLAN_ARGS, "--out", str(out), "--trace", str(out / "trace.json"),
                                      "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def pp_rank_of(plan: PlanFile) -> tuple[int, ...]:
    """Global rank -> pipeline rank, pipeline outermost (the fixtures' own choice: the runtime records its own)."""
    per_pipeline_rank = plan.layout.world // plan.layout.pp
    return tuple(r // per_pipeline_rank for r in range(plan.layout.world))


def _rank_trace(plan_trace: dict, pp_rank: int, slowdown: float) -> dict:
    events = [dict(e, ts=e["ts"] * slowdown, dur=e["dur"] * slowdown) for e in plan_trace["traceEvents"]
              if e.get("ph") == "X" and e["pid"] == pp_rank]
    makespan_us = max(e["ts"] + e["dur"] for e in plan_trace["traceEvents"] if e.get("ph") == "X")
    return {"traceEvents": events, "otherData": {"step_time_s": makespan_us * slowdown / 1e6, "synthetic": True}}


def synthetic_run(run_dir: Path, plan_dir: Path, slowdown: float = 1.0, seed: int = 0, steps: int = 7,
                  warmup_steps: int = 2, memory_frac: float = 1.0) -> Path:
    """A run directory (``run.json``, ``metrics.jsonl``, ``traces/``, ``plan.json``) whose measurements are
    the plan's prediction times ``slowdown`` with seeded noise; warm-up steps are 3x slower (left out)."""
    plan = read_plan(plan_dir)
    step = plan.predictions.step
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_bytes((plan_dir / "plan.json").read_bytes())
    world, pp_of = plan.layout.world, pp_rank_of(plan)
    memory = tuple(int(plan.memory.per_rank[p].total_bytes * memory_frac) for p in pp_of)
    metrics = []
    for i in range(steps):
        wall = step.step_time_s * slowdown * (3.0 if i < warmup_steps else 1.0 + rng.uniform(-NOISE_FRAC, NOISE_FRAC))
        metrics.append(StepMetrics(step=i, wall_time_s=wall, tokens=step.tokens_per_step, loss=5.0 - 0.1 * i, lr=1e-3,
                                   grad_norm=1.0, peak_memory_bytes=memory,
                                   tokens_per_s_per_gpu=step.tokens_per_step / wall / world))
        append_metrics(run_dir, metrics[-1])
    plan_trace = json.loads((plan_dir / "trace.json").read_text())
    (run_dir / "traces").mkdir(exist_ok=True)
    for r in range(world):
        (run_dir / trace_path(r)).write_text(json.dumps(_rank_trace(plan_trace, pp_of[r], slowdown)))
    report = RunReport(
        plan_sha256=plan.inputs_sha256, plan_file="plan.json", status="completed",
        environment=Environment(moeplan_version="synthetic", hostnames=("synthetic",)),
        settings=RunSettings(steps=steps, warmup_steps=warmup_steps, world_size=world, backend="nccl", pp_rank_of=pp_of),
        steps=tuple(metrics), traces=tuple(TraceRef(rank=r, path=trace_path(r)) for r in range(world)),
        budget_guard=BudgetGuard(policy="off"),
    )
    write_run_report(run_dir, report)
    return run_dir
