"""``moeplan check`` stays bounded in memory and time whatever a run directory holds (issue 23, item 1): a trace
larger than a step's trace can be is refused before it is parsed, one with too many events after, each with one
line; only the drawn ranks' intervals are kept while the traces are read, so memory does not grow with the
world size. (A hand-made run of eight 58 MiB traces of a million events each took 163 s and 2.2 GB before.)"""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.check_cmd import _drawn_ranks, measured_timelines
from moeplan.orchestrator.cli import app
from moeplan.simulator.contracts.run_report import read_run_report
from moeplan.simulator.report.trace_analysis import MAX_TRACE_BYTES, MAX_TRACE_EVENTS, TraceError, read_trace
from tests.orchestrator.fuzz_inputs import gc_paused
from tests.orchestrator.run_dirs import synthetic_run, tiny_plan  # noqa: F401 -- the session fixture


def _refused(run, *expected: str) -> None:
    before = sorted(p.name for p in run.iterdir())
    with gc_paused():
        start = time.perf_counter()
        result = CliRunner().invoke(app, ["check", str(run)])
        seconds = time.perf_counter() - start
    assert seconds < 2.0
    assert result.exit_code == 2 and result.stdout == "", result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("moeplan: error: ") and all(e in line for e in expected), line
    assert sorted(p.name for p in run.iterdir()) == before  # no run.html


def test_a_trace_too_large_for_a_step_is_refused_before_it_is_read(tmp_path, tiny_plan):  # noqa: F811
    run = synthetic_run(tmp_path / "run", tiny_plan)
    with open(run / "traces" / "rank3.json", "wb") as f:  # sparse: nothing to read unless someone reads it
        f.truncate(MAX_TRACE_BYTES + 1)
    _refused(run, "traces/rank3.json: 33,554,433 bytes, more than the 33,554,432 a step's trace may hold")


def test_a_trace_of_too_many_events_is_refused(tmp_path, tiny_plan):  # noqa: F811
    run = synthetic_run(tmp_path / "run", tiny_plan)
    (run / "traces" / "rank5.json").write_text("[" + ",".join(["{}"] * (MAX_TRACE_EVENTS + 1)) + "]")
    _refused(run, "traces/rank5.json: 131,073 trace events, more than the 131,072 a step's trace may hold")
    (run / "traces" / "rank5.json").write_text("[" + ",".join(["{}"] * MAX_TRACE_EVENTS) + "]")
    assert len(read_trace(run / "traces" / "rank5.json")) == MAX_TRACE_EVENTS  # the bound itself is accepted


def test_the_plan_trace_may_hold_every_pipeline_rank(tmp_path, tiny_plan):  # noqa: F811
    path = tmp_path / "plan-trace.json"
    path.write_text("[" + ",".join(["{}"] * (MAX_TRACE_EVENTS + 1)) + "]")
    assert len(read_trace(path, 2 * MAX_TRACE_EVENTS)) == MAX_TRACE_EVENTS + 1
    with pytest.raises(TraceError, match="more than the 131,072"):
        read_trace(path)


def test_only_the_drawn_ranks_intervals_are_kept(tmp_path, tiny_plan):  # noqa: F811
    run = synthetic_run(tmp_path / "run", tiny_plan)
    report = read_run_report(run)
    timelines, intervals = measured_timelines(run, report, drawn={0, 4})
    assert [t.rank for t in timelines] == list(range(report.settings.world_size))  # every rank is judged
    assert intervals and {iv.rank for iv in intervals} == {0, 4}
    everyone = measured_timelines(run, report, drawn=range(report.settings.world_size))[1]
    assert {iv.rank for iv in everyone} == set(range(8)) and len(everyone) > len(intervals)
    assert set(_drawn_ranks(report)) == set(range(8))  # at most MAX_DRAWN_RANKS = 16: all 8 of the tiny run
