"""Reference executor: exact tiny timelines, and the bubble against the DualPipe README table."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplan.simulator.schedules import (
    Durations,
    Schedule,
    ScheduleError,
    check_schedule,
    closed_form_bubble,
    execute,
    make_schedule,
)
from moeplan.simulator.schedules.table import bubble_table_markdown


def _log(kind: str, pp: int, m: int, durations: Durations) -> list[list[tuple[str, float, float]]]:
    timeline = execute(make_schedule(kind, pp, m), durations)
    return [[(str(t.action), t.start_s, t.end_s) for t in row] for row in timeline.ranks]


def test_1f1b_two_ranks_exact_timeline() -> None:
    assert _log("1f1b", 2, 2, Durations(f_s=1, b_s=2, w_s=1)) == [
        [("0F0", 0, 1), ("0F1", 1, 2), ("0B0", 4, 6), ("0B1", 7, 9)],
        [("1F0", 1, 2), ("1B0", 2, 4), ("1F1", 4, 5), ("1B1", 5, 7)],
    ]


def test_overlapped_pair_takes_fb_s_and_waits_for_both_inputs() -> None:
    assert _log("dualpipev", 1, 2, Durations(f_s=1, b_s=2, w_s=0.5, fb_s=2.5)) == [
        [
            ("0F0", 0, 1), ("1F0", 1, 2), ("0F1", 2, 3), ("1B0", 3, 5), ("1F1&0B0", 5, 7.5),
            ("1B1", 7.5, 9.5), ("0I1", 9.5, 11), ("0W1", 11, 11.5),
        ]
    ]


def test_bubble_is_the_longest_idle_rank() -> None:
    timeline = execute(make_schedule("dualpipe", 8, 16), Durations(f_s=1, b_s=2, w_s=1, fb_s=2.5))
    # Ranks overlap different numbers of pairs, so busy times differ by (F+B-F&B) per pair.
    assert len(set(timeline.busy_s)) > 1
    assert timeline.bubble_s == max(timeline.idle_s) == timeline.makespan_s - min(timeline.busy_s)
    assert timeline.bubble_frac == pytest.approx(timeline.bubble_s / timeline.makespan_s)


def test_durations_are_checked() -> None:
    with pytest.raises(ValueError, match="w_s=2.0 must be < b_s=2.0"):
        Durations(f_s=1, b_s=2, w_s=2)
    with pytest.raises(ValueError, match="greater than 0"):
        Durations(f_s=0)
    assert Durations(f_s=1, b_s=2).overlap_s == 3
    assert Durations(b_s=3, w_s=1).i_s == 2


quarters = st.integers(1, 16).map(lambda q: q / 4)


@st.composite
def in_conditions(draw: st.DrawFn, kind: str) -> tuple[int, int, Durations]:
    """(pp, microbatches, durations) inside the closed form's stated conditions, pp in 2..32."""
    f_s = draw(quarters)
    if kind == "dualpipe":
        pp = 2 * draw(st.integers(1, 16))
    else:
        pp = draw(st.integers(1, 16)) if kind in ("dualpipev", "interleaved") else draw(st.integers(2, 32))
    if kind in ("dualpipe", "dualpipev"):
        w_s = draw(st.integers(0, 4)) * f_s / 4  # W <= F
        b_s = f_s + w_s  # I = F
        fb_s = max(f_s, b_s) + draw(st.integers(0, 4)) * (f_s + b_s - max(f_s, b_s)) / 4
        m = 2 * pp + 2 * draw(st.integers(0, 3))
        return pp, m, Durations(f_s=f_s, b_s=b_s, w_s=w_s, fb_s=fb_s)
    b_s = draw(quarters)
    if kind == "zb1p":
        w_s = min(f_s, b_s / 2) * draw(st.integers(0, 4)) / 4  # W <= F, W <= I
        return pp, pp + draw(st.integers(0, 8)), Durations(f_s=f_s, b_s=b_s, w_s=w_s)
    m = pp * draw(st.integers(1, 2)) if kind == "interleaved" else draw(st.integers(1, 2 * pp))
    return pp, m, Durations(f_s=f_s, b_s=b_s, w_s=0)


@pytest.mark.parametrize("kind", ["1f1b", "interleaved", "zb1p", "dualpipe", "dualpipev"])
@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_bubble_equals_readme_table_inside_its_conditions(kind: str, data: st.DataObject) -> None:
    pp, m, durations = data.draw(in_conditions(kind))
    v = data.draw(st.integers(2, 4)) if kind == "interleaved" else 2
    closed = closed_form_bubble(kind, pp, m, durations)
    assert closed.holds, (pp, m, durations)
    measured = execute(make_schedule(kind, pp, m, virtual_stages=v), durations).bubble_s
    assert measured == pytest.approx(closed.bubble_s, abs=1e-9)


@pytest.mark.parametrize(
    ("kind", "pp", "m", "durations"),
    [
        ("zb1p", 4, 8, Durations(f_s=1, b_s=4, w_s=2)),  # W > F
        ("zb1p", 4, 8, Durations(f_s=2, b_s=2, w_s=1.5)),  # W > I
        ("zb1p", 4, 2, Durations(f_s=1, b_s=2, w_s=1)),  # M < pp
        ("interleaved", 4, 2, Durations(f_s=1, b_s=2, w_s=1)),  # pp does not divide M
        ("dualpipe", 8, 16, Durations(f_s=1, b_s=2, w_s=0.5, fb_s=2.5)),  # I != F
        ("dualpipev", 4, 8, Durations(f_s=1, b_s=2.5, w_s=1, fb_s=3)),  # I != F
        ("dualpipev", 4, 8, Durations(f_s=1, b_s=1.5, w_s=0.5, fb_s=1.2)),  # F&B < max(F, B)
    ],
)
def test_conditions_are_needed(kind: str, pp: int, m: int, durations: Durations) -> None:
    closed = closed_form_bubble(kind, pp, m, durations)
    assert not closed.holds
    assert execute(make_schedule(kind, pp, m), durations).bubble_s != pytest.approx(closed.bubble_s)


@pytest.mark.parametrize("kind", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_bubble_does_not_grow_with_microbatches(kind: str) -> None:
    durations = Durations(f_s=1, b_s=2, w_s=1, fb_s=2.5)
    bubbles = {execute(make_schedule(kind, 8, m), durations).bubble_s for m in (16, 24, 40)}
    assert len(bubbles) == 1


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize(
    ("kind", "params", "activations"),
    [
        # DualPipe README: parameters per device and activations per device, PP = stages.
        ("1f1b", 1, lambda stages: stages),
        ("zb1p", 1, lambda stages: stages),
        ("dualpipe", 2, lambda stages: stages + 1),
        ("dualpipev", 2, lambda stages: stages + 1),
    ],
)
def test_memory_columns_of_the_readme_table(kind: str, pp: int, params: int, activations) -> None:
    schedule = make_schedule(kind, pp, 4 * pp)
    stats = check_schedule(schedule)
    assert set(stats.stages_per_rank) == {params}
    assert max(stats.peak_activations) == activations(schedule.num_stages)


def test_executor_reports_deadlock() -> None:
    data = make_schedule("1f1b", 2, 1).model_dump(mode="json")
    schedule = Schedule.model_validate({**data, "ranks": [["0F0", "0B0"], ["1B0", "1F0"]]})
    with pytest.raises(ScheduleError, match="rank 1 at 1B0"):
        execute(schedule, Durations())


@pytest.mark.parametrize(
    ("kind", "pp", "m", "expected_s"),
    [
        # The README table's largest sizes, F=1 B=2 W=1 F&B=2.5: 32 stages in every case.
        ("1f1b", 32, 32, 31 * 3),
        ("zb1p", 32, 40, 31 * 1),
        ("dualpipe", 32, 64, 15 * 1.5),
        ("dualpipev", 16, 32, 15 * 1.5),
    ],
)
def test_bubble_at_32_stages(kind: str, pp: int, m: int, expected_s: float) -> None:
    durations = Durations(f_s=1, b_s=2, w_s=1, fb_s=2.5)
    assert execute(make_schedule(kind, pp, m), durations).bubble_s == pytest.approx(expected_s)


@pytest.mark.parametrize(
    ("marker", "durations"),
    [
        ("F=1 B=2 W=1 FB=2.5", Durations(f_s=1, b_s=2, w_s=1, fb_s=2.5)),
        ("F=1 B=2 W=0.5 FB=2.4", Durations(f_s=1, b_s=2, w_s=0.5, fb_s=2.4)),
    ],
)
def test_docs_bubble_table_is_current(marker: str, durations: Durations) -> None:
    docs = (Path(__file__).parents[3] / "docs" / "design" / "schedules.md").read_text()
    table = bubble_table_markdown([4, 8, 16], durations)
    assert f"<!-- bubble-table {marker} -->\n{table}" in docs
