"""``check --recalibrate`` of a run that does not match its plan is refused like ``check`` of it (issue 23, item 1):
the recalibration trusts the run's pipeline ranks, so it comes after the comparison's checks of the run against the
plan. (A run whose ``settings.pp_rank_of`` named pipeline rank 7 of a pp=2 plan was an ``IndexError``, exit 3, found
by the long fuzz profile on 2026-12-06.)"""

from __future__ import annotations

import json

from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from tests.orchestrator.run_dirs import synthetic_run, tiny_plan  # noqa: F401 -- the session fixture


def test_pipeline_ranks_past_the_plans_are_one_line_with_recalibrate(tmp_path, tiny_plan):  # noqa: F811
    run = synthetic_run(tmp_path / "run", tiny_plan)
    doc = json.loads((run / "run.json").read_text())
    doc["settings"]["pp_rank_of"] = list(range(doc["settings"]["world_size"]))  # 0..7 on a pp=2 plan
    (run / "run.json").write_text(json.dumps(doc))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for extra in ([], ["--recalibrate", str(tmp_path / "tables.json")]):
        result = CliRunner().invoke(app, ["check", str(run), *extra])
        assert result.exit_code == 2 and result.stdout == "", result.output
        (line,) = result.stderr.splitlines()
        assert line == f"moeplan: error: {run}: settings.pp_rank_of names pipeline rank 7 but the plan has pp=2", line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no run.html, no tables
