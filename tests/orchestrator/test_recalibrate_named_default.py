"""``check --recalibrate`` of a plan priced with its GPU's default tables: the plan records their own name
(``h200-default``, ``hopper-deepgemm-default``), which ``named_tables`` does not know; the tables are the
GPU's defaults, loaded without ``--recalibrate-from`` (found by the run-command fuzz, issue 23)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.simulator.contracts.plan_file import read_plan
from moeplan.simulator.costs.tables import CostTables, default_tables
from tests.orchestrator.run_dirs import synthetic_run, tiny_plan  # noqa: F401 -- a fixture


def test_a_plan_priced_with_the_default_tables_recalibrates_without_a_file(tmp_path, tiny_plan):  # noqa: F811
    plan = read_plan(tiny_plan)
    assert plan.predictions.cost_tables == default_tables(plan.inputs.cluster.gpu.name).name != "default"
    run = synthetic_run(tmp_path / "run", tiny_plan)
    out = tmp_path / "tables.json"
    result = CliRunner().invoke(app, ["check", str(run), "--recalibrate", str(out)])
    assert result.exit_code in (0, 1), result.output
    CostTables.model_validate(json.loads(out.read_text()))
