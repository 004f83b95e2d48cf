"""``orchestrator.calibration.spawned``: a signal while calibrate's processes start is raised only after the last
has started (a child cut off before its arguments dies with a traceback on the command's stderr), and a process
that exits with an error stops ``gather`` instead of leaving it waiting."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest

from moeplan.orchestrator.calibration.spawned import gather, start_all, stop_all
from moeplan.orchestrator.errors import Terminated, _terminate_by_exception


class _Signalling:
    """A process whose start is interrupted by ``signum`` half way (after the fork, before the arguments)."""

    def __init__(self, signum: int | None, log: list) -> None:
        self.signum, self.log = signum, log

    def start(self) -> None:
        if self.signum is not None:
            os.kill(os.getpid(), self.signum)
        self.log.append("started whole")


@pytest.mark.parametrize(("signum", "raised"), [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)],
                         ids=["sigterm", "ctrl-c"])
def test_a_signal_during_start_all_is_raised_after_every_process_started(signum, raised):
    log: list = []
    with pytest.raises(raised), _terminate_by_exception():
        start_all([_Signalling(signum, log), _Signalling(None, log), _Signalling(None, log)])
    assert log == ["started whole"] * 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back


def test_gather_raises_when_a_process_exits_with_an_error_before_reporting():
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=os._exit, args=(3,), name="moeplan-test-3")]
    start_all(procs)
    with pytest.raises(RuntimeError, match=r"the test: processes \[\('moeplan-test-3', 3\)\] exited before reporting"):
        gather(procs, queue, 1, "the test")
    stop_all(procs, 5.0)
    assert not procs[0].is_alive()


def test_gather_takes_what_the_processes_put():
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=queue.put, args=(r,)) for r in range(2)]
    start_all(procs)
    assert sorted(gather(procs, queue, 2, "the test")) == [0, 1]
    stop_all(procs, 5.0)
