"""The cpu cluster's cost tables, measured on this machine: GEMMs, attention, memory-bound kernels and gloo links.

    python -P benchmarks/cpu_tables.py          # simulator/costs/data/cpu-{fp32,bf16}.json, docs/results/cpu-tables.md
    python -P benchmarks/cpu_tables.py --quick --out-dir /tmp/t --md /tmp/t/cpu.md   # smoke run (seconds)

One process per rank with ``torch.set_num_threads(1)``, as the runtime runs its CPU ranks (``--threads``
to change). In this process (``orchestrator.calibration.compute``): the GEMMs the simulator prices for ``--model`` (tiny-moe)
at ``--tokens`` per micro-batch, in FP32 and BF16; causal SDPA at ``--seqs``; a copy sweep for the memory
peak; each memory-bound kernel class of ``simulator.costs.elementwise`` at ``--tokens`` through
``elementwise_bench`` (the eager implementation where the table's is a Triton kernel: what a CPU rank
runs). Then ``--processes`` gloo process groups (``orchestrator.calibration.links``): send/recv, all-to-all, all-reduce,
reduce-scatter and all-gather at ``--sizes``. Each time is the median of ``--reps`` runs after warm-up.
Last (not with ``--quick``), ``cpu_validate`` prices one-process steps of the model with the new tables
and times the same steps: the page's "predicted against measured".

It writes two cost-table files (``CostTables`` JSON, loadable by ``moeplan plan --calibration``): the
``cpu`` tables (FP32: the plan's non-FP8 precision run in FP32, as the runtime's CPU ranks do by
default) and ``cpu-bf16``; each prices no FP8 (``precisions``), reserves no SMs for communication
(``comm_sms`` 0: gloo runs on its own threads), and carries the machine (``machine``: peaks, RAM,
versions, date) and the fitted links (``links``), which the ``cpu`` cluster preset reads. Fractions are
of the fastest GEMM measured in either dtype and of the fastest copy, the preset's peaks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import shlex
import sys
from pathlib import Path

import torch

# The sibling modules by name: under python -P this folder is not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpu_validate
from cpu_report import markdown

from moeplan.orchestrator.calibration import compute as cpu_compute
from moeplan.orchestrator.calibration import links as cpu_comm
from moeplan.orchestrator.calibration.machine_info import load_average, machine_facts
from moeplan.orchestrator.calibration.memory_cases import CASES
from moeplan.orchestrator.calibration.memory_classes import measure
from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.costs.machine import LinkFit, Machine
from moeplan.simulator.costs.memory_kernels import point_fields
from moeplan.simulator.costs.tables import CPU_TABLE_FILES, CostTables
from moeplan.simulator.presets.models import MODEL_PRESETS

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"cpu": torch.float32, "cpu-bf16": torch.bfloat16}
FULL = {"tokens": [64, 128, 256, 512], "seqs": [32, 64, 128, 256, 512, 1024], "eps": [1, 2, 4],
        "sizes": [2**p for p in range(10, 25, 2)], "processes": [2, 4], "reps": 20}
QUICK = {"tokens": [64], "seqs": [64], "eps": [1, 2], "sizes": [4096, 2**18], "processes": [2], "reps": 2}
VALIDATE = [(1, 64, 1), (1, 64, 8), (4, 64, 2), (1, 256, 2)]  # (sequences, tokens, micro-batches) of one step


def memory_classes(model: str, tokens: int, peak_bytes_per_s: float, reps: int) -> list[dict]:
    """Each kernel class once: the table's implementation, or the eager one where that is a Triton kernel."""
    spec, rows = MODEL_PRESETS[model](), []
    for kernel in dict.fromkeys(c.kernel for c in CASES):
        cases = [c for c in CASES if c.kernel == kernel]
        case = next((c for c in sorted(cases, key=lambda c: not c.in_table) if not c.needs_triton), None)
        if case is None:  # a Triton kernel only (the fused loss): the CPU runtime never runs it
            continue
        rows.append(measure(case, spec, tokens, cpu_compute.CPU, reps, peak_bytes_per_s))
    return rows


def _frac(x: float) -> float:
    """A measured fraction of a measured peak, at most 1 (a point above its peak is read as the peak)."""
    return min(1.0, x)


def tables(name: str, m: dict, machine: Machine, fits: list[LinkFit], src: str) -> CostTables:
    """The cost tables of one dtype from the measurements ``m``."""
    peak, mem_peak = machine.peak_flops_per_s, machine.memory_bytes_per_s
    dt = str(DTYPES[name]).removeprefix("torch.")
    gemm = [{"precision": "bf16", "m": r["m"], "n": r["n"], "k": r["k"], "groups": r["groups"],
             "flops_per_s": r["flops_per_s"],
             "source": f"{src} {dt} {'torch.mm' if r['groups'] == 1 else 'grouped mm'} "
                       f"{r['groups']}x{r['m']}x{r['n']}x{r['k']}"}
            for r in m["gemm"][name]]
    att = [{"seq_len": r["seq"], "fwd_frac": _frac(r["flops"] / r["fwd_s"] / peak),
                "fwd_bwd_frac": _frac(3 * r["flops"] / r["fwd_bwd_s"] / peak)} for r in m["attention"][name]]
    mid = att[len(att) // 2]
    kernels = [{"kernel": r["kernel"], **point_fields(r["fwd"], r["bwd"]),
                    "source": f"{src} {r['implementation']} at {r['shape']}"
                              f"{'' if r['kernel'] == 'optimizer' else ', bf16'}, of the fastest copy"}
               for r in m["memory"] if r["fwd"]]
    largest = m["copy"][-1]
    p2p = next(f for f in fits if f.collective == "send_recv" and f.processes == min(f.processes for f in fits))
    return CostTables.model_validate({
        "name": name, "gemm": gemm, "attention_fwd_frac": mid["fwd_frac"],
        "attention_fwd_bwd_frac": mid["fwd_bwd_frac"],
        "attention_by_seq": att, "attention_source": f"{src} causal SDPA {dt}, one sequence (fwd+bwd as 3x fwd)",
        "memory_frac": _frac(largest["bytes_per_s"] / mem_peak),
        "memory_source": f"{src} copy of {largest['bytes'] / 2**20:.0f} MiB over the fastest copy",
        "memory_kernels": kernels, "collective_latency_s": p2p.latency_s,
        "collective_source": f"{src} gloo send/recv latency, {p2p.processes} processes (fit intercept)",
        "comm_sms": 0, "precisions": ("bf16",), "machine": machine.model_copy(update={"dtype": dt}), "links": fits})


def measure_all(args: argparse.Namespace, cfg: dict) -> dict:
    """Every measurement of the run, as plain rows."""
    spec, load_before = MODEL_PRESETS[args.model](), load_average()
    shapes = cpu_compute.gemm_shapes(spec, cfg["tokens"], cfg["eps"])
    reps = cfg["reps"]
    log.info("%d GEMM shapes x %d dtypes", len(shapes), len(DTYPES))
    out = {"gemm": {n: cpu_compute.gemm_rows(shapes, dt, reps) for n, dt in DTYPES.items()},
           "peak": {n: cpu_compute.peak_gemm_row(dt, reps) for n, dt in DTYPES.items()},
           "attention": {n: cpu_compute.attention_rows(spec, cfg["seqs"], dt, reps) for n, dt in DTYPES.items()},
           "copy": cpu_compute.copy_rows(reps)}
    copy_peak = max(r["bytes_per_s"] for r in out["copy"])
    out["memory"] = memory_classes(args.model, cfg["tokens"][0], copy_peak, reps)
    out["memory"].append(cpu_compute.optimizer_row(spec, reps, copy_peak))
    log.info("gloo links at %s processes", cfg["processes"])
    out["links"] = {p: cpu_comm.measure_links(p, cfg["sizes"], reps, args.threads) for p in cfg["processes"]}
    out["load_average"] = f"before: {load_before}; after: {load_average()}"
    return out


def machine_record(m: dict, args: argparse.Namespace, command: str) -> Machine:
    facts = machine_facts()
    peak = max(r["flops_per_s"] for rows in [*m["gemm"].values(), list(m["peak"].values())] for r in rows)
    return Machine(cpu=facts["cpu"], cores=facts["cores"], threads_per_process=args.threads,
                   memory_bytes=facts["memory_bytes"],
                   process_rss_bytes=max(d["rss_bytes"] for d in m["links"].values()),
                   dtype="float32", peak_flops_per_s=peak, memory_bytes_per_s=max(r["bytes_per_s"] for r in m["copy"]),
                   load_average=m["load_average"], torch=torch.__version__, python=platform.python_version(),
                   date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), command=command)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "simulator/costs")
    parser.add_argument("--md", type=Path, default=ROOT / "docs/results/cpu-tables.md")
    parser.add_argument("--model", default="tiny-moe", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (the runtime's: 1)")
    parser.add_argument("--quick", action="store_true", help="a few shapes, sizes and reps: a smoke run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    command = "python -P benchmarks/cpu_tables.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    m = measure_all(args, cfg)
    machine = machine_record(m, args, command.strip())
    src = f"[CPU] cpu_tables.py {machine.date}:"
    fits = cpu_comm.link_fits(m["links"], src)
    files = {args.out_dir / CPU_TABLE_FILES[n]: tables(n, m, machine, fits, src) for n in DTYPES}
    if not args.quick:
        by_name = {t.name: (t, DTYPES[t.name]) for t in files.values()}
        m["validation"] = cpu_validate.validation_rows(args.model, by_name, VALIDATE, cfg["reps"])
        m["split"] = {n: cpu_validate.measured_split(args.model, DTYPES[n], *VALIDATE[0][:2]) for n in DTYPES}
    page = markdown(files, m, cfg)
    for path, t in files.items():
        write_atomic(path, json.dumps(t.model_dump(mode="json"), indent=1) + "\n")
    write_atomic(args.md, page)
    log.info("wrote %s and %s", ", ".join(map(str, files)), args.md)


if __name__ == "__main__":
    main()
