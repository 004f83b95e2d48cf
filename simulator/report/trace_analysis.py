"""Per-rank summaries of one step's Chrome/Perfetto trace, measured or simulated (the simulator's schema).

A trace is ``{"traceEvents": [...]}`` (or the bare list) of complete events (``"ph": "X"``, ``ts`` and
``dur`` in microseconds from the step's start, ``pid`` the rank); metadata and other phases are
skipped. Each event's op class comes from its name, the simulator's names (``simulator.engine.step``):
``"{stage}{kind}{mb} L{i} {op}"``, ``"{stage}{kind}{mb} embed|head"``, ``"{stage}W{mb}"``, ``"p2p ..."``,
``"dp-sync stage {s}"``, ``"optimizer {part}"`` (``costs.optimizer_step.OPTIMIZER_PARTS``; a bare
``"optimizer"`` in older traces); a measured event with another name says its class in
``args.op_class``. Communication is the ``communication`` class, compute every other class.

Per rank, over the window ``[start, end]`` (default: 0 to the trace's last end, so a rank that
finished early idles until the step ends, as the simulator's step time counts it)::

    compute_s      = |C|                C = union of compute intervals
    comm_s         = |M|                M = union of communication intervals
    hidden_comm_s  = |M ∩ C|            hidden fraction = hidden_comm_s / comm_s
    exposed_comm_s = |M \\ C|
    bubble_s       = window - |C ∪ M|   (= the idle class)
    op_class_s[k]  = |union of class k's intervals|

So bubble_s + exposed_comm_s = window - compute_s, the plan's bubble + exposed communication of the
same rank. The split differs from the plan's: the plan's bubble is the idle time left when the step is
re-simulated with free communication, and a rank waiting on a transfer that runs on *another* rank's
link (a pipeline receive) idles with no communication of its own, which this analysis counts as bubble
(docs/design/run-report.md). Pure Python: no numpy, no I/O but ``read_trace``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeplan.simulator.contracts.run_report import OP_CLASSES, RankTimeline
from moeplan.simulator.contracts.trace import TraceEvent
from moeplan.simulator.costs.optimizer_step import OPTIMIZER_PARTS
from moeplan.simulator.spec.json_input import JsonInputError, read_json_file

COMPUTE_CLASSES = ("gemm", "grouped_gemm", "attention", "memory_bound")
# The op of each simulator event name (the word after "L{i} ", or the bare end op) -> its class.
# "attn" covers attention's projections and core; "W" is every weight-gradient GEMM (dense and grouped).
OP_CLASS_OF = {
    **dict.fromkeys(("attn", "attn-bwd", "attn-down", "q-up", "attn-dw", "attn-down-dx", "recompute"), "attention"),
    **dict.fromkeys(("shared", "shared-bwd", "mlp", "mlp-bwd", "head", "W"), "gemm"),
    **dict.fromkeys(("experts", "experts-bwd"), "grouped_gemm"),
    **dict.fromkeys(("embed", "optimizer"), "memory_bound"),
    **dict.fromkeys(("dispatch", "combine", "dispatch-bwd", "combine-bwd", "cp-gather", "cp-regather",
                     "cp-reduce-scatter", "p2p", "dp-sync"), "communication"),
}
# Ops a run may time inside another node: the runtime runs a MoE layer without expert parallelism as one node,
# ``experts``, the shared expert inside it (``model.runtime.overlap._local_layer``; recalibration reads such runs
# so too: ``calibration.recalibrate``), where a plan prices the shared expert as its own ``shared`` node. Against
# such a run, a plan's ``shared`` time is compared in the class of the node that held it (``held_ops``).
HELD_BY = {"shared": "experts", "shared-bwd": "experts-bwd"}
# Events in one rank's step trace. V3's simulated step (PP16, `moeplan plan --trace`) has at most 6,977 complete
# events per pipeline rank; 2**17 is 19 times that. A 64 MiB trace (the JSON reader's limit) can hold a million tiny
# events: `moeplan check` of 8 such traces took 163 s and 2.2 GB (docs/results/fuzz.md).
MAX_TRACE_EVENTS = 2**17
MAX_TRACE_BYTES = 256 * MAX_TRACE_EVENTS  # 32 MiB; V3's simulated events are 130 bytes each
_TAG = re.compile(r"^\d+([FBIW])\d+$")  # "12F64", "3W7"
_LAYER = re.compile(r"^L\d+$")


class TraceError(ValueError):
    """A trace that is not a step trace in the simulator's schema; the message names the event."""


@dataclass(frozen=True)
class Interval:
    rank: int
    op_class: str
    start_s: float
    end_s: float


def layer_op(name: str) -> str | None:
    """The op of a layer's event name (``"0F1 L2 shared"`` -> ``"shared"``), None for any other name."""
    words = name.split(" ")
    return words[2] if len(words) == 3 and _TAG.match(words[0]) and _LAYER.match(words[1]) else None


def trace_ops(doc: Any) -> set[str]:
    """The layer ops (``layer_op``) among a trace document's complete events."""
    events = doc.get("traceEvents") if isinstance(doc, dict) else doc
    ops = {layer_op(e["name"]) for e in events if isinstance(e, dict) and e.get("ph") == "X"
           and isinstance(e.get("name"), str)} if isinstance(events, list) else set()
    return ops - {None}


def held_ops(run_ops: Collection[str]) -> dict[str, str]:
    """``HELD_BY``'s entries for a run whose traces have the holding node's events and none of the op's own."""
    return {op: holder for op, holder in HELD_BY.items() if op not in run_ops and holder in run_ops}


def op_class(name: str, held: Mapping[str, str] | None = None) -> str:
    """The op class of a simulator trace event name (``TraceError`` for a name it does not know); a layer op in
    ``held`` takes the class of the op holding it (``held_ops``)."""
    words = name.split(" ")
    if words[0] in ("p2p", "dp-sync") and len(words) > 1:
        return OP_CLASS_OF[words[0]]
    if words[0] == "optimizer" and (len(words) == 1 or (len(words) == 2 and words[1] in OPTIMIZER_PARTS)):
        return OP_CLASS_OF["optimizer"]  # a part, or the whole step as runs before 2026-12-06 traced it
    tag = _TAG.match(words[0])
    if tag and len(words) == 1 and tag.group(1) == "W":
        return OP_CLASS_OF["W"]
    if tag and len(words) == 2 and words[1] in ("embed", "head"):
        return OP_CLASS_OF[words[1]]
    op = layer_op(name)
    if op in OP_CLASS_OF:
        return OP_CLASS_OF[(held or {}).get(op, op)]
    raise TraceError(f"trace event name={name!r:.80} is not a simulator op name and has no args.op_class")


def intervals_of(events: Iterable[TraceEvent], held: Mapping[str, str] | None = None) -> list[Interval]:
    """The simulator's own events (``predict_step(..., trace=True)``) as classified intervals."""
    return [Interval(e.rank, op_class(e.name, held), e.start_s, e.end_s) for e in events]


def _number(event: Mapping[str, Any], key: str, i: int) -> float:
    value = event.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise TraceError(f"traceEvents[{i}].{key}={value!r:.40} must be a number >= 0")
    return float(value)


def _event_class(event: Mapping[str, Any], i: int, held: Mapping[str, str] | None = None) -> str:
    args = event.get("args")
    given = args.get("op_class") if isinstance(args, dict) else None
    if given is not None:
        if given not in OP_CLASSES or given == "idle":
            raise TraceError(f"traceEvents[{i}].args.op_class={given!r:.40} is not one of {OP_CLASSES[:-1]}")
        return given
    name = event.get("name")
    if not isinstance(name, str):
        raise TraceError(f"traceEvents[{i}].name={name!r:.40} must be a string")
    return op_class(name, held)


def chrome_intervals(doc: Any, held: Mapping[str, str] | None = None) -> list[Interval]:
    """Classified intervals of a Chrome/Perfetto trace document (complete events only; ``held``: ``op_class``)."""
    events = doc.get("traceEvents") if isinstance(doc, dict) else doc
    if not isinstance(events, list):
        raise TraceError("a trace is a JSON object with a traceEvents list (or that list)")
    out = []
    for i, event in enumerate(events):
        if not isinstance(event, dict):
            raise TraceError(f"traceEvents[{i}] must be an object")
        if event.get("ph") != "X":
            continue
        pid = event.get("pid", 0)
        if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
            raise TraceError(f"traceEvents[{i}].pid={pid!r:.40} must be a rank (an integer >= 0)")
        start = _number(event, "ts", i) / 1e6
        out.append(Interval(pid, _event_class(event, i, held), start, start + _number(event, "dur", i) / 1e6))
    return out


def read_trace(path: str | Path, max_events: int = MAX_TRACE_EVENTS) -> Any:
    """A trace file's document (strict, bounded JSON: ``spec.json_input``) of at most ``max_events`` events
    and ``MAX_TRACE_BYTES`` per ``MAX_TRACE_EVENTS`` of them (checked before it is parsed)."""
    path = Path(path)
    try:
        size = path.stat().st_size  # a device says 0: the reader's own limit bounds it
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise TraceError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if size > (max_bytes := MAX_TRACE_BYTES * max_events // MAX_TRACE_EVENTS):
        raise TraceError(f"{path}: {size:,} bytes, more than the {max_bytes:,} a step's trace may hold")
    try:
        doc = read_json_file(path)
    except JsonInputError as exc:
        raise TraceError(str(exc)) from None
    events = doc.get("traceEvents") if isinstance(doc, dict) else doc
    if isinstance(events, list) and len(events) > max_events:
        raise TraceError(f"{path}: {len(events):,} trace events, more than the {max_events:,} a step's trace may hold")
    return doc


def union(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint, sorted intervals covering the same time as ``spans`` (empty ones dropped)."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(spans: Sequence[tuple[float, float]]) -> float:
    return sum(end - start for start, end in spans)


def overlap(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> float:
    """|a ∩ b| of two results of ``union`` (a merge walk)."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _clipped(intervals: Iterable[Interval], lo: float, hi: float) -> list[tuple[float, float]]:
    return [(max(iv.start_s, lo), min(iv.end_s, hi)) for iv in intervals]


def summarise_rank(intervals: Sequence[Interval], window_s: tuple[float, float], rank: int,
                   pp_rank: int | None = None) -> RankTimeline:
    """One rank's summary over ``window_s`` (every interval counts as this rank's)."""
    lo, hi = window_s
    if not hi > lo:
        raise TraceError(f"window_s={window_s}: the step must end after it starts")
    by_class = {k: union(_clipped((iv for iv in intervals if iv.op_class == k), lo, hi)) for k in OP_CLASSES[:-1]}
    compute = union(s for k in COMPUTE_CLASSES for s in by_class[k])
    comm = by_class["communication"]
    busy = length(union([*compute, *comm]))
    hidden = overlap(comm, compute)
    op_s = {k: length(spans) for k, spans in by_class.items()} | {"idle": max(0.0, hi - lo - busy)}
    return RankTimeline(rank=rank, pp_rank=rank if pp_rank is None else pp_rank, window_s=hi - lo,
                        compute_s=length(compute), comm_s=length(comm), hidden_comm_s=hidden,
                        exposed_comm_s=max(0.0, length(comm) - hidden), bubble_s=op_s["idle"], op_class_s=op_s)


def analyse(intervals: Sequence[Interval], window_s: tuple[float, float] | None = None) -> list[RankTimeline]:
    """Per rank (``Interval.rank``), in rank order; the window defaults to 0 .. the last end."""
    if not intervals:
        raise TraceError("the trace holds no complete events")
    window = window_s or (0.0, max(iv.end_s for iv in intervals))
    ranks = sorted({iv.rank for iv in intervals})
    return [summarise_rank([iv for iv in intervals if iv.rank == r], window, r) for r in ranks]


def trace_window(doc: Any) -> tuple[float, float] | None:
    """A measured trace's step window from ``otherData.step_time_s`` (0 .. that), else None."""
    other = doc.get("otherData") if isinstance(doc, dict) else None
    step = other.get("step_time_s") if isinstance(other, dict) else None
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, int | float) or step <= 0:
        raise TraceError(f"otherData.step_time_s={step!r:.40} must be a number > 0")
    return (0.0, float(step))


def analyse_rank_trace(doc: Any, rank: int, pp_rank: int) -> RankTimeline:
    """A measured trace of one rank's step (``RUN/traces/rank{r}.json``): all its events are that rank's."""
    intervals = chrome_intervals(doc)
    if not intervals:
        raise TraceError(f"the trace of rank {rank} holds no complete events")
    window = trace_window(doc) or (0.0, max(iv.end_s for iv in intervals))
    return summarise_rank(intervals, window, rank, pp_rank)


def mean_fracs(timelines: Sequence[RankTimeline]) -> dict[str, float]:
    """Mean over ranks of bubble, exposed communication, compute and idle (bubble + exposed) per window,
    as the plan's ``bubble_frac`` and ``exposed_comm_frac`` average them."""
    n = len(timelines)
    assert n, "no timelines"
    fracs = {
        "bubble_frac": sum(t.bubble_s / t.window_s for t in timelines) / n,
        "exposed_comm_frac": sum(t.exposed_comm_s / t.window_s for t in timelines) / n,
        "compute_frac": sum(t.compute_s / t.window_s for t in timelines) / n,
    }
    fracs["idle_frac"] = fracs["bubble_frac"] + fracs["exposed_comm_frac"]
    hidden = [t.hidden_comm_s / t.comm_s for t in timelines if t.comm_s > 0]
    if hidden:  # left out where no rank communicated
        fracs["hidden_comm_frac"] = sum(hidden) / len(hidden)
    return fracs
