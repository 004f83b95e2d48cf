"""Plans for the manifest tests, made once per session with ``moeplan plan`` (DeepSeek-V3 takes seconds)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.simulator.contracts.plan_file import PlanFile, parse_plan

# DeepSeek-V3 on 256 x 8 H800 (the `moeplan plan` defaults: the published layout and budget), and the tiny
# preset on 2 x 8 H200 with a layout that fits and a budget, so both cases exercise the budget arithmetic.
PLAN_ARGS = {
    "v3-256x8-h800": [],
    "tiny-moe-2x8-h200": ["--model", "tiny-moe", "--cluster", "h200", "--nodes", "2", "--pp", "2", "--ep", "8",
                          "--schedule", "dualpipev", "--budget-gpu-hours", "100"],
}


@dataclass(frozen=True)
class PlannedCase:
    name: str
    path: Path
    text: str
    plan: PlanFile


def _planned(name: str, out: Path) -> PlannedCase:
    result = CliRunner().invoke(app, ["plan", *PLAN_ARGS[name], "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = (out / "plan.json").read_text()
    return PlannedCase(name, out / "plan.json", text, parse_plan(text))


@pytest.fixture(scope="session")
def v3(tmp_path_factory) -> PlannedCase:
    return _planned("v3-256x8-h800", tmp_path_factory.mktemp("v3"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> PlannedCase:
    return _planned("tiny-moe-2x8-h200", tmp_path_factory.mktemp("tiny"))
