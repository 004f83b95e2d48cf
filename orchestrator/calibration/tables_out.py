"""Cost tables from ``measure.Measured``: every entry a measurement at the plan's shape, naming its source.

Fractions are of the plan's own cluster peaks (``cluster.gpu.bf16_flops_per_s`` and ``hbm_bytes_per_s``),
the numbers the engine multiplies them back by, so ``plan --calibration FILE`` on the same cluster prices
each op at the time measured (a measurement above a peak is held at the peak: the fraction is at most 1).
GEMMs keep their absolute rate. Measurements that are missing leave their entry out; the ones the tables
cannot do without (a GEMM, attention, a copy, on a CPU the send/recv latency) raise ``CalibrationError``
naming what failed; a GPU with no second GPU to measure against keeps the default tables' collective
latency, its source saying so.
"""

from __future__ import annotations

import datetime
import platform

import torch

from moeplan.orchestrator.calibration.links import link_fits, rss_bytes
from moeplan.orchestrator.calibration.machine_info import load_average, machine_facts
from moeplan.orchestrator.calibration.measure import Measured, Setup
from moeplan.simulator.costs.machine import LinkFit, Machine
from moeplan.simulator.costs.memory_kernels import point_fields
from moeplan.simulator.costs.measured_ops import MeasuredOp
from moeplan.simulator.costs.tables import CostTables, default_tables
from moeplan.simulator.spec.hardware import GpuSpec


class CalibrationError(ValueError):
    """The measurements cannot make cost tables (an entry they need failed); the message says which."""


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def machine_record(m: Measured, setup: Setup, gpu: GpuSpec, command: str, load_before: str) -> Machine:
    facts = machine_facts()
    device = torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else facts["cpu"]
    rss = max((d["rss_bytes"] for d in m.links.values()), default=rss_bytes())
    return Machine(cpu=device, cores=facts["cores"], threads_per_process=setup.threads,
                   memory_bytes=facts["memory_bytes"], process_rss_bytes=rss,
                   dtype=str(setup.dtype).removeprefix("torch."), peak_flops_per_s=gpu.bf16_flops_per_s,
                   memory_bytes_per_s=gpu.hbm_bytes_per_s,
                   load_average=f"before: {load_before}; after: {load_average()}", torch=torch.__version__,
                   python=platform.python_version(), date=now(), command=command)


def _required(m: Measured, device: torch.device) -> None:
    """A CPU's tables need a measured send/recv latency; a GPU alone (no peer) takes the default tables'."""
    plain = [r for r in m.gemm if not r.get("main_grad")]  # every product looks these up; Wgrads into FP32 alone
    missing = [what for what, rows in (("GEMM", plain), ("attention", m.attention), ("copy", m.copy)) if not rows]
    if device.type == "cpu" and not _has_send_recv(m):
        missing.append("send/recv latency")
    if missing:
        why = "; ".join(m.skipped) or "not measured"
        raise CalibrationError(f"calibration measured no {', '.join(missing)} ({why}): no cost tables written")


def _has_send_recv(m: Measured) -> bool:
    return any(r["rows"] and any(c == "send_recv" for c, _, _ in r["rows"]) for r in m.links.values())


def _latency(m: Measured, setup: Setup, gpu: GpuSpec, fits: list) -> tuple[float, str]:
    """The send/recv fit's intercept; on a GPU with no peer measured, the default tables', labelled as such."""
    if _has_send_recv(m):
        p2p = min((f for f in fits if f.collective == "send_recv"), key=lambda f: f.processes)
        return p2p.latency_s, f"{setup.label} {setup.backend} send/recv latency, {p2p.processes} processes (fit intercept)"
    default = default_tables(gpu.name)
    return default.collective_latency_s, f"not measured (no second GPU): the default tables' {default.collective_source}"


def _memory_point(r: dict, src: str) -> dict:
    """A memory class's table point, its fixed seconds too where fitted (``memory_kernels.point_fields``: a class
    with backward bytes only, ``expert_cast``, takes its backward's for both passes)."""
    first, which = (r["fwd"], "forward") if r["fwd"] is not None else (r["bwd"], "backward only")
    return {"kernel": r["kernel"], **point_fields(r["fwd"], r["bwd"]),
            "source": f"{src} {r['implementation']} at {r['shape']}, {first['s'] * 1e6:.1f} us {which}"
                      + (" (its own ops' host time taken off)" if "host_s" in first else "")
                      + (f"; fixed seconds fitted with {r['small_tokens']} tokens" if r.get("small_tokens") else "")}


def _gemm_what(row: dict, dtype: str) -> str:
    if row.get("main_grad"):
        return f"{dtype} Wgrad into FP32 main gradients ({'addmm' if row['groups'] == 1 else 'an addmm an expert'})"
    return f"{dtype} {'mm' if row['groups'] == 1 else 'grouped mm'}"


def calibrated_tables(name: str, m: Measured, setup: Setup, gpu: GpuSpec, machine: Machine) -> CostTables:
    """The ``CostTables`` of the measurements (see module docstring)."""
    _required(m, setup.device)
    src, dt, peak, hbm = setup.label, machine.dtype, gpu.bf16_flops_per_s, gpu.hbm_bytes_per_s
    gemm = [{"precision": "bf16", "m": r["m"], "n": r["n"], "k": r["k"], "groups": r["groups"],
             "flops_per_s": r["flops_per_s"], "main_grad": r.get("main_grad", False), "source": f"{src} {_gemm_what(r, dt)} "
                                                        f"{r['groups']}x{r['m']}x{r['n']}x{r['k']}, {r['s'] * 1e6:.1f} us"}
            for r in m.gemm]
    att = [{"seq_len": r["seq"], "fwd_frac": min(1.0, r["flops"] / r["fwd_s"] / peak),
            "fwd_bwd_frac": min(1.0, 3 * r["flops"] / r["fwd_bwd_s"] / peak)} for r in m.attention]
    kernels = [_memory_point(r, src) for r in m.memory]
    largest = max(m.copy, key=lambda r: r["bytes"])
    fits = link_fits(m.links, src, setup.backend)
    latency, latency_source = _latency(m, setup, gpu, fits)
    return CostTables.model_validate({
        "name": name, "gemm": gemm, "attention_fwd_frac": att[0]["fwd_frac"],
        "attention_fwd_bwd_frac": att[0]["fwd_bwd_frac"], "attention_by_seq": att,
        "attention_source": f"{src} causal SDPA {dt} at the plan's sequence length (fwd+bwd as 3x fwd)",
        "memory_frac": min(1.0, largest["bytes_per_s"] / hbm),
        "memory_source": f"{src} copy of {largest['bytes'] / 2**20:.0f} MiB over the cluster's hbm_bytes_per_s",
        "memory_kernels": kernels, "collective_latency_s": latency,
        "collective_source": latency_source,
        "comm_sms": 0 if setup.device.type == "cpu" else CostTables.model_fields["comm_sms"].default,
        "precisions": ("bf16",), "machine": machine, "links": fits, "host": m.host, "compute_beside_comm": m.beside,
        "measured_ops": tuple(with_norm_collectives(m.pieces, m.norm_collectives, fits))})


def with_norm_collectives(ops: list[MeasuredOp], collectives: dict[tuple[int, int], tuple[tuple[str, int, int], ...]],
                          fits: list[LinkFit]) -> list[MeasuredOp]:
    """``ops`` with each optimizer ``norm`` part timed in one process plus the collectives it runs across
    processes in a job (``collectives`` by parameter set), each at its measured link fit (called once, as a step
    calls it, where measured: ``all_reduce_once``); one with no fit at its process count is left out (and the source
    says so)."""
    by = {(f.collective, f.processes): f for f in fits}
    out = []
    for op in ops:
        wanted = collectives.get((op.params, op.tensors), ()) if op.layer_kind == "optimizer" and op.op == "norm" else ()
        if wanted:
            found = [(c, b, p, by.get((f"{c}_once", p)) or by.get((c, p))) for c, b, p in wanted]
            added = sum(f.seconds(b) for _, b, _, f in found if f is not None)
            said = "; ".join(f"{f.collective if f else c} of {b:,} bytes over {p} processes "
                             + (f"{f.seconds(b) * 1e6:.0f} us" if f else "not measured, left out")
                             for c, b, p, f in found)
            op = op.model_copy(update={"s": op.s + added, "source": f"{op.source}, plus its collectives at the "
                                                                     f"measured link fits ({said})"})
        out.append(op)
    return out
