"""``plan --search``'s progress on a terminal: the layouts checked, then the simulation stage as a line of its own
(it said nothing for minutes: DeepSeek-V3 on 1,024 H800 nodes spends 162 s of 185 s there); nothing elsewhere."""

from __future__ import annotations

import io

from rich.console import Console

from moeplan.orchestrator.inputs import build_request
from moeplan.orchestrator.plan_cmd import _run_search
from moeplan.orchestrator.search_progress import SIMULATING, SearchProgress
from moeplan.orchestrator.sim_options import sim_options
from moeplan.simulator.planning.search import search
from moeplan.simulator.schedules.registry import SCHEDULE_KINDS


def _terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100), out


def test_the_last_layout_checked_shows_the_simulation_stage():
    console, out = _terminal()
    with SearchProgress(console, enabled=True) as progress:
        for done in range(1, 4):
            progress(done, 3)
            assert "checking layouts 1/3" in out.getvalue() and (SIMULATING in out.getvalue()) == (done == 3)
        progress.simulated(2, 5, 1.2345)
        progress.bar.refresh()
        assert "simulated 2 of at most 5 layouts that fit, best step 1.23 s" in out.getvalue()


def test_the_search_reports_each_simulation_with_the_best_so_far():
    req = build_request("tiny-moe", "h200", 1, ["parallel.pp=2", "parallel.recompute=none"])
    opts = sim_options(req.inputs.model, req.inputs.cluster.gpu, zipf=None, load=None, redundant_experts=0,
                       calibration=None, table_name=None, precision=req.inputs.training.precision)
    calls: list[tuple[int, int, float]] = []
    result = search(req.inputs, req.fixed, opts, simulated=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == list(range(1, result.simulated + 1))
    assert all(c[1] == result.evaluated >= c[0] for c in calls)  # of at most the layouts that fit
    best = [c[2] for c in calls]
    assert best == sorted(best, reverse=True) and best[-1] > 0  # the best so far only improves


def test_a_search_draws_on_a_terminal_only():
    req = build_request("tiny-moe", "h200", 1, ["parallel.pp=2", "parallel.recompute=none"])  # a small search
    opts = sim_options(req.inputs.model, req.inputs.cluster.gpu, zipf=None, load=None, redundant_experts=0,
                       calibration=None, table_name=None, precision=req.inputs.training.precision)
    console, out = _terminal()
    drawn = _run_search(req, opts, quiet=False, schedules=SCHEDULE_KINDS, stderr=console)
    assert "checking layouts" in out.getvalue() and SIMULATING in out.getvalue()
    plain = io.StringIO()
    assert _run_search(req, opts, quiet=False, schedules=SCHEDULE_KINDS, stderr=Console(file=plain)) == drawn
    assert plain.getvalue() == ""
