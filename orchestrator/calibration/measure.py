"""Every measurement ``moeplan calibrate`` makes at a plan's shapes, each one allowed to fail alone.

``measure_all(shapes, setup, advance)`` runs, in order: the GEMMs (one shape at a time), causal attention at
the plan's sequence length, a copy sweep (the memory fallback), each memory-bound kernel class at the
plan's tokens, the optimizer class, the host's per-op cost and the op counts of every piece, the largest
dense GEMM alone and beside communication (``beside``), and the
collectives (real processes: gloo on a CPU, NCCL on GPUs) at the plan's sizes and group spans. A shape
that fails (out of memory, an op the device does not run, a collective that cannot start) is recorded in
``Measured.skipped`` with its reason and left out; nothing is filled in for it. ``advance(label)`` is
called as each piece starts (the CLI's progress bar).

Memory-bound classes and the optimizer are timed whole at the plan's shapes, and their own ops' host time
(counted, times the measured per-op cost) is taken off before they become bandwidth fractions: the
host term prices those ops once, for every piece (``costs.host``). Never less than the bytes at the
fastest copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moeplan.orchestrator.calibration import compute, links
from moeplan.orchestrator.calibration.beside import measure_beside
from moeplan.orchestrator.calibration.host_ops import OpCounter, count_pieces, op_costs
from moeplan.orchestrator.calibration.memory_cases import CASES
from moeplan.orchestrator.calibration.memory_classes import measure
from moeplan.orchestrator.calibration.shapes import PlanShapes
from moeplan.simulator.costs.host import HostCosts, HostOpCost
from moeplan.simulator.costs.tables import CostTables
from moeplan.simulator.spec.model import ModelSpec

log = logging.getLogger(__name__)
FAILURES = (RuntimeError, ValueError, NotImplementedError, MemoryError, OSError)


@dataclass(frozen=True)
class Setup:
    """Where and how to measure: device, dtype of the plan's non-FP8 precision, repetitions, threads."""

    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    reps: int
    threads: int
    backend: str  # "gloo" | "nccl"
    label: str  # the source prefix every entry carries


@dataclass
class Measured:
    gemm: list[dict] = field(default_factory=list)
    attention: list[dict] = field(default_factory=list)
    copy: list[dict] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    host: HostCosts | None = None
    links: dict[int, dict] = field(default_factory=dict)
    beside: list[dict] = field(default_factory=list)  # the largest GEMM alone and beside communication
    skipped: list[str] = field(default_factory=list)


def _attempt(what: str, fn: Callable[[], object], skipped: list[str]) -> object | None:
    try:
        return fn()
    except FAILURES as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        skipped.append(f"{what}: {reason}")
        log.warning("skipped %s: %s", what, reason)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def _own_host_s(run: Callable[[], object], costs: list[HostOpCost], backward: bool) -> float:
    """Host seconds of ``run``'s own ops at the measured per-op costs (backward ops at the backward cost)."""
    with OpCounter() as c:
        run()
    by = {k: sorted(p.s for p in costs if p.op_class == k) for k in ("fwd_compute", "fwd_view", "bwd")}
    med = {k: v[len(v) // 2] for k, v in by.items()}
    return c.host * med["bwd"] if backward else c.compute * med["fwd_compute"] + c.view * med["fwd_view"]


def _net(row: dict, fwd_host_s: float, bwd_host_s: float, copy_peak: float, hbm: float) -> dict:
    """The class's row with its own host time taken off each pass (see module docstring)."""
    for key, host_s in (("fwd", fwd_host_s), ("bwd", bwd_host_s)):
        p = row.get(key)
        if p:
            s = max(p["s"] - host_s, p["bytes"] / copy_peak)
            p.update(measured_s=p["s"], host_s=host_s, s=s, bytes_per_s=p["bytes"] / s, hbm_frac=p["bytes"] / s / hbm)
    return row


def _memory_classes(shapes: PlanShapes, setup: Setup, m: Measured, hbm: float, copy_peak: float) -> None:
    costs = list(m.host.costs) if m.host else []
    for kernel in dict.fromkeys(c.kernel for c in CASES):
        cases = sorted((c for c in CASES if c.kernel == kernel), key=lambda c: not c.in_table)
        usable = [c for c in cases if not c.needs_triton or setup.device.type == "cuda"]
        if not usable:
            m.skipped.append(f"memory class {kernel}: only Triton implementations, none runs on {setup.device.type}")
            continue
        case = usable[0]

        def one(case=case) -> dict:
            row = measure(case, setup.spec, shapes.tokens, setup.device, setup.reps, hbm)
            if not costs or row["fwd"] is None:
                return row
            fwd, bwd = case.build(setup.spec, shapes.tokens, setup.device)
            return _net(row, _own_host_s(fwd, costs, False), _own_host_s(bwd, costs, True) if bwd else 0.0,
                        copy_peak, hbm)

        row = _attempt(f"memory class {kernel} at {shapes.tokens} tokens", one, m.skipped)
        if row is not None and row["fwd"] is not None:
            m.memory.append(row)


def measure_all(shapes: PlanShapes, setup: Setup, hbm_bytes_per_s: float, advance: Callable[[str], None]) -> Measured:
    m, dev, dt, reps = Measured(), setup.device, setup.dtype, setup.reps
    advance(f"{len(shapes.gemms)} GEMM shapes")
    for g in shapes.gemms:
        row = _attempt(f"GEMM {g[3]}x{g[0]}x{g[1]}x{g[2]}", lambda g=g: compute.gemm_rows([g], dt, reps, dev)[0],
                       m.skipped)
        if row is not None:
            m.gemm.append(row)
    advance(f"attention at {shapes.seq_len} tokens")
    m.attention = _attempt(f"attention at seq {shapes.seq_len}",
                           lambda: compute.attention_rows(setup.spec, [shapes.seq_len], dt, reps, dev), m.skipped) or []
    advance("host: per-op cost and op counts")
    costs = _attempt("host per-op cost", lambda: op_costs(dev, max(reps, 20), setup.label), m.skipped)
    counts = _attempt("host op counts", lambda: count_pieces(setup.spec, shapes.mbs, shapes.seq_len, dt, dev,
                                                            setup.label), m.skipped)
    if costs and counts:
        m.host = HostCosts(mode="max" if dev.type == "cuda" else "sum", costs=tuple(costs), counts=tuple(counts))
    advance("copies and memory-bound classes")
    m.copy = _attempt("copy sweep", lambda: compute.copy_rows(reps, device=dev), m.skipped) or []
    copy_peak = max((r["bytes_per_s"] for r in m.copy), default=hbm_bytes_per_s)
    _memory_classes(shapes, setup, m, hbm_bytes_per_s, copy_peak)
    opt = _attempt("optimizer class", lambda: compute.optimizer_row(setup.spec, reps, hbm_bytes_per_s), m.skipped)
    if opt is not None:
        m.memory.append(opt)
    advance("a GEMM beside communication")
    _beside(shapes, setup, m)
    for span, wanted in link_groups(shapes).items():
        advance(f"collectives over {span} processes ({setup.backend})")
        if dev.type == "cuda" and torch.cuda.device_count() < span:
            m.skipped.append(f"collectives over {span} processes: {torch.cuda.device_count()} GPU(s) visible")
            continue
        sizes = sorted({s for _, ss in wanted for s in ss})
        res = _attempt(f"collectives over {span} processes", lambda span=span, sizes=sizes, wanted=wanted:
                       links.measure_links(span, sizes, reps, setup.threads, backend=setup.backend,
                                           collectives=tuple(c for c, _ in wanted)), m.skipped)
        if res is not None:
            m.links[span] = res
    return m


def _beside(shapes: PlanShapes, setup: Setup, m: Measured) -> None:
    """The plan's largest dense GEMM alone and beside communication (``calibration.beside``) on the SMs the
    default tables give all-to-all kernels."""
    dense = [g for g in shapes.gemms if g[3] == 1]
    if not dense:
        return
    mm, n, k, _ = max(dense, key=lambda g: g[0] * g[1] * g[2])
    sms = CostTables.model_fields["comm_sms"].default
    row = _attempt(f"GEMM {mm}x{n}x{k} beside communication", lambda: measure_beside(
        mm, n, k, setup.dtype, setup.device, setup.reps, sms, setup.threads, setup.label), m.skipped)
    if row is not None:
        m.beside.append(row)


def link_groups(shapes: PlanShapes) -> dict[int, list[tuple[str, tuple[int, ...]]]]:
    """Per group span, the collectives and sizes to time; send/recv between two processes always (its
    fit's intercept is the tables' ``collective_latency_s``)."""
    groups: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    for link in shapes.links:
        groups.setdefault(link.processes, []).append((link.collective, link.sizes))
    if not any(c == "send_recv" for c, _ in groups.get(2, [])):
        groups.setdefault(2, []).append(("send_recv", (1024, 65536)))
    return groups
