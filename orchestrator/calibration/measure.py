"""Every measurement ``moeplan calibrate`` makes at a plan's shapes, each one allowed to fail alone.

``measurements(shapes, setup, hbm_bytes_per_s)`` lists them, in order, as data (``Measurement``: its kind,
one of ``KINDS``, what it measures, and a thunk; building the list runs nothing): the GEMMs (one shape
each; on a GPU in BF16 the weight gradients the runtime adds into FP32 main gradients timed so), causal
attention at the plan's sequence length, the host's per-op cost and the op counts of every
piece (on a CPU each piece timed alone, then in the runtime's passes of each pipeline rank: ``stage_steps``,
whose ops replace the alone ones where it runs), a copy sweep (the memory fallback), each memory-bound kernel class at the plan's tokens, the
optimizer class (on a CPU with ZeRO groups of one also the runtime's step over each pipeline rank's own
tensors: ``optimizer_ranks``), the largest dense GEMM alone and beside communication (``beside``), and the collectives
(real processes: gloo on a CPU, NCCL on GPUs) at the plan's sizes and group spans, one group span each.
``measure_all`` runs them, telling ``progress`` as each starts and ends. A measurement that fails (out of
memory, an op the device does not run, a collective that cannot start) is recorded in
``Measured.skipped`` with its reason and left out; nothing is filled in for it. Each timed loop stops
after ``reps`` calls or ``timing.MAX_S`` seconds (``timing.median_s``), so the list's length bounds the
time: ``MAX_MEASUREMENTS`` is the most a plan should ask for.

Memory-bound classes and the optimizer are timed whole at the plan's shapes, and their own ops' host time
(counted, times the measured per-op cost) is taken off before they become bandwidth fractions: the
host term prices those ops once, for every piece (``costs.host``). Never less than the bytes at the
fastest copy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from moeplan.orchestrator.calibration import compute, links
from moeplan.orchestrator.calibration.beside import measure_beside
from moeplan.orchestrator.calibration.host_ops import OpCounter, count_pieces, op_costs, time_pieces
from moeplan.orchestrator.calibration.memory_cases import CASES
from moeplan.orchestrator.calibration.memory_classes import fit_pass, measure
from moeplan.orchestrator.calibration.optimizer_ranks import norm_collectives, time_rank_optimizer
from moeplan.orchestrator.calibration.shapes import PlanShapes
from moeplan.orchestrator.calibration.stage_steps import time_stage_ops
from moeplan.simulator.costs.elementwise import EAGER_CLASSES, priced_as
from moeplan.simulator.costs.host import HostCosts, HostOpCost
from moeplan.simulator.costs.measured_ops import MeasuredOp, measured_optimizer_s
from moeplan.simulator.costs.tables import CostTables
from moeplan.simulator.engine.build import rank_optimizer_set
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.training import OptimizerSpec

log = logging.getLogger(__name__)
FAILURES = (RuntimeError, ValueError, NotImplementedError, MemoryError, OSError)
Kind = Literal["gemm", "attention", "host", "copy", "memory", "optimizer", "beside", "links"]
KINDS: tuple[Kind, ...] = ("gemm", "attention", "host", "copy", "memory", "optimizer", "beside", "links")
# the most measurements a plan should ask for (tests hold the presets to it): V3's one-GPU stage asks for 64 fused
# and 69 eager in BF16 (the op-by-op classes it is priced at, ``_prices_eager``), 38 of them GEMM shapes; each timed
# loop stops after timing.MAX_S
MAX_MEASUREMENTS = 72


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
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)  # the plan's: the optimizer class runs its dtypes


@dataclass
class Measured:
    gemm: list[dict] = field(default_factory=list)
    attention: list[dict] = field(default_factory=list)
    copy: list[dict] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    host: HostCosts | None = None
    pieces: list[MeasuredOp] = field(default_factory=list)  # a CPU's pieces and optimizer steps timed whole
    host_costs: list[HostOpCost] = field(default_factory=list)  # per-op cost, kept for the op counts after it
    links: dict[int, dict] = field(default_factory=dict)
    beside: list[dict] = field(default_factory=list)  # the largest GEMM alone and beside communication
    # per optimizer set timed in one process, the collectives its norm part runs in a job (``norm_collectives``)
    norm_collectives: dict[tuple[int, int], tuple[tuple[str, int, int], ...]] = field(default_factory=dict)
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
    """The class's row with its own host time taken off each pass (see module docstring), at both of its sizes (the
    same ops, so the same host time: it leaves the fitted fixed seconds, ``memory_classes.fit_pass``)."""
    for key, host_s in (("fwd", fwd_host_s), ("bwd", bwd_host_s)):
        p = row.get(key)
        if p:
            s = max(p["s"] - host_s, p["bytes"] / copy_peak)
            small = (p["small_bytes"], max(p["small_s"] - host_s, p["small_bytes"] / copy_peak)) \
                if p.get("small_s") is not None else None
            p.update(measured_s=p["s"], measured_small_s=p.get("small_s"), host_s=host_s,
                     **fit_pass(p["bytes"], s, hbm, small))
    return row


@dataclass(frozen=True)
class Measurement:
    """One entry of ``measurements``: ``run(m)`` measures and stores into ``m``, or raises (then skipped)."""

    kind: Kind
    what: str  # what is measured, at which shape; also the skipped entry's name
    run: Callable[[Measured], None]


class Reporter(Protocol):
    """Told as each measurement starts and ends (the CLI's progress lines: ``calibration.progress``)."""

    def start(self, index: int, total: int, item: Measurement) -> None: ...

    def done(self, item: Measurement, elapsed_s: float, skipped: list[str]) -> None: ...


def measure_all(shapes: PlanShapes, setup: Setup, hbm_bytes_per_s: float, progress: Reporter) -> Measured:
    """Run every ``measurements`` entry in order, each failure recorded and skipped (see module docstring)."""
    m, items = Measured(), measurements(shapes, setup, hbm_bytes_per_s)
    for index, item in enumerate(items):
        progress.start(index, len(items), item)
        before, start = len(m.skipped), time.perf_counter()
        run(item, m)
        progress.done(item, time.perf_counter() - start, m.skipped[before:])
    return m


def run(item: Measurement, m: Measured) -> None:
    """One measurement into ``m``; a failure is recorded in ``m.skipped`` (``"{what}: {reason}"``), not raised."""
    _attempt(item.what, lambda: item.run(m), m.skipped)


def measurements(shapes: PlanShapes, setup: Setup, hbm_bytes_per_s: float) -> list[Measurement]:
    """Every measurement of the plan's shapes, in the order they run (see module docstring); nothing runs here."""
    dev, dt, reps = setup.device, setup.dtype, setup.reps
    # the Wgrads a GPU run adds into FP32 main gradients in cuBLAS are timed so, instead of as plain products
    into = set(shapes.wgrads) if dev.type == "cuda" and dt == torch.bfloat16 else set()
    items = [Measurement("gemm", f"GEMM {g[3]}x{g[0]}x{g[1]}x{g[2]}",
                         lambda m, g=g: m.gemm.append(compute.gemm_rows([g], dt, reps, dev)[0]))
             for g in shapes.gemms if g not in into]
    items += [Measurement("gemm", f"GEMM {g[3]}x{g[0]}x{g[1]}x{g[2]} Wgrad into FP32 main gradients",
                          lambda m, g=g: m.gemm.append(compute.wgrad_main_grad_row(g, reps, dev)))
              for g in sorted(into)]

    def attention(m: Measured) -> None:
        m.attention = compute.attention_rows(setup.spec, [shapes.seq_len], dt, reps, dev)

    def host_costs(m: Measured) -> None:
        m.host_costs = op_costs(dev, max(reps, 20), setup.label)

    def host_counts(m: Measured) -> None:
        counts = count_pieces(setup.spec, shapes.mbs, shapes.seq_len, dt, dev, setup.label)
        if m.host_costs:
            m.host = HostCosts(mode="max" if dev.type == "cuda" else "sum", costs=tuple(m.host_costs),
                               counts=tuple(counts))

    def pieces(m: Measured) -> None:  # a CPU only: a GPU's pieces are priced from their kernels' entries
        m.pieces += time_pieces(setup.spec, shapes.mbs, shapes.seq_len, dt, dev, reps, setup.label, shapes.ep > 1)

    def passes(m: Measured) -> None:  # the same ops in the runtime's passes: replace the pieces timed alone
        ops = time_stage_ops(shapes.inputs, shapes.dp, dt, reps, setup.label)
        keys = {o.key for o in ops}
        m.pieces = [o for o in m.pieces if o.key not in keys] + ops
        _note_norm_collectives(m, shapes)

    def copies(m: Measured) -> None:
        m.copy = compute.copy_rows(reps, device=dev)

    def optimizer(m: Measured) -> None:
        m.memory.append(compute.optimizer_row(setup.spec, reps, hbm_bytes_per_s, dev, setup.optimizer))

    items += [Measurement("attention", f"attention at seq {shapes.seq_len}", attention),
              Measurement("host", "host per-op cost", host_costs),
              Measurement("host", f"host op counts at {shapes.mbs} x {shapes.seq_len} tokens", host_counts),
              *([Measurement("host", f"pieces timed whole at {shapes.mbs} x {shapes.seq_len} tokens", pieces)]
                if dev.type == "cpu" else []),
              *([Measurement("host", "each pipeline rank's passes, timed as the runtime runs them", passes)]
                if dev.type == "cpu" and shapes.inputs is not None else []),
              Measurement("copy", f"copy sweep of {len(compute.COPY_SIZES)} sizes", copies)]
    items += _memory_classes(shapes, setup, hbm_bytes_per_s)
    items.append(Measurement("optimizer", f"optimizer class ({compute.optimizer_params(setup.spec):,} parameters)",
                             optimizer))
    items += _rank_optimizers(shapes, setup)
    items += _beside(shapes, setup)
    return items + [_links(span, wanted, setup) for span, wanted in link_groups(shapes).items()]


def _prices_eager(kernel: str, shapes: PlanShapes) -> bool:
    """Whether the plan prices a class: every class but an op-by-op one (``elementwise.EAGER_CLASSES``), which only
    a plan priced at it (``elementwise.priced_as``: eager, the experts' in BF16 only); without a plan, every class."""
    base = next((k for k, v in EAGER_CLASSES.items() if v == kernel), None)
    if base is None or shapes.inputs is None:
        return True
    training = shapes.inputs.training
    return priced_as(base, training.precision, training.kernels.fusion) == kernel


def _memory_classes(shapes: PlanShapes, setup: Setup, hbm: float) -> list[Measurement]:
    """One measurement per class the plan prices (``_prices_eager``): its table implementation (Triton ones on CUDA
    only) at the plan's tokens."""
    items = []
    for kernel in (k for k in dict.fromkeys(c.kernel for c in CASES) if _prices_eager(k, shapes)):
        cases = sorted((c for c in CASES if c.kernel == kernel), key=lambda c: not c.in_table)
        usable = [c for c in cases if not c.needs_triton or setup.device.type == "cuda"]
        if not usable:  # a fused GPU kernel only (the fused loss, MLA's compiled RoPE), which the CPU runtime never
            continue    # runs (it runs the eager class): not measured, not reported, the tables' default stands

        def one(m: Measured, case=usable[0]) -> None:
            row = _memory_row(case, shapes, setup, m, hbm)
            if row["fwd"] is not None or row["bwd"] is not None:  # expert_cast has backward bytes only
                m.memory.append(row)
        items.append(Measurement("memory", f"memory class {kernel} at {shapes.tokens} tokens", one))
    return items


def _memory_row(case, shapes: PlanShapes, setup: Setup, m: Measured, hbm: float) -> dict:
    row = measure(case, setup.spec, shapes.tokens, setup.device, setup.reps, hbm)
    if row["skipped"]:
        raise NotImplementedError(row["skipped"])
    costs = list(m.host.costs) if m.host else []
    if not costs or row["fwd"] is None:
        return row
    copy_peak = max((r["bytes_per_s"] for r in m.copy), default=hbm)
    fwd, bwd = case.build(setup.spec, shapes.tokens, setup.device)
    return _net(row, _own_host_s(fwd, costs, False), _own_host_s(bwd, costs, True) if bwd else 0.0, copy_peak, hbm)


def _rank_optimizers(shapes: PlanShapes, setup: Setup) -> list[Measurement]:
    """On a CPU, where both ZeRO groups have one rank: the runtime's optimizer step over each pipeline rank's own
    tensors, part by part (``calibration.optimizer_ranks``), one measurement per rank; none where the rank's
    passes were timed with its step after them (``stage_steps``)."""
    inputs = shapes.inputs
    if setup.device.type != "cpu" or inputs is None or shapes.dp * inputs.parallel.cp != 1 or inputs.parallel.ep != 1:
        return []

    def run(m: Measured, pp_rank: int) -> None:
        if measured_optimizer_s(tuple(m.pieces), *rank_optimizer_set(inputs, pp_rank)) is not None:
            return  # timed after the rank's passes (``stage_steps``)
        m.pieces += time_rank_optimizer(inputs, shapes.dp, pp_rank, setup.dtype, setup.reps, setup.label)
        _note_norm_collectives(m, shapes)
    return [Measurement("optimizer", f"optimizer step over pipeline rank {r}'s tensors", lambda m, r=r: run(m, r))
            for r in range(inputs.parallel.pp)]


def _note_norm_collectives(m: Measured, shapes: PlanShapes) -> None:
    """For each optimizer set ``m`` holds, the collectives its norm part runs across processes (priced at the
    measured link fits when the tables are written: ``tables_out``)."""
    inputs = shapes.inputs
    if inputs is None:
        return
    for r in range(inputs.parallel.pp):
        m.norm_collectives[rank_optimizer_set(inputs, r)] = norm_collectives(inputs, shapes.dp, r)


def _beside(shapes: PlanShapes, setup: Setup) -> list[Measurement]:
    """The plan's largest dense GEMM alone and beside communication (``calibration.beside``) on the SMs the
    default tables give all-to-all kernels."""
    dense = [g for g in shapes.gemms if g[3] == 1]
    if not dense:
        return []
    mm, n, k, _ = max(dense, key=lambda g: g[0] * g[1] * g[2])
    sms = CostTables.model_fields["comm_sms"].default

    def run(m: Measured) -> None:
        m.beside.append(measure_beside(mm, n, k, setup.dtype, setup.device, setup.reps, sms, setup.threads,
                                       setup.label))
    return [Measurement("beside", f"GEMM {mm}x{n}x{k} beside communication", run)]


def _links(span: int, wanted: list[tuple[str, tuple[int, ...]]], setup: Setup) -> Measurement:
    sizes = sorted({s for _, ss in wanted for s in ss})

    def run(m: Measured) -> None:
        if setup.device.type == "cuda" and torch.cuda.device_count() < span:
            raise RuntimeError(f"{torch.cuda.device_count()} GPU(s) visible")
        m.links[span] = links.measure_links(span, sizes, setup.reps, setup.threads, backend=setup.backend,
                                            collectives=tuple(c for c, _ in wanted))
    return Measurement("links", f"collectives over {span} processes", run)


def link_groups(shapes: PlanShapes) -> dict[int, list[tuple[str, tuple[int, ...]]]]:
    """Per group span, the collectives and sizes to time; send/recv between two processes always (its
    fit's intercept is the tables' ``collective_latency_s``)."""
    groups: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    for link in shapes.links:
        groups.setdefault(link.processes, []).append((link.collective, link.sizes))
    if not any(c == "send_recv" for c, _ in groups.get(2, [])):
        groups.setdefault(2, []).append(("send_recv", (1024, 65536)))
    return groups
