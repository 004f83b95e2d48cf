"""The schedule-kind registry: it agrees with the generators, and it is the only place that tells
kinds apart by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplan.simulator.schedules import SCHEDULE_KINDS, ScheduleError, make_schedule, schedule_kind
from moeplan.simulator.schedules.registry import microbatch_error, smallest_valid_microbatches
from moeplan.simulator.spec.parallel import ParallelSpec

ROOT = Path(__file__).resolve().parents[3]
SOURCE_FOLDERS = ("simulator", "model", "orchestrator", "kernels", "manifests")
REGISTRY_ROOM = ROOT / "simulator" / "schedules"


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SCHEDULE_KINDS), st.integers(1, 12), st.integers(1, 40), st.integers(1, 4))
def test_the_registry_admits_exactly_what_the_generator_runs(kind, pp, m, v):
    entry = schedule_kind(kind)
    if entry.pp_error(pp):
        with pytest.raises(ScheduleError, match=f"pp={pp}"):
            make_schedule(kind, pp, max(m, 2 * pp), v)
        return
    if not entry.accepts(pp, m):
        with pytest.raises(ScheduleError, match=f"microbatches={m}"):
            make_schedule(kind, pp, m, v)
        return
    schedule = make_schedule(kind, pp, m, v)
    assert schedule.stage_ranks == entry.stage_ranks(pp, v)
    assert schedule.num_stages == entry.num_stages(pp, v)
    assert len(schedule.direction_microbatches) == entry.directions(pp, v)
    assert [schedule.stages_on_rank(r) for r in range(pp)] == [entry.rank_stages(pp, v, r) for r in range(pp)]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SCHEDULE_KINDS), st.integers(1, 12).map(lambda k: 2 * k), st.integers(-2, 60))
def test_smallest_valid_is_the_first_accepted_count(kind, pp, m):
    entry = schedule_kind(kind)
    found = entry.smallest_valid(pp, m)
    assert entry.accepts(pp, found)
    assert not any(entry.accepts(pp, k) for k in range(max(1, m), found))


@pytest.mark.parametrize(("kind", "pp", "m", "expected"),
                         [("dualpipe", 4, 3, 8), ("dualpipe", 4, 9, 10), ("dualpipev", 4, 9, 9), ("1f1b", 4, 1, 1),
                          ("interleaved", 4, 5, 5),  # one round of 5: what the generator (and torch) run
                          ("interleaved", 4, 9, 10), ("interleaved", 2, 3, 3), ("zb1p", 3, 0, 1)])
def test_smallest_valid_microbatches(kind, pp, m, expected):
    assert smallest_valid_microbatches(ParallelSpec(pp=pp, schedule=kind), m) == expected


def test_microbatch_errors_name_the_values():
    assert microbatch_error(ParallelSpec(pp=2, schedule="interleaved"), 3) is None  # the planner plans it, the search tries it
    assert "microbatches=5 must split into 2 equal rounds" in microbatch_error(ParallelSpec(pp=2, schedule="interleaved"), 5)
    assert microbatch_error(ParallelSpec(pp=4, schedule="dualpipe"), 9) == (
        "microbatches=9 must be even for dualpipe (half per direction)")
    assert microbatch_error(ParallelSpec(pp=3, schedule="dualpipe"), 8).startswith("pp=3 must be even")
    assert microbatch_error(ParallelSpec(pp=2), 0) == "microbatches=0 must be >= 1"
    with pytest.raises(ScheduleError, match="kind='gpipe' must be one of 1f1b, interleaved"):
        schedule_kind("gpipe")


def test_only_interleaved_reads_virtual_stages():
    for kind in SCHEDULE_KINDS:
        entry = schedule_kind(kind)
        layouts = {(entry.num_stages(4, v), entry.rank_stages(4, v, 1)) for v in (1, 2, 3)}
        assert (len(layouts) > 1) == entry.uses_virtual_stages, kind


def kind_comparisons(source: str) -> list[tuple[int, str]]:
    """(line, code) of every comparison with, dict keyed by, or match case on a schedule-kind string."""
    kinds = set(SCHEDULE_KINDS)

    def names_kind(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in kinds
        return isinstance(node, ast.Tuple | ast.List | ast.Set) and any(names_kind(e) for e in node.elts)

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            hit = any(names_kind(n) for n in (node.left, *node.comparators))
        elif isinstance(node, ast.Dict):
            hit = any(k is not None and names_kind(k) for k in node.keys)
        elif isinstance(node, ast.MatchValue):
            hit = names_kind(node.value)
        else:
            continue
        if hit:
            found.append((node.lineno, ast.get_source_segment(source, node) or ""))
    return found


def test_the_check_sees_kind_comparisons():
    source = ('if par.schedule == "dualpipe":\n    pass\nok = kind in ("1f1b", "zb1p")\n'
              'stages = {"dualpipev": 2}\nmatch kind:\n    case "interleaved":\n        pass\n'
              'fine = op.kind == "F" or ParallelSpec(schedule="dualpipe")\n')
    assert [line for line, _ in kind_comparisons(source)] == [1, 3, 4, 6]


def test_no_kind_is_compared_outside_the_registry():
    found = []
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.is_relative_to(REGISTRY_ROOM):
                continue
            found += [f"{path.relative_to(ROOT)}:{line}: {code}" for line, code in kind_comparisons(path.read_text())]
    assert found == [], "ask simulator.schedules.registry instead of comparing kind names"
