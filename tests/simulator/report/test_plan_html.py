"""The plan's HTML report: event kinds, exact merged and binned timelines, the bar bound, the page's
sections, plotly.js inlined once, no CDN, the size bound on a DeepSeek-V3 step."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplan.simulator.contracts.plan_file import Candidate, PlanInputs
from moeplan.simulator.contracts.trace import TraceEvent
from moeplan.simulator.planning.planner import plan_with_predictions, summary
from moeplan.simulator.planning.predict import predict_step
from moeplan.simulator.presets.clusters import h200, h800
from moeplan.simulator.presets.models import deepseek_v3, tiny_moe
from moeplan.simulator.presets.recipes import deepseek_v3_recipe, default_recipe
from moeplan.simulator.report.plan_html import SECTION_TITLES, memory_figure, plan_html, rank_time_figure
from moeplan.simulator.report.plan_tables import budget_verdict, count, size
from moeplan.simulator.report.timeline import (
    EVENT_KINDS,
    MAX_BARS,
    Bar,
    bin_row,
    busy_per_bin,
    event_kind,
    event_rows,
    merge_row,
    timeline_bars,
    timeline_figure,
)
from moeplan.simulator.spec.parallel import ParallelSpec

PLOTLY_JS_MARKER = "plotly.js v"  # the licence banner at the top of plotly.min.js


def _plan_and_trace(inputs: PlanInputs):
    plan = plan_with_predictions(inputs, (), "given")
    _, events = predict_step(plan.inputs, plan.layout.dp, plan.layout.microbatches, trace=True)
    return plan, events


@pytest.fixture(scope="module")
def tiny():
    r = default_recipe()
    phase = r.training.phases[0].model_copy(update={"global_batch_seqs": 64})
    inputs = PlanInputs(
        model=tiny_moe(), cluster=h200(1),
        parallel=ParallelSpec(pp=2, ep=4, schedule="dualpipe", seq_len_tokens=256),
        training=r.training.model_copy(update={"phases": (phase,)}), budget=r.budget,
    )
    return _plan_and_trace(inputs)


def _sections(html: str) -> list[str]:
    return re.findall(r'<section id="([a-z]+)">', html)


def _figure_data(html: str, div_id: str) -> list[dict]:
    """The traces plotly is given for one figure div."""
    match = re.search(rf'Plotly\.newPlot\(\s*"{div_id}",\s*', html)
    assert match, div_id
    data, _ = json.JSONDecoder().raw_decode(html, match.end())
    return data


# -- event kinds and bars -------------------------------------------------------------------


def test_event_kinds_from_names():
    names = {
        "3F7 L2 attn": "forward", "12F64 embed": "forward", "12F64 L0 dispatch": "all-to-all",
        "0B4 L1 combine-bwd": "all-to-all", "0B4 L1 experts-bwd": "backward", "12I61 L3 attn-bwd": "backward",
        "3I7 head": "backward", "12W60": "weight-grad", "p2p F3/7": "p2p", "p2p G0/1": "p2p",
        "dp-sync stage 2": "dp-sync", "optimizer": "optimizer",
    }
    assert {n: event_kind(n) for n in names} == names
    with pytest.raises(ValueError, match="'warmup'"):
        event_kind("warmup")


def _ev(lane, name, start, end, rank=0):
    return TraceEvent(rank, lane, name, start, end)


def test_merge_joins_touching_events_of_one_kind_only():
    events = [
        _ev("compute", "0F0 L0 attn", 0.0, 1.0), _ev("compute", "0F0 L0 experts", 1.05, 2.0),
        _ev("compute", "0B0 L0 attn-bwd", 2.0, 3.0), _ev("compute", "0F1 L0 attn", 3.5, 4.0),
        _ev("nic", "0F0 L0 dispatch", 0.5, 0.7),
    ]
    bars = [b for row in event_rows(events) for b in merge_row(row, gap_s=0.1)]
    assert bars == [
        Bar(0, "compute", "forward", 0.0, 2.0, "0F0 L0 attn … 0F0 L0 experts (2 events)"),
        Bar(0, "compute", "backward", 2.0, 3.0, "0B0 L0 attn-bwd"),
        Bar(0, "compute", "forward", 3.5, 4.0, "0F1 L0 attn"),  # 0.5 s after the last forward
        Bar(0, "nic", "all-to-all", 0.5, 0.7, "0F0 L0 dispatch"),
    ]


def test_bins_take_the_busiest_kind_and_drop_half_idle_bins():
    events = [
        _ev("compute", "0F0 L0 attn", 0.0, 1.6), _ev("compute", "0B0 L0 attn-bwd", 1.6, 2.0),
        _ev("compute", "0W0", 2.0, 2.4), _ev("compute", "optimizer", 3.6, 4.0),
    ]
    [row] = event_rows(events)
    # bins [0,1] F; [1,2] F 0.6 vs B 0.4 -> F; [2,3] W 0.4 busy < half -> idle; [3,4] optimizer 0.4 -> idle
    assert bin_row(row, np.linspace(0.0, 4.0, 5)) == [Bar(0, "compute", "forward", 0.0, 2.0, "2 bin(s) of 1e+03 ms")]
    # halves: [0,.5] [.5,1] [1,1.5] F; [1.5,2] B 0.4 > F 0.1; [2,2.5] W 0.4; [3.5,4] optimizer 0.4
    bars = bin_row(row, np.linspace(0.0, 4.0, 9))
    assert [(b.kind, b.start_s, b.end_s) for b in bars] == [
        ("forward", 0.0, 1.5), ("backward", 1.5, 2.0), ("weight-grad", 2.0, 2.5), ("optimizer", 3.5, 4.0),
    ]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.001, 1.0), st.sampled_from(["0F1", "0B1", "0W1"])),
                min_size=1, max_size=30),
       st.integers(1, 50))
def test_binning_keeps_every_busy_second(gaps_durations_names, bins):
    t, events = 0.0, []
    for gap, duration, name in gaps_durations_names:
        events.append(_ev("compute", name, t + gap, t + gap + duration))
        t += gap + duration
    [row] = event_rows(events)
    edges = np.linspace(0.0, t, bins + 1)
    busy = busy_per_bin(row, edges)
    assert busy.shape == (len(EVENT_KINDS), bins)
    assert busy.sum() == pytest.approx(sum(e.end_s - e.start_s for e in events))
    assert np.all(busy >= -1e-12) and np.all(busy.sum(axis=0) <= np.diff(edges) + 1e-9)


def test_real_trace_is_merged_exactly_or_binned_under_the_bound(tiny):
    _, events = tiny
    bars, note = timeline_bars(events)
    assert "merged" in note and len(bars) < len(events)
    for e in events:  # every event lies inside a bar of its rank, lane and kind
        assert any(b.rank == e.rank and b.lane == e.lane and b.kind == event_kind(e.name)
                   and b.start_s <= e.start_s and e.end_s <= b.end_s for b in bars), e
    few, note = timeline_bars(events, max_bars=40)
    assert 0 < len(few) <= 40 and "bin" in note
    assert {b.rank for b in few} == {0, 1}


def _synthetic_step(ranks: int, per_rank: int) -> list[TraceEvent]:
    """V3-sized trace: forward and backward interleaved layer by layer, all-to-all on both links."""
    events = []
    for r in range(ranks):
        t = 0.0
        for i in range(per_rank):
            name = f"{r}F{i} L0 attn" if i % 2 else f"{r}B{i} L0 attn-bwd"
            events.append(TraceEvent(r, "compute", name, t, t + 4e-3))
            events.append(TraceEvent(r, "nic", f"{r}F{i} L0 dispatch", t + 1e-3, t + 4e-3))
            events.append(TraceEvent(r, "nvlink", f"{r}F{i} L0 combine", t + 2e-3, t + 3e-3))  # 20% busy: binned away
            t += 5e-3
    return events


def test_timeline_figure_of_a_v3_sized_trace_stays_small():
    events = _synthetic_step(ranks=16, per_rank=2100)  # ~100k events
    figure = timeline_figure(events, num_ranks=16, max_bars=20_000)
    assert sum(len(t.base) for t in figure.data) <= 20_000
    assert len(figure.to_html(full_html=False, include_plotlyjs=False)) < 2_000_000
    assert {t.name for t in figure.data} == {"forward", "backward", "all-to-all"}


# -- the page -------------------------------------------------------------------------------


def test_page_has_every_section_in_order_and_plotly_js_once(tiny):
    plan, events = tiny
    html = plan_html(plan, events)
    assert _sections(html) == ["summary", "timeline", "time", "memory", "phases"]  # no search: no candidates
    for key in _sections(html):
        assert f"<h2>{SECTION_TITLES[key]}</h2>" in html
    assert html.count(PLOTLY_JS_MARKER) == 1
    assert not re.search(r"<script[^>]+src=", html) and "cdn.plot.ly/plotly-" not in html
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert plan_html(plan, events) == html  # fixed div ids: same plan, same bytes
    timeline = _figure_data(html, "plan-timeline")
    assert {t["name"] for t in timeline} >= {"forward", "backward", "all-to-all", "p2p", "optimizer"}


def test_a_trace_of_another_step_is_flagged(tiny):
    plan, events = tiny
    assert 'class="note"' not in plan_html(plan, events)
    shorter = [TraceEvent(e.rank, e.lane, e.name, e.start_s / 2, e.end_s / 2) for e in events]
    assert "fewer micro-batches than the plan's 16" in plan_html(plan, shorter)
    assert "No trace of the step was given" in plan_html(plan, [])


def test_per_rank_figures_have_one_bar_per_rank(tiny):
    plan, _ = tiny
    time = rank_time_figure(plan.predictions.step)
    assert [t.name for t in time.data] == ["compute", "bubble", "exposed communication"]
    assert all(list(t.x) == ["rank 0", "rank 1"] for t in time.data)
    per_rank = plan.predictions.step.per_rank
    assert list(time.data[1].y) == [r.bubble_s for r in per_rank]
    memory = memory_figure(plan.memory)
    assert len(memory.data) == 5 and all(len(t.x) == plan.layout.pp for t in memory.data)
    stacked = np.sum([t.y for t in memory.data], axis=0) * 2**30
    assert stacked == pytest.approx([r.total_bytes for r in plan.memory.per_rank])
    [line] = memory.layout.shapes
    assert line.y0 == line.y1 == pytest.approx(plan.memory.usable_hbm_bytes / 2**30)


def test_summary_table_holds_the_plans_numbers(tiny):
    plan, events = tiny
    html = plan_html(plan, events)
    s = summary(plan)
    assert f"<td>{s['step_time_s']:.4g} s</td>" in html
    assert f"{s['gpu_hours_total']:,.0f} GPU-hours" in html
    assert f"<td>{size(s['peak_memory_bytes_per_gpu'])} of " in html
    assert "<td>no budget set</td>" in html


def test_accounting_only_plan_keeps_summary_and_memory(tiny):
    plan, _ = tiny
    bare = plan.model_copy(update={"predictions": None, "budget_report": None})
    html = plan_html(bare, [])
    assert _sections(html) == ["summary", "memory"]
    assert html.count(PLOTLY_JS_MARKER) == 1  # carried by the memory figure now
    assert "not run: accounting-only plan" in html and "Step time" not in html


def test_candidates_table_lists_searched_layouts(tiny):
    plan, events = tiny
    cand = Candidate(parallel=plan.inputs.parallel.model_copy(update={"pp": 4}), microbatches=32,
                     step_time_s=1.5, tokens_per_s_per_gpu=1234.0, mfu_frac=0.4, peak_memory_bytes_per_gpu=3 * 2**30)
    searched = plan.model_copy(update={"predictions": plan.predictions.model_copy(update={"top_candidates": (cand,)})})
    html = plan_html(searched, events)
    assert _sections(html)[-1] == "candidates"
    assert "<td>PP4 EP4 DP2</td>" in html and "<td>40.0%</td>" in html and "<td>3.0 GiB</td>" in html
    assert "expert Wgrad batch" not in html  # the search did not choose it
    chosen = searched.model_copy(update={"predictions": searched.predictions.model_copy(update={"top_candidates": (
        cand.model_copy(update={"expert_wgrad_batch": 3}), cand)})})
    html = plan_html(chosen, events)
    assert "<th>expert Wgrad batch</th>" in html and "<td>3</td>" in html and "<td>-</td>" in html


def test_budget_verdict_and_units():
    s = {"gpu_hours_total": 900.0, "budget_gpu_hours": 1000.0, "within_budget": True, "budget_margin_frac": 0.1}
    assert budget_verdict(s) == "within budget: 900 of 1,000 GPU-hours, margin 10.0%"
    over = s | {"gpu_hours_total": 1250.0, "within_budget": False, "budget_margin_frac": -0.25}
    assert budget_verdict(over) == "OVER budget: 1,250 of 1,000 GPU-hours, short by 25.0%"
    assert budget_verdict(s | {"budget_gpu_hours": None}) == "no budget set"
    assert (count(671e9), count(458_500), count(12)) == ("671 B", "458.5 K", "12")
    assert (size(67 * 2**30), size(9 * 2**20), size(100)) == ("67.0 GiB", "9.0 MiB", "100 B")


@pytest.mark.slow
def test_deepseek_v3_page_stays_under_8_mb():
    r = deepseek_v3_recipe()
    inputs = PlanInputs(model=deepseek_v3(), cluster=h800(256), parallel=r.parallel, training=r.training, budget=r.budget)
    plan, events = _plan_and_trace(inputs)
    assert len(events) > 50_000
    html = plan_html(plan, events)
    assert len(html.encode()) < 8_000_000
    assert html.count(PLOTLY_JS_MARKER) == 1
    assert sum(len(t["base"]) for t in _figure_data(html, "plan-timeline")) <= MAX_BARS
    assert "within budget" in html and "rank 15" in html
