"""``moeplan plan --techniques`` (issue 21, capability 4): the search leaves the techniques out, the plan records
them, and a setting that contradicts them is one line, exit 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.simulator.contracts.plan_file import read_plan

runner = CliRunner()
TINY = ["plan", "--model", "tiny-moe", "--cluster", "cpu", "--nodes", "1", "--seq-len", "1024", "--json"]


def test_the_search_leaves_the_schedules_out_and_the_plan_records_them(tmp_path):
    res = runner.invoke(app, [*TINY, "--techniques", "no-dualpipe,no-zero-bubble,no-interleaved,no-fp8",
                              "--out", str(tmp_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    plan = read_plan(tmp_path / "plan.json")
    pred = plan.predictions
    assert pred.techniques == ("no-dualpipe", "no-fp8", "no-interleaved", "no-zero-bubble")
    assert pred.layout_source == "searched" and plan.inputs.training.precision == "bf16"
    assert {c.parallel.schedule for c in pred.top_candidates} == {"1f1b"}


def test_without_techniques_the_plan_records_none(tmp_path):
    res = runner.invoke(app, [*TINY, "--no-search", "--out", str(tmp_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "plan.json").read_text())["predictions"]["techniques"] == []


@pytest.mark.parametrize("args,line", [
    (["--techniques", "no-dualpipe", "--schedule", "dualpipev", "--pp", "2"],
     "--techniques no-dualpipe excludes schedule=dualpipev"),
    (["--techniques", "no-fp8", "--precision", "fp8"], "--techniques no-fp8 contradicts precision=fp8"),
    (["--techniques", "no-ep", "--ep", "2"], "--techniques no-ep contradicts ep=2"),
    (["--techniques", "no-dualpip"], "--techniques 'no-dualpip': unknown (choose from no-dualpipe,"),
])
def test_contradictions_are_one_line(tmp_path, args, line):
    res = runner.invoke(app, [*TINY, *args, "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert line in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "plan.json").exists()


def test_the_published_dualpipe_layout_is_searched_again_or_refused_with_no_search(tmp_path):
    res = runner.invoke(app, ["plan", "--model", "deepseek-v3", "--cluster", "h800", "--nodes", "256", "--techniques",
                              "no-dualpipe", "--no-search", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert ("--techniques no-dualpipe excludes schedule=dualpipe (the planned layout's): drop --no-search"
            in " ".join(res.output.split()))


def test_no_cp_holds_the_long_context_phases_too(tmp_path):
    from moeplan.orchestrator.sim_options import parse_techniques, request_with_techniques

    req = request_with_techniques(parse_techniques("no-cp"), "deepseek-v3", "h800", 256, [])
    assert len(req.inputs.training.phases) > 1  # V3's recipe: 4K, then 32K and 128K context extension
    assert {p.cp for p in req.inputs.training.phases} == {1} and req.inputs.parallel.cp == 1
    res = runner.invoke(app, [*TINY, "--techniques", "no-cp", "--set", "training.phases.0.cp=2", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--techniques no-cp contradicts training.phases.0.cp=2" in res.output


def test_the_summary_table_names_the_techniques_left_out(tmp_path):
    res = runner.invoke(app, [*TINY[:-1], "--techniques", "no-fp8,no-dualpipe", "--no-search", "--out", str(tmp_path)],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "without no-dualpipe, no-fp8)" in " ".join(res.output.split())
