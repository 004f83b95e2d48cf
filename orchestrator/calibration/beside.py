"""Compute beside communication, for ``moeplan calibrate``: one GEMM timed alone and while a communication
kernel runs on the same device (issue 21, capability 7). The simulator's ``costs.beside_comm`` takes the
slowdown beyond wave quantisation from these points; without them it prices none.

- GPU: a copy kernel (Triton, one block per SM it holds, ``comm_sms`` blocks looping over a 256 MiB buffer:
  HBM traffic like a dispatch's) is launched on a side stream, then the GEMM (``torch.mm`` in the plan's
  dtype) is timed on the main stream while the copy runs (CUDA events, L2 flushed, only the main stream
  synchronised); the copy's passes are sized to outlast the timed calls (a copy that ended first fails the
  measurement), and the GEMM alone is timed the same way before it. The block scheduler places one block per SM
  while SMs are free, so the copy holds ``comm_sms`` SMs as DeepEP's kernels hold theirs.
- CPU: the matmul (``threads`` torch threads) alone, then beside a gloo all-reduce looping between two
  spawned processes of one thread each (the communication of a local run: ``comm_sms`` = their 2 cores),
  then alone again; alone is the mean of the two. Each all-reduce carries the stop flag, so both
  processes leave after the same call.

``measure_beside`` returns a ``simulator.costs.beside_comm.BesidePoint`` as a dict; a failure raises, and the
caller (``measure.measure_all``) records it as skipped.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeplan.orchestrator.calibration.links import free_port
from moeplan.orchestrator.calibration.spawned import failed, running
from moeplan.orchestrator.calibration.timing import FLUSH_BYTES, median_s

CPU_COMM_PROCESSES = 2  # the all-reduce pair on a CPU
CPU_COMM_BYTES = 4 * 2**20  # its buffer: large enough to be bandwidth-bound, small enough to loop fast
GPU_COPY_BYTES = 256 * 2**20  # the copy kernel's buffer: above the H100/H200 L2 (50 MiB), so it streams HBM
START_TIMEOUT_S = 60.0  # the pair of processes must be looping by then


def measure_beside(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, reps: int,
                   comm_sms: int, threads: int = 1, label: str = "") -> dict:
    """One ``BesidePoint`` (as a dict) for an (m x k) @ (k x n) GEMM; ``comm_sms`` is the SMs the copy kernel
    holds on a GPU (ignored on a CPU, where the all-reduce pair holds ``CPU_COMM_PROCESSES`` cores)."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)

    def gemm() -> None:
        torch.mm(a, b)

    if device.type == "cuda":
        alone_s, beside_s = _gpu_times(gemm, device, reps, comm_sms)
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        what = f"copy kernel on {comm_sms} SMs ({GPU_COPY_BYTES // 2**20} MiB buffer)"
    else:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:  # alone before and after: a shared machine's drift shows as their difference
            first = median_s(gemm, device, reps)
            beside_s = _cpu_beside_s(gemm, reps)
            last = median_s(gemm, device, reps)
        finally:
            torch.set_num_threads(before)
        alone_s = (first + last) / 2
        sm_count, comm_sms = os.cpu_count() or 1, CPU_COMM_PROCESSES
        what = (f"gloo all-reduce of {CPU_COMM_BYTES // 2**20} MiB looping between {CPU_COMM_PROCESSES} processes "
                f"(alone before {first * 1e6:.1f} us, after {last * 1e6:.1f} us)")
    return {"m": m, "n": n, "k": k, "sm_count": sm_count, "comm_sms": comm_sms, "alone_s": alone_s,
            "beside_s": beside_s, "source": f"{label} {str(dtype).removeprefix('torch.')} mm {m}x{n}x{k}, "
                                            f"{threads} thread(s): alone {alone_s * 1e6:.1f} us, beside a {what} "
                                            f"{beside_s * 1e6:.1f} us (medians of {reps})".strip()}


# -- CPU: a gloo all-reduce pair --------------------------------------------------------------------------
def _comm_worker(rank: int, port: int, stop, started, parent: int) -> None:
    """One of the pair: all-reduces until the parent sets ``stop`` or dies (a killed ``calibrate`` leaves no
    process behind: daemonic children are only terminated by a parent that exits normally)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=CPU_COMM_PROCESSES)
    buf = torch.zeros(CPU_COMM_BYTES // 4)
    dist.barrier()
    if rank == 0:
        started.put(True)
    while True:
        # the flag rides in the buffer: both see it at once
        buf[0] = 1.0 if (rank == 0 and stop.is_set()) or os.getppid() != parent else 0.0
        dist.all_reduce(buf)
        if buf[0] > 0:
            break
    dist.destroy_process_group()


def _cpu_beside_s(gemm, reps: int) -> float:
    """Median seconds of ``gemm`` while the all-reduce pair loops; the pair is stopped (or killed) after."""
    ctx = mp.get_context("spawn")
    stop, started = ctx.Event(), ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_comm_worker, args=(r, port, stop, started, os.getpid()), daemon=True)
             for r in range(CPU_COMM_PROCESSES)]
    with running(procs, 10.0):
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while started.empty():
                if time.monotonic() > deadline or failed(procs):
                    raise RuntimeError(f"the gloo all-reduce pair did not start within {START_TIMEOUT_S:.0f} s")
                time.sleep(0.01)
            started.get()
            return median_s(gemm, torch.device("cpu"), reps)
        finally:
            stop.set()  # before the join: each leaves after the all-reduce that carries it


# -- GPU: a copy kernel holding comm_sms SMs -------------------------------------------------------------
def _stream_median_s(fn, flush: torch.Tensor, reps: int, warmup: int = 5) -> float:
    """``timing.median_s`` without its device-wide synchronisations (they would wait for the side stream's
    copy): CUDA events on the current stream, ``flush`` read before each call to evict the L2, then that
    stream alone synced. Nothing is allocated here (an allocation may synchronise the device)."""
    stream = torch.cuda.current_stream(flush.device)
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.max()
        start.record(stream)
        fn()
        end.record(stream)
    stream.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e-3 for s, e in events)


def _gpu_times(gemm, device: torch.device, reps: int, comm_sms: int) -> tuple[float, float]:
    """(alone, beside) medians of ``gemm``, CUDA events on the main stream, the copy on a side stream."""
    from moeplan.kernels.copy_loop import copy_loop  # Triton: imported on a GPU only

    flush = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    alone_s = _stream_median_s(gemm, flush, reps)
    src = torch.ones(GPU_COPY_BYTES // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):  # one pass, timed, to size the looping copy
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        copy_loop(src, dst, comm_sms, passes=1)
        start.record(side)
        copy_loop(src, dst, comm_sms, passes=1)
        end.record(side)
    torch.cuda.synchronize(device)
    pass_s = start.elapsed_time(end) * 1e-3
    # the timed calls, their warm-up and L2 flushes: ask for 4x the GEMM's time alone, plus a second
    passes = max(1, math.ceil((4 * (reps + 5) * alone_s + 1.0) / pass_s))
    with torch.cuda.stream(side):
        copy_loop(src, dst, comm_sms, passes=passes)
    beside_s = _stream_median_s(gemm, flush, reps)
    still_copying = not side.query()
    torch.cuda.synchronize(device)
    if not still_copying:
        raise RuntimeError(f"the copy kernel ({passes} passes of {pass_s * 1e3:.2f} ms) ended before the GEMM's "
                           "timed calls did: its time would mix alone and beside")
    return alone_s, beside_s
