"""Timing one call: the median of repeated calls after warm-up (CUDA events with the L2 flushed on a GPU, wall
clock on a CPU), stopped by a count or a time, whichever comes first. Shared by ``moeplan calibrate`` and the
benchmarks in ``benchmarks/``.

The first call runs untimed (it may compile a Triton kernel or pick a cuBLAS algorithm); the other warm-up calls
are each timed alone (synchronised), and stop once they took ``max_s`` together; the last one's seconds size the
timed loop: ``reps`` calls, fewer when ``reps`` of them would take longer than ``max_s``, never fewer than
``MIN_REPS`` (or ``reps`` where that is smaller). So a timed loop costs at most the first call, about ``max_s`` of
warm-up and ``max_s`` of timed calls (``MIN_REPS`` calls where one call alone is longer).
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


def timed_calls(reps: int, call_s: float, max_s: float = MAX_S) -> int:
    """How many calls of ``call_s`` seconds a timed loop makes: ``reps``, cut to fit ``max_s``, at least ``MIN_REPS``."""
    fit = math.floor(max_s / call_s) if call_s > 0 else reps
    return max(1, min(reps, max(MIN_REPS, fit)))


def median_s(fn, device: torch.device, reps: int, warmup: int = WARMUP, max_s: float = MAX_S) -> float:
    """Median seconds of ``fn()``: CUDA events around each call, the L2 flushed before it; else wall clock. At
    most ``reps`` calls after warm-up, fewer past ``max_s`` (see module docstring)."""
    n = timed_calls(reps, _warm_up(fn, device, max(1, warmup), max_s), max_s)
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
