"""Checkpoints through the worker on real gloo processes: a run resumed from a DCP checkpoint (weights,
biases, ZeRO shards, AdamW steps, tokens seen) follows the uninterrupted run's losses exactly, and the
run directory is rewound to the checkpoint (later steps dropped, the restart and its lost GPU-hours recorded)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moeplan.model.runtime.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    checkpoints_dir,
    latest_checkpoint,
    load_checkpoint,
)
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


def test_another_plan_or_a_broken_latest_is_one_line(tmp_path):
    rt = SimpleNamespace(plan=SimpleNamespace(inputs_sha256="1" * 64))
    meta = CheckpointMeta(steps_done=2, tokens_seen=64.0, plan_sha256="0" * 64, world_size=2, saved_unix_s=0.0,
                          path="RUN/checkpoints/step2")
    with pytest.raises(CheckpointError, match=r"^RUN/checkpoints/step2: plan_sha256=000000000000\.\.\. is not"):
        load_checkpoint(rt, meta)
    assert latest_checkpoint(tmp_path) is None
    write_atomic(checkpoints_dir(tmp_path) / "latest", "step7\n")
    with pytest.raises(CheckpointError, match="names 'step7' whose moeplan.json cannot be read"):
        latest_checkpoint(tmp_path)
