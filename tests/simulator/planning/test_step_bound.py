"""The search's step bound (compute plus the TP waits no schedule hides) and the pruning it buys."""

from __future__ import annotations

import pytest

from moeplan.simulator.accounting.layout import LayoutError, check_layout
from moeplan.simulator.engine.build import SimOptions, compute_bound_s
from moeplan.simulator.planning import search as search_module
from moeplan.simulator.planning.predict import simulate
from moeplan.simulator.planning.run_model import step_line
from moeplan.simulator.planning.search import _microbatches, enumerate_layouts, search
from moeplan.simulator.planning.step_bound import BoundMemo, runs_one_op_at_a_time, step_bound_s
from moeplan.simulator.presets.clusters import h200, h800
from moeplan.simulator.presets.models import deepseek_v2_lite, tiny_dense, tiny_moe
from moeplan.simulator.schedules.registry import SCHEDULE_KINDS, make_schedule
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import Phase, TrainingSpec

COARSE = SimOptions(coarse=True)


def _inputs(model, cluster, batch: int = 32, seq: int = 256) -> PlanInputs:
    training = TrainingSpec(phases=(Phase(name="pretrain", tokens=1e9, global_batch_seqs=batch),))
    return PlanInputs(model=model, cluster=cluster, training=training, parallel=ParallelSpec(seq_len_tokens=seq))


def _tp_layouts(inputs: PlanInputs, fixed: dict) -> list[tuple[PlanInputs, int, int]]:
    """(inputs with the layout, dp, micro-batches) of every enumerated layout with tp > 1 that runs."""
    out = []
    for par in enumerate_layouts(inputs, fixed):
        try:
            dp = check_layout(inputs.model, inputs.cluster, par)
        except LayoutError:
            continue
        m = _microbatches(inputs, par, dp)
        if par.tp > 1 and m is not None:
            out.append((inputs.model_copy(update={"parallel": par}), dp, m))
    return out


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_only_dualpipe_kinds_overlap_two_ops(kind):
    assert runs_one_op_at_a_time(make_schedule(kind, 4, 16, 2)) == (kind not in ("dualpipe", "dualpipev"))


@pytest.mark.parametrize(("model", "cluster", "fixed"), [
    (tiny_dense(), h800(1), {"micro_batch_size": 8}),
    (tiny_moe(), h200(1), {"micro_batch_size": 2, "recompute": "none"}),
    (deepseek_v2_lite(), h200(1), {"micro_batch_size": 1, "recompute": "selective", "pp": 2}),
])
def test_the_bound_never_exceeds_the_ranked_or_the_detailed_step(model, cluster, fixed):
    raised = 0
    for trial, dp, m in _tp_layouts(_inputs(model, cluster), fixed):
        bound = step_bound_s(trial, dp, m, COARSE, BoundMemo())
        raised += bound > compute_bound_s(trial, dp, m, COARSE) * (1 + 1e-9)
        coarse = step_line(trial, dp, trial.parallel.seq_len_tokens, None, COARSE).step_s(m)
        detailed = simulate(trial, dp, m, opts=SimOptions()).step_time_s
        assert bound <= min(coarse, detailed) * (1 + 1e-9), f"{trial.parallel=} {bound=} {coarse=} {detailed=}"
    assert raised > 0  # the TP waits counted somewhere, so the case tests them


def _compute_bound_only(inputs, dp, microbatches, opts, memo):
    return compute_bound_s(inputs, dp, microbatches, opts)


# tiny_dense at micro-batch size 8: below it its step is the memory-bound classes (at 1, 256 tokens, their fixed
# seconds a call, the H100 file measured at two sizes; up to 4, the op-by-op RMSNorm an eager run is priced at since
# 2026-12-07, elementwise.EAGER_CLASSES) and the TP waits no longer decide what is pruned (21 = 21)
@pytest.mark.parametrize(("model", "cluster", "fixed"), [
    (tiny_dense(), h800(1), {"micro_batch_size": 8}),
    (tiny_moe(), h200(1), {"recompute": "selective"}),
    (deepseek_v2_lite(), h200(1), {"micro_batch_size": 1, "recompute": "selective"}),
])
def test_pruned_and_unpruned_searches_agree_and_the_tp_waits_prune(model, cluster, fixed, monkeypatch):
    inputs = _inputs(model, cluster, batch=64, seq=1024 if model.name == "deepseek-v2-lite" else 256)
    pruned, full = search(inputs, fixed), search(inputs, fixed, exhaustive=True)
    assert pruned.ranked == full.ranked and pruned.evaluated == full.evaluated
    assert pruned.simulated < full.simulated == full.evaluated
    monkeypatch.setattr(search_module, "step_bound_s", _compute_bound_only)
    by_compute = search(inputs, fixed)
    assert by_compute.ranked == pruned.ranked
    assert pruned.simulated < by_compute.simulated, f"{pruned.simulated=} {by_compute.simulated=}"


def test_a_bound_that_fails_turns_pruning_off(monkeypatch, caplog):
    inputs = _inputs(tiny_moe(), h200(1))
    fixed = {"recompute": "selective", "micro_batch_size": 1}
    full = search(inputs, fixed, exhaustive=True)
    monkeypatch.setattr(search_module, "step_bound_s", lambda *a: 100 * _compute_bound_only(*a))  # not a bound
    wrong = search(inputs, fixed)
    assert "below its bound" in caplog.text
    assert wrong.simulated == full.simulated and wrong.ranked == full.ranked

