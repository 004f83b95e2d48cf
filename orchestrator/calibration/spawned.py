"""Processes that ``moeplan calibrate`` spawns (the ranks' passes, the links, the all-reduce pair beside a GEMM).

``start_all(procs)`` starts each with SIGTERM and Ctrl-C held until the last has its arguments. A spawned
process reads its pickled target from a pipe the parent writes right after starting it; a signal raised
between the two closed that pipe early, and the child died with ``EOFError`` and a traceback on the
command's stderr (seen in CI, 2026-12-07: ``calibrate`` signalled while its link processes started). Held,
the signal is raised once every child can run, where the caller's cleanup stops them.

``running(procs, join_s)`` starts them (``start_all``), kills every one at once if the block raises (a signal, or
one of them gone: the others would wait in a collective or at a barrier for ever), and joins them after.

``gather(procs, queue, count)`` takes ``count`` results from ``queue``, raising as soon as one of ``procs``
has exited with an error instead of waiting forever for what it will never put.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.process import BaseProcess
from typing import Any

from moeplan.orchestrator.errors import DeferredSignals

POLL_S = 0.05


def start_all(procs: Sequence[BaseProcess]) -> None:
    """Start every process; a SIGTERM or SIGINT meanwhile is raised (``Terminated``/``KeyboardInterrupt``) after."""
    with DeferredSignals():
        for proc in procs:
            proc.start()


def failed(procs: Sequence[BaseProcess]) -> list[tuple[str, int]]:
    """(name, exit code) of each process that has exited with an error."""
    return [(p.name, p.exitcode) for p in procs if p.exitcode not in (None, 0)]


def gather(procs: Sequence[BaseProcess], queue: Any, count: int, what: str) -> list:
    """``count`` items from ``queue`` (a ``SimpleQueue``), in the order they came."""
    got: list = []
    while len(got) < count:
        if not queue.empty():
            got.append(queue.get())
        elif dead := failed(procs):
            raise RuntimeError(f"{what}: processes {dead} exited before reporting")
        else:
            time.sleep(POLL_S)
    return got


def stop_all(procs: Sequence[BaseProcess], join_s: float) -> None:
    """Join each started process for up to ``join_s`` seconds; kill those still running."""
    for proc in procs:
        if proc.pid is None:
            continue
        proc.join(timeout=join_s)
        if proc.is_alive():
            proc.kill()
            proc.join()


@contextmanager
def running(procs: Sequence[BaseProcess], join_s: float) -> Iterator[None]:
    """``procs`` started for the block; killed now if it raises, else joined (``stop_all``) after it."""
    try:
        start_all(procs)  # inside: a signal while the later ones start stops the earlier ones too
        yield
    except BaseException:
        for proc in procs:
            if proc.pid is not None:
                proc.kill()
        raise
    finally:
        stop_all(procs, join_s)
