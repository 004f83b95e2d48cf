"""The simulated step as a Gantt chart: one row per (pipeline rank, lane), bars coloured by kind.

A DeepSeek-V3 step traces ~100,000 events; one plotly bar each would make a page of tens of MB.
So events are first merged (same rank, lane and kind, touching within a sub-pixel gap); if that
still leaves more than ``max_bars``, each row is cut into equal time bins, a bin takes the kind
that kept the lane busiest in it (or stays idle when the lane was busy less than half of it), and
runs of equal bins become one bar, at the finest resolution that fits. Bars go into one
``go.Bar`` trace per kind, never one shape per event.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from moeplan.simulator.contracts.trace import LANES, TraceEvent
from moeplan.simulator.schedules.figure import KIND_COLOURS

EVENT_KINDS = ("forward", "backward", "weight-grad", "all-to-all", "p2p", "dp-sync", "optimizer")
EVENT_COLOURS = {
    "forward": KIND_COLOURS["F"],
    "backward": KIND_COLOURS["B"],
    "weight-grad": KIND_COLOURS["W"],
    "all-to-all": "#72B7B2",  # teal
    "p2p": "#EECA3B",  # yellow
    "dp-sync": "#9D755D",  # brown
    "optimizer": "#B279A2",  # purple
}
MAX_BARS = 20_000
MERGE_GAP_FRAC = 1e-4  # of the makespan: well under one pixel of a page-wide chart
FINEST_BINS = 4096  # columns per row when binning; halved until the bars fit

# "12F64 L0 attn", "0B4 L1 combine-bwd", "3I7 head", "12W60": stage, op kind, micro-batch.
_OP = re.compile(r"^\d+([FBIW])\d+\b")
_OP_KINDS = {"F": "forward", "B": "backward", "I": "backward", "W": "weight-grad"}


@dataclass(frozen=True)
class Bar:
    rank: int
    lane: str
    kind: str
    start_s: float
    end_s: float
    label: str  # hover text: the first event's name and how many events the bar stands for


def event_kind(name: str) -> str:
    """The kind of a trace event from its name (see ``simulator.engine.step``)."""
    if name.startswith("p2p "):
        return "p2p"
    if name.startswith("dp-sync"):
        return "dp-sync"
    if name.split(" ")[0] == "optimizer":  # the step, or one of its parts
        return "optimizer"
    if "dispatch" in name or "combine" in name:
        return "all-to-all"
    match = _OP.match(name)
    if match is None:
        raise ValueError(f"trace event name={name!r} has no known kind")
    return _OP_KINDS[match.group(1)]


@dataclass(frozen=True)
class Row:
    """One (rank, lane) of the trace in time order; ``kinds`` index ``EVENT_KINDS``."""

    rank: int
    lane: str
    starts: np.ndarray  # [events] seconds
    ends: np.ndarray  # [events] seconds
    kinds: np.ndarray  # [events] int
    names: tuple[str, ...]


def event_rows(events: Sequence[TraceEvent]) -> list[Row]:
    """The trace split per (rank, lane), rank-major, lanes in ``LANES`` order."""
    grouped: dict[tuple[int, str], list[TraceEvent]] = {}
    for e in sorted(events, key=lambda e: (e.rank, LANES.index(e.lane), e.start_s, e.end_s)):
        grouped.setdefault((e.rank, e.lane), []).append(e)
    return [
        Row(rank, lane, np.array([e.start_s for e in row]), np.array([e.end_s for e in row]),
            np.array([EVENT_KINDS.index(event_kind(e.name)) for e in row]), tuple(e.name for e in row))
        for (rank, lane), row in grouped.items()
    ]


def merge_row(row: Row, gap_s: float) -> list[Bar]:
    """Consecutive events of one kind become one bar when at most ``gap_s`` apart."""
    breaks = (row.kinds[1:] != row.kinds[:-1]) | (row.starts[1:] - row.ends[:-1] > gap_s)
    firsts = np.flatnonzero(np.concatenate([[True], breaks]))
    lasts = np.append(firsts[1:], len(row.names)) - 1
    run_ends = np.maximum.reduceat(row.ends, firsts)
    bars = []
    for a, b, end in zip(firsts, lasts, run_ends):
        label = row.names[a] if a == b else f"{row.names[a]} … {row.names[b]} ({b - a + 1} events)"
        bars.append(Bar(row.rank, row.lane, EVENT_KINDS[row.kinds[a]], float(row.starts[a]), float(end), label))
    return bars


def busy_per_bin(row: Row, edges: np.ndarray) -> np.ndarray:
    """``[kinds, bins]`` seconds each kind kept the lane busy within each bin (``len(edges) - 1`` bins).

    Events on one lane do not overlap (a lane serves one at a time), so the busy time up to ``t``
    is the full events that ended by ``t`` plus the part of the one in progress."""
    busy = np.zeros((len(EVENT_KINDS), len(edges) - 1))
    for k in np.unique(row.kinds):
        mine = row.kinds == k
        starts, ends = row.starts[mine], row.ends[mine]
        done = np.concatenate([[0.0], np.cumsum(ends - starts)])
        i = np.searchsorted(ends, edges, side="right")  # events finished by each edge
        current = np.minimum(i, len(starts) - 1)
        partial = np.where(i < len(starts), np.clip(edges - starts[current], 0.0, None), 0.0)
        busy[k] = np.diff(done[i] + partial)
    return busy


def bin_row(row: Row, edges: np.ndarray) -> list[Bar]:
    """Each bin takes the kind busiest in it, or stays idle when the lane was busy under half of it;
    runs of equal bins become one bar."""
    bins = len(edges) - 1
    width = edges[-1] / bins
    busy = busy_per_bin(row, edges)
    winner = np.where(busy.sum(axis=0) >= width / 2, busy.argmax(axis=0), -1)  # -1: idle
    firsts = np.flatnonzero(np.diff(winner, prepend=-2))  # first bin of each run
    stops = np.append(firsts[1:], bins)
    return [
        Bar(row.rank, row.lane, EVENT_KINDS[winner[a]], float(edges[a]), float(edges[b]),
            f"{b - a} bin(s) of {width * 1e3:.3g} ms")
        for a, b in zip(firsts, stops) if winner[a] >= 0
    ]


def timeline_bars(events: Sequence[TraceEvent], max_bars: int = MAX_BARS) -> tuple[list[Bar], str]:
    """At most ``max_bars`` bars for the trace (or one per row if there are more rows), and a note
    on how they were reduced."""
    if not events:
        return [], "no events"
    rows = event_rows(events)
    makespan = max(float(r.ends.max()) for r in rows)
    gap_s = MERGE_GAP_FRAC * makespan
    bars = [b for row in rows for b in merge_row(row, gap_s)]
    if len(bars) <= max_bars:
        return bars, f"{len(events):,} events, merged where under {gap_s * 1e6:.3g} µs apart"
    bins = FINEST_BINS
    while True:
        edges = np.linspace(0.0, makespan, bins + 1)
        bars = [b for row in rows for b in bin_row(row, edges)]
        if len(bars) <= max_bars or bins == 1:  # at most len(rows) * bins bars, so this ends
            break
        bins //= 2
    note = f"{len(events):,} events, drawn as the busiest kind per {makespan / bins * 1e3:.3g} ms bin"
    return bars, note


def _row_y(rank: int, lane: str) -> int:
    """Rows top to bottom: rank 0 compute, nic, nvlink, a spacer, rank 1 compute, ..."""
    return rank * (len(LANES) + 1) + LANES.index(lane)


def timeline_figure(events: Sequence[TraceEvent], num_ranks: int, max_bars: int = MAX_BARS) -> go.Figure:
    """Gantt of one simulated step; x in seconds, one trace per event kind."""
    bars, note = timeline_bars(events, max_bars)
    makespan = max((e.end_s for e in events), default=0.0)
    # bar starts are plain JSON numbers (plotly encodes only x and y in binary): ~1e-7 of the step is enough
    decimals = 7 - int(np.floor(np.log10(makespan))) if makespan > 0 else 7
    figure = go.Figure()
    for kind in EVENT_KINDS:
        mine = [b for b in bars if b.kind == kind]
        if not mine:
            continue
        figure.add_trace(
            go.Bar(
                name=kind,
                orientation="h",
                y=np.array([_row_y(b.rank, b.lane) for b in mine], dtype=np.int32),
                base=[round(b.start_s, decimals) for b in mine],
                x=np.array([b.end_s - b.start_s for b in mine]),
                width=0.8,
                customdata=[b.label for b in mine],
                marker={"color": EVENT_COLOURS[kind], "line": {"width": 0}},
                hovertemplate="%{customdata}<br>start %{base:.4g} s<br>duration %{x:.4g} s<extra>%{fullData.name}</extra>",
            )
        )
    tickvals = [_row_y(r, lane) for r in range(num_ranks) for lane in LANES]
    ticktext = [f"rank {r} {lane}" if lane == LANES[0] else lane for r in range(num_ranks) for lane in LANES]
    figure.update_layout(
        title=f"Simulated step: {makespan:.4g} s, {num_ranks} pipeline ranks ({note})",
        barmode="overlay",
        xaxis={"title": "time (s)", "range": [0, makespan]},
        # reversed range: rank 0 on top
        yaxis={"tickvals": tickvals, "ticktext": ticktext, "tickfont": {"size": 10},
               "range": [_row_y(num_ranks - 1, LANES[-1]) + 0.6, -0.6]},
        height=max(360, 180 + 16 * _row_y(num_ranks, LANES[0])),
        legend={"orientation": "h", "y": 1.0, "yanchor": "bottom", "x": 0},
        bargap=0,
        plot_bgcolor="white",
    )
    return figure
