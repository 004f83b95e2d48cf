"""Load models and the two JSON formats (load record, placement)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from pydantic import ValidationError

from moeplan.simulator.contracts.expert_load import ExpertLoadRecord, one_line_error
from moeplan.simulator.contracts.placement import ExpertPlacement
from moeplan.simulator.placement.loads import drifting_load, uniform_load, zipf_load
from moeplan.simulator.placement.rebalance import place_experts


def test_zipf_sums_to_token_expert_pairs_and_is_seeded() -> None:
    a = zipf_load(3, 256, 1000, 8, 1.2, np.random.default_rng(5))
    b = zipf_load(3, 256, 1000, 8, 1.2, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a.sum(axis=1), 8000)
    top = np.sort(a[0])[::-1]
    np.testing.assert_allclose(top[0] / top[1], 2**1.2)  # rank 1 vs rank 2
    assert len({tuple(np.argsort(row)) for row in a}) == 3  # ranks differ per layer


def test_zipf_exponent_zero_is_uniform() -> None:
    np.testing.assert_allclose(zipf_load(2, 16, 100, 4, 0.0, np.random.default_rng(0)), uniform_load(2, 16, 100, 4))


def test_drift_keeps_totals_and_grows_with_sigma() -> None:
    base = np.linspace(1, 2, 32)
    small = drifting_load(base, 10, 0.01, np.random.default_rng(0))
    large = drifting_load(base, 10, 0.5, np.random.default_rng(0))
    np.testing.assert_allclose(small.sum(axis=1), base.sum())
    np.testing.assert_allclose(small[0], base)
    change = lambda load: np.abs(np.log(load[-1] / load[0])).mean()  # noqa: E731
    assert change(large) > 10 * change(small)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: zipf_load(1, 8, 10, 2, -1.0, np.random.default_rng(0)), "zipf exponent=-1.0 must be"),
        (lambda: zipf_load(1, 8, 10, 2, float("nan"), np.random.default_rng(0)), "zipf exponent=nan"),
        (lambda: uniform_load(1, 0, 10, 2), "num_experts=0 must be > 0"),
        (lambda: drifting_load(np.array([1.0, -1.0]), 2, 0.1, np.random.default_rng(0)), "non-negative"),
        (lambda: drifting_load(np.ones(2), 2, -0.1, np.random.default_rng(0)), "drift sigma=-0.1"),
    ],
)
def test_bad_load_parameters(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def _record(**update) -> dict:
    data = {
        "schema_version": 1, "model": "tiny-moe", "n_routed_experts": 4, "num_experts_per_tok": 2,
        "window_tokens": 10, "layers": [{"layer": 1, "tokens_per_expert": [5, 5, 6, 4]},
                                         {"layer": 2, "tokens_per_expert": [0, 10, 5, 5]}],
    }
    return {**data, **update}


def test_load_record_round_trip() -> None:
    record = ExpertLoadRecord.model_validate(_record())
    again = ExpertLoadRecord.model_validate_json(record.model_dump_json())
    assert again == record and again.layer_ids == [1, 2]
    assert again.weight().tolist() == [[5, 5, 6, 4], [0, 10, 5, 5]]


@pytest.mark.parametrize(
    "update, message",
    [
        ({"schema_version": 2}, r"schema_version: Input should be 1 \(got 2\)"),
        ({"layers": [{"layer": 1, "tokens_per_expert": [1, -3, 0, 0]}]}, r"tokens_per_expert\[1\]=-3 must be >= 0"),
        ({"layers": [{"layer": 1, "tokens_per_expert": [1, 2]}]}, "len\\(tokens_per_expert\\)=2 != n_routed_experts=4"),
        ({"layers": [{"layer": 1, "tokens_per_expert": [1, 1, 1, 1]}] * 2}, "layer=1 appears twice"),
        ({"layers": [{"layer": 1, "tokens_per_expert": [1, "x", 1, 1]}]}, "layers.0.tokens_per_expert.1"),
        ({"n_routed_experts": 0}, "n_routed_experts: Input should be greater than 0"),
    ],
)
def test_load_record_errors_are_one_line_naming_field_and_value(update, message) -> None:
    with pytest.raises(ValidationError) as info:
        ExpertLoadRecord.model_validate(_record(**update))
    line = one_line_error(info.value)
    assert "\n" not in line
    assert re.search(message, line), line


def test_placement_json_round_trip_and_derived_maps() -> None:
    weight = np.random.default_rng(0).random((2, 16))
    placement = place_experts(weight, 24, 4, 2, 8)
    model = ExpertPlacement.from_placement(placement, num_groups=4, layer_ids=[3, 4])
    again = ExpertPlacement.model_validate_json(model.model_dump_json()).to_placement()
    np.testing.assert_array_equal(again.phy2log, placement.phy2log)
    np.testing.assert_array_equal(again.logcnt, placement.logcnt)
    np.testing.assert_array_equal(again.log2phy, placement.log2phy)
    assert again.policy == "hierarchical" and model.num_gpus == 8


@pytest.mark.parametrize(
    "update, message",
    [
        ({"phy2log": [[0, 1, 2, 2]]}, "expert 3 has no replica"),
        ({"phy2log": [[0, 1, 2, 7]]}, "expert id 7 outside 0..3"),
        ({"phy2log": [[0, 1, 2]]}, r"len\(phy2log\)=3 != sum\(slots_per_gpu\)=4"),
        ({"slots_per_gpu": [2, 0, 2]}, "must all be >= 1"),
        ({"num_nodes": 3}, "num_nodes=3 must divide the 2 GPUs"),
        ({"layer_ids": [0, 1]}, "phy2log has 1 rows but layer_ids has 2"),
    ],
)
def test_placement_json_rejects_inconsistent_maps(update, message) -> None:
    data = {
        "policy": "global", "num_logical_experts": 4, "num_groups": 1, "num_nodes": 1,
        "slots_per_gpu": [2, 2], "layer_ids": [0], "phy2log": [[0, 1, 2, 3]], **update,
    }
    with pytest.raises(ValidationError, match=message):
        ExpertPlacement.model_validate(data)
