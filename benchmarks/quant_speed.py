"""FP8 quantisers at DeepSeek-V3 shapes: bytes/s and fraction of HBM, emulated against hardware E4M3 cast.

    python -P benchmarks/quant_speed.py --out /tmp/quant-speed.md      # CUDA, under 60 s on an H100
    TRITON_INTERPRET=1 python -P benchmarks/quant_speed.py --device cpu --small --out /tmp/q.md   # smoke run

Each quantiser of ``kernels.fp8_quant`` (1x128 rows, 128x1 transposed, 128x128 blocks without and with the
transposed copy) runs once with the integer-emulated E4M3 cast and once with the hardware cast
(``kernels.e4m3_cast``), through its public wrapper (so autotuned, each path tuned on its own). Bytes are
the ideal traffic: the input read once, each FP8 copy and the fp32 scales written once. Times: median of
``--reps`` calls by CUDA events, the L2 flushed by a read before each (``orchestrator.calibration.timing``),
after the autotuner's first call. Each shape's two outputs are compared bit for bit. HBM % is of the
datasheet bandwidth of the GPU's cluster preset (``simulator.presets.clusters``). Triton's ~44 compiles
(each quantiser and path, every autotune candidate) run first in ``--jobs`` processes at once; shapes then
run in order until ``--budget-s`` seconds since the start have passed, the rest listed as skipped.
"""

from __future__ import annotations

import time

T0_S = time.monotonic()  # the budget counts the imports too

import argparse
import concurrent.futures
import dataclasses
import datetime
import math
import multiprocessing
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from moeplan.kernels.e4m3_cast import CASTS, EMULATED, MIN_HW_CAPABILITY, cast_for_device
from moeplan.kernels.fp8_quant import TILE, quant_act_1x128, quant_act_128x1_t, quant_weight_128x128
from moeplan.kernels.triton_compat import HAVE_TRITON, INTERPRET, cdiv, triton
from moeplan.orchestrator.calibration.timing import median_s
from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.presets.clusters import gpu_for_device, h200_gpu

FP8_BYTES, SCALE_BYTES = 1, 4
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# V3 weights (N, K): an expert's down (7168x2048) and gate or up (2048x7168) projection, the dense MLP's down
# (7168x18432), 16 local experts' fused gate/up (16 x 4096x7168); activations (rows, features): 4096 tokens x 7168
# hidden, 32768 routed rows (4096 tokens x top-8) x 2048 (an expert's intermediate size).
WEIGHT_SHAPES = ((7168, 2048), (2048, 7168), (7168, 18432), (16, 4096, 7168))
ACT_SHAPES = ((4096, 7168), (32768, 2048))
SMALL_WEIGHT_SHAPES, SMALL_ACT_SHAPES = ((256, 384), (2, 130, 257)), ((200, 384),)
BUDGET_S = 45.0  # of the 60 s allowed: a case started before it ends within ~10 s, compiles included
# Precompiling: Triton compiles a kernel for each pattern of its integer arguments (multiple of 16 or not, 1 or
# not; ``specialisation``); these small shapes have the patterns of all the shapes above (tested), so the worker
# processes' compiles are the main process's (through Triton's disk cache).
PRECOMPILE_SHAPES = {"rows": ((256, 256),), "cols": ((256, 256),), "blocks": ((256, 2048), (256, 1024))}
TIMED_S = 0.1  # of warm-up and again of timed calls per path and shape, at most (orchestrator.calibration.timing)


@dataclasses.dataclass(frozen=True)
class Quantiser:
    """A quantiser as the benchmark calls it: ``run(x, cast)`` returns its output tensors (``cast``: a name of
    ``e4m3_cast.CASTS``)."""

    name: str
    run: Callable[[torch.Tensor, str], tuple[torch.Tensor, ...]]
    fp8_copies: int
    tiles: str  # "rows" (1x128: a scale per row and 128 columns), "cols" (128x1), "blocks" (128x128)


QUANTISERS = {
    q.name: q for q in (
        Quantiser("act_1x128", lambda x, cast: quant_act_1x128(x, cast=cast), 1, "rows"),
        Quantiser("act_128x1_t", lambda x, cast: quant_act_128x1_t(x, cast=cast), 1, "cols"),
        Quantiser("weight_128x128", lambda w, cast: quant_weight_128x128(w, cast=cast)[:2], 1, "blocks"),
        Quantiser("weight_128x128+t", lambda w, cast: quant_weight_128x128(w, transposed=True, cast=cast), 2, "blocks"),
    )
}


def cases(small: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(quantiser, shape) in the order they run: every quantiser once at its first shape (its compiles),
    then the other shapes."""
    weights, acts = (SMALL_WEIGHT_SHAPES, SMALL_ACT_SHAPES) if small else (WEIGHT_SHAPES, ACT_SHAPES)
    per_quantiser = [[(name, shape) for shape in (weights if q.tiles == "blocks" else acts)]
                     for name, q in QUANTISERS.items()]
    firsts = [c[0] for c in per_quantiser]
    return firsts + [case for c in per_quantiser for case in c[1:]]


def traffic_bytes(quantiser: str, shape: tuple[int, ...], in_bytes: int) -> int:
    """Ideal bytes of one call: ``shape`` read at ``in_bytes`` an element, each FP8 copy and the scales written."""
    q = QUANTISERS[quantiser]
    numel = math.prod(shape)
    *lead, rows, cols = shape
    scales = {"rows": rows * cdiv(cols, TILE), "cols": cols * cdiv(rows, TILE),
              "blocks": math.prod(lead) * cdiv(rows, TILE) * cdiv(cols, TILE)}[q.tiles]
    return numel * in_bytes + q.fp8_copies * numel * FP8_BYTES + scales * SCALE_BYTES


def hbm_peak(device: torch.device) -> tuple[str, float | None]:
    """(what, bytes/s) of the device's datasheet HBM bandwidth, from the cluster presets; none on the CPU."""
    if device.type != "cuda":
        return "none on the CPU", None
    known = gpu_for_device(torch.cuda.get_device_name(device))
    gpu = known or h200_gpu()
    return f"{gpu.name} preset{'' if known else ' (device not in the presets)'}", gpu.hbm_bytes_per_s


def hardware_path(device: torch.device, reason: str | None) -> tuple[str | None, str]:
    """(the hardware path to time, what the report says of it): the probe's choice, or the plain ``hardware``
    cast, timed and compared anyway, where both hardware paths failed the probe; none where ``reason``."""
    if reason:
        return None, f"unavailable: {reason}"
    chosen = cast_for_device(device)  # the probe: warns where a hardware path failed it
    if chosen == EMULATED:
        return "hardware", "both hardware paths FAILED the probe (the quantisers emulate); `hardware` timed anyway"
    name = next(n for n, c in CASTS.items() if c == chosen)
    return name, f"`{name}`, the path the probe chose" + ("" if name == "hardware" else " (the fp32 cvt failed it)")


def hardware_reason(device: torch.device) -> str | None:
    """Why the hardware path cannot run on ``device`` at all (None: it can)."""
    if device.type != "cuda" or INTERPRET:
        return "no hardware cast on the CPU / Triton interpreter"
    if torch.cuda.get_device_capability(device) < MIN_HW_CAPABILITY:
        return f"sm_{''.join(map(str, torch.cuda.get_device_capability(device)))} has no E4M3 cvt"
    return None


def mismatches(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> int:
    """Bytes that differ between two quantisers' outputs (fp8 copies and fp32 scales)."""
    assert len(a) == len(b), f"{len(a)=} {len(b)=}"
    return sum(int((x.contiguous().view(torch.uint8) != y.contiguous().view(torch.uint8)).sum()) for x, y in zip(a, b))


def measure(quantiser: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, hw: str | None,
            timer: Callable[[Callable[[], object]], float], peak_bytes_per_s: float | None) -> dict:
    """One row: the emulated and the ``hw`` path's (None: none) seconds, bytes/s and HBM fraction, and how many
    output bytes differ between the two."""
    q = QUANTISERS[quantiser]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device, dtype=dtype)
    nbytes = traffic_bytes(quantiser, shape, x.element_size())
    row = {"quantiser": quantiser, "shape": list(shape), "bytes": nbytes, "emulated": None, "hardware": None,
           "mismatches": None, "skipped": None}
    outputs = {}
    for path, cast in (("emulated", "emulated"), ("hardware", hw)) if hw else (("emulated", "emulated"),):
        outputs[path] = q.run(x, cast)  # the autotuner's first call: compiles and tunes
        s = timer(lambda cast=cast: q.run(x, cast))
        row[path] = {"s": s, "bytes_per_s": nbytes / s,
                     "hbm_frac": None if peak_bytes_per_s is None else nbytes / s / peak_bytes_per_s}
    if hw:
        row["mismatches"] = mismatches(outputs["emulated"], outputs["hardware"])
    return row


def specialisation(tiles: str, shape: tuple[int, ...]) -> tuple[tuple[bool, bool], ...]:
    """(multiple of 16, equal to 1) of each integer argument the ``fp8_quant`` wrapper passes its kernel for a
    contiguous input of ``shape`` (sizes, the rows kernel's size key, strides): what Triton specialises on."""
    rows, cols = shape[-2:]
    if tiles == "blocks":
        nt, kt = cdiv(rows, TILE), cdiv(cols, TILE)
        ints = [rows, cols, rows * cols, cols, 1, rows * cols, cols, 1, cols * rows, 1, rows, nt * kt, kt, 1]
    else:
        r, c = (rows, cols) if tiles == "rows" else (cols, rows)  # the kernel's view: x, or x^T for 128x1
        view_strides = [cols, 1] if tiles == "rows" else [1, cols]
        ints = [r, c, (r * c).bit_length(), *view_strides, c, 1, 1, cdiv(r, 4) * 4]
    return tuple((v % 16 == 0, v == 1) for v in ints)


def _precompile_worker(device: str, dtype: str, quantiser: str, cast: str, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, device=device, dtype=DTYPES[dtype])
    QUANTISERS[quantiser].run(x, cast)


def precompile(device: torch.device, dtype: str, hw: str | None, jobs: int) -> str:
    """Compile (and tune on a small shape) every quantiser and path in ``jobs`` processes at once, so that the
    main process finds its kernels in Triton's disk cache: a cold run compiles ~44 kernels, one at a time
    otherwise. Returns what happened, for the report; a failure leaves the compiles to the first calls."""
    tasks = [(name, cast, shape) for name, q in QUANTISERS.items() for cast in (("emulated", hw) if hw else ("emulated",))
             for shape in PRECOMPILE_SHAPES[q.tiles]]
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    try:
        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=context) as pool:
            futures = [pool.submit(_precompile_worker, str(device), dtype, *task) for task in tasks]
            for future in futures:
                future.result()
    except Exception as exc:  # noqa: BLE001 (the benchmark compiles on first use instead)
        return f"precompile failed ({_first_line(exc)}); compiled on first use"
    return f"{len(tasks)} (quantiser, path, shape) compiles and tunings in {min(jobs, len(tasks))} processes first"


def _first_line(exc: Exception) -> str:
    text = str(exc).partition("\n")[0][:120]
    return f"{type(exc).__name__}: {text}"


def _path_cells(p: dict | None) -> str:
    if p is None:
        return "| — | — | — "
    frac = "—" if p["hbm_frac"] is None else f"{p['hbm_frac']:.1%}"
    return f"| {p['s'] * 1e6:,.1f} | {p['bytes_per_s'] / 1e9:,.1f} | {frac} "


def render(meta: dict, rows: list[dict]) -> str:
    """The markdown report: a header on what was run and one table row per (quantiser, shape)."""
    peak = "n/a" if meta["hbm_bytes_per_s"] is None else f"{meta['hbm_bytes_per_s'] / 1e12:.2f} TB/s"
    lines = [
        "# FP8 quantisers: integer-emulated against hardware E4M3 cast",
        "",
        f"`{meta['command']}` on {meta['device']} ({meta['date']}; torch {meta['torch']}, triton {meta['triton']}); "
        f"inputs {meta['dtype']}, randn. Bytes: input read once, each FP8 copy and the fp32 scales written once. "
        f"HBM peak {peak} ({meta['hbm_source']}). Hardware cast: {meta['hardware']}."
        + (f" Compiles: {meta['compiles']}." if meta.get("compiles") else ""),
        "",
        ("| quantiser | shape | MB | emulated us | emulated GB/s | emulated HBM | hardware us | hardware GB/s "
         "| hardware HBM | speed-up | bit-exact |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    return "\n".join(lines + [table_row(r) for r in rows]) + "\n"


def table_row(r: dict) -> str:
    """One (quantiser, shape) of the table."""
    shape = "×".join(map(str, r["shape"]))
    if r["skipped"]:
        return f"| {r['quantiser']} | {shape} | {r['bytes'] / 1e6:,.1f} | skipped: {r['skipped']} ||||||||"
    emu, hw = r["emulated"], r["hardware"]
    speedup = "—" if hw is None else f"{emu['s'] / hw['s']:.2f}×"
    exact = "—" if r["mismatches"] is None else "yes" if r["mismatches"] == 0 else f"NO ({r['mismatches']} bytes differ)"
    return f"| {r['quantiser']} | {shape} | {r['bytes'] / 1e6:,.1f} {_path_cells(emu)}{_path_cells(hw)}| {speedup} | {exact} |"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown report to write")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="input dtype")
    parser.add_argument("--reps", type=int, default=30, help="timed calls per path and shape (fewer past 0.1 s)")
    parser.add_argument("--jobs", type=int, default=8,
                        help="processes that compile the kernels before timing (0: compile on first use)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="start no new shape after this many seconds since the process started")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.budget_s <= 0 or args.jobs < 0:
        parser.error(f"--reps={args.reps} must be >= 1, --budget-s={args.budget_s} > 0, --jobs={args.jobs} >= 0")
    if not HAVE_TRITON:
        parser.error("the quantisers need the 'triton' package, which is not installed")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (smoke run: TRITON_INTERPRET=1 ... --device cpu --small)")
    if args.device == "cpu" and not INTERPRET:
        parser.error("--device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    return args


def main(argv: list[str] | None = None, t0_s: float | None = None) -> list[dict]:
    """Run the cases, print each row as it comes, write the report; ``t0_s``: when the budget started
    (``time.monotonic()``; the call by default)."""
    t0_s = time.monotonic() if t0_s is None else t0_s
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    hbm_source, peak = hbm_peak(device)
    reason = hardware_reason(device)
    hw, probe = hardware_path(device, reason)
    reps = args.reps if device.type == "cuda" else min(args.reps, 3)

    def timer(fn):
        return median_s(fn, device, reps, max_s=TIMED_S)

    meta = {
        "command": " ".join(["python -P benchmarks/quant_speed.py", *argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype,
        "hbm_bytes_per_s": peak, "hbm_source": hbm_source, "hardware": probe,
    }
    print(f"{meta['device']}, HBM peak: {hbm_source}; hardware cast: {probe}", flush=True)
    if args.jobs and device.type == "cuda":  # the interpreter compiles nothing
        meta["compiles"] = precompile(device, args.dtype, hw, args.jobs)
        print(f"[{time.monotonic() - t0_s:5.1f} s] {meta['compiles']}", flush=True)
    rows = []
    for quantiser, shape in cases(args.small):
        elapsed_s = time.monotonic() - t0_s
        skipped = {"quantiser": quantiser, "shape": list(shape), "bytes": traffic_bytes(quantiser, shape, dtype.itemsize)}
        if elapsed_s > args.budget_s:
            rows.append(skipped | {"skipped": f"budget, {elapsed_s:.0f} s > {args.budget_s:.0f} s"})
        else:
            try:
                rows.append(measure(quantiser, shape, dtype, device, hw, timer, peak))
            except Exception as exc:  # noqa: BLE001 (one shape failing, e.g. out of memory, leaves the others)
                rows.append(skipped | {"skipped": f"failed, {_first_line(exc)}"})
        print(f"[{time.monotonic() - t0_s:5.1f} s] {table_row(rows[-1])}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = render(meta, rows)
    write_atomic(args.out, text)
    print(text, end="")
    print(f"wrote {args.out} in {time.monotonic() - t0_s:.1f} s")
    return rows


if __name__ == "__main__":
    main(t0_s=T0_S)
