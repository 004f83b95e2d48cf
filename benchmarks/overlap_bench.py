"""The overlapped F&B on one GPU with loopback expert parallelism: step time and hidden communication.

    python -P benchmarks/overlap_bench.py --out docs/results/overlap.md           # CUDA
    python -P benchmarks/overlap_bench.py --device cpu --small --out /tmp/o.md    # smoke run (tiny model, CPU)

One stage holds a dense layer and three MoE layers whose all-to-alls are loopback copies on the
communication stream (``model.runtime.loopback``), each repeated ``--repeat`` times to stand for a link that
much slower than a device copy (HBM3 at ~3 TB/s against NVLink's ~0.45 TB/s per direction is ~7). One F&B
pair (backward of micro-batch 0, forward of micro-batch 1) is timed, median of ``--steps`` after
``--warmup``, each between two synchronizes:
- ``T_ovl``: the pair interleaved (``overlap.interleave``), copies repeated;
- ``T_seq``: F then B, copies repeated;
- ``T_one``: F then B, one copy (the communication almost free).
hidden (A/B) = (T_seq - T_ovl) / (T_seq - T_one). One more overlapped pair runs under ``torch.profiler``:
hidden fraction = |comm ∩ compute| / |comm| over its GPU activity (``loopback.hidden_fraction``), and the
F-then-B pair's for contrast. On CPU the copies are synchronous and there is no kernel trace: the times
only show that the script runs.
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

from moeplan.model.runtime.executor import Timeline
from moeplan.model.runtime.loopback import hidden_fraction, loopback_spec, loopback_stage, run_pair
from moeplan.model.runtime.overlap_comm import LoopbackComm, Streams
from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.presets.models import deepseek_v3, tiny_moe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(model, ids, device, repeat: int, overlap: bool, steps: int, warmup: int) -> float:
    """Median seconds of the pair (after micro-batch 0's forward), ``steps`` after ``warmup``."""
    streams, times, marks = Streams(device), [], []

    def start():
        _sync(device)
        marks.append(time.perf_counter())

    for i in range(warmup + steps):
        run_pair(model, ids, LoopbackComm(repeat), streams, Timeline(0, cuda=device.type == "cuda"), overlap, start)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - marks[-1])
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def profile_pair(model, ids, device, repeat: int, overlap: bool, keep: Path | None = None) -> tuple[float, float, float]:
    """(hidden fraction, comm us, compute us) of one pair under ``torch.profiler`` (NaN on CPU); its Chrome
    trace copied to ``keep`` when given."""
    if device.type != "cuda":
        return float("nan"), 0.0, 0.0
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    run_pair(model, ids, LoopbackComm(repeat), Streams(device), Timeline(0, cuda=True), overlap, prof.start)
    _sync(device)
    prof.stop()
    model.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        if keep is not None:
            keep.write_bytes(path.read_bytes())
        return hidden_fraction(json.loads(path.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny-moe, short sequences (smoke run)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per micro-batch (default 4096, small 32)")
    parser.add_argument("--repeat", type=int, default=7, help="copies per all-to-all (link slowdown)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--shape", default="1k", choices=("1k", "v3"), help="loopback model (model.runtime.loopback)")
    parser.add_argument("--trace", type=Path, default=None, help="also keep the interleaved pair's profiler trace")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU smoke run shares its cores
    base = deepseek_v3() if args.shape == "v3" and not args.small else tiny_moe()
    spec = loopback_spec(base, args.small, args.shape)
    seq = args.seq or (32 if args.small else 4096)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = loopback_stage(spec, dtype, device)
    gen = torch.Generator().manual_seed(1)
    ids = tuple(torch.randint(0, spec.vocab_size, (1, seq), generator=gen).to(device) for _ in range(2))
    steps, warmup = (2, 1) if args.small else (args.steps, args.warmup)
    t_ovl = time_pair(model, ids, device, args.repeat, True, steps, warmup)
    t_seq = time_pair(model, ids, device, args.repeat, False, steps, warmup)
    t_one = time_pair(model, ids, device, 1, False, steps, warmup)
    frac_ovl = profile_pair(model, ids, device, args.repeat, True, args.trace)
    frac_seq = profile_pair(model, ids, device, args.repeat, False)
    ab = (t_seq - t_ovl) / (t_seq - t_one) if t_seq > t_one else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    write_atomic(args.out, "\n".join([
        "# Overlapped F&B on one device, loopback expert parallelism",
        "",
        (f"`benchmarks/overlap_bench.py{' --small' if args.small else ''} --shape {args.shape} --device {args.device} --repeat "
         f"{args.repeat}` on {name}, torch {torch.__version__}, {datetime.date.today()}: model `{spec.name}` "
         f"d={spec.hidden_size}, {spec.num_hidden_layers} layers ({spec.first_k_dense_replace} dense), "
         f"{spec.n_routed_experts} experts top-{spec.num_experts_per_tok}, {seq} tokens per micro-batch, {dtype}."),
        "",
        "| pair | ms | profiler hidden fraction |",
        "|---|---|---|",
        f"| interleaved (T_ovl), {args.repeat} copies per all-to-all | {t_ovl * 1e3:.2f} | {frac_ovl[0]:.3f} |",
        f"| F then B (T_seq), {args.repeat} copies | {t_seq * 1e3:.2f} | {frac_seq[0]:.3f} |",
        f"| F then B (T_one), one copy | {t_one * 1e3:.2f} | |",
        "",
        (f"hidden (A/B) = (T_seq - T_ovl) / (T_seq - T_one) = {ab:.3f}; communication busy "
         f"{frac_ovl[1] / 1e3:.2f} ms, compute busy {frac_ovl[2] / 1e3:.2f} ms in the profiled interleaved pair."),
        "",
    ]))


if __name__ == "__main__":
    main()
