"""Generators: exact small orders, admitted sizes, errors naming the values, invariants over sizes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplan.simulator.schedules import (
    Schedule,
    ScheduleError,
    check_schedule,
    make_schedule,
    schedule_from_torch_csv,
    schedule_to_torch_csv,
)
from moeplan.simulator.schedules.registry import num_stages
from moeplan.simulator.spec.parallel import ParallelSpec

EXACT_ORDERS = {
    # Warm-up min(pp-1-r, M) forwards, then one forward / one backward, then the drain.
    ("1f1b", 3, 4): [
        "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3",
        "1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3",
        "2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3",
    ],
    ("1f1b", 3, 1): ["0F0 0B0", "1F0 1B0", "2F0 2B0"],
    # As 1F1B with B split; rank r holds back its first r weight passes.
    ("zb1p", 3, 4): [
        "0F0 0F1 0F2 0I0 0W0 0F3 0I1 0W1 0I2 0W2 0I3 0W3",
        "1F0 1F1 1I0 1F2 1I1 1W0 1F3 1I2 1W1 1I3 1W2 1W3",
        "2F0 2I0 2F1 2I1 2F2 2I2 2W0 2F3 2I3 2W1 2W2 2W3",
    ],
    # Rounds of 2 micro-batches, depth first over chunks (stages r and r + 2).
    ("interleaved", 2, 4): [
        "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3",
        "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3",
    ],
    # Rank 0 runs stage 0 down (mb 0, 1) and stage 1 up (mb 2, 3); rank 1 the mirror. Both are
    # middle ranks, so the first phase-4 pair runs un-overlapped.
    ("dualpipe", 2, 4): [
        "0F0 1F2 0F1 1B2 1F3&0B0 1B3 0I1 0W1",
        "0F2 1F0 0F3 1B0 1F1&0B2 1B1 0I3 0W3",
    ],
    # The eight phases with n = 2, h = r, C = 4.
    ("dualpipev", 2, 4): [
        "0F0 0F1 0F2 3F0 3I0 3W0 3F1 0F3&3B1 3F2&0B0 3B2 3F3&0B1 3B3 0I2 0W2 0I3 0W3",
        "1F0 2F0 1F1 2F1 1F2 2B0 2F2&1B0 1F3&2B1 2F3&1B1 2B2 1B2 2I3 1I3 2W3 1W3",
    ],
}


@pytest.mark.parametrize(("kind", "pp", "m"), list(EXACT_ORDERS))
def test_exact_orders(kind: str, pp: int, m: int) -> None:
    rows = [" ".join(str(a) for a in row) for row in make_schedule(kind, pp, m).ranks]
    assert rows == EXACT_ORDERS[(kind, pp, m)]


@pytest.mark.parametrize(
    ("kind", "pp", "m", "message"),
    [
        ("dualpipe", 3, 6, "pp=3 must be even"),
        ("dualpipe", 4, 9, "microbatches=9 must be even"),
        ("dualpipe", 4, 6, r"microbatches=6 must be >= 2\*pp=8"),
        ("dualpipev", 4, 7, r"microbatches=7 must be >= 2\*pp=8"),
        ("interleaved", 4, 9, "microbatches=9 must split into 2 equal rounds"),
        ("1f1b", 0, 4, "pp=0 must be a positive integer"),
        ("zb1p", 2, 0, "microbatches=0 must be a positive integer"),
        ("gpipe", 2, 2, "kind='gpipe' must be one of"),
    ],
)
def test_constraints_name_the_values(kind: str, pp: int, m: int, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        make_schedule(kind, pp, m)


def test_interleaved_virtual_stages_must_be_positive() -> None:
    with pytest.raises(ScheduleError, match="virtual_stages=0"):
        make_schedule("interleaved", 2, 4, virtual_stages=0)


@pytest.mark.parametrize("kind", ["1f1b", "interleaved", "zb1p", "dualpipe", "dualpipev"])
def test_stage_count_matches_parallel_spec(kind: str) -> None:
    spec = ParallelSpec(pp=4, schedule=kind, virtual_stages=3, microbatches=12)
    schedule = make_schedule(kind, spec.pp, 12, spec.virtual_stages)
    assert schedule.num_stages == num_stages(spec)
    expected_chunks = {"interleaved": 3, "dualpipe": 2, "dualpipev": 2}.get(kind, 1)
    assert {len(schedule.stages_on_rank(r)) for r in range(4)} == {expected_chunks}


@st.composite
def sizes(draw: st.DrawFn) -> tuple[str, int, int, int]:
    kind = draw(st.sampled_from(["1f1b", "interleaved", "zb1p", "dualpipe", "dualpipev"]))
    if kind == "dualpipe":
        pp = 2 * draw(st.integers(1, 8))
        return kind, pp, 2 * draw(st.integers(pp, 3 * pp)), 1
    pp = draw(st.integers(1, 16))
    if kind == "dualpipev":
        return kind, pp, draw(st.integers(2 * pp, 5 * pp)), 1
    if kind == "interleaved":
        m = draw(st.integers(1, 4 * pp).filter(lambda m: m % max(1, m // pp) == 0))  # torch's rule
        return kind, pp, m, draw(st.integers(1, 4))
    return kind, pp, draw(st.integers(1, 4 * pp)), 1


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(sizes())
def test_every_admitted_size_is_valid(size: tuple[str, int, int, int]) -> None:
    kind, pp, m, v = size
    schedule = make_schedule(kind, pp, m, virtual_stages=v)
    stats = check_schedule(schedule)
    chunks = {"interleaved": v, "dualpipe": 2, "dualpipev": 2}.get(kind, 1)
    assert schedule.num_ranks == pp
    assert schedule.num_stages == {"interleaved": v * pp, "dualpipev": 2 * pp}.get(kind, pp)
    assert stats.stages_per_rank == (chunks,) * pp
    # Each rank runs a forward and a backward of every micro-batch on each of its chunks; F&B
    # pairs count once for each; split backwards add one W per I.
    forwards = m * (1 if kind == "dualpipe" else chunks)
    for counts in stats.action_counts:
        assert counts["F"] + counts["FB"] == forwards
        assert counts["B"] + counts["I"] + counts["FB"] == forwards
        assert counts["W"] == counts["I"]
    if kind in ("1f1b", "zb1p"):
        assert max(stats.peak_activations) == min(pp, m)
    if kind == "1f1b":
        assert stats.peak_activations == tuple(min(pp - r, m) for r in range(pp))
    if kind in ("dualpipe", "dualpipev"):
        assert stats.peak_activations == (schedule.num_stages + 1,) * pp
    assert Schedule.model_validate(schedule.model_dump(mode="json")) == schedule
    if kind != "dualpipe":
        assert schedule_from_torch_csv(schedule_to_torch_csv(schedule), kind) == schedule


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(sizes(), st.data())
def test_dropping_or_repeating_any_action_is_caught(size: tuple[str, int, int, int], data: st.DataObject) -> None:
    kind, pp, m, v = size
    rows = make_schedule(kind, pp, m, virtual_stages=v).model_dump(mode="json")
    rank = data.draw(st.integers(0, pp - 1))
    index = data.draw(st.integers(0, len(rows["ranks"][rank]) - 1))
    token = rows["ranks"][rank].pop(index)
    if data.draw(st.booleans()):
        rows["ranks"][rank][data.draw(st.integers(0, len(rows["ranks"][rank]))):0] = [token, token]
    with pytest.raises(ScheduleError):
        check_schedule(Schedule.model_validate(rows))
