"""A plan the processes cannot run is refused in one line, before any process group forms."""

from __future__ import annotations

import pytest

from moeplan.model.runtime.rank import PlanRuntimeError, check_plan_for_world
from moeplan.simulator.presets.models import tiny_dense
from tests.model.runtime.harness import tiny_plan


def test_a_world_other_than_the_plans_is_one_line():
    plan = tiny_plan("1f1b", pp=2, dp=2)
    check_plan_for_world(plan, 4)
    with pytest.raises(PlanRuntimeError, match=r"^layout.world=4 but 3 processes were given$"):
        check_plan_for_world(plan, 3)


def test_a_plan_without_a_schedule_is_one_line():
    plan = tiny_plan("1f1b", pp=2).model_copy(update={"schedule": None})
    with pytest.raises(PlanRuntimeError, match="plan.schedule is null"):
        check_plan_for_world(plan, 2)


def test_a_model_without_mla_is_one_line():
    """The runtime builds MLA attention only: every way in (``RankRuntime.create``, ``moeplan launch``) asks this."""
    plan = tiny_plan("1f1b", pp=2, spec=tiny_dense())
    with pytest.raises(PlanRuntimeError, match=r"^model 'tiny-dense': kv_lora_rank=None; the runtime builds MLA models "
                                               r"only \(the plan is for the simulator only\)$"):
        check_plan_for_world(plan, 2)
