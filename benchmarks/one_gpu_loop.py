"""The product's loop on one GPU (issue 19): plan a DeepSeek-V3-shaped stage sized to fit, launch it through
Ray on this machine's GPU, check the run against the plan, and (``--calibrate``) predict it again from tables
``moeplan calibrate`` measured on the same GPU.

    python -P benchmarks/one_gpu_loop.py --work /tmp/loop --out docs/results/one-gpu.md            # a GPU
    python -P benchmarks/one_gpu_loop.py --work /tmp/loop --out /tmp/loop.md --cpu-smoke           # plumbing only

The stage is V3's own architecture (``simulator.presets.models.deepseek_v3``: d = 7168, MLA with 128 heads,
8 of n routed experts in 8 groups, 4 kept, V3's vocabulary) cut to three layers, the first dense, with 16
routed experts per MoE layer and no MTP: 4.31B parameters, 67.3 GiB planned on an H100 with FP32 main gradients
and AdamW moments. One pipeline rank, 1F1B, four 4096-token micro-batches per step. The GPU's cluster preset
(``h100`` or ``h200``) is chosen from ``torch.cuda.get_device_name``. ``--cpu-smoke`` runs the same commands on
``tiny-moe`` and the ``cpu`` cluster, to test this script without a GPU. Every command is the CLI a user types;
the report quotes their output.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import itertools
import json
import math
import runpy
import subprocess
import sys
import time
from pathlib import Path

from moeplan.model.runtime.overlap import NODE_RANGE
from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.presets.models import deepseek_v3
from moeplan.simulator.spec.model import ModelSpec

STAGE = {"name": "deepseek-v3-stage", "num_hidden_layers": 3, "first_k_dense_replace": 1, "n_routed_experts": 16,
         "num_nextn_predict_layers": 0}


def stage_spec() -> ModelSpec:
    """V3 cut to one pipeline stage that one 80 GB GPU trains (see the module docstring)."""
    return deepseek_v3().model_copy(update=STAGE)


def gpu_cluster() -> str:
    import torch

    if not torch.cuda.is_available():
        sys.exit("one_gpu_loop: no CUDA GPU here (use --cpu-smoke to test the script)")
    name = torch.cuda.get_device_name()
    for key, preset in (("H200", "h200"), ("H100", "h100")):
        if key in name:
            return preset
    sys.exit(f"one_gpu_loop: no cluster preset for {name!r} (h100 and h200 exist)")


def moeplan(*args: str, timeout: float = 900) -> tuple[int, str]:
    """Run the CLI; (exit code, stdout + stderr); a command past ``timeout`` is killed and reads exit 124."""
    try:
        res = subprocess.run([sys.executable, "-P", "-m", "moeplan.orchestrator.cli", *args], capture_output=True,
                             text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        return 124, f"{out.rstrip()}\n(killed after {timeout:.0f} s)"
    return res.returncode, (res.stdout + res.stderr).rstrip()


def node_kind(name: str) -> str:
    """"0F1 L2 experts" -> "F experts": the micro-batch and layer numbers dropped; other names ("optimizer
    update") kept whole."""
    words = name.split()
    if len(words) > 1 and words[0][:1].isdigit():
        return " ".join([words[0].lstrip("0123456789")[:1]] + [w for w in words[1:] if not w[1:].isdigit()])
    return name


def trace_summary(run_dir: Path, top: int = 12) -> tuple[int, str]:
    """Where rank 0's traced step went: each node kind's total (micro-batch and layer numbers dropped, so
    "0F1 L2 experts" counts as "F experts"), the time between nodes (host work, waits), and the longest
    gaps with the nodes around them. (1, reason) when the run wrote no trace."""
    path = run_dir / "traces" / "rank0.json"
    try:
        events = json.loads(path.read_text())["traceEvents"]
    except (OSError, ValueError, KeyError) as exc:
        return 1, f"no trace at {path}: {exc}"
    spans = sorted((e["ts"], e["dur"], e["name"]) for e in events if e.get("ph") == "X")
    if not spans:
        return 1, f"{path}: no timed events"
    kinds: dict[str, float] = {}
    for _, dur, name in spans:
        kind = node_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + dur
    gaps = [(b[0] - (a[0] + a[1]), a[2], b[2]) for a, b in itertools.pairwise(spans)]
    window = spans[-1][0] + spans[-1][1] - spans[0][0]
    between = sum(max(g, 0.0) for g, _, _ in gaps)
    lines = [f"step window {window / 1e3:.1f} ms over {len(spans)} nodes; between nodes {between / 1e3:.1f} ms", "",
             "node kind                      total ms"]
    lines += [f"{kind:<30} {ms / 1e3:9.1f}" for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])[:top]]
    lines += ["", "longest gaps (ms, after -> before)"]
    lines += [f"{g / 1e3:7.1f}  {a} -> {b}" for g, a, b in sorted(gaps, reverse=True)[:5]]
    return 0, "\n".join(lines)


def kernels_by_node(trace: dict) -> dict[str, dict[str, float]]:
    """Seconds of GPU kernels per (node kind, kernel class) in a ``moeplan launch --kernel-trace`` Chrome trace:
    each kernel goes to the innermost ``NODE_RANGE`` around the host call that launched it, else (a backward
    node's kernels: autograd launches them from its own thread while the node's range stays open on the
    executor's) to the ``NODE_RANGE`` on any thread whose span holds the launch ("(outside nodes)" where none);
    its class by ``model_step_cases.kernel_class`` (a GEMM in an experts node is a grouped one)."""
    here = Path(__file__).parent  # siblings by path: the script runs as ``python -P``, its folder not on sys.path
    gaps, kernel_class = runpy.run_path(str(here / "gpu_gaps.py")), \
        runpy.run_path(str(here / "model_step_cases.py"))["kernel_class"]
    events = trace["traceEvents"]
    stacks = gaps["_stacks"](events)
    launch_of = {e["args"]["correlation"]: i for i, e in enumerate(events)
                 if e.get("ph") == "X" and e.get("cat") in gaps["LAUNCH_CATS"] and "correlation" in e.get("args", {})}
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"][len(NODE_RANGE):])
                   for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith(NODE_RANGE))
    out: dict[str, dict[str, float]] = {}
    for e in events:
        if e.get("ph") != "X" or e.get("cat") != "kernel":
            continue
        i = launch_of.get(e.get("args", {}).get("correlation"))
        nodes = [n[len(NODE_RANGE):] for n in (stacks.get(i, []) if i is not None else []) if n.startswith(NODE_RANGE)]
        if not nodes and i is not None:
            nodes = _open_node(spans, float(events[i]["ts"]))
        kind = node_kind(nodes[-1]) if nodes else "(outside nodes)"
        cls = kernel_class(e["name"], "experts" if "experts" in kind else "")
        row = out.setdefault(kind, {})
        row[cls] = row.get(cls, 0.0) + float(e["dur"]) / 1e6
    return out


def _open_node(spans: list[tuple[float, float, str]], ts: float) -> list[str]:
    """The node ranges (any thread; sorted by start) open at host time ``ts``, outermost first."""
    return [name for start, end, name in spans[:bisect.bisect_right(spans, (ts, math.inf))] if end >= ts]


def kernel_summary(run_dir: Path) -> tuple[int, str]:
    """Rank 0's profiled step (``--kernel-trace``): kernel ms per node kind and class."""
    path = run_dir / "traces" / "rank0-kernels.json"
    try:
        table = kernels_by_node(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError) as exc:
        return 1, f"no kernel trace at {path}: {exc}"
    classes = ("gemm", "grouped_gemm", "attention", "memory_bound", "communication")
    lines = [f"{'node kind':<24}" + "".join(f"{c:>14}" for c in classes) + f"{'total':>10}"]
    for kind, row in sorted(table.items(), key=lambda kv: -sum(kv[1].values())):
        lines.append(f"{kind:<24}" + "".join(f"{1e3 * row.get(c, 0.0):14.2f}" for c in classes)
                     + f"{1e3 * sum(row.values()):10.2f}")
    total = sum(sum(r.values()) for r in table.values())
    lines += ["", f"kernels summed {1e3 * total:.1f} ms in the profiled step (ms; the step after the measured ones)"]
    return 0, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the config, plans and runs")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown report")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp8"))
    parser.add_argument("--fusion", default="fused", choices=("eager", "fused"),
                        help="training.kernels.fusion: the plan prices it and the runtime runs it")
    parser.add_argument("--loss", default="fused", choices=("fp32", "fused"),
                        help="training.kernels.loss: the chunked FP32 loss or the fused Triton one (GPU only)")
    parser.add_argument("--calibrate", action="store_true", help="also predict from `moeplan calibrate`'s tables")
    parser.add_argument("--timeout", type=float, default=900, help="seconds each command may take")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny-moe on the cpu cluster: the plumbing only")
    parser.add_argument("--kernel-trace", action="store_true",
                        help="launch --kernel-trace: one more step profiled, its kernels by node on the page")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.cpu_smoke:
        model, cluster, seq, extra = "tiny-moe", "cpu", "64", []
    else:
        model, cluster, seq = str(args.work / "v3-stage.json"), gpu_cluster(), "4096"
        write_atomic(Path(model), json.dumps(stage_spec().model_dump(mode="json"), indent=1))
        extra = ["--precision", args.precision]
    common = ["--model", model, "--cluster", cluster, "--nodes", "1", "--set", "cluster.node.gpus_per_node=1",
              "--pp", "1", "--ep", "1", "--dp", "1", "--schedule", "1f1b", "--microbatches", "4",
              "--micro-batch-size", "1", "--seq-len", seq, "--global-batch", "4", "--tokens", "1B",
              "--budget-gpu-hours", "2000", "--no-search", "--set", f"training.kernels.fusion={args.fusion}", *extra]
    if not args.cpu_smoke:  # the CPU runtime runs the chunked loss whatever the plan says
        common += ["--set", f"training.kernels.loss={args.loss}"]
    plan_dir, run_dir = args.work / "plan", args.work / "plan" / "run"
    tables, calibrated = args.work / "calibrated.json", args.work / "plan-calibrated"
    calibrated_trace = args.work / "plan-calibrated-trace.json"  # its step, for check's per-class breakdown
    steps = [("plan", ("plan", *common, "--out", str(plan_dir))),
             ("launch", ("launch", str(plan_dir), "--steps", str(args.steps), "--run-dir", str(run_dir),
                         *(["--kernel-trace"] if args.kernel_trace else []))),
             ("check", ("check", str(run_dir)))]
    if args.calibrate:
        steps += [("calibrate", ("calibrate", "--plan", str(plan_dir / "plan.json"), "--out", str(tables))),
                  ("plan, calibrated", ("plan", *common, "--calibration", str(tables), "--out", str(calibrated),
                                        "--trace", str(calibrated_trace))),
                  ("check against it", ("check", str(run_dir), "--plan", str(calibrated / "plan.json"),
                                        "--plan-trace", str(calibrated_trace)))]
    head = ["# The plan -> launch -> check loop on one GPU", "",
            (f"`python -P benchmarks/one_gpu_loop.py {' '.join(sys.argv[1:])}`, "
             f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, model {model}, cluster {cluster}."), ""]
    log: list[tuple[str, tuple[int, str], float]] = []

    def write_report() -> None:  # after every command: a later one that hangs keeps the rest
        lines = list(head)
        for done, (code, text), secs in log:
            lines += [f"## {done} (exit {code}, {secs:.0f} s)", "", "```text", text[-12000:], "```", ""]
        write_atomic(args.out, "\n".join(lines))

    for name, argv in steps:
        if any(code != 0 for done, (code, _), _ in log if done in ("plan", "launch", "calibrate")):
            break  # nothing to launch without a plan, to check after a failed launch, to plan without tables
        print(f"one_gpu_loop: {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        log.append((name, moeplan(*argv, timeout=args.timeout), time.perf_counter() - t0))
        print(f"one_gpu_loop: {name} exit {log[-1][1][0]} in {log[-1][2]:.0f} s", file=sys.stderr, flush=True)
        write_report()
    if any(done == "launch" and code == 0 for done, (code, _), _ in log):
        log.append(("rank 0's traced step", trace_summary(run_dir), 0.0))
        if args.kernel_trace:
            log.append(("rank 0's kernels by node", kernel_summary(run_dir), 0.0))
        write_report()
    failed = [code for name, (code, _), _ in log if name in ("plan", "launch", "calibrate") and code != 0]
    sys.exit(failed[0] if failed else 0)  # a check that misses (exit 1) is a result, not a failure


if __name__ == "__main__":
    main()
