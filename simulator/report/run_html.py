"""``RUN/run.html``: a run measured against its plan as one self-contained page.

The comparison table (``run_comparison``), the predicted and the measured per-rank timelines side by
side (bars coloured by op class, compute and communication rows per rank), and per-op-class bars.
Pure: ``run_html`` returns a string; ``moeplan check`` writes it. plotly.js is inlined once (the first
figure), as in ``plan_html``, so the page renders offline; div ids are fixed.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from html import escape

import plotly.graph_objects as go

from moeplan.simulator.contracts.run_report import OP_CLASSES, RankTimeline
from moeplan.simulator.report.run_comparison import Comparison, Line
from moeplan.simulator.report.trace_analysis import Interval, union

CLASS_COLOURS = {"gemm": "#4C78A8", "grouped_gemm": "#F58518", "attention": "#54A24B", "memory_bound": "#B279A2",
                 "communication": "#E45756", "idle": "#BAB0AC"}
MAX_BARS = 20_000
MERGE_GAP_FRAC = 1e-4  # of the makespan: bars this close merge (well under a pixel); doubled until they fit
VERDICT_COLOURS = {"pass": "#2a7", "fail": "#c33", "n/a": "#888"}
_CSS = """
body { font-family: system-ui, sans-serif; margin: 1em auto; padding: 0 1em; max-width: 1400px; color: #222; }
.sub { color: #666; } table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: right; } th { background: #f4f4f4; }
td:nth-child(-n+2) { text-align: left; } .pair { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }
"""


def _bars(intervals: Sequence[Interval], row_of: Mapping[int, int], gap_s: float) -> list[tuple[str, int, float, float]]:
    """(class, y, start, end) after merging each (rank, row, class)'s intervals closer than ``gap_s``."""
    out = []
    for rank, base in row_of.items():
        for k in OP_CLASSES[:-1]:
            spans = union((iv.start_s, iv.end_s + gap_s) for iv in intervals if iv.rank == rank and iv.op_class == k)
            y = base + (1 if k == "communication" else 0)
            out += [(k, y, start, end - gap_s) for start, end in spans]
    return out


def timeline_figure(intervals: Sequence[Interval], labels: Mapping[int, str], title: str) -> go.Figure:
    """Gantt of one step: per rank a compute row and a communication row, one bar trace per op class."""
    row_of = {rank: 3 * i for i, rank in enumerate(sorted(labels))}
    makespan = max((iv.end_s for iv in intervals), default=0.0)
    gap = MERGE_GAP_FRAC * makespan
    bars = _bars(intervals, row_of, gap)
    while len(bars) > MAX_BARS and gap < makespan:
        gap *= 2
        bars = _bars(intervals, row_of, gap)
    figure = go.Figure()
    for k in OP_CLASSES[:-1]:
        mine = [b for b in bars if b[0] == k]
        if mine:
            figure.add_trace(go.Bar(name=k, orientation="h", y=[b[1] for b in mine], base=[b[2] for b in mine],
                                    x=[b[3] - b[2] for b in mine], width=0.8, marker={"color": CLASS_COLOURS[k]},
                                    hovertemplate="start %{base:.4g} s<br>%{x:.4g} s<extra>" + k + "</extra>"))
    ticks = [(y + d, f"{labels[r]} {'comm' if d else 'compute'}") for r, y in row_of.items() for d in (0, 1)]
    figure.update_layout(
        title=title, barmode="overlay", bargap=0, plot_bgcolor="white", height=max(320, 140 + 22 * 3 * len(labels)),
        xaxis={"title": "time (s)", "range": [0, makespan or 1.0]},
        yaxis={"tickvals": [t[0] for t in ticks], "ticktext": [t[1] for t in ticks], "range": [3 * len(labels) - 1, -1]},
        legend={"orientation": "h", "y": 1.0, "yanchor": "bottom"},
    )
    return figure


def op_class_figure(measured: Sequence[RankTimeline], predicted: Sequence[RankTimeline] | None) -> go.Figure:
    """Mean seconds per rank of each op class, predicted beside measured."""
    figure = go.Figure()
    for name, timelines, colour in (("predicted", predicted, "#9ecae9"), ("measured", measured, "#4C78A8")):
        if timelines:
            y = [statistics.fmean(t.op_class_s.get(k, 0.0) for t in timelines) for k in OP_CLASSES]
            figure.add_trace(go.Bar(name=name, x=list(OP_CLASSES), y=y, marker_color=colour))
    figure.update_layout(title="Seconds per step by op class (mean over ranks)", barmode="group", height=400,
                         yaxis_title="seconds per step")
    return figure


def _cell(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "frac":
        return f"{100 * value:.2f}%"
    if unit == "bytes":
        return f"{value / 2**20:,.1f} MiB"
    return f"{value:.4g}"


def lines_table(lines: Sequence[Line]) -> str:
    head = "<tr><th>group</th><th>quantity</th><th>measured</th><th>predicted</th><th>error</th><th>verdict</th></tr>"
    rows = []
    for line in lines:
        error = "—" if line.error is None else f"{100 * line.error:+.2f}% ({line.basis})"
        colour = VERDICT_COLOURS[line.verdict]
        rows.append(f"<tr><td>{escape(line.group)}</td><td title='{escape(line.note)}'>{escape(line.name)}</td>"
                    f"<td>{_cell(line.measured, line.unit)}</td><td>{_cell(line.predicted, line.unit)}</td>"
                    f"<td>{error}</td><td style='color:{colour}'><b>{line.verdict}</b></td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def run_html(comparison: Comparison, title: str, predicted_events: Sequence[Interval] | None,
             measured_events: Sequence[Interval], rank_labels: Mapping[int, str], pp: int,
             measured: Sequence[RankTimeline], predicted: Sequence[RankTimeline] | None) -> str:
    """The page. ``predicted_events``: the plan's simulated step (ranks = pipeline ranks), None when not
    available; ``measured_events``: the run's traces (ranks = global ranks, labelled by ``rank_labels``)."""
    figures = []
    if predicted_events:
        figures.append(("predicted", timeline_figure(predicted_events, {r: f"pp {r}" for r in range(pp)},
                                                     "Predicted step (simulated)")))
    if measured_events:
        figures.append(("measured", timeline_figure(measured_events, rank_labels, "Measured step")))
    figures.append(("ops", op_class_figure(measured, predicted)))
    divs = {key: fig.to_html(full_html=False, include_plotlyjs=i == 0, div_id=f"run-{key}",
                             config={"displaylogo": False}) for i, (key, fig) in enumerate(figures)}
    pair = "".join(f"<div>{divs[k]}</div>" for k in ("predicted", "measured") if k in divs)
    verdict = "PASS" if comparison.passed else "FAIL"
    notes = "".join(f"<li>{escape(n)}</li>" for n in comparison.notes)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body><h1>{escape(title)}</h1>"
        f'<p class="sub">plan inputs sha256 {escape(comparison.plan_sha256[:16])}; median of {comparison.measured_steps} '
        f"step(s) after {comparison.warmup_steps} warm-up; tolerance {100 * comparison.tolerance:g}%: "
        f"<b style='color:{VERDICT_COLOURS['pass' if comparison.passed else 'fail']}'>{verdict}</b></p>"
        f"<ul>{notes}</ul><h2>Measured against predicted</h2>{lines_table(comparison.lines)}"
        f'<h2>Timelines</h2><div class="pair">{pair}</div><h2>Op classes</h2>{divs["ops"]}</body></html>\n'
    )
