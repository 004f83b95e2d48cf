"""Timing one call: the median of repeated calls after warm-up (CUDA events with the L2 flushed on a GPU, wall
clock on a CPU), stopped by a count or a time, whichever comes first. Shared by ``moeplan calibrate`` and the
benchmarks in ``benchmarks/``.

The first call runs untimed (it may compile a Triton kernel or pick a cuBLAS algorithm); the other warm-up calls
are each timed alone (synchronised), and stop once they took ``max_s`` together; the last one's seconds size the
timed loop: ``reps`` calls, fewer when ``reps`` of them would take longer than ``max_s``, never fewer than
``MIN_REPS`` (or ``reps`` where that is smaller). So a timed loop costs at most the first call, about ``max_s`` of
warm-up and ``max_s`` of timed calls (``MIN_REPS`` calls where one call alone is longer).

On a GPU the call then runs back to back for ``settle_s`` (``SETTLE_S``) before it is timed, so that the clocks
settle where the call's own power holds them, as a training step's do: a launched step held an H100 at its 700 W
limit, SM clock 1.6-1.75 GHz against 1.98 GHz, and its SDPA and MLA's query/key assembly ran 11-15% and 16-90%
slower than calibrate's short loops had timed them on a GPU left cool between measurements (docs/results/one-gpu.md,
2026-12-06). Until 2026-12-07 there was no such settling.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

FLUSH_BYTES = 256 * 2**20  # above the H200's 50 MiB L2
WARMUP = 5  # calls before timing, the first untimed
MIN_REPS = 3  # the fewest timed calls a median is taken of (unless fewer were asked for)
MAX_S = 1.0  # seconds of warm-up, and again of timed calls, after which a loop takes no more calls
SETTLE_S = 0.5  # on a GPU, seconds of back-to-back calls before the timed ones (module docstring)
SETTLE_MAX_CALLS = 5000  # at most, so that a call of microseconds is not launched for the whole time


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(fn, device: torch.device, warmup: int, max_s: float) -> float:
    """Seconds of the last warm-up call (wall clock, synchronised), after the untimed first one."""
    fn()
    _sync(device)
    last, spent = 0.0, 0.0
    for _ in range(warmup - 1):
        start = time.perf_counter()
        fn()
        _sync(device)
        last = time.perf_counter() - start
        spent += last
        if spent >= max_s:
            break
    return last


def _settle(fn, device: torch.device, call_s: float, settle_s: float) -> int:
    """``fn`` back to back for about ``settle_s`` seconds (its last warm-up call took ``call_s``), synchronised
    once at the end; the number of calls made."""
    if settle_s <= 0:
        return 0
    calls = min(SETTLE_MAX_CALLS, max(1, math.ceil(settle_s / call_s))) if call_s > 0 else SETTLE_MAX_CALLS
    for _ in range(calls):
        fn()
    _sync(device)
    return calls


def timed_calls(reps: int, call_s: float, max_s: float = MAX_S) -> int:
    """How many calls of ``call_s`` seconds a timed loop makes: ``reps``, cut to fit ``max_s``, at least ``MIN_REPS``."""
    fit = math.floor(max_s / call_s) if call_s > 0 else reps
    return max(1, min(reps, max(MIN_REPS, fit)))


def median_s(fn, device: torch.device, reps: int, warmup: int = WARMUP, max_s: float = MAX_S,
             settle_s: float | None = None) -> float:
    """Median seconds of ``fn()``: CUDA events around each call, the L2 flushed before it; else wall clock. At
    most ``reps`` calls after warm-up, fewer past ``max_s``; before them, on a GPU, ``settle_s`` (default
    ``SETTLE_S``; a CPU 0) seconds of calls back to back (see module docstring)."""
    call_s = _warm_up(fn, device, max(1, warmup), max_s)
    n = timed_calls(reps, call_s, max_s)
    _settle(fn, device, call_s, (SETTLE_S if device.type == "cuda" else 0.0) if settle_s is None else settle_s)
    if device.type != "cuda":
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    # A read, not a write, evicts the L2: written lines would be written back during the timed kernel.
    flush = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    torch.cuda.synchronize()
    for start, end in events:
        flush.max()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e-3 for s, e in events)
