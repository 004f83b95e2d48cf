"""The layout search over tensor and sequence parallelism."""

from __future__ import annotations

from moeplan.simulator.planning.search import enumerate_layouts, search
from moeplan.simulator.presets.clusters import h200, h800
from moeplan.simulator.presets.models import deepseek_67b, deepseek_v3, tiny_dense, tiny_moe
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import Phase, TrainingSpec

TRAINING = TrainingSpec(phases=(Phase(name="pretrain", tokens=1e9, global_batch_seqs=64),))


def _inputs(model, cluster, seq: int = 4096) -> PlanInputs:
    return PlanInputs(model=model, cluster=cluster, training=TRAINING, parallel=ParallelSpec(seq_len_tokens=seq))


def test_dense_search_tries_every_tp_with_and_without_sp_and_moe_only_with_sp():
    dense = {(p.tp, p.sp) for p in enumerate_layouts(_inputs(deepseek_67b(), h800(64)), {})}
    assert dense == {(1, False)} | {(t, s) for t in (2, 4, 8) for s in (False, True)}
    moe = {(p.tp, p.sp) for p in enumerate_layouts(_inputs(deepseek_v3(), h800(256)), {"pp": 16, "schedule": "dualpipe"})}
    assert moe == {(1, False), (2, True), (4, True), (8, True)}
    assert {p.tp for p in enumerate_layouts(_inputs(tiny_dense(), h800(1)), {})} == {1, 2}  # 2 KV heads


def test_world_is_pp_dp_cp_tp_and_tp_never_meets_cp():
    inputs = _inputs(deepseek_67b(), h800(8), seq=32768)
    layouts = list(enumerate_layouts(inputs, {}))
    assert all(p.pp * p.dp * p.cp * p.tp == 64 for p in layouts)
    assert not any(p.tp > 1 and p.cp > 1 for p in layouts) and any(p.cp > 1 for p in layouts)


def test_a_fixed_tp_on_a_moe_model_lets_the_search_choose_sp():
    result = search(_inputs(tiny_moe(), h200(1), seq=256), {"tp": 2, "pp": 2})
    assert result.best.tp == 2 and result.best.sp
    assert all(c.parallel.tp == 2 for c in result.ranked)
