"""Training runs through the worker: the loss trajectory equals the single-process one, and the run
directory holds what ``moeplan check`` reads (metrics.jsonl, run.json, per-rank traces)."""

from __future__ import annotations

import json

import pytest

from moeplan.model.runtime.worker import RunConfig, TracedStep, train
from moeplan.orchestrator.inputs import read_load_record
from moeplan.simulator.contracts.run_report import EXPERT_LOAD_NAME, read_metrics, read_run_report
from moeplan.simulator.costs.optimizer_step import OPTIMIZER_PARTS
from moeplan.simulator.report.trace_analysis import op_class
from moeplan.simulator.schedules.lowering import lower
from moeplan.simulator.spec.hyperparams import LrSchedule
from moeplan.simulator.spec.training import OptimizerSpec
from tests.model.runtime.harness import reference_training, run_ranks, tiny_plan

STEPS = 20
# FP32 moments (the reference is torch.optim.AdamW), a learning rate that moves the loss, clipping on
OPTIMIZER = OptimizerSpec(moment_bytes=4, lr=LrSchedule(peak_lr=3e-3, warmup_steps=3), grad_clip_norm=0.5)


def _train(rank: int, plan, run_dir, steps: int) -> None:
    train(plan, run_dir, RunConfig(steps=steps, warmup_steps=1, dtype="fp32"), rank)


@pytest.mark.parametrize(("kind", "pp", "dp"), [("dualpipe", 2, 1), ("zb1p", 2, 2)])
def test_twenty_steps_follow_the_single_process_trajectory(tmp_path, kind, pp, dp):
    plan = tiny_plan(kind, pp=pp, dp=dp, optimizer=OPTIMIZER)
    run_dir = tmp_path / "run"
    run_ranks(pp * dp, _train, plan, run_dir, STEPS, tmp=tmp_path / "ranks")
    measured = [m.loss for m in read_metrics(run_dir / "metrics.jsonl")]
    reference = reference_training(plan, STEPS)
    assert measured == pytest.approx(reference, rel=2e-4), list(zip(measured, reference))
    assert reference[-1] < 0.8 * reference[0], f"the run did not learn: {reference[0]:.3f} -> {reference[-1]:.3f}"
    report = read_run_report(run_dir / "run.json")
    assert report.status == "completed" and len(report.steps) == STEPS
    assert report.plan_sha256 == plan.inputs_sha256
    assert report.settings.pp_rank_of == tuple(r // dp for r in range(pp * dp))
    assert all(t.energy_j.missing for t in report.telemetry), "no NVML on a CPU run: every series is missing"
    spec = plan.inputs.model  # the expert-load file: every token of every step routed to top-k experts
    record = read_load_record(run_dir / EXPERT_LOAD_NAME, spec, range(spec.num_hidden_layers + 1))
    decoder = [layer for layer in record.layers if layer.layer < spec.num_hidden_layers]
    assert decoder and all(sum(layer.tokens_per_expert) == STEPS * report.steps[0].tokens * spec.num_experts_per_tok
                           for layer in decoder)
    programs = lower(plan.schedule).programs
    traced_steps = set()
    for ref in report.traces:
        doc = json.loads((run_dir / ref.path).read_text())
        names = [e["name"] for e in doc["traceEvents"] if e.get("ph") == "X"]
        ops = [str(op) for step in programs[report.settings.pp_rank_of[ref.rank]].steps for op in step.action.ops]
        timed = {n.split(" ")[0] for n in names}  # "0F3 L1 attn", "1B2 head", "0W1": the op is the first word
        assert set(ops) <= timed, f"ops of the rank's program without a timed event: {sorted(set(ops) - timed)}"
        assert {f"optimizer {part}" for part in OPTIMIZER_PARTS} <= set(names) and all(op_class(n) for n in names)
        # the traced step is a measured one (TracedStep: the kept step nearest the median), the same on every rank
        traced = next(m for m in report.steps if m.step == doc["otherData"]["step"])
        assert traced.step >= 1 and doc["otherData"]["step_time_s"] == traced.wall_time_s
        traced_steps.add(traced.step)
    assert len(traced_steps) == 1


def test_the_traced_step_is_the_kept_step_nearest_the_runs_median():
    """``TracedStep`` holds five steps' events at most, drops the one farthest from the median so far, and picks the
    kept one nearest the median of every measured step; a warm-up step stands in only until a measured one."""
    walls = [9.0, 1.0, 5.0, 4.9, 5.2, 8.0, 0.5, 5.1, 7.0, 4.0, 6.0, 3.0]  # step 0 warm-up; measured median 5.0
    traced = TracedStep(warmup_steps=1)
    traced.offer(walls[0], 0, ["warm-up"])
    assert traced.choice()[1] == 0  # stopped in the warm-up: its step stands in
    for step, wall in enumerate(walls[1:], start=1):
        traced.offer(wall, step, [f"step {step}"])
        assert len(traced.kept) <= 5 and all(s >= 1 for _, s, _ in traced.kept)
    # the median step (2) was kept through seven evictions; the last five steps' median would be step 7's 5.1
    assert traced.choice() == (5.0, 2, ["step 2"])
    assert sorted(s for _, s, _ in traced.kept) == [2, 3, 4, 7, 10]


def _train_kernel_trace(rank: int, plan, run_dir) -> None:
    train(plan, run_dir, RunConfig(steps=2, warmup_steps=1, dtype="fp32", kernel_trace=True), rank)


def test_kernel_trace_profiles_one_more_step_with_each_node_in_its_range(tmp_path):
    """``kernel_trace``: after the measured steps every rank profiles one more step; each compute node of its
    program (and the optimizer) is a ``NODE_RANGE`` in that trace, enclosing the ops it ran. The measured
    steps and their report are what a run without it writes."""
    from moeplan.model.runtime.overlap import NODE_RANGE
    from moeplan.model.runtime.worker import KERNEL_TRACE

    plan = tiny_plan("dualpipe", pp=2)
    run_dir = tmp_path / "run"
    run_ranks(2, _train_kernel_trace, plan, run_dir, tmp=tmp_path / "ranks")
    report = read_run_report(run_dir / "run.json")
    assert report.status == "completed" and [m.step for m in report.steps] == [0, 1]
    programs = lower(plan.schedule).programs
    for rank in range(2):
        events = json.loads((run_dir / KERNEL_TRACE.format(rank=rank)).read_text())["traceEvents"]
        ranges = [e for e in events if e.get("ph") == "X" and e["name"].startswith(NODE_RANGE)]
        names = {e["name"][len(NODE_RANGE):] for e in ranges}
        ops = {str(op) for step in programs[report.settings.pp_rank_of[rank]].steps for op in step.action.ops}
        assert ops <= {n.split(" ")[0] for n in names} and "optimizer" in names, sorted(names)
        inside = [e for e in events if e.get("cat") == "cpu_op" and e["name"].startswith("aten::")
                  and any(r["ts"] <= e["ts"] <= r["ts"] + r["dur"] for r in ranges)]
        assert inside, "no aten op inside a node's range"
