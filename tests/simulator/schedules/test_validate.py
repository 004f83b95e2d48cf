"""Validation catches each kind of broken schedule, and names what is wrong."""

from __future__ import annotations

import pytest

from moeplan.simulator.schedules import Action, Schedule, ScheduleError, check_schedule, make_schedule, peak_activations


def _edit(kind: str, pp: int, m: int, rank: int, edit) -> Schedule:
    """``make_schedule`` with rank ``rank``'s token list rewritten by ``edit``."""
    data = make_schedule(kind, pp, m).model_dump(mode="json")
    data["ranks"][rank] = edit(list(data["ranks"][rank]))
    return Schedule.model_validate(data)


def test_generated_schedules_pass() -> None:
    stats = check_schedule(make_schedule("1f1b", 4, 8))
    assert stats.action_counts[0] == {"F": 8, "B": 8, "I": 0, "W": 0, "FB": 0}
    assert stats.peak_activations == (4, 3, 2, 1)
    assert stats.stages_per_rank == (1, 1, 1, 1)


def test_missing_backward_is_reported() -> None:
    broken = _edit("1f1b", 2, 2, 0, lambda row: [t for t in row if t != "0B1"])
    with pytest.raises(ScheduleError, match="stage=0 microbatch=1 runs F x1, B x0, I x0, W x0"):
        check_schedule(broken)


def test_duplicated_forward_is_reported() -> None:
    broken = _edit("1f1b", 2, 2, 1, lambda row: [*row, "1F0"])
    with pytest.raises(ScheduleError, match="stage=1 microbatch=0 runs F x2"):
        check_schedule(broken)


def test_backward_before_its_forward_is_reported() -> None:
    broken = _edit("1f1b", 2, 2, 1, lambda row: ["1B0", "1F0", *row[2:]])
    with pytest.raises(ScheduleError, match="rank=1 runs 1B0 at or before 1F0"):
        check_schedule(broken)


def test_weight_before_input_backward_is_reported() -> None:
    def swap(row: list[str]) -> list[str]:
        i, w = row.index("1I0"), row.index("1W0")
        row[i], row[w] = row[w], row[i]
        return row

    with pytest.raises(ScheduleError, match="rank=1 runs 1W0 at or before 1I0"):
        check_schedule(_edit("zb1p", 2, 3, 1, swap))


def test_mixing_full_and_split_backward_is_reported() -> None:
    broken = _edit("zb1p", 2, 2, 0, lambda row: ["0B0" if t == "0I0" else t for t in row])
    with pytest.raises(ScheduleError, match="stage=0 microbatch=0 runs F x1, B x1, I x0, W x1"):
        check_schedule(broken)


def test_stages_out_of_order_deadlock() -> None:
    # DualPipeV on one rank holds stages 0 and 1; running 1F0 before 0F0 can never start.
    broken = _edit("dualpipev", 1, 2, 0, lambda row: ["1F0", "0F0", *row[2:]] if row[:2] == ["0F0", "1F0"] else row)
    assert str(broken.ranks[0][0]) == "1F0"
    with pytest.raises(ScheduleError, match=r"dualpipev schedule deadlocks: rank 0 at 1F0"):
        check_schedule(broken)


def test_cross_rank_cycle_deadlocks() -> None:
    # Rank 0 waits in 0B0 for rank 1's 1B0; rank 1 first wants 0F1, which rank 0 runs after 0B0.
    data = make_schedule("1f1b", 2, 2).model_dump(mode="json")
    data["ranks"] = [["0F0", "0B0", "0F1", "0B1"], ["1F1", "1B1", "1F0", "1B0"]]
    with pytest.raises(ScheduleError, match="deadlocks: rank 0 at 0B0; rank 1 at 1F1"):
        check_schedule(Schedule.model_validate(data))


def test_overlapped_pair_of_one_microbatch_is_refused() -> None:
    # A backward cannot overlap its own forward: it needs the forward's activations.
    data = make_schedule("dualpipev", 1, 2).model_dump(mode="json")
    data["ranks"] = [["0F0", "1F0", "0F1", "1B0", "1F1&1B1", "0B0", "0I1", "0W1"]]
    with pytest.raises(ScheduleError, match="rank=0 runs 1B1 at or before 1F1"):
        check_schedule(Schedule.model_validate(data))


def test_peak_activations_counts_overlap_as_both() -> None:
    actions = [Action.model_validate(t) for t in ["0F0", "1F0", "0F1&1B0", "0B0", "0B1"]]
    # Two held when the pair starts its forward; its backward frees one only when it ends.
    assert peak_activations(actions) == 3
    assert peak_activations([Action.model_validate(t) for t in ["0F0", "0I0", "0F1", "0W0"]]) == 2
    assert peak_activations([Action.model_validate(t) for t in ["0F0", "0B0", "0F1", "0B1"]]) == 1
