"""Cost tables updated from a measured run: each entry from its own op's durations, never from the step time.

``recalibrate(plan, tables, traces, pp_rank_of, label)`` reads the per-rank traces of a run (the profiled
step, after warm-up) and derives:

- per sub-step op (``"{stage}{kind}{mb} L{i} {op}"`` and ``"{stage}{kind}{mb} head|embed"``, the simulator's
  names; ``i`` counts the stage's layer units, so its kind is the stage record's ``i``-th layer's), the median duration over micro-batches, layers of the same kind and ranks, as a ``MeasuredOp``
  at the run's shape (tokens per micro-batch, sequence length): the engine prices that op with it in
  place of its computed cost (``costs.measured_ops``). A head event covers all heads of its stage
  (main and MTP) and is divided by their number;
- from each rank's ``"optimizer {part}"`` events, where its ZeRO groups have one rank, each part's seconds as a
  ``MeasuredOp`` of layer kind ``optimizer`` at the rank's parameter set (``engine.build.rank_optimizer_set``;
  the median over ranks with the same set), which the engine uses for that rank (what ``moeplan calibrate``
  times over the rank's tensors, replaced by the run's); the norm part counts from the barrier below;
- from each rank's ``optimizer`` events (its parts), the optimizer class's bandwidth fraction: the rank's
  step at the engine's ideal bytes (``engine.build.rank_optimizer_bytes``) over the measured seconds (less
  the host term the tables already add to it), the median over ranks; it replaces the tables' ``optimizer``
  memory-kernel point.
  With a global gradient norm the seconds count from the last rank's optimizer start: until then a rank
  waits in the norm's all-reduce (measured: 5.9 ms of the tiny preset's 25.3 ms last-stage event), a wait
  the engine prices itself (``optimizer_barrier``).

Ops the runtime times inside another op's event (``covered``) are entered at zero, so the covering event is
counted once: without expert parallelism its ``experts`` event holds the shared expert (no ``shared`` event),
and its ``head`` event holds the stage's MTP modules (no ``L{i}`` event for an MTP layer). Measured on the
tiny preset (docs/results/calibration-cpu.md), pricing those ops again put the recalibrated step 20% over
the measured one. The shared expert's weight gradient stays priced (the engine keeps ``dw`` as computed).

Each derived entry is reported with what the old tables priced for it (``Moved``), so a comparison shows
which entries moved and by how much. Events of other names (whole actions, transfers) are not per op and
are left alone.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from dataclasses import dataclass

from moeplan.simulator.accounting.context_parallel import cp_tokens
from moeplan.simulator.accounting.layout import pipeline_stages
from moeplan.simulator.contracts.plan_file import PlanFile
from moeplan.simulator.costs.elementwise import OPTIMIZER
from moeplan.simulator.costs.measured_ops import MEASURABLE_OPS, PASS_OP, LayerKind, MeasuredOp, measured_s
from moeplan.simulator.costs.memory_kernels import MemoryKernelPoint
from moeplan.simulator.costs.optimizer_step import OPTIMIZER_PARTS
from moeplan.simulator.costs.tables import CostTables
from moeplan.simulator.engine.build import (
    SimOptions,
    optimizer_updates,
    rank_optimizer_bytes,
    rank_optimizer_set,
    step_inputs,
)
from moeplan.simulator.engine.host_term import optimizer_host_s
from moeplan.simulator.spec.inputs import PlanInputs

LAYER_EVENT = re.compile(r"^(\d+)([FBI])(\d+) L(\d+) (\S+)$")
END_EVENT = re.compile(r"^(\d+)([FBI])(\d+) (head|embed)$")


@dataclass(frozen=True)
class Moved:
    entry: str
    before: float | None  # what the old tables priced (seconds), or their fraction for a class
    after: float
    unit: str  # "s" or "frac"
    samples: int


def _x_events(doc: object) -> list[dict]:
    events = doc.get("traceEvents", []) if isinstance(doc, dict) else doc
    return [e for e in events if isinstance(e, dict) and e.get("ph") == "X"]


def _events(doc: object) -> list[tuple[str, float]]:
    return [(e["name"], e["dur"] * 1e-6) for e in _x_events(doc)]


def _kind(inputs: PlanInputs, layer: int) -> LayerKind:
    """The kind of global layer ``layer`` (MTP modules number on from ``num_hidden_layers``)."""
    m = inputs.model
    return "mtp" if layer >= m.num_hidden_layers else "moe" if m.is_moe_layer(layer) else "dense"


def _stage_kind(inputs: PlanInputs, stage: int, i: int) -> LayerKind | None:
    """The kind of the ``i``-th layer unit of ``stage`` (the engine's ``L{i}`` counts within the stage)."""
    stages = pipeline_stages(inputs.model, inputs.parallel)
    if stage >= len(stages) or i >= len(stages[stage].layers):
        return None
    return _kind(inputs, stages[stage].layers[i])


def _heads(inputs: PlanInputs) -> list[int]:
    m = inputs.model
    return [int(s.has_head) + sum(u >= m.num_hidden_layers for u in s.layers)
            for s in pipeline_stages(m, inputs.parallel)]


def op_durations(plan: PlanFile, traces: dict[int, object]) -> dict[tuple[LayerKind, str, str], list[float]]:
    """(layer kind, action kind, op) -> durations of every occurrence in the traces (per head for heads)."""
    return op_durations_of(plan.inputs, traces)


def op_durations_of(inputs: PlanInputs, traces: dict[int, object]) -> dict[tuple[LayerKind, str, str], list[float]]:
    """``op_durations`` of traces of a plan's ``inputs`` (``moeplan calibrate``'s own, with no plan file)."""
    heads, out = _heads(inputs), defaultdict(list)
    for doc in traces.values():
        for name, s in _events(doc):
            if (hit := LAYER_EVENT.match(name)) and hit[5] in MEASURABLE_OPS[hit[2]]:
                kind = _stage_kind(inputs, int(hit[1]), int(hit[4]))
                if kind is not None:
                    out[(kind, hit[2], hit[5])].append(s)
            elif (hit := END_EVENT.match(name)) and hit[4] in MEASURABLE_OPS[hit[2]]:
                stage = int(hit[1])
                per = heads[stage] if hit[4] == "head" and stage < len(heads) and heads[stage] else 1
                out[("ends", hit[2], hit[4])].append(s / per)
    return dict(out)


_COVERED_OPS = {"F": ("attn", "mlp", "shared", "experts"), "B": ("attn-bwd", "mlp-bwd", "shared-bwd", "experts-bwd")}


def covered(inputs: PlanInputs, durations: dict[tuple[LayerKind, str, str], list[float]]
            ) -> dict[tuple[LayerKind, str, str], tuple[str, int]]:
    """Ops the run timed inside another op's event: (kind, action, op) -> (the covering event, its count)."""
    out: dict[tuple[LayerKind, str, str], tuple[str, int]] = {}
    if inputs.model.n_shared_experts:
        for (kind, action, op), found in durations.items():
            shared = "shared" if action == "F" else "shared-bwd"
            if op == ("experts" if action == "F" else "experts-bwd") and (kind, action, shared) not in durations:
                out[(kind, action, shared)] = (f"{kind} {action} {op}", len(found))
    has_mtp = any(k == "mtp" for k, _, _ in durations)
    for (kind, action, op), found in durations.items():
        if kind == "ends" and op == "head" and not has_mtp and any(h > 1 for h in _heads(inputs)):
            for mop in _COVERED_OPS["F" if action == "F" else "B"]:
                out[("mtp", action, mop)] = (f"ends {action} head", len(found))
    return out


def _optimizer_span(doc) -> list[tuple[float, float]]:
    """A rank's optimizer step, seconds from the step's start: from its first part's start to its last part's
    end (``"optimizer {part}"`` events; one ``"optimizer"`` event in runs before 2026-12-06). Empty if none."""
    found = [(e["ts"] * 1e-6, (e["ts"] + e["dur"]) * 1e-6) for e in _x_events(doc)
             if e["name"].split(" ")[0] == "optimizer"]
    return [(min(a for a, _ in found), max(b for _, b in found))] if found else []


def _barrier_s(plan: PlanFile, spans: dict[int, list[tuple[float, float]]]) -> float:
    """With a global gradient norm no rank updates before every rank's gradients are in (``engine.step``'s
    optimizer barrier, priced there): the last rank's optimizer start; the wait until then is not the
    optimizer's own time. 0 without one."""
    if plan.inputs.training.optimizer.grad_clip_norm is None:
        return 0.0
    return max((a for v in spans.values() for a, _ in v), default=0.0)


def _optimizer_parts(plan: PlanFile, traces: dict[int, object], pp_rank_of: tuple[int, ...], tokens: int,
                     label: str) -> list[MeasuredOp]:
    """Per parameter set, each optimizer part's seconds in the run (module docstring); none where a ZeRO group
    has more than one rank (the parts hold its collectives)."""
    par = plan.inputs.parallel
    if plan.layout.dp * par.cp != 1 or par.ep != 1:
        return []
    barrier = _barrier_s(plan, {rank: _optimizer_span(doc) for rank, doc in traces.items()})
    found: dict[tuple[int, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rank, doc in traces.items():
        shape = rank_optimizer_set(plan.inputs, pp_rank_of[rank])
        for e in _x_events(doc):
            part = e["name"].removeprefix("optimizer ")
            if e["name"].startswith("optimizer ") and part in OPTIMIZER_PARTS:
                start, end = e["ts"] * 1e-6, (e["ts"] + e["dur"]) * 1e-6
                found[shape][part].append(max(0.0, end - max(start, barrier)))
    return [MeasuredOp(layer_kind="optimizer", action="F", op=part, tokens=tokens, seq_len=par.seq_len_tokens,
                       s=statistics.median(parts[part]), samples=len(parts[part]), params=params, tensors=tensors,
                       source=f"{label}: the run's optimizer {part} event(s) over {tensors} tensors ({params:,} "
                              f"parameters), median of {len(parts[part])}" + (", from the last rank's optimizer "
                                                                           "start" if part == "norm" and barrier else ""))
            for (params, tensors), parts in sorted(found.items())
            if all(p in parts for p in OPTIMIZER_PARTS) for part in OPTIMIZER_PARTS]


def _optimizer_point(plan: PlanFile, tables: CostTables, traces: dict[int, object], pp_rank_of: tuple[int, ...],
                     label: str) -> tuple[MemoryKernelPoint, Moved] | None:
    hbm, fracs = plan.inputs.cluster.gpu.hbm_bytes_per_s, []
    spans = {rank: _optimizer_span(doc) for rank, doc in traces.items()}
    part_bytes = rank_optimizer_bytes(plan.inputs, plan.layout.dp)
    barrier = _barrier_s(plan, spans)
    for rank, found in spans.items():
        for start, end in found:
            s = end - max(start, barrier)
            if s > 0:
                nbytes = sum(part_bytes[pp_rank_of[rank]].values())
                host = optimizer_host_s(tables, 0.0, optimizer_updates(plan.inputs, plan.layout.dp,
                                                                       pp_rank_of[rank]))
                fracs.append(min(1.0, nbytes / max(s - host, 1e-9) / hbm))
    if not fracs:
        return None
    frac = statistics.median(fracs)
    point = MemoryKernelPoint(kernel=OPTIMIZER, fwd_frac=frac, source=f"{label}: the run's optimizer events, "
                              f"{len(fracs)} rank(s), at the engine's bytes of its parts (median)")
    return point, Moved("memory class optimizer (fraction of hbm)", tables.memory_fracs(OPTIMIZER)[0], frac, "frac",
                        len(fracs))


def _priced(plan: PlanFile, tables: CostTables) -> dict[tuple[LayerKind, str, str], float]:
    """What ``tables`` price for each measurable op of the plan's step (first unit of each kind; a stage's first
    unit without the pass's work outside its nodes, ``costs.measured_ops.PASS_OP``, which the engine adds to it)."""
    m, lay, par = plan.inputs.model, plan.layout, plan.inputs.parallel
    si = step_inputs(plan.inputs, lay.dp, lay.microbatches, opts=SimOptions(tables=tables))
    shape = (cp_tokens(par.micro_batch_size, par.seq_len_tokens, par.cp), par.seq_len_tokens)
    lead_f, lead_b = (measured_s(tables.measured_ops, "ends", a, PASS_OP, *shape) or 0.0 for a in ("F", "B"))
    out: dict[tuple[LayerKind, str, str], float] = {}
    for st, spec in zip(si.stages, pipeline_stages(m, par), strict=True):
        for i, (u, layer) in enumerate(zip(st.units, spec.layers, strict=True)):
            k = _kind(plan.inputs, layer)
            f, b = (lead_f, lead_b) if i == 0 and not par.cp > 1 else (0.0, 0.0)
            fwd = {"attn": u.attn_fwd_s - f, "mlp": u.mlp_fwd_s, "shared": u.mlp_fwd_s, "experts": u.experts_fwd_s}
            bwd = {"attn-bwd": u.recompute_s + u.attn_dx_s - b, "mlp-bwd": u.mlp_dx_s, "shared-bwd": u.mlp_dx_s,
                   "experts-bwd": u.experts_dx_s}
            dw = {"attn-bwd": u.attn_dw_s, "mlp-bwd": u.mlp_dw_s, "shared-bwd": u.mlp_dw_s, "experts-bwd": u.experts_dw_s}
            for op, s in fwd.items():
                out.setdefault((k, "F", op), s)
            for op, s in bwd.items():
                out.setdefault((k, "I", op), s)
                out.setdefault((k, "B", op), s + dw[op])
    e = si.ends
    out.update({("ends", "F", "embed"): e.embed_fwd_s, ("ends", "F", "head"): e.head_fwd_s,
                ("ends", "I", "head"): e.head_dx_s, ("ends", "B", "head"): e.head_dx_s + e.head_dw_s})
    return out


def measured_ops_of(inputs: PlanInputs, found: dict[tuple[LayerKind, str, str], list[float]],
                    label: str) -> list[MeasuredOp]:
    """One ``MeasuredOp`` per op found (the median of its durations), then the ops ``covered`` by another's event
    at zero, at the plan's shape (tokens per micro-batch on one GPU, sequence length)."""
    par = inputs.parallel
    shape = {"tokens": cp_tokens(par.micro_batch_size, par.seq_len_tokens, par.cp), "seq_len": par.seq_len_tokens}
    ops = [MeasuredOp(layer_kind=kind, action=action, op=op, s=statistics.median(durations), samples=len(durations),
                      source=f"{label}: median of {len(durations)} event(s)", **shape)
           for (kind, action, op), durations in sorted(found.items())]
    return ops + [MeasuredOp(layer_kind=kind, action=action, op=op, s=0.0, samples=n,
                             source=f"{label}: timed inside the {by} event(s)", **shape)
                  for (kind, action, op), (by, n) in sorted(covered(inputs, found).items())]


def _priced_parts(plan: PlanFile, tables: CostTables) -> dict[tuple[int, int], dict[str, float]]:
    """What ``tables`` price for each pipeline rank's optimizer parts, by the rank's parameter set."""
    lay = plan.layout
    tails = step_inputs(plan.inputs, lay.dp, lay.microbatches, opts=SimOptions(tables=tables)).tails
    return {rank_optimizer_set(plan.inputs, r): tail.optimizer_parts_s for r, tail in enumerate(tails)}


def recalibrate(plan: PlanFile, tables: CostTables, traces: dict[int, object], pp_rank_of: tuple[int, ...],
                label: str) -> tuple[CostTables, list[Moved]]:
    """``tables`` with the run's per-op measurements in place (see module docstring), and what moved."""
    par = plan.inputs.parallel
    tokens = cp_tokens(par.micro_batch_size, par.seq_len_tokens, par.cp)
    priced = _priced(plan, tables)
    found = op_durations(plan, traces)
    ops = measured_ops_of(plan.inputs, found, label)
    zero = covered(plan.inputs, found)
    moved = [Moved(f"{o.layer_kind} {o.action} {o.op}" + (f" (in {zero[k][0]})" if k in zero else ""),
                   priced.get(k), o.s, "s", o.samples) for o in ops for k in [(o.layer_kind, o.action, o.op)]]
    kernels = list(tables.memory_kernels)
    opt = _optimizer_point(plan, tables, traces, pp_rank_of, label)
    if opt is not None:
        kernels = [k for k in kernels if k.kernel != OPTIMIZER] + [opt[0]]
        moved.append(opt[1])
    priced_parts = _priced_parts(plan, tables)
    for op in _optimizer_parts(plan, traces, pp_rank_of, tokens, label):
        ops.append(op)
        moved.append(Moved(f"optimizer {op.op} ({op.tensors} tensors)",
                           priced_parts.get((op.params, op.tensors), {}).get(op.op), op.s, "s", op.samples))
    kept = [o for o in tables.measured_ops if o.key not in {n.key for n in ops}]
    data = tables.model_dump(mode="json") | {
        "name": f"{tables.name}+run", "memory_kernels": [k.model_dump(mode="json") for k in kernels],
        "measured_ops": [o.model_dump(mode="json") for o in kept + ops]}
    return CostTables.model_validate(data), moved
