"""Training runs through the worker: the loss trajectory equals the single-process one, and the run
directory holds what ``moeplan check`` reads (metrics.jsonl, run.json, per-rank traces)."""

from __future__ import annotations

import json

import pytest

from moeplan.model.runtime.worker import RunConfig, train
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
    for ref in report.traces:
        doc = json.loads((run_dir / ref.path).read_text())
        names = [e["name"] for e in doc["traceEvents"] if e.get("ph") == "X"]
        ops = [str(op) for step in programs[report.settings.pp_rank_of[ref.rank]].steps for op in step.action.ops]
        timed = {n.split(" ")[0] for n in names}  # "0F3 L1 attn", "1B2 head", "0W1": the op is the first word
        assert set(ops) <= timed, f"ops of the rank's program without a timed event: {sorted(set(ops) - timed)}"
        assert {f"optimizer {part}" for part in OPTIMIZER_PARTS} <= set(names) and all(op_class(n) for n in names)
        # the traced step is the median (by wall time) of the last five measured steps, the same on every rank
        median = sorted(report.steps[-5:], key=lambda m: (m.wall_time_s, m.step))[2]
        assert doc["otherData"]["step"] == median.step and doc["otherData"]["step_time_s"] == median.wall_time_s
