"""The overlapped F&B on one GPU with loopback expert parallelism: step time and hidden communication.

    python -P benchmarks/overlap_bench.py --shape v3 --pairs 8 --out docs/results/overlap.md   # CUDA
    python -P benchmarks/overlap_bench.py --device cpu --small --pairs 3 --out /tmp/o.md       # smoke run (CPU)

One stage holds a dense layer and MoE layers whose all-to-alls are loopback copies on the communication
stream (``model.runtime.loopback``). By default each is run as a link's kernel runs it: ``--repeat`` passes of
``kernels.copy_loop`` on ``--copy-sms`` SMs (4 passes on 8 SMs: ~50 GB/s an all-to-all on an H100, DeepSeek-V3's
cross-node rate; docs/results/overlap.md), holding a few SMs and moving the bytes through HBM once a pass.
``--copy-sms 0``: torch's copy on every free SM, repeated ``--repeat`` times, which takes ``--repeat`` times the
bytes of HBM traffic from the compute beside it. A chain runs the
forward of micro-batch 0, then ``--pairs`` F&B pairs back to back (pair k: backward of micro-batch k beside
the forward of k + 1; no host sync between pairs, as in DualPipe's steady state), then the last backward
(``loopback.run_pairs``). The window is the pairs alone: from the end of micro-batch 0's forward to the end
of the last pair on the GPU, between two CUDA events on the compute stream (every all-to-all of a pair is
waited for by a compute node of the pair), no host sync inside. Per pair = window / pairs, median of
``--steps`` chains after ``--warmup``:
- ``T_ovl``: the pairs interleaved (``overlap.interleave``), copies repeated;
- ``T_seq``: each pair F then B, copies repeated;
- ``T_one``: each pair F then B, one copy (the communication almost free).
Wall-time metrics: hidden (A/B) = (T_seq - T_ovl) / (T_seq - T_one), the share of the copies' wall-time
cost the interleaving wins back, and the gain (T_seq - T_ovl) / T_seq. One more interleaved and one F-then-B
chain run under ``torch.profiler`` (CUDA activity, the whole chain) with a marker kernel at each end of the
window (``loopback.mark_window``): hidden fraction = |comm ∩ compute| / |comm| over the GPU activity inside
the window (``loopback.hidden_fraction``), i.e. how much of the copies' GPU time ran while a compute kernel
ran, whether or not that compute was slowed by them. On CPU the copies are synchronous and there is no
kernel trace: the times only show that the script runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moeplan.kernels.copy_loop import copy_loop
from moeplan.model.runtime.executor import Timeline
from moeplan.model.runtime.loopback import (
    exposure,
    hidden_fraction,
    loopback_spec,
    loopback_stage,
    mark_window,
    pairs_window,
    run_pairs,
)
from moeplan.model.runtime.overlap_comm import LoopbackComm, Streams
from moeplan.orchestrator.calibration.timing import median_s
from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.presets.models import deepseek_v3, tiny_moe


class _Window:
    """The steady state's two ends: CUDA events on the current (compute) stream, no host sync; on CPU, where
    every copy is synchronous, the host's clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self) -> None:
        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> float:
        """The window's length; on CUDA after a synchronize."""
        start, end = self.marks
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start


def time_pairs(model, ids, device, comm: LoopbackComm, overlap: bool, pairs: int, steps: int, warmup: int) -> float:
    """Median seconds per pair over the window of ``pairs`` consecutive pairs, ``steps`` chains after ``warmup``."""
    times = []
    for i in range(warmup + steps):
        window = _Window(device)
        run_pairs(model, ids, comm, Streams(device), Timeline(0, cuda=device.type == "cuda"),
                  overlap, pairs, window.mark, window.mark)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(window.seconds() / pairs)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def profile_pairs(model, ids, device, comm: LoopbackComm, overlap: bool, pairs: int,
                  keep: Path | None = None) -> tuple[float, float, float, dict]:
    """(hidden fraction, comm us, compute us, ``exposure``) inside the window of one chain under
    ``torch.profiler`` (NaN on CPU); the chain's whole Chrome trace copied to ``keep`` when given."""
    if device.type != "cuda":
        return float("nan"), 0.0, 0.0, exposure({})
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run_pairs(model, ids, comm, Streams(device), Timeline(0, cuda=True), overlap, pairs, mark_window, mark_window)
        torch.cuda.synchronize(device)
    model.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        if keep is not None:
            keep.write_bytes(path.read_bytes())
        trace = json.loads(path.read_text())
    window = pairs_window(trace)
    return (*hidden_fraction(trace, window), exposure(trace, window))


def copy_rate(spec, seq: int, device, sms: int, reps: int = 20) -> float:
    """Bytes moved a second by one ``copy_loop`` pass on ``sms`` SMs, alone (``calibration.timing.median_s``), over
    one dispatch's BF16 rows (tokens x top-k x hidden): the loopback link's rate is this over --repeat."""
    numel = seq * spec.num_experts_per_tok * spec.hidden_size // 2  # bf16 rows as fp32 words
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    return 4 * numel / median_s(lambda: copy_loop(src, dst, sms), device, reps)  # each byte read once, written once


def render(args, spec, seq: int, dtype, name: str, times: dict, fracs: dict, rate: float = float("nan")) -> str:
    """The results page: the command, the table per pair, both kinds of hidden fraction and the wall-time gain."""
    t_ovl, t_seq, t_one = times["ovl"], times["seq"], times["one"]
    ab = (t_seq - t_ovl) / (t_seq - t_one) if t_seq > t_one else float("nan")
    frac_ovl, frac_seq = fracs["ovl"], fracs["seq"]
    exp = frac_ovl[3]
    pairs = args.pairs
    sms = f" --copy-sms {args.copy_sms or 0}"
    command = (f"benchmarks/overlap_bench.py{' --small' if args.small else ''} --shape {args.shape} --device "
               f"{args.device} --repeat {args.repeat}{sms} --pairs {pairs} --steps {args.steps} --warmup {args.warmup}")
    if args.copy_sms:
        copies = (f"{args.repeat} passes of `kernels.copy_loop` on {args.copy_sms} SMs per all-to-all ("
                  f"{rate / 1e9:,.0f} GB/s a pass alone, {rate / args.repeat / 1e9:,.0f} GB/s the all-to-all)")
        short = f"{args.repeat} passes on {args.copy_sms} SMs"
    else:
        copies = f"{args.repeat} copies per all-to-all (torch's copy, every free SM)"
        short = f"{args.repeat} copies"
    return "\n".join([
        "# Overlapped F&B on one device, loopback expert parallelism",
        "",
        (f"`{command}` on {name}, torch {torch.__version__}, {datetime.date.today()}: model `{spec.name}` "
         f"d={spec.hidden_size}, {spec.num_hidden_layers} layers ({spec.first_k_dense_replace} dense), "
         f"{spec.n_routed_experts} experts top-{spec.num_experts_per_tok}, {seq} tokens per micro-batch, {dtype}."),
        "",
        (f"Window: {pairs} consecutive F&B pair{'s' if pairs > 1 else ''} (pair k: backward of micro-batch k beside "
         f"the forward of k + 1), issued back to back with no host sync, from the end of micro-batch 0's forward "
         f"to the end of the last pair on the GPU; that forward and the last backward run outside it. Times per "
         f"pair (window / {pairs}), median of {args.steps} chains; the profiler's fraction over the window of one chain."),
        "",
        "| chain of pairs | ms per pair | profiler hidden fraction |",
        "|---|---|---|",
        f"| interleaved (T_ovl), {copies} | {t_ovl * 1e3:.2f} | {frac_ovl[0]:.3f} |",
        f"| F then B (T_seq), {short} | {t_seq * 1e3:.2f} | {frac_seq[0]:.3f} |",
        f"| F then B (T_one), one copy | {t_one * 1e3:.2f} | |",
        "",
        (f"Wall time: the copies cost T_seq - T_one = {(t_seq - t_one) * 1e3:.2f} ms per pair; interleaving wins back "
         f"T_seq - T_ovl = {(t_seq - t_ovl) * 1e3:.2f} ms, hidden (A/B) = (T_seq - T_ovl) / (T_seq - T_one) = "
         f"{ab:.3f}, a gain of {(t_seq - t_ovl) / t_seq:.1%} on T_seq. Profiler: communication busy "
         f"{frac_ovl[1] / 1e3 / pairs:.2f} ms, compute busy {frac_ovl[2] / 1e3 / pairs:.2f} ms per interleaved pair; "
         f"its hidden fraction counts copy time that ran beside compute, even where the copies slowed that compute, "
         f"so it can exceed hidden (A/B)."),
        "",
        (f"Exposed communication per interleaved pair (`loopback.exposure`): {exp['waited'] / 1e3 / pairs:.2f} ms in "
         f"{exp['waits'] / pairs:.1f} compute-stream gaps that end when a copy ends (the compute waited for it), "
         f"{exp['host'] / 1e3 / pairs:.2f} ms in {exp['gaps'] / pairs:.1f} gaps that end otherwise (the host issued "
         f"the next kernel late)."),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny-moe, short sequences (smoke run)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per micro-batch (default 4096, small 32)")
    parser.add_argument("--repeat", type=int, default=4, help="passes (copies) per all-to-all (link slowdown)")
    parser.add_argument("--copy-sms", type=int, default=8,
                        help="each all-to-all as --repeat passes of kernels.copy_loop on this many SMs (a link's "
                             "kernel: a few SMs, HBM at the link's rate); 0: torch's copy on every SM")
    parser.add_argument("--pairs", type=int, default=1, help="consecutive F&B pairs in the timed window")
    parser.add_argument("--steps", type=int, default=10, help="timed chains per mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--shape", default="1k", choices=("1k", "v3"), help="loopback model (model.runtime.loopback)")
    parser.add_argument("--trace", type=Path, default=None, help="also keep the interleaved chain's profiler trace")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error(f"--pairs={args.pairs} must be at least 1")
    if args.copy_sms < 0 or args.repeat < 1:
        parser.error(f"--copy-sms={args.copy_sms} must be at least 0 and --repeat={args.repeat} at least 1")
    args.copy_sms = args.copy_sms if args.copy_sms and args.device != "cpu" else None  # torch's copy: 0, or a CPU
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU smoke run shares its cores
    if args.small:
        args.steps, args.warmup = 2, 1
    base = deepseek_v3() if args.shape == "v3" and not args.small else tiny_moe()
    spec = loopback_spec(base, args.small, args.shape)
    seq = args.seq or (32 if args.small else 4096)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = loopback_stage(spec, dtype, device)
    gen = torch.Generator().manual_seed(1)
    ids = tuple(torch.randint(0, spec.vocab_size, (1, seq), generator=gen).to(device) for _ in range(2))
    run = {"pairs": args.pairs, "steps": args.steps, "warmup": args.warmup}
    comm = LoopbackComm(args.repeat, args.copy_sms)
    times = {"ovl": time_pairs(model, ids, device, comm, True, **run),
             "seq": time_pairs(model, ids, device, comm, False, **run),
             "one": time_pairs(model, ids, device, LoopbackComm(1), False, **run)}
    fracs = {"ovl": profile_pairs(model, ids, device, comm, True, args.pairs, args.trace),
             "seq": profile_pairs(model, ids, device, comm, False, args.pairs)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rate = copy_rate(spec, seq, device, args.copy_sms) if args.copy_sms and device.type == "cuda" else float("nan")
    write_atomic(args.out, render(args, spec, seq, dtype, name, times, fracs, rate))


if __name__ == "__main__":
    main()
