"""The trace analyser: hand-computed synthetic traces, a brute-force oracle over random traces, and a real
``moeplan plan --trace`` step against the plan's own per-rank predictions."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplan.simulator.contracts.plan_file import read_plan
from moeplan.simulator.contracts.trace import TraceEvent
from moeplan.simulator.engine.build import SimOptions
from moeplan.simulator.engine.trace import chrome_trace
from moeplan.simulator.planning.predict import simulate_at
from moeplan.simulator.report.trace_analysis import (
    TraceError,
    analyse,
    analyse_rank_trace,
    chrome_intervals,
    held_ops,
    intervals_of,
    mean_fracs,
    op_class,
    read_trace,
    trace_ops,
)
from tests.orchestrator.run_dirs import tiny_plan  # noqa: F401 -- the session fixture

# rank 0: C = [0,2] [3,4] [5,7] (5 s), M = [1,4] [6,8] (5 s), hidden = [1,2] [3,4] [6,7] (3 s),
# C ∪ M = [0,4] [5,8] (7 s) of the 10 s window; rank 1: one optimizer second.
HAND = [TraceEvent(0, "compute", "0F0 L0 attn", 0, 2), TraceEvent(0, "nvlink", "0F0 L0 dispatch", 1, 4),
        TraceEvent(0, "compute", "0F0 L0 shared", 3, 4), TraceEvent(0, "compute", "0F0 L0 experts", 5, 7),
        TraceEvent(0, "nic", "p2p F0/0", 6, 8), TraceEvent(1, "compute", "optimizer", 9, 10)]


def test_a_run_that_times_the_shared_expert_inside_the_experts_node_has_it_compared_there() -> None:
    """Without expert parallelism the runtime times a MoE layer as one ``experts`` node (no ``shared`` events):
    the plan's ``shared`` seconds are then compared as the run holds them, in the experts' class."""
    local = {"traceEvents": [{"name": "0F0 L1 experts", "ph": "X", "ts": 0, "dur": 5},
                             {"name": "0B0 L1 experts-bwd", "ph": "X", "ts": 9, "dur": 5},
                             {"name": "0F0 L0 mlp", "ph": "X", "ts": 5, "dur": 1}, {"name": "optimizer", "ph": "X"}]}
    assert trace_ops(local) == {"experts", "experts-bwd", "mlp"}
    held = held_ops(trace_ops(local))
    assert held == {"shared": "experts", "shared-bwd": "experts-bwd"}
    (r0, _) = analyse(intervals_of(HAND, held))
    assert r0.op_class_s["gemm"] == 0 and r0.op_class_s["grouped_gemm"] == 3  # the shared second moved over
    assert chrome_intervals({"traceEvents": [{"name": "0B1 L3 shared-bwd", "ph": "X", "ts": 0, "dur": 1}]},
                            held)[0].op_class == "grouped_gemm"
    assert op_class("0F0 L0 shared") == "gemm" and op_class("0F0 L0 mlp", held) == "gemm"
    # a run with its own shared events (expert parallelism), or none of the holder's, keeps the plan's classes
    assert held_ops({"experts", "shared", "experts-bwd", "shared-bwd"}) == {}
    assert held_ops({"mlp", "mlp-bwd"}) == {}


def test_hand_computed_trace() -> None:
    r0, r1 = analyse(intervals_of(HAND))
    assert (r0.window_s, r0.compute_s, r0.comm_s, r0.hidden_comm_s, r0.exposed_comm_s, r0.bubble_s) == (10, 5, 5, 3, 2, 3)
    assert r0.op_class_s == {"gemm": 1, "grouped_gemm": 2, "attention": 2, "memory_bound": 0, "communication": 5,
                             "idle": 3}
    assert (r1.compute_s, r1.comm_s, r1.bubble_s, r1.op_class_s["memory_bound"]) == (1, 0, 9, 1)
    fracs = mean_fracs([r0, r1])
    assert fracs["bubble_frac"] == pytest.approx((0.3 + 0.9) / 2) and fracs["hidden_comm_frac"] == pytest.approx(0.6)
    assert fracs["idle_frac"] == pytest.approx(((10 - 5) / 10 + 9 / 10) / 2)


def test_the_chrome_form_gives_the_same_answer_and_measured_overlaps_count_once() -> None:
    doc = chrome_trace(HAND)
    assert analyse(chrome_intervals(doc)) == analyse(intervals_of(HAND))
    # a measured rank: two streams overlap their compute, a custom op says its class, the window is given
    measured = {"traceEvents": [
        {"name": "process_name", "ph": "M", "pid": 3, "args": {"name": "rank 3"}},
        {"name": "1F0 L0 attn", "ph": "X", "pid": 3, "tid": 0, "ts": 0, "dur": 2e6},
        {"name": "1F1 L0 experts", "ph": "X", "pid": 3, "tid": 1, "ts": 1e6, "dur": 2e6},
        {"name": "nccl:all_to_all", "ph": "X", "pid": 3, "tid": 2, "ts": 2.5e6, "dur": 1e6,
         "args": {"op_class": "communication"}},
    ], "otherData": {"step_time_s": 5.0}}
    t = analyse_rank_trace(measured, rank=3, pp_rank=1)
    assert (t.rank, t.pp_rank, t.window_s, t.compute_s, t.comm_s) == (3, 1, 5.0, 3.0, 1.0)
    assert (t.hidden_comm_s, t.exposed_comm_s, t.bubble_s) == (0.5, 0.5, 1.5)
    assert t.op_class_s["attention"] + t.op_class_s["grouped_gemm"] == 4.0  # classes overlap each other here


@pytest.mark.parametrize("name, cls", [("12F64 L0 attn", "attention"), ("0B4 L1 combine-bwd", "communication"),
                                       ("3I7 head", "gemm"), ("12W60", "gemm"), ("dp-sync stage 2", "communication"),
                                       ("p2p G1/3", "communication"), ("0F0 embed", "memory_bound"),
                                       ("1F2 L3 experts-bwd", "grouped_gemm"), ("0B1 L0 cp-reduce-scatter", "communication")])
def test_op_classes_of_simulator_names(name, cls) -> None:
    assert op_class(name) == cls


@pytest.mark.parametrize("doc, message", [
    ({"traceEvents": [{"name": "step 3", "ph": "X", "ts": 0, "dur": 1}]}, "name='step 3'"),
    ({"traceEvents": [{"name": "12F0", "ph": "X", "ts": 0, "dur": 1}]}, "name='12F0'"),
    ({"traceEvents": [{"name": "optimizer", "ph": "X", "ts": -1, "dur": 1}]}, "traceEvents[0].ts=-1"),
    ({"traceEvents": [{"name": "x", "ph": "X", "ts": 0, "dur": 1, "args": {"op_class": "idle"}}]}, "op_class='idle'"),
    ({"traceEvents": [{"name": "optimizer", "ph": "X", "ts": 0, "dur": True}]}, "dur=True"),
    ({"events": []}, "traceEvents list"),
])
def test_bad_traces_name_the_event(doc, message) -> None:
    with pytest.raises(TraceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        analyse_rank_trace(doc, rank=0, pp_rank=0)


_spans = st.lists(st.tuples(st.integers(0, 40), st.integers(1, 10), st.booleans(), st.integers(0, 1)), max_size=12)


@settings(max_examples=150, deadline=None)
@given(_spans)
def test_against_a_unit_grid_oracle(spans) -> None:
    """Integer intervals: every measure is a count of unit cells."""
    names = {True: "0F0 L0 dispatch", False: "0F0 L0 attn"}
    events = [TraceEvent(rank, "x", names[comm], start, start + dur) for start, dur, comm, rank in spans]
    if not events:
        return
    end = max(e.end_s for e in events)
    for t in analyse(intervals_of(events)):
        cells = [(c, c + 1) for c in range(int(end))]
        mine = [e for e in events if e.rank == t.rank]

        def covered(cell, comm, mine=mine):
            return any(e.start_s <= cell[0] and cell[1] <= e.end_s and ("dispatch" in e.name) == comm for e in mine)

        compute = [c for c in cells if covered(c, False)]
        comm = [c for c in cells if covered(c, True)]
        assert (t.compute_s, t.comm_s) == (len(compute), len(comm))
        assert t.hidden_comm_s == len(set(compute) & set(comm))
        assert t.bubble_s == len(cells) - len(set(compute) | set(comm))
        assert t.bubble_s + t.exposed_comm_s + t.compute_s == pytest.approx(t.window_s)


def test_a_real_plan_trace_agrees_with_the_plan(tiny_plan) -> None:  # noqa: F811
    """Per rank: compute and idle (bubble + exposed communication) equal the plan's; the split differs by
    definition (the plan's bubble is re-simulated with free communication)."""
    plan = read_plan(tiny_plan)
    step = plan.predictions.step
    timelines = analyse(chrome_intervals(read_trace(tiny_plan / "trace.json")))
    assert [t.rank for t in timelines] == list(range(plan.layout.pp))
    for t, pred in zip(timelines, step.per_rank, strict=True):
        assert math.isclose(t.window_s, step.step_time_s, rel_tol=1e-9)
        assert math.isclose(t.compute_s, pred.compute_s, rel_tol=1e-6)
        assert math.isclose(t.bubble_s + t.exposed_comm_s, pred.bubble_s + pred.exposed_comm_s, rel_tol=1e-6)
        assert t.comm_s > 0 and t.bubble_s >= pred.bubble_s  # rank 0 idles on rank 1's transfers: bubble here
    fracs = mean_fracs(timelines)
    assert math.isclose(fracs["idle_frac"], step.bubble_frac + step.exposed_comm_frac, rel_tol=1e-6)
    assert math.isclose(fracs["compute_frac"], step.compute_frac, rel_tol=1e-6)


def test_with_free_communication_the_bubble_is_the_plans(tiny_plan) -> None:  # noqa: F811
    """The plan's own bubble definition, reproduced: analyse the step simulated with free communication."""
    plan = read_plan(tiny_plan)
    lay = plan.layout
    free = simulate_at(plan.inputs, lay.dp, lay.microbatches, plan.inputs.parallel.seq_len_tokens, SimOptions(),
                       trace=True, free_comm=True)
    timelines = analyse(intervals_of(free.events))
    for t, pred in zip(timelines, plan.predictions.step.per_rank, strict=True):
        assert t.comm_s == 0 and math.isclose(t.bubble_s, pred.bubble_s, rel_tol=1e-6, abs_tol=1e-15)
    assert any(t.bubble_s > 0 for t in timelines)
