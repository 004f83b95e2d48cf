"""Checkpoints through the worker on real gloo processes: a run resumed from a DCP checkpoint (weights,
biases, ZeRO shards, AdamW steps, tokens seen) follows the uninterrupted run's losses exactly, and the
run directory is rewound to the checkpoint (later steps dropped, the restart and its lost GPU-hours recorded)."""

from __future__ import annotations

import pytest

from moeplan.model.runtime.checkpoint import checkpoints_dir, latest_checkpoint
from moeplan.model.runtime.worker import Resume, RunConfig, train
from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.contracts.run_report import read_metrics, read_run_report
from moeplan.simulator.spec.hyperparams import LrSchedule
from moeplan.simulator.spec.training import OptimizerSpec
from tests.model.runtime.harness import run_ranks, tiny_plan

STEPS = 5
OPTIMIZER = OptimizerSpec(moment_bytes=4, lr=LrSchedule(peak_lr=3e-3, warmup_steps=2), grad_clip_norm=0.5)


def _train(rank: int, plan, run_dir, config: RunConfig) -> None:
    train(plan, run_dir, config, rank)


def test_a_resumed_run_follows_the_uninterrupted_one(tmp_path):
    # dualpipe at pp 2: mirrored stages on both ranks and the MTP embedding tied across them
    plan = tiny_plan("dualpipe", pp=2, optimizer=OPTIMIZER)
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_ranks(2, _train, plan, whole, RunConfig(steps=STEPS, dtype="fp32"), tmp=tmp_path / "a")
    run_ranks(2, _train, plan, split, RunConfig(steps=STEPS, dtype="fp32", checkpoint_every=3), tmp=tmp_path / "b")
    assert sorted(p.name for p in checkpoints_dir(split).iterdir()) == ["latest", "step3", "step5"]
    assert latest_checkpoint(split).steps_done == STEPS
    # as if the run had died after recording steps 3 and 4 but before committing step5
    write_atomic(checkpoints_dir(split) / "latest", "step3\n")
    recorded = read_metrics(split)
    run_ranks(2, _train, plan, split, RunConfig(steps=STEPS, dtype="fp32", resume=Resume("test resume")),
              tmp=tmp_path / "c")
    expected = [m.loss for m in read_metrics(whole)]
    resumed = read_metrics(split)
    assert [m.step for m in resumed] == list(range(STEPS))
    assert [m.loss for m in resumed] == expected, list(zip([m.loss for m in resumed], expected))
    assert expected[-1] != expected[2], "the losses must move for the comparison to mean anything"
    report = read_run_report(split)
    assert report.status == "completed" and [m.loss for m in report.steps] == expected
    (restart,) = report.restarts
    redone = sum(m.wall_time_s for m in recorded if m.step >= 3)
    assert restart.at_step == 3 and restart.reason == "test resume"
    assert restart.lost_gpu_hours == pytest.approx(2 * redone / 3600)


def test_another_plan_refuses_the_checkpoint(tmp_path):
    plan = tiny_plan("1f1b", pp=2, optimizer=OPTIMIZER)
    other = tiny_plan("1f1b", pp=2, optimizer=OPTIMIZER.model_copy(update={"grad_clip_norm": 1.0}))
    run_dir = tmp_path / "run"
    run_ranks(2, _train, plan, run_dir, RunConfig(steps=1, warmup_steps=0, dtype="fp32", checkpoint_every=1),
              tmp=tmp_path / "a")
    with pytest.raises(AssertionError, match="CheckpointError: .*step1: plan_sha256="):
        run_ranks(2, _train, other, run_dir, RunConfig(steps=2, warmup_steps=0, dtype="fp32", resume=Resume("r")),
                  tmp=tmp_path / "b")
