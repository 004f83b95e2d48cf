"""A full disk while a checkpoint is written (issue 23, item 5): an ``OSError(ENOSPC)`` injected where DCP writes
the shards (half the bytes first, as a disk filling up does), where the meta file is written and where
``latest`` is rewritten. The run must stop with one ``OSError`` line naming the checkpoint and the disk's
complaint, ``latest`` must still name the previous checkpoint, and that checkpoint must be whole: a run resumed
from it follows the uninterrupted run's losses exactly.

One process, a gloo group of one (a ``HashStore``): the tiny model at pp 1, a few milliseconds a step.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.distributed.checkpoint import filesystem

from moeplan.model.runtime import checkpoint
from moeplan.model.runtime.checkpoint import checkpoints_dir, latest_checkpoint
from moeplan.model.runtime.worker import Resume, RunConfig, train
from moeplan.simulator.contracts.run_report import read_metrics
from moeplan.simulator.spec.hyperparams import LrSchedule
from moeplan.simulator.spec.training import OptimizerSpec
from tests.model.runtime.harness import tiny_plan

STEPS = 4
OPTIMIZER = OptimizerSpec(moment_bytes=4, lr=LrSchedule(peak_lr=3e-3, warmup_steps=2), grad_clip_norm=0.5)


def _full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def plan():
    return tiny_plan("1f1b", pp=1, optimizer=OPTIMIZER)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class _FillingUp:
    """A stream that takes half of what it is given, then raises ENOSPC."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data):
        self.stream.write(bytes(data)[: len(data) // 2])
        self.stream.flush()
        raise _full()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _fill_up_at(monkeypatch, where: str, checkpoint_name: str) -> None:
    """From the checkpoint ``checkpoint_name`` on, ``where`` runs out of space."""
    if where == "shards":
        real = filesystem.FileSystem.create_stream.__wrapped__  # the generator under @contextmanager

        def create_stream(self, path, mode):
            stream = real(self, path, mode)
            opened = next(stream)
            yield _FillingUp(opened) if checkpoint_name in str(path) and "w" in mode else opened
            next(stream, None)
        monkeypatch.setattr(filesystem.FileSystem, "create_stream",
                            filesystem.contextmanager(create_stream))
        return
    name = {"meta": checkpoint.META_NAME, "latest": checkpoint.LATEST_NAME}[where]
    real_write = checkpoint.write_atomic

    def write_atomic(path, text):
        is_ours = Path(path).name == name and (where == "latest" and text.startswith(checkpoint_name)
                                               or checkpoint_name in Path(path).parent.name)
        if is_ours:
            raise _full()
        real_write(path, text)
    monkeypatch.setattr(checkpoint, "write_atomic", write_atomic)


@pytest.mark.parametrize("where", ["shards", "meta", "latest"])
def test_a_full_disk_keeps_the_previous_checkpoint_whole(group, plan, tmp_path, monkeypatch, where):
    whole, run = tmp_path / "whole", tmp_path / "run"
    train(plan, whole, RunConfig(steps=STEPS, dtype="fp32"), 0)
    train(plan, run, RunConfig(steps=2, dtype="fp32", checkpoint_every=2), 0)
    assert latest_checkpoint(run).steps_done == 2
    step2 = _files(checkpoints_dir(run) / "step2")
    with monkeypatch.context() as patch:
        _fill_up_at(patch, where, "step3")
        with pytest.raises(OSError) as failed:
            train(plan, run, RunConfig(steps=STEPS, dtype="fp32", checkpoint_every=1, resume=Resume("test")), 0)
    line = str(failed.value)
    assert failed.value.errno == errno.ENOSPC and "\n" not in line, line
    assert "step3" in line and "No space left on device" in line and "latest still names step2" in line, line
    assert latest_checkpoint(run).steps_done == 2
    assert _files(checkpoints_dir(run) / "step2") == step2
    train(plan, run, RunConfig(steps=STEPS, dtype="fp32", resume=Resume("after the disk was freed")), 0)
    assert [m.loss for m in read_metrics(run)] == [m.loss for m in read_metrics(whole)]
    assert not list(checkpoints_dir(run).glob("*.tmp")), "the half-written checkpoint is cleared at the next start"
