"""What a number field may hold (``spec.numbers``) and the bounds on sizes, through the specs users fill."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from moeplan.simulator.presets.clusters import h200
from moeplan.simulator.presets.models import tiny_moe
from moeplan.simulator.presets.recipes import default_recipe
from moeplan.simulator.spec.errors import first_error_line
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import BudgetSpec, Phase


def _line(cls, data) -> str:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(data)
    return first_error_line(info.value)


def _config(**update):
    return {**tiny_moe().to_hf_config(), **update}


@pytest.mark.parametrize(("update", "message"), [
    ({"hidden_size": True}, "hidden_size: Input should be a valid integer (got True)"),
    ({"num_hidden_layers": 4.0}, "num_hidden_layers: Input should be a valid integer (got 4.0)"),
    ({"num_hidden_layers": "4"}, "num_hidden_layers: Input should be a valid integer (got '4')"),
    ({"rope_theta": False}, "rope_theta: Input should be a valid number (got False)"),
    ({"rope_theta": math.nan}, "rope_theta: Input should be a finite number (got nan)"),
    ({"rms_norm_eps": math.inf}, "rms_norm_eps: Input should be a finite number (got inf)"),
    ({"attention_bias": 1}, "attention_bias: Input should be a valid boolean (got 1)"),
    ({"attention_bias": "yes"}, "attention_bias: Input should be a valid boolean (got 'yes')"),
    ({"rope_scaling": "yarn"}, "rope_scaling: Input should be a valid dictionary or instance of RopeScaling (got 'yarn')"),
    ({"num_hidden_layers": 10**6}, "num_hidden_layers: Input should be less than or equal to 512 (got 1000000)"),
    ({"n_routed_experts": 2**20}, "n_routed_experts: Input should be less than or equal to 16384 (got 1048576)"),
])
def test_model_fields_refuse_bools_strings_nan_and_huge_sizes(update, message):
    with pytest.raises(ValidationError) as info:
        ModelSpec.from_hf_config(_config(**update))
    assert first_error_line(info.value) == message


@pytest.mark.parametrize(("data", "message"), [
    ({"zero_stage": True}, "zero_stage: expected a number, got true"),
    ({"pp": True}, "pp: Input should be a valid integer (got True)"),
    ({"microbatches": 99999999}, "microbatches: Input should be less than or equal to 131072 (got 99999999)"),
    ({"virtual_stages": 99999999999}, "virtual_stages: Input should be less than or equal to 64 (got 99999999999)"),
    ({"stage_layers": [1, True]}, "stage_layers.1: Input should be a valid integer (got True)"),
])
def test_layout_fields(data, message):
    assert _line(ParallelSpec, data) == message


def test_budgets_and_phases_are_finite():
    assert _line(BudgetSpec, {"gpu_hours": math.inf}) == "gpu_hours: Input should be a finite number (got inf)"
    assert _line(BudgetSpec, {"usd_per_gpu_hour": math.nan}) == "usd_per_gpu_hour: Input should be a finite number (got nan)"
    assert _line(Phase, {"name": "p", "tokens": 1e30, "global_batch_seqs": 8}) == (
        "tokens: Input should be less than or equal to 1000000000000000000 (got 1e+30)")


def test_a_phase_holds_at_least_one_step():
    r = default_recipe()
    phase = {"name": "pretrain", "tokens": 1e-30, "global_batch_seqs": 64}
    data = {"model": tiny_moe(), "cluster": h200(1), "parallel": ParallelSpec(), "budget": r.budget,
            "training": {"phases": [phase]}}
    assert _line(PlanInputs, data) == (
        "training.phases.0.tokens=1e-30 is less than one step of 64 sequences x 4096 tokens = 262,144 tokens")
    ramp = {**phase, "tokens": 200_000, "ramp": {"start_seqs": 8, "ramp_tokens": 1e5}}  # one step of the ramp's start
    assert PlanInputs.model_validate({**data, "training": {"phases": [ramp]}}).training.phases[0].tokens == 200_000
