"""The runtime does not run tensor parallelism: a plan with tp > 1 is refused in one line before any
process group forms."""

from __future__ import annotations

import pytest

from moeplan.model.runtime.rank import PlanRuntimeError, check_plan_for_world
from moeplan.simulator.planning.planner import build_plan
from moeplan.simulator.presets.clusters import h200
from moeplan.simulator.presets.models import tiny_moe
from moeplan.simulator.presets.recipes import default_recipe
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import Phase, TrainingSpec


def _plan(tp: int):
    cluster = h200(1)
    training = TrainingSpec(phases=(Phase(name="pretrain", tokens=1e9, global_batch_seqs=8),))
    par = ParallelSpec(pp=2, tp=tp, sp=tp > 1, schedule="1f1b", seq_len_tokens=16)
    return build_plan(PlanInputs(model=tiny_moe(), cluster=cluster, parallel=par, training=training,
                                 budget=default_recipe().budget))


def test_a_tp_plan_is_refused_in_one_line():
    check_plan_for_world(_plan(1), 8)
    with pytest.raises(PlanRuntimeError, match=r"^parallel.tp=2: the runtime does not run tensor parallelism "
                                               r"\(tp must be 1; the plan is for the simulator only\)$"):
        check_plan_for_world(_plan(2), 8)
