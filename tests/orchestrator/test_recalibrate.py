"""``recalibrate`` on the plan's own simulated trace (the simulator's names and durations): a fixed point.

Fed the trace the tables priced, every measured op equals its priced value and re-pricing reproduces the step;
fed the same trace with one op class slowed k times, only that op's entries move, by k, and the step moves
by what those ops add (closed form); the optimizer class is derived from the optimizer events alone."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.calibration.recalibrate import LAYER_EVENT, op_durations, recalibrate
from moeplan.orchestrator.cli import app
from moeplan.simulator.accounting.layout import pipeline_stages
from moeplan.simulator.contracts.plan_file import read_plan
from moeplan.simulator.costs.tables import named_tables
from moeplan.simulator.engine.build import SimOptions, step_inputs
from moeplan.simulator.planning.predict import predict_step

PLAN = ["plan", "--model", "tiny-moe", "--cluster", "cpu", "--nodes", "1", "--no-search", "--micro-batch-size", "1",
        "--seq-len", "64", "--pp", "2", "--schedule", "1f1b", "--global-batch", "4"]
FWD = re.compile(r"^\d+F\d+ ")


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    res = CliRunner().invoke(app, [*PLAN, "--out", str(out), "--trace", str(out / "trace.json")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "trace.json").read_text())
    by_rank: dict[int, dict] = {}
    for e in doc["traceEvents"]:
        by_rank.setdefault(e["pid"], {"traceEvents": []})["traceEvents"].append(e)
    return read_plan(out / "plan.json"), by_rank


def _step_s(plan, tables) -> float:
    result, _ = predict_step(plan.inputs, plan.layout.dp, plan.layout.microbatches, opts=SimOptions(tables=tables))
    return result.step_time_s


def _slowed(traces: dict, op: str, k: float) -> dict:
    return {r: {"traceEvents": [e | {"dur": e["dur"] * k} if e.get("name", "") == op or e.get("name", "").endswith(f" {op}") else e
                                for e in doc["traceEvents"]]} for r, doc in traces.items()}


def test_the_plans_own_trace_is_a_fixed_point(planned):
    plan, traces = planned
    tables = named_tables("cpu", "CPU-process")
    new, moved = recalibrate(plan, tables, traces, (0, 1), "test")
    assert {m.entry for m in moved} >= {"moe F attn", "moe B experts-bwd", "dense F mlp", "ends F head", "ends F embed"}
    for m in moved:
        assert m.after == pytest.approx(m.before, rel=1e-9), m
    assert _step_s(plan, new) == pytest.approx(plan.predictions.step.step_time_s, rel=1e-9)


def test_a_slowed_op_moves_its_own_entries_only_and_the_step_by_its_time(planned):
    plan, traces = planned
    tables = named_tables("cpu", "CPU-process")
    before = op_durations(plan, traces)
    new, moved = recalibrate(plan, tables, _slowed(traces, "experts", 3.0), (0, 1), "test")
    for m in moved:
        assert m.after == pytest.approx(m.before * (3.0 if m.entry.endswith(" experts") else 1.0), rel=1e-9), m
    added = 2.0 * sum(sum(v) for (kind, action, op), v in before.items() if op == "experts")
    # the ranks run their experts forward one after another in 1F1B, so the step grows by at least the
    # busiest rank's added work and at most by all of it
    grown = _step_s(plan, new) - plan.predictions.step.step_time_s
    assert added / 2 * 0.99 <= grown <= added * 1.01, (grown, added)


def _optimizer_slowed(traces: dict, k: float) -> dict:
    """Each rank's optimizer parts ``k`` times as long, one after the other from the step's first part."""
    out = {}
    for r, doc in traces.items():
        first = min(e["ts"] for e in doc["traceEvents"] if e.get("name", "").startswith("optimizer "))
        out[r] = {"traceEvents": [e | {"ts": first + k * (e["ts"] - first), "dur": e["dur"] * k}
                                  if e.get("name", "").startswith("optimizer ") else e for e in doc["traceEvents"]]}
    return out


def test_the_optimizer_class_comes_from_the_optimizer_events(planned):
    plan, traces = planned
    tables = named_tables("cpu", "CPU-process")
    new, moved = recalibrate(plan, tables, _optimizer_slowed(traces, 4.0), (0, 1), "test")
    opt = next(m for m in moved if "optimizer" in m.entry)
    assert opt.after == pytest.approx(opt.before / 4.0, rel=1e-6) and opt.samples == 2
    assert new.memory_fracs("optimizer")[0] == opt.after and new.measured_ops, "the ops measured come along"


def _as_the_runtime_times_it(plan, traces: dict) -> dict:
    """The simulated trace folded as the runtime's events are (no expert parallelism): each ``shared`` op inside
    its layer's ``experts`` event, each MTP layer's ops inside its action's ``head`` event."""
    stages = pipeline_stages(plan.inputs.model, plan.inputs.parallel)
    mtp = {(s, i) for s, st in enumerate(stages) for i, layer in enumerate(st.layers)
           if layer >= plan.inputs.model.num_hidden_layers}
    out = {}
    for r, doc in traces.items():
        events, extra = [], {}
        for e in doc["traceEvents"]:
            hit = LAYER_EVENT.match(e.get("name", ""))
            if hit and (hit[5] in ("shared", "shared-bwd") or (int(hit[1]), int(hit[4])) in mtp):
                into = (f"{hit[1]}{hit[2]}{hit[3]} L{hit[4]} experts" + ("-bwd" if hit[2] != "F" else "")
                        if (int(hit[1]), int(hit[4])) not in mtp else f"{hit[1]}{hit[2]}{hit[3]} head")
                extra[into] = extra.get(into, 0.0) + e["dur"]
            else:
                events.append(e)
        out[r] = {"traceEvents": [e | {"dur": e["dur"] + extra.pop(e["name"], 0.0)} if "dur" in e else e
                                  for e in events]}
        assert not extra, extra
    return out


def test_ops_timed_inside_another_event_are_counted_once(planned):
    """Folded as the runtime times them, the shared expert and the MTP layer are entered at zero and their time
    comes back through the covering event: every forward is priced as before, and the step only by the shared
    expert's weight gradient more (kept as computed, its time also inside the experts-bwd event)."""
    plan, traces = planned
    tables = named_tables("cpu", "CPU-process")
    folded = _as_the_runtime_times_it(plan, traces)
    new, moved = recalibrate(plan, tables, folded, (0, 1), "test")
    zeros = {m.entry for m in moved if m.after == 0.0}
    assert {"moe F shared (in moe F experts)", "mtp F attn (in ends F head)", "mtp F experts (in ends F head)"} <= zeros
    _, before = predict_step(plan.inputs, plan.layout.dp, plan.layout.microbatches, opts=SimOptions(tables=tables),
                             trace=True)
    _, after = predict_step(plan.inputs, plan.layout.dp, plan.layout.microbatches, opts=SimOptions(tables=new),
                            trace=True)
    for r in (0, 1):
        fwd = [sum(e.end_s - e.start_s for e in ev if e.rank == r and FWD.match(e.name)) for ev in (before, after)]
        assert fwd[1] == pytest.approx(fwd[0], rel=1e-9), (r, fwd)
    dw = sum(u.mlp_dw_s for st in step_inputs(plan.inputs, plan.layout.dp, plan.layout.microbatches,
                                               opts=SimOptions(tables=tables)).stages for u in st.units)
    grown = _step_s(plan, new) - plan.predictions.step.step_time_s
    assert 0.0 <= grown <= dw * plan.layout.microbatches * 1.01, (grown, dw)
    unfolded, _ = recalibrate(plan, tables, traces, (0, 1), "test")
    assert not any(o.s == 0.0 for o in unfolded.measured_ops), "nothing is covered when every op has its event"


def test_the_wait_for_the_global_norm_is_not_the_optimizers_own_time(planned):
    """A rank that reached its optimizer early waits in the gradient norm's all-reduce: its event starts earlier
    and ends where it did. The class is fitted from the seconds after the last rank's start, so it does not move
    (the engine prices the wait itself: ``optimizer_barrier``)."""
    plan, traces = planned
    tables = named_tables("cpu", "CPU-process")
    early = {r: {"traceEvents": [e | {"ts": e["ts"] - 5000.0, "dur": e["dur"] + 5000.0}
                                 if r == 1 and e.get("name") == "optimizer norm" else e for e in doc["traceEvents"]]}
             for r, doc in traces.items()}
    _, moved = recalibrate(plan, tables, early, (0, 1), "test")
    opt = next(m for m in moved if "optimizer" in m.entry)
    assert opt.after == pytest.approx(opt.before, rel=1e-6) and opt.samples == 2
