"""The cast with transpose (``kernels.fp8_quant.quant_act_both``) at the FP8 step's shapes: each autotune candidate,
the autotuned call, the Gluon kernel's configs, and the two single quantisers (what ``quant_act_both`` runs unless
``fp8_quant.ONE_READ``), in bytes/s and fraction of HBM.

    python -P benchmarks/quant_both_bench.py --out /tmp/quant-both.md          # CUDA, ~1 min on an H100
    TRITON_INTERPRET=1 python -P benchmarks/quant_both_bench.py --device cpu --small --out /tmp/qb.md  # smoke run

Why: in ``benchmarks/model_step.py``'s FP8 step (docs/results/model-step.md) ``_quant_both_kernel`` is the largest
memory-bound kernel. Its candidates differ in how a 128x128 tile is read: whole (SUB 128), in chunks read twice
(the column amax first, then each chunk again from L2), or in four chunks loaded together and held (HOLD). Beside them
the Gluon kernel (``kernels/fp8_quant_gluon.py``: the tile read once into shared memory), one row per config, where it
runs (Gluon and a Hopper GPU; elsewhere its rows are left out). Shapes:
a 4096-token micro-batch's hidden states (4096 x 7168), and the routed experts' padded rows of workload A (34,560 =
4096 tokens x top-8 over 32 experts, each padded to 128) by hidden (the down projection's output gradient) and by
2 x 2048 (gate_up's). Bytes are ideal: the input read once, both FP8 copies and their fp32 scales written once. Each
candidate's output is compared bit for bit with the two single quantisers'. Times: median of ``--reps`` calls by CUDA
events with the L2 flushed before each (``orchestrator.calibration.timing.median_s``). HBM % is of the datasheet
bandwidth of the GPU's cluster preset.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from moeplan.kernels import fp8_quant, fp8_quant_gluon
from moeplan.kernels.fp8_quant import quant_act_1x128, quant_act_128x1_t, quant_act_both
from moeplan.kernels.triton_compat import HAVE_TRITON, INTERPRET, cdiv, triton
from moeplan.orchestrator.calibration.timing import median_s
from moeplan.simulator.contracts.atomic_write import write_atomic

def _sibling(name: str):
    """``benchmarks/<name>.py`` as a module (the script runs as ``python -P``: its folder is not on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hbm_peak = _sibling("quant_speed").hbm_peak  # the datasheet bandwidth of the device's cluster preset

SHAPES = ((4096, 7168), (34560, 7168), (34560, 4096))
SMALL_SHAPES = ((200, 384),)
FP8_BYTES, SCALE_BYTES = 1, 4


def ideal_bytes(rows: int, cols: int, in_bytes: int) -> int:
    """Read x once; write x in 1x128 and x^T in 128x1 tiles, each with its fp32 scales."""
    return rows * cols * (in_bytes + 2 * FP8_BYTES) + SCALE_BYTES * (rows * cdiv(cols, 128) + cols * cdiv(rows, 128))


def candidate_name(config) -> str:
    kw = config.kwargs
    how = "held" if kw.get("HOLD") else "whole" if kw["SUB"] == 128 else "read twice"
    return f"SUB {kw['SUB']} {how}, {config.num_warps} warps"


def launch_candidate(x: torch.Tensor, config) -> tuple:
    """One candidate launched directly (the autotuner bypassed), into fresh outputs as the public call makes them."""
    M, K = x.shape
    q = torch.empty((M, K), dtype=fp8_quant.FP8_DTYPE, device=x.device)
    qt = torch.empty((K, M), dtype=fp8_quant.FP8_DTYPE, device=x.device)
    s, st = fp8_quant._empty_mn_major_scales(M, K, x.device), fp8_quant._empty_mn_major_scales(K, M, x.device)
    fp8_quant._quant_both_kernel.fn[(cdiv(M, 128), cdiv(K, 128))](
        x, q, s, qt, st, M, K, (M * K).bit_length(), *x.stride(), *q.stride(), *s.stride(), qt.stride(0),
        *st.stride(), POW2=False, FLOOR=fp8_quant.AMAX_FLOOR, ROW_MAJOR=True, CAST=fp8_quant._cast(x.device, None),
        BLOCK=128, num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs)
    return (q, s), (qt, st)


def same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(p.view(torch.uint8) if p.dtype == fp8_quant.FP8_DTYPE else p,
                           r.view(torch.uint8) if r.dtype == fp8_quant.FP8_DTYPE else r)
               for pa, pb in zip(a, b) for p, r in zip(pa, pb))


def measure(shape: tuple[int, int], device: torch.device, reps: int, peak: float | None) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16)
    nbytes = ideal_bytes(*shape, x.element_size())
    want = (quant_act_1x128(x), quant_act_128x1_t(x))  # quant_act_both's default path (ONE_READ False)
    rows = []

    def row(what: str, s: float, exact: bool | None) -> None:
        rows.append({"shape": list(shape), "what": what, "s": s, "bytes": nbytes, "bytes_per_s": nbytes / s,
                     "hbm_frac": None if peak is None else nbytes / s / peak, "bit_exact": exact})

    default = fp8_quant.ONE_READ
    try:
        fp8_quant.ONE_READ = True
        got = quant_act_both(x)  # the autotuner's first call: tunes
        row("one-read kernel (autotuned)", median_s(lambda: quant_act_both(x), device, reps), same(got, want))
    finally:
        fp8_quant.ONE_READ = default
    best = getattr(fp8_quant._quant_both_kernel, "best_config", None) if not INTERPRET else None
    if best is not None:
        rows[-1]["what"] += f": {candidate_name(best)}"
    for config in fp8_quant._both_configs():
        got = launch_candidate(x, config)
        row(candidate_name(config), median_s(lambda c=config: launch_candidate(x, c), device, reps), same(got, want))
    if fp8_quant_gluon.runs_on(x):
        for config in fp8_quant_gluon.CONFIGS:
            got = fp8_quant_gluon.quant_act_both_gluon(x, config=config)
            grid = f"persistent, {config[2]} programs an SM" if config[2] else "a program a tile"
            row(f"Gluon, tile in shared memory: {config[0]} warps, {config[1]}-row chunks, {grid}",
                median_s(lambda c=config: fp8_quant_gluon.quant_act_both_gluon(x, config=c), device, reps),
                same(got, want))
    row("quant_act_1x128 + quant_act_128x1_t (two reads; quant_act_both's default)",
        median_s(lambda: (quant_act_1x128(x), quant_act_128x1_t(x)), device, reps), True)
    return rows


def render(meta: dict, rows: list[dict]) -> str:
    out = ["# The FP8 cast with transpose (`quant_act_both`): candidates at the FP8 step's shapes", "",
           f"`{meta['command']}` on {meta['device']} ({meta['date']}; torch {meta['torch']}, triton {meta['triton']}, "
           f"tree {meta['tree']}). Input bf16 randn; bytes ideal (read once, both FP8 copies and scales written "
           f"once); HBM peak {meta['hbm']}. Median of {meta['reps']} calls, L2 flushed before each.", "",
           "| shape | kernel | MB | us | GB/s | HBM | bit-exact |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        frac = "" if r["hbm_frac"] is None else f"{100 * r['hbm_frac']:.1f}%"
        exact = {True: "yes", False: "**no**", None: ""}[r["bit_exact"]]
        out.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['what']} | {r['bytes'] / 1e6:,.1f} | {r['s'] * 1e6:,.1f} | "
                   f"{r['bytes_per_s'] / 1e9:,.1f} | {frac} | {exact} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (the interpreter's smoke run)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", required=True, help="markdown page; the rows go beside it as .json")
    args = p.parse_args(argv)
    if not HAVE_TRITON:
        sys.exit("quant_both_bench: needs triton")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"quant_both_bench: device={args.device} but no CUDA GPU is visible")
    if device.type != "cuda" and not INTERPRET:
        sys.exit(f"quant_both_bench: device={args.device} needs TRITON_INTERPRET=1")
    hbm, peak = hbm_peak(device)
    rows = [r for shape in (SMALL_SHAPES if args.small else SHAPES) for r in measure(shape, device, args.reps, peak)]
    tree = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip() or "unknown"
    meta = {"command": "python -P benchmarks/quant_both_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "triton": triton.__version__, "tree": tree, "hbm": hbm, "reps": args.reps}
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_atomic(out, render(meta, rows))
    print(render(meta, rows))
    return rows


if __name__ == "__main__":
    main()
