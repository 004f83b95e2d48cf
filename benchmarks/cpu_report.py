"""The results page of benchmarks/cpu_tables.py: the machine, every measurement, the tables and the links' fits."""

from __future__ import annotations

from pathlib import Path

from moeplan.simulator.costs.tables import CostTables

ROOT = Path(__file__).resolve().parents[1]


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _gemm(m: dict) -> list[str]:
    names = list(m["gemm"])
    lines = ["## GEMMs", "", ("Every shape the simulator prices for the model (linears in forward, input- and "
             "weight-gradient form at each token count; routed experts' grouped products at each EP size), and "
             "the square peak shape. us = median microseconds; GFLOP/s = 2 groups m n k / s."), "",
             "| groups | m | n | k | " + " | ".join(f"{n} us | {n} GFLOP/s" for n in names) + " |",
             "|---:|---:|---:|---:|" + "---:|---:|" * len(names)]
    rows = list(zip(*(m["gemm"][n] + [m["peak"][n]] for n in names)))
    for row in rows:
        r0 = row[0]
        cells = " | ".join(f"{r['s'] * 1e6:,.1f} | {r['flops_per_s'] / 1e9:,.2f}" for r in row)
        lines.append(f"| {r0['groups']} | {r0['m']} | {r0['n']} | {r0['k']} | {cells} |")
    return lines + [""]


def _attention(m: dict, peak: float) -> list[str]:
    lines = ["## Attention (causal SDPA, one sequence)", "", f"Fractions are of the peak {peak / 1e9:,.2f} GFLOP/s.",
             "", "| dtype | seq | fwd us | fwd+bwd us | fwd frac | fwd+bwd frac (3x) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, rows in m["attention"].items():
        for r in rows:
            lines.append(f"| {name} | {r['seq']} | {r['fwd_s'] * 1e6:,.1f} | {r['fwd_bwd_s'] * 1e6:,.1f} | "
                         f"{r['flops'] / r['fwd_s'] / peak:.2%} | {3 * r['flops'] / r['fwd_bwd_s'] / peak:.2%} |")
    return lines + [""]


def _memory(m: dict, tokens: int) -> list[str]:
    lines = ["## Memory", "", "Copy sweep (`dst.copy_(src)`, bytes read + written):", "",
             "| bytes | us | GB/s |", "|---:|---:|---:|"]
    lines += [f"| {r['bytes']:,} | {r['s'] * 1e6:,.1f} | {r['bytes_per_s'] / 1e9:,.2f} |" for r in m["copy"]]
    lines += ["", (f"Memory-bound kernel classes at {tokens} tokens (`elementwise_bench`, bf16 tensors; ideal bytes as "
              "`simulator/costs/elementwise.py` counts them; fraction of the fastest copy):"), "",
              "| class | implementation | fwd us | fwd frac | bwd us | bwd frac |", "|---|---|---:|---:|---:|---:|"]
    for r in m["memory"]:
        if r["fwd"] is None:
            continue
        bwd = f"{r['bwd']['s'] * 1e6:,.1f} | {r['bwd']['hbm_frac']:.2%}" if r["bwd"] else "— | —"
        lines.append(f"| {r['kernel']} | {r['implementation']} | {r['fwd']['s'] * 1e6:,.1f} | "
                     f"{r['fwd']['hbm_frac']:.2%} | {bwd} |")
    return lines + [""]


def _links(t: CostTables) -> list[str]:
    lines = ["## gloo links", "", ("Median of the slowest process; fit = latency + bytes moved / bandwidth, bytes as "
             "`simulator/costs/machine.py` counts them (send/recv: one way, half a ping-pong)."), "",
             "| collective | processes | latency us | GB/s | buffer bytes: measured us (fit us) |",
             "|---|---:|---:|---:|---|"]
    for f in t.links:
        pts = ", ".join(f"{p.buffer_bytes:,}: {p.s * 1e6:,.0f} ({f.seconds(p.buffer_bytes) * 1e6:,.0f})"
                        for p in f.points)
        lines.append(f"| {f.collective} | {f.processes} | {f.latency_s * 1e6:,.1f} | {f.bytes_per_s / 1e9:,.3f} "
                     f"| {pts} |")
    return lines + [""]


def _validation(m: dict) -> list[str]:
    rows = m.get("validation")
    if not rows:
        return []
    lines = ["## Predicted against measured: one step in one process", "",
             ("`benchmarks/cpu_validate.py`: the plan of one process (`--cluster cpu --set "
             "cluster.node.gpus_per_node=1`, pp = ep = dp = 1: no communication) priced with the tables above, "
             "against the same step of "
             "`moeplan.model.Transformer` (MTP included; forward, loss, backward per micro-batch, then AdamW) in the "
             "tables' dtype on one thread, median of the same number of runs."), "",
             "| tables | sequences x tokens | micro-batches | predicted ms | measured ms | predicted / measured |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tables']} | {r['mbs']} x {r['seq']} | {r['microbatches']} | "
                     f"{r['predicted_s'] * 1e3:,.2f} | {r['measured_s'] * 1e3:,.2f} | "
                     f"{r['predicted_s'] / r['measured_s']:.2f} |")
    first = rows[0]
    lines += ["", (f"Where the measured time goes: one step of {first['mbs']} x {first['seq']} tokens, one micro-batch, "
                   "self CPU time by class from `torch.profiler` (`cpu_validate.measured_split`):"), "",
              "| class | " + " | ".join(f"{n} ms" for n in m["split"]) + " |", "|---|" + "---:|" * len(m["split"])]
    for cls in next(iter(m["split"].values())):
        lines.append(f"| {cls} | " + " | ".join(f"{s[cls] * 1e3:,.2f}" for s in m["split"].values()) + " |")
    return lines + [""]


def markdown(files: dict[Path, CostTables], m: dict, cfg: dict) -> str:
    first = next(iter(files.values()))
    mc = first.machine
    assert mc is not None, "cpu tables carry their machine"
    lines = [
        "# Cost tables of the cpu cluster, measured on this machine", "",
        f"`{mc.command}` on {mc.cpu} ({mc.cores} logical CPUs, {mc.memory_bytes / 2**30:.1f} GiB RAM), {mc.date}; "
        f"torch {mc.torch}, Python {mc.python}; {mc.threads_per_process} torch thread(s) per process, as the "
        f"runtime runs its CPU ranks. Load averages (1, 5, 15 min) {mc.load_average}: the machine is shared, "
        "so other work may slow what was measured. Every time is the median of "
        f"{cfg['reps']} runs after warm-up, wall clock. Written: "
        + ", ".join(f"`{_shown(p)}` (`{t.name}`, {t.machine.dtype if t.machine else ''})" for p, t in files.items())
        + ". The `cpu` cluster preset (`simulator/presets/clusters.py`) reads its peaks and links from the first.", "",
        "| peak | value | what |", "|---|---:|---|",
        (f"| GEMM | {mc.peak_flops_per_s / 1e9:,.2f} GFLOP/s | fastest GEMM measured, either dtype: the preset's "
        "`bf16_flops_per_s` |"),
        f"| memory | {mc.memory_bytes_per_s / 1e9:,.2f} GB/s | fastest copy: the preset's `hbm_bytes_per_s` |",
        (f"| process | {mc.process_rss_bytes / 2**20:,.0f} MiB | resident after importing torch and joining gloo: "
        "the preset's `memory_reserved_bytes` |"),
        f"| latency | {first.collective_latency_s * 1e6:,.1f} us | {first.collective_source} |", "",
    ]
    lines += (_validation(m) + _links(first) + _attention(m, mc.peak_flops_per_s) + _memory(m, cfg["tokens"][0])
              + _gemm(m))
    return "\n".join(lines)
