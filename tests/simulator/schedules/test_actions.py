"""The schedule representation: tokens, JSON round trips, placement checks, import hygiene."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from moeplan.simulator.schedules import SCHEDULE_KINDS, Action, Op, Schedule, ScheduleError, make_schedule


def test_tokens_round_trip() -> None:
    assert str(Action.single("F", 3, 0)) == "3F0"
    pair = Action.overlap(Op(kind="F", stage=0, microbatch=7), Op(kind="B", stage=7, microbatch=3))
    assert str(pair) == "0F7&7B3"
    assert pair.kind == "FB"
    assert Action.model_validate("0F7&7B3") == pair
    assert Action.model_validate("12W5") == Action.single("W", 12, 5)


@pytest.mark.parametrize("token", ["3X0", "F0", "3F", "0F1&0F2", "0B1&0F2", "0F1&1B1&2B1", "-1F0"])
def test_bad_tokens_are_refused_with_the_token(token: str) -> None:
    with pytest.raises(ValueError, match="op=|action=|ops"):
        Action.model_validate(token)


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_json_round_trip(kind: str) -> None:
    schedule = make_schedule(kind, 4, 8)
    data = json.loads(json.dumps(schedule.model_dump(mode="json")))
    assert data["kind"] == kind
    assert all(isinstance(token, str) for row in data["ranks"] for token in row)
    assert Schedule.model_validate(data) == schedule


def test_json_is_compact_tokens() -> None:
    data = make_schedule("dualpipev", 2, 4).model_dump(mode="json")
    assert data["stage_ranks"] == [[0, 1, 1, 0]]
    assert data["ranks"][0][:4] == ["0F0", "0F1", "0F2", "3F0"]
    assert "0F3&3B1" in data["ranks"][0]


def test_dualpipe_placement_has_two_directions() -> None:
    schedule = make_schedule("dualpipe", 4, 8)
    assert schedule.stage_ranks == ((0, 1, 2, 3), (3, 2, 1, 0))
    assert schedule.direction_microbatches == (4, 4)
    assert schedule.rank_of(stage=0, microbatch=3) == 0
    assert schedule.rank_of(stage=0, microbatch=4) == 3
    assert schedule.chunks_on_rank(1) == ((0, 1), (1, 2))
    assert schedule.stages_on_rank(1) == (1, 2)


def test_action_on_the_wrong_rank_is_refused() -> None:
    data = make_schedule("1f1b", 2, 2).model_dump(mode="json")
    data["ranks"][0][0] = "1F0"
    with pytest.raises(ValueError, match=r"action=1F0 is listed on rank=0 but stage 1 lives on rank 1"):
        Schedule.model_validate(data)


def test_inconsistent_shape_is_refused() -> None:
    data = make_schedule("1f1b", 2, 2).model_dump(mode="json")
    data["num_ranks"] = 3
    with pytest.raises(ValueError, match="num_ranks=3"):
        Schedule.model_validate(data)
    data = make_schedule("1f1b", 2, 2).model_dump(mode="json")
    data["direction_microbatches"] = [3]
    with pytest.raises(ValueError, match=r"direction_microbatches=\(3,\)"):
        Schedule.model_validate(data)


def test_schedule_error_is_a_value_error() -> None:
    assert issubclass(ScheduleError, ValueError)


def test_core_imports_neither_torch_nor_plotly() -> None:
    code = (
        "import sys, simulator.schedules as s; s.execute(s.make_schedule('dualpipev', 2, 4), s.Durations()); "
        "assert 'torch' not in sys.modules and 'plotly' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_json_schema_describes_actions_as_tokens() -> None:
    schema = Schedule.model_json_schema()
    pattern = schema["$defs"]["Action"]["pattern"]
    assert schema["$defs"]["Action"]["type"] == "string"
    tokens = [t for kind in SCHEDULE_KINDS for row in make_schedule(kind, 2, 4).model_dump(mode="json")["ranks"] for t in row]
    assert all(re.match(pattern, token) for token in tokens)
    assert not re.match(pattern, "0B1&0F2")
