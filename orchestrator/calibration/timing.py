"""Timing one call: the median of repeated calls after warm-up (CUDA events with the L2 flushed on a GPU, wall
clock on a CPU). Shared by ``moeplan calibrate`` and the benchmarks in ``benchmarks/``."""

from __future__ import annotations

import statistics
import time

import torch

FLUSH_BYTES = 256 * 2**20  # above the H200's 50 MiB L2


def median_s(fn, device: torch.device, reps: int, warmup: int = 5) -> float:
    """Median seconds of ``fn()``: CUDA events around each call, the L2 flushed before it; else wall clock."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    # A read, not a write, evicts the L2: written lines would be written back during the timed kernel.
    flush = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda.synchronize()
    for start, end in events:
        flush.max()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e-3 for s, e in events)
