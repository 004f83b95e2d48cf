"""Collectives between local processes, for ``moeplan calibrate`` and benchmarks/cpu_tables.py: latency and bandwidth.

``measure_links(processes, sizes, reps)`` starts ``processes`` processes (``torch.multiprocessing``, gloo
over 127.0.0.1 on a free port, ``threads`` torch threads each: 1, as the runtime's ranks run; or NCCL with
one GPU each, ``backend="nccl"``) and times, per
buffer size: point-to-point send/recv (a ping-pong between ranks 2i and 2i+1, all pairs at once, each
message one ``batch_isend_irecv`` as the runtime posts them; half the round trip), ``all_to_all_single``
(even splits), ``all_reduce``, ``reduce_scatter_tensor`` and ``all_gather_into_tensor`` (``size`` = the
full buffer). A run is ``inner(size)`` calls back to back after a barrier (so small sizes are not one
timer tick and a barrier's skew is spread), its time divided by them; a process keeps the median of
``reps`` runs after ``warmup``; the collective's time is the slowest process's median. ``fit`` turns a
collective's points into ``latency_s + bytes / bytes_per_s`` by least squares on relative error (bytes as
``simulator.costs.machine.bytes_moved`` counts them), so the smallest sizes set the latency.

Where gloo's send/recv is timed, also the batch as the runtime posts it (``model.runtime.executor``'s ``_post``: a
receive buffer made, one ``batch_isend_irecv``, each request waited for), which holds the host on a CPU
(``POSTED_BATCHES``): one send whose receiver already waits, one receive whose message is already there, one of
each; timed by the even rank of each pair after ``SPIN_S`` busy (the runtime posts right after a pass, its core
busy, its neighbour's operations posted by then), the odd rank posting the other ends at once. The ping-pong's
half round trip is the message's time on the wire; on a 2-core VM the runtime's batches took 0.15-0.4 ms
against 0.1 (tiny-moe, 2026-12-06).

Where gloo's all-reduce is timed, also ``all_reduce_once``: one call after ``SPIN_S`` busy on every process, as a
CPU step's optimizer norm calls it (the sums of the embedding's two copies, the squared norm), the mean of at least
``ONCE_REPS``: back to back a call's wake-ups are shared with its neighbours' (2 processes, 2026-12-06 18:14: 128 KiB
0.71 ms back to back against 1.36 once, median; the FP64 norm 0.18 against 0.27, mean 0.66).
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeplan.orchestrator.calibration.spawned import gather, running
from moeplan.simulator.costs.machine import POSTED_BATCHES, Collective, LinkFit, LinkPoint, bytes_moved

COLLECTIVES: tuple[Collective, ...] = ("send_recv", "all_to_all", "all_reduce", "reduce_scatter", "all_gather")
SPIN_S = 1e-3  # the timing rank's busy wait before a posted batch (see module docstring)
POSTED_REPS = 15  # at least, a posted batch: each takes ~SPIN_S
ONCE_REPS = 100  # at least, an all-reduce called once: its times have two modes, the mean needs the samples
JOIN_S = 30.0  # for the processes to leave after rank 0 has reported (a barrier and destroy_process_group)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes() -> int:
    """This process's resident memory (VmRSS), 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return 0


def inner(size: int) -> int:
    """Calls per timed run: up to 16 for small buffers, one from 256 KiB."""
    return max(1, min(16, 2**18 // size))


def _op(collective: Collective, rank: int, world: int, numel: int, device: torch.device):
    """A thunk running ``collective`` once on fresh fp32 buffers of ``numel`` elements (the full buffer)."""
    numel -= numel % world  # the ring collectives split the buffer evenly
    full, out = torch.ones(numel, device=device), torch.empty(numel, device=device)
    part = torch.ones(numel // world, device=device)
    peer = rank ^ 1

    def post(op, tensor: torch.Tensor) -> None:
        for work in dist.batch_isend_irecv([dist.P2POp(op, tensor, peer)]):
            work.wait()

    def send_recv() -> None:
        if peer >= world:
            return
        if rank % 2 == 0:
            post(dist.isend, full)
            post(dist.irecv, out)
        else:
            post(dist.irecv, out)
            post(dist.isend, full)

    return {
        "send_recv": send_recv,
        "all_to_all": lambda: dist.all_to_all_single(out, full),
        "all_reduce": lambda: dist.all_reduce(full),
        "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full),
        "all_gather": lambda: dist.all_gather_into_tensor(out, part),
    }[collective]


def _worker(rank: int, world: int, port: int, sizes: list[int], reps: int, warmup: int, threads: int, queue,
            backend: str = "gloo", collectives: tuple[Collective, ...] = COLLECTIVES) -> None:
    mp._prctl_pr_set_pdeathsig(signal.SIGKILL)  # gone with the command, even a killed one (as torch's spawn does)
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    # torch 2.13 renames the tensor collectives (``*_single``); 2.11 has only these names
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rss = rss_bytes()
    rows = []
    for collective in collectives:
        for size in sizes:
            fn = _op(collective, rank, world, max(world, size // 4), device)
            times, calls = [], inner(size)
            for i in range(warmup + reps):
                dist.barrier()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = (time.perf_counter() - start) / calls
                if i >= warmup:
                    times.append(elapsed / 2 if collective == "send_recv" else elapsed)
            rows.append((collective, size, statistics.median(times)))
    if backend == "gloo" and "send_recv" in collectives and world % 2 == 0:
        rows += _posted(rank, sizes, max(reps, POSTED_REPS), warmup)
    if backend == "gloo" and "all_reduce" in collectives:
        rows += _once(rank, world, sizes, max(reps, ONCE_REPS), warmup)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        slowest = [(c, s, max(g[i][2] for g in gathered)) for i, (c, s, _) in enumerate(rows)]
        queue.put({"rows": slowest, "rss_bytes": rss})
    dist.barrier()
    dist.destroy_process_group()


def _once(rank: int, world: int, sizes: list[int], reps: int, warmup: int) -> list[tuple[str, int, float]]:
    """``all_reduce_once``: per size, an all-reduce called once after ``SPIN_S`` busy on every process, as a CPU
    step's optimizer norm calls it (see module docstring); each process's mean (the times have two modes: a median
    flips between them from one calibration to the next)."""
    rows = []
    for size in sizes:
        buffer = torch.ones(max(world, size // 4))
        times = []
        for i in range(warmup + reps):
            dist.barrier()
            spun = time.perf_counter() + SPIN_S
            while time.perf_counter() < spun:
                pass
            start = time.perf_counter()
            dist.all_reduce(buffer)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        rows.append(("all_reduce_once", size, statistics.mean(times)))
    return rows


def _posted(rank: int, sizes: list[int], reps: int, warmup: int) -> list[tuple[str, int, float]]:
    """The runtime's point-to-point batches (``POSTED_BATCHES``, see module docstring): per size, the even rank's
    median seconds; the odd rank's rows are 0 (the gathered rows keep each row's slowest process)."""
    peer, timer, rows = rank ^ 1, rank % 2 == 0, []
    kinds = {"post_send": (("send",), ("recv",)), "post_recv": (("recv",), ("send",)),
             "post_both": (("send", "recv"), ("send", "recv"))}
    for size in sizes:
        numel = max(1, size // 4)
        out = torch.ones(numel)

        def post(ops: tuple[str, ...], numel: int = numel, out: torch.Tensor = out) -> None:
            p2p = [dist.P2POp(dist.isend, out.contiguous(), peer) if op == "send" else
                   dist.P2POp(dist.irecv, torch.empty(numel), peer) for op in ops]
            for request in dist.batch_isend_irecv(p2p):
                request.wait()

        for kind, (mine, theirs) in kinds.items():
            assert kind in POSTED_BATCHES, kind
            times = []
            for i in range(warmup + reps):
                dist.barrier()
                if not timer:
                    post(theirs)
                    continue
                spun = time.perf_counter() + SPIN_S
                while time.perf_counter() < spun:
                    pass
                start = time.perf_counter()
                post(mine)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            rows.append((kind, size, statistics.median(times) if timer else 0.0))
    return rows


def measure_links(processes: int, sizes: list[int], reps: int, threads: int = 1, warmup: int = 3,
                  backend: str = "gloo", collectives: tuple[Collective, ...] = COLLECTIVES) -> dict:
    """{"rows": [(collective, buffer bytes, seconds)], "rss_bytes": rank 0's resident memory after joining}."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.SimpleQueue(), free_port()
    procs = [ctx.Process(target=_worker, name=f"moeplan-links-{r}", daemon=True,
                         args=(r, processes, port, sizes, reps, warmup, threads, queue, backend, collectives))
             for r in range(processes)]
    with running(procs, JOIN_S):
        (result,) = gather(procs, queue, 1, f"the links over {processes} processes")
    return result


def fit(collective: Collective, processes: int, points: list[tuple[int, float]]) -> tuple[float, float]:
    """(latency_s, bytes_per_s) of ``t = latency + bytes_moved / bw`` by least squares over ``points``
    (buffer bytes, seconds); latency at least 0 (else the smallest time, bandwidth from the largest point)."""
    x = np.array([bytes_moved(collective, b, processes) for b, _ in points])
    t = np.array([s for _, s in points])
    slope, intercept = np.polyfit(x, t, 1, w=1 / t) if len(points) > 1 else (0.0, t[0])
    if slope <= 0 or intercept < 0:
        intercept = float(t.min())
        slope = max((t[-1] - intercept) / x[-1], 1e-18) if len(points) > 1 else 1e-18
    return float(intercept), float(1.0 / slope)


def link_fits(links: dict[int, dict], src: str, backend: str = "gloo") -> list[LinkFit]:
    """One ``LinkFit`` per collective measured at each process count (``measure_links``'s results by count)."""
    fits = []
    for processes, data in links.items():
        for collective in (*COLLECTIVES, *POSTED_BATCHES, "all_reduce_once"):
            pts = [(b, s) for c, b, s in data["rows"] if c == collective]
            if not pts:
                continue
            latency, bw = fit(collective, processes, pts)
            fits.append(LinkFit(collective=collective, processes=processes, latency_s=latency,
                                bytes_per_s=min(bw, 1e18),
                                points=tuple(LinkPoint(buffer_bytes=b, s=s) for b, s in pts),
                                source=f"{src} {backend} {collective}, {processes} processes, least-squares fit"))
    return fits
