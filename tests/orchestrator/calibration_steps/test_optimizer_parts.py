"""The optimizer step measured per pipeline rank over its own tensors: ``calibrate`` times the runtime's step,
``check --recalibrate`` reads the run's part events, and the engine prices a rank whose parameter set was measured
with those parts instead of the class's bytes plus the host term (tiny-moe, pp 2: 28 and 52 tensors)."""

from __future__ import annotations

import pytest
import torch

from moeplan.model.stage import rank_stages_from_plan
from moeplan.orchestrator.calibration.measure import Setup, measurements
from moeplan.orchestrator.calibration.optimizer_ranks import norm_collectives, rank_stage_specs, time_rank_optimizer
from moeplan.orchestrator.calibration.recalibrate import recalibrate
from moeplan.orchestrator.calibration.shapes import plan_shapes
from moeplan.orchestrator.calibration.tables_out import with_norm_collectives
from moeplan.simulator.costs.machine import LinkFit, LinkPoint
from moeplan.simulator.costs.measured_ops import MeasuredOp, measured_optimizer_s
from moeplan.simulator.costs.optimizer_step import OPTIMIZER_PARTS
from moeplan.simulator.costs.tables import named_tables
from moeplan.simulator.engine.build import SimOptions, rank_optimizer_set, step_inputs


def _tails(plan, tables):
    return step_inputs(plan.inputs, plan.layout.dp, plan.layout.microbatches, opts=SimOptions(tables=tables)).tails


def _with_ops(tables, ops):
    return tables.model_copy(update={"measured_ops": tuple(tables.measured_ops) + tuple(ops)})


def _parts(params: int, tensors: int, seconds: dict[str, float]) -> list[MeasuredOp]:
    return [MeasuredOp(layer_kind="optimizer", action="F", op=p, tokens=64, seq_len=64, s=seconds[p], samples=1,
                       source="test", params=params, tensors=tensors) for p in OPTIMIZER_PARTS]


def test_an_optimizer_part_carries_its_parameter_set_and_no_other_op_does():
    with pytest.raises(ValueError, match="an optimizer part has both"):
        MeasuredOp(layer_kind="optimizer", action="F", op="norm", tokens=64, seq_len=64, s=1e-3, samples=1, source="x")
    with pytest.raises(ValueError, match="an optimizer part has both"):
        MeasuredOp(layer_kind="moe", action="F", op="attn", tokens=64, seq_len=64, s=1e-3, samples=1, source="x",
                   params=10, tensors=2)
    with pytest.raises(ValueError, match="the op is one of"):
        MeasuredOp(layer_kind="optimizer", action="F", op="attn", tokens=64, seq_len=64, s=1e-3, samples=1, source="x",
                   params=10, tensors=2)
    some = _parts(10, 2, dict(zip(OPTIMIZER_PARTS, (1.0, 2.0, 3.0, 4.0))))
    assert measured_optimizer_s(tuple(some), 10, 2) == dict(zip(OPTIMIZER_PARTS, (1.0, 2.0, 3.0, 4.0)))
    assert measured_optimizer_s(tuple(some), 10, 3) is None
    assert measured_optimizer_s(tuple(some[:3]), 10, 2) is None, "all four parts or none"


def test_the_engine_prices_a_measured_rank_with_its_parts_and_leaves_the_others(planned):
    plan, _ = planned
    tables = named_tables("cpu", "CPU-process")
    before = _tails(plan, tables)
    assert [rank_optimizer_set(plan.inputs, r) for r in (0, 1)] == [(188_768, 28), (429_328, 52)]
    seconds = dict(zip(OPTIMIZER_PARTS, (1e-4, 4e-3, 6e-5, 5e-4)))
    after = _tails(plan, _with_ops(tables, _parts(429_328, 52, seconds)))
    assert after[1].optimizer_parts_s == seconds
    assert after[0].optimizer_parts_s == before[0].optimizer_parts_s
    # over a data-parallel group the step holds collectives a one-process measurement has not seen
    dp2 = step_inputs(plan.inputs, 2, plan.layout.microbatches,
                      opts=SimOptions(tables=_with_ops(tables, _parts(429_328, 52, seconds)))).tails
    assert dp2[1].optimizer_parts_s != seconds


def test_calibrate_times_the_runtimes_step_over_each_ranks_own_tensors(planned):
    plan, _ = planned
    for r in (0, 1):
        assert rank_stage_specs(plan.inputs, r) == rank_stages_from_plan(plan.layout, plan.inputs.model, r)
    ops = time_rank_optimizer(plan.inputs, plan.layout.dp, 1, torch.float32, 2, "test")
    assert [o.op for o in ops] == list(OPTIMIZER_PARTS)
    assert {(o.params, o.tensors) for o in ops} == {rank_optimizer_set(plan.inputs, 1)}
    assert all(o.s > 0 and o.samples == 2 and "52 tensors" in o.source for o in ops)
    tails = _tails(plan, _with_ops(named_tables("cpu", "CPU-process"), ops))
    assert tails[1].optimizer_parts_s == {o.op: o.s for o in ops}
    with pytest.raises(NotImplementedError, match="dp=2"):
        time_rank_optimizer(plan.inputs, 2, 1, torch.float32, 2, "test")


def test_calibrate_lists_one_step_per_pipeline_rank_on_a_cpu_with_zero_groups_of_one(planned):
    plan, _ = planned

    def listed(dp: int) -> list[str]:
        setup = Setup(spec=plan.inputs.model, device=torch.device("cpu"), dtype=torch.float32, reps=2, threads=1,
                      backend="gloo", label="test")
        shapes = plan_shapes(plan.inputs, dp, 2)
        return [m.what for m in measurements(shapes, setup, 1e11) if m.kind == "optimizer" and "pipeline rank" in m.what]
    assert listed(1) == ["optimizer step over pipeline rank 0's tensors", "optimizer step over pipeline rank 1's tensors"]
    assert listed(2) == []


def test_the_run_replaces_calibrates_parts_and_its_norm_counts_from_the_last_ranks_start(planned):
    """The plan's own trace read back gives each rank's priced parts; a rank whose norm event began 5 ms early
    (it waited in the norm's all-reduce) keeps its norm; entries of calibrate's at the same set are replaced."""
    plan, traces = planned
    tables = named_tables("cpu", "CPU-process")
    early = {r: {"traceEvents": [e | {"ts": e["ts"] - 5000.0, "dur": e["dur"] + 5000.0}
                                 if r == 1 and e.get("name") == "optimizer norm" else e for e in doc["traceEvents"]]}
             for r, doc in traces.items()}
    stale = _parts(429_328, 52, dict.fromkeys(OPTIMIZER_PARTS, 1.0))
    new, moved = recalibrate(plan, _with_ops(tables, stale), early, (0, 1), "test")
    parts = [m for m in moved if m.entry.startswith("optimizer ") and "tensors" in m.entry]
    assert len(parts) == 8
    before = _tails(plan, tables)
    for r, (params, tensors) in enumerate(rank_optimizer_set(plan.inputs, r) for r in (0, 1)):
        got = measured_optimizer_s(new.measured_ops, params, tensors)
        assert got == pytest.approx(before[r].optimizer_parts_s, rel=1e-6), r
    assert sum(o.layer_kind == "optimizer" for o in new.measured_ops) == 8, "calibrate's stale parts are replaced"


def test_the_norm_part_timed_in_one_process_gains_the_collectives_it_runs_in_a_job(planned):
    """tiny-moe pp 2: the MTP module's embedding copy on rank 1 is summed with rank 0's (512 x 64 FP32), and the
    squared norm is all-reduced over both ranks; calibrate measures both all-reduces at 2 processes and adds them
    to each rank's norm at the fit, nothing else."""
    plan, _ = planned
    embed, norm = ("all_reduce", 512 * 64 * 4, 2), ("all_reduce", 8, 2)
    assert [norm_collectives(plan.inputs, 1, r) for r in (0, 1)] == [(embed, norm), (embed, norm)]
    assert ("all_reduce", 2, (1024, 131072)) in {(s.collective, s.processes, s.sizes)
                                                 for s in plan_shapes(plan.inputs, 1, 2).links}
    fit = LinkFit(collective="all_reduce", processes=2, latency_s=2e-4, bytes_per_s=1e9,
                  points=(LinkPoint(buffer_bytes=1024, s=2e-4),), source="test")
    ops = _parts(429_328, 52, dict(zip(OPTIMIZER_PARTS, (1e-4, 4e-3, 6e-5, 5e-4))))
    out = with_norm_collectives(ops, {(429_328, 52): (embed, norm)}, [fit])
    assert out[0].s == pytest.approx(1e-4 + fit.seconds(131072) + fit.seconds(8)) and "131,072 bytes" in out[0].source
    assert out[1:] == ops[1:]
    missing = with_norm_collectives(ops, {(429_328, 52): (("all_reduce", 8, 4),)}, [fit])
    assert missing[0].s == ops[0].s and "not measured, left out" in missing[0].source
    # the all-reduce called once, as a step calls it, where calibrate measured it (gloo)
    once = fit.model_copy(update={"collective": "all_reduce_once", "latency_s": 5e-4})
    out = with_norm_collectives(ops, {(429_328, 52): (embed, norm)}, [fit, once])
    assert out[0].s == pytest.approx(1e-4 + once.seconds(131072) + once.seconds(8))
    assert "all_reduce_once of 131,072 bytes" in out[0].source
