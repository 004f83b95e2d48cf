"""The plan file as one self-contained HTML report: summary, step timeline, time and memory per
pipeline rank, phases and candidate layouts.

Pure: ``plan_html`` returns a string; the CLI writes it. plotly.js is inlined exactly once (the
first figure), never loaded from a CDN, so the page renders offline. Div ids are fixed, so the
same plan and trace give the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

import plotly.graph_objects as go

from moeplan.simulator.contracts.plan_file import MemoryReport, PlanFile
from moeplan.simulator.contracts.predictions import StepPrediction
from moeplan.simulator.contracts.trace import TraceEvent
from moeplan.simulator.planning.planner import summary
from moeplan.simulator.report.plan_tables import GiB, candidates_table, phases_table, size, summary_table
from moeplan.simulator.report.timeline import MAX_BARS, timeline_figure

TIME_PARTS = (("compute", "compute_s", "#4C78A8"), ("bubble", "bubble_s", "#BAB0AC"),
              ("exposed communication", "exposed_comm_s", "#E45756"))
MEMORY_PARTS = (("parameters", "param_bytes", "#4C78A8"), ("gradients", "grad_bytes", "#F58518"),
                ("optimizer", "optimizer_bytes", "#54A24B"), ("activations", "activation_bytes", "#E45756"),
                ("transient", "transient_bytes", "#B279A2"))
SECTION_TITLES = {
    "summary": "Summary",
    "timeline": "Simulated step timeline",
    "time": "Time per pipeline rank",
    "memory": "Memory per GPU by pipeline rank",
    "phases": "Training phases",
    "candidates": "Top candidate layouts",
}
_CSS = """
body { font-family: system-ui, sans-serif; margin: 1em auto; padding: 0 1em; max-width: 1360px; color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; } .note { color: #a33; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 12px; text-align: left; }
th { background: #f4f4f4; } table.summary td:first-child { font-weight: 600; white-space: nowrap; }
table.phases td, table.candidates td { text-align: right; }
table.phases td:first-child, table.candidates td:first-child { text-align: left; }
"""


def _rank_labels(n: int) -> list[str]:
    return [f"rank {r}" for r in range(n)]


def rank_time_figure(step: StepPrediction) -> go.Figure:
    """Stacked compute / bubble / exposed communication seconds per pipeline rank."""
    labels = _rank_labels(len(step.per_rank))
    figure = go.Figure()
    for name, field, colour in TIME_PARTS:
        figure.add_trace(go.Bar(name=name, x=labels, y=[getattr(r, field) for r in step.per_rank],
                                marker_color=colour, hovertemplate=f"%{{x}}<br>{name} %{{y:.4g}} s<extra></extra>"))
    figure.add_hline(y=step.step_time_s, line_dash="dash", line_color="#222",
                     annotation_text=f"step {step.step_time_s:.4g} s", annotation_position="top left")
    figure.update_layout(
        title=(f"Where each rank's step goes: bubble {100 * step.bubble_frac:.1f}%, exposed communication "
               f"{100 * step.exposed_comm_frac:.1f}% (mean over ranks)"),
        barmode="stack", yaxis_title="seconds per step", height=420, legend={"orientation": "h", "y": -0.15},
    )
    return figure


def memory_figure(memory: MemoryReport) -> go.Figure:
    """Stacked memory per GPU in GiB for each pipeline rank, with the usable HBM as a line."""
    labels = _rank_labels(len(memory.per_rank))
    figure = go.Figure()
    for name, field, colour in MEMORY_PARTS:
        figure.add_trace(go.Bar(name=name, x=labels, y=[getattr(r, field) / GiB for r in memory.per_rank],
                                marker_color=colour, hovertemplate=f"%{{x}}<br>{name} %{{y:.3g}} GiB<extra></extra>"))
    usable = memory.usable_hbm_bytes / GiB
    figure.add_hline(y=usable, line_dash="dash", line_color="#E45756",
                     annotation_text=f"usable HBM {usable:.1f} GiB", annotation_position="top left")
    verdict = "fits" if memory.fits else "DOES NOT FIT"
    figure.update_layout(
        title=f"Peak {size(memory.peak_bytes_per_gpu)} on rank {memory.peak_rank}: {verdict}",
        barmode="stack", yaxis={"title": "GiB per GPU", "rangemode": "tozero"}, height=420,
        legend={"orientation": "h", "y": -0.15},
    )
    return figure


def _figure_div(figure: go.Figure, div_id: str, first: bool) -> str:
    return figure.to_html(full_html=False, include_plotlyjs=first, div_id=div_id,
                          config={"displaylogo": False})


def _trace_caption(step: StepPrediction, events: Sequence[TraceEvent]) -> str:
    """Say so when the trace is not the predicted step: above ``EXACT_MICROBATCHES`` the step is
    extrapolated and the trace comes from a simulation at fewer micro-batches."""
    if not events:
        return '<p class="note">No trace of the step was given.</p>'
    makespan = max(e.end_s for e in events)
    if abs(makespan - step.step_time_s) <= 0.01 * step.step_time_s:
        return ""
    return (f'<p class="note">This trace is a step of fewer micro-batches than the plan\'s {step.microbatches}: '
            f"{makespan:.4g} s against the predicted {step.step_time_s:.4g} s.</p>")


def _section(key: str, body: str) -> str:
    return f'<section id="{key}"><h2>{escape(SECTION_TITLES[key])}</h2>{body}</section>'


def plan_html(plan: PlanFile, events: Sequence[TraceEvent], max_bars: int = MAX_BARS) -> str:
    """The whole report as one HTML document. ``events`` is the trace of the plan's simulated step
    (``predict_step(..., trace=True)``); without ``plan.predictions`` the timeline, time per rank and
    phases are left out."""
    s = summary(plan)
    pred = plan.predictions
    figures: list[tuple[str, go.Figure]] = []
    if pred is not None:
        figures.append(("timeline", timeline_figure(events, plan.layout.pp, max_bars)))
        figures.append(("time", rank_time_figure(pred.step)))
    figures.append(("memory", memory_figure(plan.memory)))
    sections = [_section("summary", summary_table(s, plan.inputs.cluster.gpu.name))]
    for i, (key, figure) in enumerate(figures):
        caption = _trace_caption(pred.step, events) if key == "timeline" and pred is not None else ""
        sections.append(_section(key, caption + _figure_div(figure, f"plan-{key}", first=i == 0)))
    if pred is not None:
        sections.append(_section("phases", phases_table(pred.run.phases)))
        if pred.top_candidates:
            sections.append(_section("candidates", candidates_table(pred.top_candidates, plan.layout.world)))
    title = f"moeplan: {s['model']} on {s['cluster']} ({s['gpus']} GPUs)"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{escape(title)}</h1>"
        f'<p class="sub">plan schema {plan.schema_version}, moeplan {escape(plan.moeplan_version)}, '
        f"inputs sha256 {escape(plan.inputs_sha256[:16])}</p>"
        + "".join(sections)
        + "</body></html>\n"
    )
