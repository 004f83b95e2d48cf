"""The 1200-TFLOPS target shape, 4096x7168x16384, at the GPU's sustained clocks.

    python benchmarks/fp8_gemm_sustained.py --out docs/results/kernels-sustained.md [--json FILE]

A long FP8 GEMM drives an H200 into its power cap within seconds (the SM clock falls from about
1980 MHz to 1300-1500 MHz; nvidia-smi reports "SW power cap"), so a number taken from a cool GPU
and one taken after another kernel has heated it are not comparable. This benchmark first runs
``torch._scaled_mm`` for ``--burn`` seconds, then times each case once per round, alternating the
order between rounds, for ``--rounds`` rounds; each timing is the median of ``do_bench``'s
repetitions, with the SM clock and the board power read right after it. Cases: our Gluon kernel
(``kernels/fp8_gemm_ws.py``) with 128x256 and 128x128 tiles, with the math warpgroups' three
ways of sharing the tensor cores (``ORDERS``), with and without the promotion FFMAs allowed to
yield (``kernels/sass_yield.py``), cuBLAS block-scaled ``_scaled_mm``, and two upper bounds that
compute other products: the same data flow promoting without scales and not promoting at all.
"""

import argparse
import datetime
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
import triton
import triton.testing

from moeplan.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from moeplan.kernels.fp8_gemm_ws import FFMA_YIELD_EVERY, ORDER, WIDTHS, fp8_gemm_ws
from moeplan.kernels.fp8_quant import quant_act_1x128, quant_weight_128x128
from moeplan.simulator.contracts.atomic_write import write_atomic

M, N, K = 4096, 7168, 16384
ORDER_NAMES = {"free": "warpgroups issue freely", "issue": "warpgroups issue in turn",
               "complete": "one warpgroup's MMA at a time"}


def clock_and_power() -> tuple[float, float]:
    """(SM MHz, board W) now, from nvidia-smi (NaN where it is missing)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                              "-i", str(torch.cuda.current_device())], capture_output=True, text=True, timeout=10)
        mhz, watts = (float(v) for v in out.stdout.split(",")[:2])
        return mhz, watts
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return float("nan"), float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/kernels-sustained.md"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--burn", type=float, default=10.0, help="seconds of _scaled_mm before the first timing")
    args = parser.parse_args()

    x, w = torch.randn(M, K, device="cuda"), torch.randn(N, K, device="cuda")
    a, sa = quant_act_1x128(x)
    b, sb, _ = quant_weight_128x128(w)
    sa_mn = sa.t().contiguous().t()  # MN-major: what the Gluon kernel's TMA reads, no copy per call
    ref = fp8_gemm_ref(a, sa, b, sb, torch.float32).double()
    flops = 2.0 * M * N * K

    def ours(width, order, every, **kw):
        return lambda: fp8_gemm_ws(a, sa_mn, b, sb, config=WIDTHS[width], ffma_yield=every, order=order, **kw)

    def label(width, order, every):
        text = f"ours, 128x{width}, {ORDER_NAMES[order]}" + (f", every {every}th FFMA may yield" if every else "")
        return text + (" (the default)" if (width, order, every) == (256, ORDER, FFMA_YIELD_EVERY) else "")

    variants = [(256, ORDER, FFMA_YIELD_EVERY), (256, "issue", 0), (256, "free", 0), (256, "free", FFMA_YIELD_EVERY),
                (256, "complete", 0), (128, "issue", FFMA_YIELD_EVERY), (128, "issue", 0), (128, "free", 0),
                (128, "complete", 0)]
    cases = {label(*v): ours(*v) for v in dict.fromkeys(variants)}
    cases["cuBLAS block-scaled _scaled_mm"] = lambda: fp8_gemm(a, sa, b, sb, backend="torch")
    cases["128x256, promotion without scales"] = ours(256, ORDER, FFMA_YIELD_EVERY, scales="none")
    cases["128x256, no promotion"] = ours(256, "free", 0, promote=False)
    exact = {name: name.startswith(("ours", "cuBLAS")) for name in cases}  # the last two: other products
    errors = {name: float((fn().double() - ref).norm() / ref.norm()) for name, fn in cases.items()}
    end = time.time() + args.burn
    while time.time() < end:
        cases["cuBLAS block-scaled _scaled_mm"]()
    torch.cuda.synchronize()
    runs = {name: [] for name in cases}
    for rnd in range(args.rounds):
        for name in (list(cases) if rnd % 2 == 0 else list(cases)[::-1]):
            ms = triton.testing.do_bench(cases[name], warmup=25, rep=200, return_mode="median")
            mhz, watts = clock_and_power()
            runs[name].append({"tflops": flops / (ms * 1e-3) / 1e12, "sm_mhz": mhz, "watts": watts})
    props = torch.cuda.get_device_properties(0)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
            "rounds": args.rounds, "burn_s": args.burn,
            "command": "python benchmarks/fp8_gemm_sustained.py --out docs/results/kernels-sustained.md"}
    lines = [f"# FP8 GEMM at {M}x{N}x{K}, sustained clocks", "",
             f"`{meta['command']}` on {meta['device']} ({meta['date']}; torch {meta['torch']}, triton "
             f"{meta['triton']}): {args.burn:g} s of `_scaled_mm` first, then {args.rounds} rounds, the order of the cases "
             "reversed every other round. TFLOPS are medians of `do_bench` repetitions; the clock and the power are "
             "read right after each timing. Relative error is against float64 on the dequantised operands (BF16 out); "
             "the last two rows compute a different product (upper bounds for the data flow).", "",
             "| case | median TFLOPS | min | max | SM MHz (median) | W (median) | rel. error |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rs in runs.items():
        t = [r["tflops"] for r in rs]
        err = f"{errors[name]:.1e}" if exact[name] else "(other product)"
        lines.append(f"| {name} | {statistics.median(t):,.0f} | {min(t):,.0f} | {max(t):,.0f} | "
                     f"{statistics.median(r['sm_mhz'] for r in rs):,.0f} | {statistics.median(r['watts'] for r in rs):,.0f} | {err} |")
    text = "\n".join(lines) + "\n"
    write_atomic(args.out, text)
    if args.json:
        write_atomic(args.json, json.dumps({"meta": meta, "errors": errors, "runs": runs}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
