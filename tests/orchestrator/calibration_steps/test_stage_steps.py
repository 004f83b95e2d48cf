"""``calibrate`` on a CPU times each pipeline rank's passes as the runtime runs them (``stage_steps``): the same
op entries ``check --recalibrate`` reads from a run's traces, which replace the pieces timed alone."""

from __future__ import annotations

import pytest
import torch

from moeplan.orchestrator.calibration.measure import Measured, Setup, measurements
from moeplan.orchestrator.calibration.recalibrate import recalibrate
from moeplan.orchestrator.calibration.shapes import plan_shapes
from moeplan.orchestrator.calibration.stage_steps import WAKE_WAITS_S, _non_decreasing, time_stage_ops
from moeplan.simulator.costs.measured_ops import PASS_OP, MeasuredOp
from moeplan.simulator.costs.tables import named_tables
from moeplan.simulator.engine.build import SimOptions, rank_optimizer_set, step_inputs
from moeplan.simulator.engine.host_term import STEP_START_OP, WAKE_OP_PREFIX, step_start_s, wake_op, wake_points
from moeplan.simulator.spec.parallel import ParallelSpec


@pytest.fixture(scope="module")
def timed(planned):
    plan, _ = planned
    return time_stage_ops(plan.inputs, plan.layout.dp, torch.float32, 2, "test")


def test_every_op_the_runtime_times_is_measured_and_those_inside_another_at_zero(timed):
    got = {(o.layer_kind, o.action, o.op): o for o in timed
           if o.layer_kind != "optimizer" and not o.op.startswith(WAKE_OP_PREFIX) and o.op != STEP_START_OP}
    timed_ops = {("dense", "F", "attn"), ("dense", "F", "mlp"), ("dense", "B", "attn-bwd"), ("dense", "B", "mlp-bwd"),
                 ("moe", "F", "attn"), ("moe", "F", "experts"), ("moe", "B", "attn-bwd"), ("moe", "B", "experts-bwd"),
                 ("ends", "F", "embed"), ("ends", "F", "head"), ("ends", "B", "head"),
                 ("ends", "F", PASS_OP), ("ends", "B", PASS_OP)}
    assert {k for k, o in got.items() if o.s > 0} == timed_ops
    # the shared expert runs inside the experts event, the MTP module inside the head event (as in a run)
    assert {k for k, o in got.items() if o.s == 0} >= {("moe", "F", "shared"), ("mtp", "F", "attn"),
                                                       ("mtp", "F", "experts"), ("mtp", "B", "experts-bwd")}
    # 4 micro-batches x 2 steps; the MoE layers: rank 0's one and rank 1's two; a head event per head (2 on rank 1)
    assert got[("dense", "F", "attn")].samples == 8 and got[("moe", "F", "attn")].samples == 24
    assert got[("ends", "F", PASS_OP)].samples == 16, "a pass per micro-batch, rank and step"
    assert all(o.tokens == 64 and o.seq_len == 64 and "each pipeline rank's in a process of its own, all at once"
               in o.source for o in got.values())


def test_each_pass_kind_is_timed_again_after_each_wait(timed):
    wakes = [o for o in timed if o.op.startswith(WAKE_OP_PREFIX)]
    assert sorted((o.action, o.op) for o in wakes) == sorted((a, wake_op(w)) for a in "FB" for w in WAKE_WAITS_S)
    # a step's passes but the first take the waits in turn, per kind: over 2 ranks x 2 steps, 12 forwards, 16 backwards
    assert all(o.layer_kind == "ends" and o.s >= 0 and "slept" in o.source for o in wakes)
    assert [sum(o.samples for o in wakes if o.action == a) for a in "FB"] == [12, 16]
    ops = tuple(wakes)
    assert wake_points(ops, "B", 64, 64) == tuple((w, next(o.s for o in wakes if o.op == wake_op(w) and o.action == "B"))
                                                  for w in WAKE_WAITS_S)
    assert wake_points(ops, "B", 64, 128) == ()
    for kind in "FB":  # never faster after a longer wait
        extras = [s for _, s in wake_points(ops, kind, 64, 64)]
        assert extras == sorted(extras), (kind, extras)


def test_a_wait_whose_median_falls_below_a_shorter_ones_is_pooled_with_it():
    # the 17:41 calibration's forwards (ms): 0.46, 0.86, 0.0, 1.8 after 2, 4, 8, 16 ms, with 5, 5, 4, 4 samples
    woken = {("F", 0.002): [0.46] * 5, ("F", 0.004): [0.86] * 5, ("F", 0.008): [0.0] * 4, ("F", 0.016): [1.8] * 4,
             ("B", 0.002): [1.0, 2.0], ("B", 0.004): [0.5], ("B", 0.008): [-0.2, 2.0, 3.0]}
    pooled = 0.86 * 5 / 9
    assert _non_decreasing(woken) == [("B", 0.002, 7 / 6, 2, 3), ("B", 0.004, 7 / 6, 1, 3), ("B", 0.008, 2.0, 3, 3),
                                      ("F", 0.002, 0.46, 5, 5), ("F", 0.004, pooled, 5, 9),
                                      ("F", 0.008, pooled, 4, 9), ("F", 0.016, 1.8, 4, 4)]


def test_a_steps_first_pass_is_timed_beside_the_runtimes_data_thread(timed):
    # 1F1B: every rank begins with a forward; one first pass a step, 2 steps, 2 ranks
    (start,) = [o for o in timed if o.op == STEP_START_OP]
    assert (start.layer_kind, start.action, start.samples) == ("ends", "F", 4) and start.s >= 0
    assert "data thread" in start.source and step_start_s((start,), 64, 64) == (("F", start.s),)


def test_they_replace_the_pieces_timed_alone_where_they_run(planned, timed):
    plan, _ = planned
    setup = Setup(spec=plan.inputs.model, device=torch.device("cpu"), dtype=torch.float32, reps=2, threads=1,
                  backend="gloo", label="test")
    passes = next(m for m in measurements(plan_shapes(plan.inputs, 1, 2), setup, 1e11) if "passes" in m.what)
    stale = MeasuredOp(layer_kind="moe", action="F", op="experts", tokens=64, seq_len=64, s=9.0, samples=1, source="x")
    other = stale.model_copy(update={"seq_len": 128})
    m = Measured(pieces=[stale, other])
    passes.run(m)
    experts = [o for o in m.pieces if (o.layer_kind, o.op) == ("moe", "experts")]
    assert other in experts and stale not in experts and len(experts) == 2


@pytest.mark.parametrize("change", [{"schedule": "zb1p"}, {"tp": 2}])
def test_other_schedules_and_parallelisms_keep_the_pieces_timed_alone(planned, change):
    plan, _ = planned
    par = ParallelSpec.model_validate(plan.inputs.parallel.model_dump() | change)
    inputs = plan.inputs.model_copy(update={"parallel": par})
    with pytest.raises(NotImplementedError):
        time_stage_ops(inputs, 1, torch.float32, 1, "test")


def test_a_pass_measured_outside_its_nodes_lands_on_each_stages_first_unit(planned):
    plan, _ = planned
    tables = named_tables("cpu", "CPU-process")
    passes = [MeasuredOp(layer_kind="ends", action=a, op=PASS_OP, tokens=64, seq_len=64, s=s, samples=1, source="x")
              for a, s in (("F", 2e-4), ("B", 3e-4))]

    def stages(t):
        return step_inputs(plan.inputs, 1, 4, opts=SimOptions(tables=t)).stages
    before = stages(tables.model_copy(update={"measured_ops": (passes[0].model_copy(update={"seq_len": 128}),)}))
    after = stages(tables.model_copy(update={"measured_ops": tuple(passes)}))
    for b, a in zip(before, after, strict=True):
        assert a.units[0].attn_fwd_s == pytest.approx(b.units[0].attn_fwd_s + 2e-4)
        assert a.units[0].attn_dx_s == pytest.approx(b.units[0].attn_dx_s + 3e-4)
        assert a.units[1:] == b.units[1:]


def test_each_ranks_optimizer_step_is_timed_after_its_passes(planned, timed):
    """On a ZeRO group of one each rank's step follows its passes, as in a run: its four parts at the rank's set,
    which the separate one-rank measurement then leaves alone."""
    plan, _ = planned
    parts = [o for o in timed if o.layer_kind == "optimizer"]
    assert sorted({(o.params, o.tensors) for o in parts}) == [rank_optimizer_set(plan.inputs, r) for r in (0, 1)]
    assert len(parts) == 8 and all(o.s > 0 and "after its passes" in o.source for o in parts)
    setup = Setup(spec=plan.inputs.model, device=torch.device("cpu"), dtype=torch.float32, reps=2, threads=1,
                  backend="gloo", label="test")
    alone = [m for m in measurements(plan_shapes(plan.inputs, 1, 2), setup, 1e11) if m.kind == "optimizer"
             and "pipeline rank" in m.what]
    m = Measured(pieces=list(timed))
    for item in alone:
        item.run(m)
    assert m.pieces == list(timed)


def test_recalibrate_compares_a_runs_op_with_its_price_less_the_pass(planned):
    """``check --recalibrate`` reports what the tables priced for each op: a stage's first unit carries the pass's
    work outside its nodes, which is not the op's, so the price it reports is the same with or without it."""
    plan, traces = planned
    tables = named_tables("cpu", "CPU-process")
    passes = tuple(MeasuredOp(layer_kind="ends", action=a, op=PASS_OP, tokens=64, seq_len=64, s=s, samples=1,
                              source="x") for a, s in (("F", 2e-4), ("B", 3e-4)))
    _, plain = recalibrate(plan, tables, traces, (0, 1), "test")
    _, with_pass = recalibrate(plan, tables.model_copy(update={"measured_ops": passes}), traces, (0, 1), "test")
    before = {m.entry: m.before for m in plain}
    assert {m.entry: m.before for m in with_pass if m.entry in before} == pytest.approx(before, rel=1e-9)


def test_a_rank_holding_two_stages_runs_each_on_its_own_module(planned):
    """Interleaved 1F1B, 2 chunks a rank: rank 0 holds stages 0 and 2 (the embedding and a MoE layer), rank 1
    stages 1 and 3 (the head): each action runs on the module of its stage, the head's loss on stage 3's."""
    plan, _ = planned
    par = ParallelSpec.model_validate(plan.inputs.parallel.model_dump() | {"schedule": "interleaved",
                                                                          "virtual_stages": 2})
    ops = time_stage_ops(plan.inputs.model_copy(update={"parallel": par}), 1, torch.float32, 1, "test")
    got = {(o.layer_kind, o.action, o.op) for o in ops if o.s > 0}
    assert {("ends", "F", "embed"), ("ends", "B", "head"), ("moe", "B", "experts-bwd"), ("dense", "F", "mlp")} <= got
    assert sum(o.layer_kind == "optimizer" for o in ops) == 8
