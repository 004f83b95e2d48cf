"""Plotly timeline of an executed schedule: one row per rank, one bar per action, coloured by kind.

Imports plotly, so it is not imported by ``simulator.schedules`` itself.
"""

from __future__ import annotations

import plotly.graph_objects as go

from moeplan.simulator.schedules.actions import ACTION_KINDS, ActionKind
from moeplan.simulator.schedules.executor import Timeline
from moeplan.simulator.schedules.schedule import Schedule

KIND_COLOURS: dict[ActionKind, str] = {
    "F": "#4C78A8",  # forward: blue
    "B": "#E45756",  # full backward: red
    "I": "#F58518",  # backward for input: orange
    "W": "#54A24B",  # backward for weights: green
    "FB": "#B279A2",  # overlapped forward + backward: purple
}
KIND_NAMES: dict[ActionKind, str] = {
    "F": "F forward",
    "B": "B full backward",
    "I": "I backward (input)",
    "W": "W backward (weights)",
    "FB": "F&B overlapped",
}


def timeline_figure(schedule: Schedule, timeline: Timeline) -> go.Figure:
    """Horizontal bars per rank (rank 0 on top), x in seconds, text = action token."""
    figure = go.Figure()
    for kind in ACTION_KINDS:
        bars = [(rank, t) for rank, row in enumerate(timeline.ranks) for t in row if t.action.kind == kind]
        if not bars:
            continue
        figure.add_trace(
            go.Bar(
                name=KIND_NAMES[kind],
                orientation="h",
                y=[f"rank {rank}" for rank, _ in bars],
                base=[t.start_s for _, t in bars],
                x=[t.end_s - t.start_s for _, t in bars],
                text=[str(t.action) for _, t in bars],
                textposition="inside",
                insidetextanchor="middle",
                marker={"color": KIND_COLOURS[kind], "line": {"color": "white", "width": 1}},
                hovertemplate="%{text}<br>start %{base:.4g} s<br>duration %{x:.4g} s<extra></extra>",
            )
        )
    figure.update_layout(
        title=(
            f"{schedule.kind}: {schedule.num_ranks} ranks, {schedule.num_stages} stages, "
            f"{schedule.num_microbatches} micro-batches; makespan {timeline.makespan_s:.4g} s, "
            f"bubble {timeline.bubble_s:.4g} s ({100 * timeline.bubble_frac:.1f}%)"
        ),
        barmode="overlay",
        xaxis_title="time (s)",
        yaxis={"autorange": "reversed", "categoryorder": "array",
               "categoryarray": [f"rank {r}" for r in range(schedule.num_ranks)]},
        height=120 + 40 * schedule.num_ranks,
        legend={"orientation": "h", "y": -0.2},
    )
    return figure


def timeline_html(schedule: Schedule, timeline: Timeline) -> str:
    """A self-contained HTML page (plotly.js inlined, no CDN) with the timeline."""
    return timeline_figure(schedule, timeline).to_html(include_plotlyjs=True, full_html=True)
