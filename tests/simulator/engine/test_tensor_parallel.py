"""Tensor and sequence parallelism in the step: exact tiny timelines of the TP collectives, their closed-form
prices, and what a TP rank computes (split GEMMs, memory-bound work / tp under SP, the MoE block on the
rank's sequence shard)."""

from __future__ import annotations

import pytest

from moeplan.simulator.accounting.tensor_parallel import tp_slice
from moeplan.simulator.costs.machine import bytes_moved
from moeplan.simulator.costs.tables import default_tables
from moeplan.simulator.engine.build import SimOptions, cost_context, step_inputs
from moeplan.simulator.engine.step import Links, RankTail, StageCosts, StepInputs, StepSimulation
from moeplan.simulator.engine.tensor_parallel import TpComm, TpEnds, tp_comm, tp_ends, tp_unit_costs
from moeplan.simulator.engine.unit_costs import EndCosts, UnitCosts, unit_costs
from moeplan.simulator.planning.predict import predict_step
from moeplan.simulator.presets.clusters import h800
from moeplan.simulator.presets.models import deepseek_67b, deepseek_v3
from moeplan.simulator.presets.recipes import default_recipe
from moeplan.simulator.schedules import make_schedule
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.parallel import ParallelSpec

NO_ENDS = EndCosts(embed_fwd_s=0.0, head_fwd_s=0.0, head_dx_s=0.0, head_dw_s=0.0)
UNIT = UnitCosts(attn_fwd_s=1.0, attn_dx_s=1.0, attn_dw_s=1.0, mlp_fwd_s=2.0, mlp_dx_s=2.0, mlp_dw_s=2.0,
                 experts_fwd_s=0.0, experts_dx_s=0.0, experts_dw_s=0.0, recompute_s=0.0)


def _one_rank(comm: TpComm, kind: str = "1f1b") -> StepInputs:
    schedule = make_schedule(kind, 1, 1)
    stages = (StageCosts(units=(UNIT,), has_embedding=False, has_head=False, heads=0, tp_comm=(comm,)),)
    links = Links(nic_bytes_per_s=1.0, nvlink_bytes_per_s=1.0, latency_s=0.0, p2p_bytes=0.0, p2p_over_nvlink=True)
    return StepInputs(schedule=schedule, stages=stages, ends=NO_ENDS, links=links,
                      tails=(RankTail(dp_sync_s={}, optimizer_parts_s={}),))


def test_exact_timeline_without_sp():
    """Forward: attention 1 s, its all-reduce 0.5 s, MLP 2 s, its all-reduce 0.5 s (exposed): 4 s. Backward: the
    MLP's dx 2 s, then its input-gradient all-reduce (1 s) beside its dw (2 s): 4 s; attention's dx 1 s, its
    all-reduce (3 s) beside its dw (1 s): 4 s, 2 s of it exposed. 12 s."""
    comm = TpComm(attn_out_fwd_s=0.5, mlp_out_fwd_s=0.5, attn_in_bwd_s=3.0, mlp_in_bwd_s=1.0)
    res = StepSimulation(_one_rank(comm), trace=True).run()
    assert res.step_time_s == pytest.approx(12.0)
    tp_events = sorted((e.start_s, e.end_s, e.name) for e in res.events if e.lane == "nvlink")
    assert tp_events == [(1.0, 1.5, "0F0 L0 attn tp-reduce"), (3.5, 4.0, "0F0 L0 mlp tp-reduce"),
                         (6.0, 7.0, "0B0 L0 mlp-bwd tp-reduce"), (9.0, 12.0, "0B0 L0 attn-bwd tp-reduce")]
    free = StepSimulation(_one_rank(comm), free_comm=True).run()
    assert free.step_time_s == pytest.approx(9.0)  # compute only: 3 + 6


def test_exact_timeline_with_sp_gathers_and_a_deferred_weight_gradient():
    """SP adds the all-gathers before each region (0.25 s) and of each output gradient (0.25 s). Under ZB1P
    (``I`` then ``W``) the input-gradient reductions have no weight gradient beside them: exposed."""
    comm = TpComm(attn_in_fwd_s=0.25, attn_out_fwd_s=0.5, attn_out_bwd_s=0.25, attn_in_bwd_s=3.0,
                  mlp_in_fwd_s=0.25, mlp_out_fwd_s=0.5, mlp_out_bwd_s=0.25, mlp_in_bwd_s=1.0)
    assert StepSimulation(_one_rank(comm)).run().step_time_s == pytest.approx(12.0 + 4 * 0.25)
    # ZB1P: forward 4.5; I: 0.25 + 2 + 1 (reduce) + 0.25 + 1 + 3 = 7.5; W: 3
    assert StepSimulation(_one_rank(comm, "zb1p")).run().step_time_s == pytest.approx(4.5 + 7.5 + 3.0)


def test_collective_prices_are_rings_on_nvlink():
    tables, cl, m = default_tables("H800-SXM5"), h800(1), deepseek_67b()
    tokens, tp, bw = 4096, 8, cl.node.nvlink_bytes_per_s
    act = tokens * m.hidden_size * 2.0
    lat = tables.collective_latency_s
    plain = tp_comm(tables, m, False, tokens, tp, False, bw)
    assert plain.attn_out_fwd_s == plain.mlp_out_fwd_s == pytest.approx(lat + bytes_moved("all_reduce", act, tp) / bw)
    assert plain.attn_in_fwd_s == plain.attn_out_bwd_s == 0.0  # without SP: no forward gather, no output-gradient gather
    sp = tp_comm(tables, m, False, tokens, tp, True, bw)
    gather = lat + bytes_moved("all_gather", act, tp) / bw
    assert sp.attn_in_fwd_s == sp.mlp_out_bwd_s == pytest.approx(gather)
    assert sp.attn_in_bwd_s == pytest.approx(2 * gather)  # reduce-scatter + the re-gather for the weight gradient
    # an all-reduce moves what a reduce-scatter and an all-gather move together
    assert sp.attn_out_fwd_s + sp.attn_in_fwd_s - 2 * lat == pytest.approx(plain.attn_out_fwd_s - lat)
    assert tp_comm(tables, m, False, tokens, 1, False, bw) == TpComm() and tp_ends(tables, m, tokens, 1, False, bw) == TpEnds()
    v3 = tp_comm(tables, deepseek_v3(), True, tokens, tp, True, bw)  # MLA gathers its 2112-wide latent; MoE: none
    assert v3.attn_in_fwd_s == pytest.approx(lat + bytes_moved("all_gather", tokens * 2112 * 2.0, tp) / bw)
    assert v3.mlp_in_fwd_s == v3.mlp_out_fwd_s == v3.mlp_in_bwd_s == 0.0


def _inputs(model, tp: int, sp: bool, pp: int = 8) -> PlanInputs:
    recipe = default_recipe()
    par = ParallelSpec(pp=pp, tp=tp, sp=sp, schedule="1f1b", seq_len_tokens=4096)
    return PlanInputs(model=model, cluster=h800(8), parallel=par, training=recipe.training, budget=recipe.budget)


def test_a_tp_rank_runs_the_slice_and_sp_divides_the_memory_bound_work():
    m, tables = deepseek_67b(), default_tables("H800-SXM5")
    whole = unit_costs(cost_context(_inputs(m, 1, False), tables, 4096), m, moe=False, traffic=None)
    ctx = cost_context(_inputs(m, 8, False), tables, 4096)
    no_sp = tp_unit_costs(ctx, m, moe=False, traffic=None, mtp=False, tp=8, sp=False)
    with_sp = tp_unit_costs(ctx, m, moe=False, traffic=None, mtp=False, tp=8, sp=True)
    assert with_sp.dw_s == no_sp.dw_s < whole.dw_s / 7  # weight gradients: the split GEMMs only
    assert with_sp.fwd_s < no_sp.fwd_s  # the norms and residual adds run on 1/8 of the sequence
    sliced = unit_costs(ctx, tp_slice(m, 8), moe=False, traffic=None)
    assert no_sp == sliced and with_sp.dw_s == sliced.dw_s  # GEMMs at the slice's shapes (the tables' efficiency there)


def test_moe_tp_rank_routes_its_sequence_shard():
    v3 = deepseek_v3()
    par = ParallelSpec(pp=16, ep=64, schedule="dualpipe", seq_len_tokens=4096)
    recipe = default_recipe()
    base = PlanInputs(model=v3, cluster=h800(256), parallel=par, training=recipe.training, budget=recipe.budget)
    tp8 = base.model_copy(update={"parallel": par.model_copy(update={"tp": 8, "sp": True})})
    one = step_inputs(base, 128, 32, opts=SimOptions(coarse=True)).stages[1].units[0]
    eight = step_inputs(tp8, 16, 32, opts=SimOptions(coarse=True)).stages[1].units[0]
    assert eight.dispatch_ib_bytes == pytest.approx(one.dispatch_ib_bytes / 8, rel=0.05)


def test_tp8_sp_on_67b_exposes_its_collectives():
    inputs = _inputs(deepseek_67b(), 8, True)
    pred, events = predict_step(inputs, 8, 16, trace=True)
    assert pred.exposed_comm_frac > 0.05
    names = {e.name.split(" ", 2)[-1] for e in events if e.lane == "nvlink"}
    assert {"tp-gather", "attn tp-reduce", "mlp tp-gather", "mlp tp-reduce", "attn-bwd tp-reduce"} <= names


@pytest.mark.parametrize("model", [deepseek_67b(), deepseek_v3()], ids=lambda m: m.name)
def test_the_memory_bound_share_is_what_unit_costs_prices(model):
    """Guard against drift from ``unit_costs``: its memory-bound seconds are what doubling HBM bandwidth halves;
    ``_memory_bound`` (which SP moves from the slice to the shard) must give the same."""
    from dataclasses import replace

    from moeplan.simulator.engine.tensor_parallel import _memory_bound

    recipe = default_recipe()
    par = ParallelSpec(pp=8, seq_len_tokens=4096, recompute="selective")
    inputs = PlanInputs(model=model, cluster=h800(8), parallel=par, training=recipe.training, budget=recipe.budget)
    tables = default_tables("H800-SXM5")
    # bandwidth alone: the fixed seconds a call (the H100 file measured at two sizes) do not halve with the bandwidth
    bytes_only = tables.model_copy(update={"memory_kernels": tuple(
        p.model_copy(update={"fwd_fixed_s": None, "bwd_fixed_s": None}) for p in tables.memory_kernels)})
    assert any(p.fwd_fixed_s for p in tables.memory_kernels)
    ctx = cost_context(inputs, bytes_only, 4096)
    fast = replace(ctx, gpu=ctx.gpu.model_copy(update={"hbm_bytes_per_s": 2 * ctx.gpu.hbm_bytes_per_s}))
    sliced, moe = tp_slice(model, 8), model.is_moe
    a, b = (unit_costs(c, sliced, moe=moe, traffic=None) for c in (ctx, fast))
    fwd, bwd, redo = _memory_bound(ctx, sliced, moe, ctx.tokens, float(model.num_experts_per_tok), False)
    assert 2 * (a.attn_fwd_s + a.mlp_fwd_s - b.attn_fwd_s - b.mlp_fwd_s) == pytest.approx(fwd, rel=1e-9)
    assert 2 * (a.attn_dx_s + a.mlp_dx_s - b.attn_dx_s - b.mlp_dx_s) == pytest.approx(bwd, rel=1e-9)
    assert 2 * (a.recompute_s - b.recompute_s) == pytest.approx(redo, rel=1e-9)
