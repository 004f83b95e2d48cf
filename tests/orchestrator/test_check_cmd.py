"""``moeplan check`` on run directories of SYNTHETIC measurements made from a real tiny plan
(``run_dirs.synthetic_run``): the judging logic, exit codes and one-line errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator import check_cmd
from moeplan.orchestrator.cli import app
from moeplan.simulator.contracts.plan_file import read_plan
from moeplan.simulator.planning.run_model import project_run
from tests.orchestrator.run_dirs import synthetic_run, tiny_plan  # noqa: F401 -- the session fixture


def _check(run_dir, *args):
    return CliRunner().invoke(app, ["check", str(run_dir), *args], catch_exceptions=False)


def _lines(result) -> dict[str, dict]:
    return {line["name"]: line for line in json.loads(result.stdout)["lines"]}


def test_a_run_that_matches_its_plan_passes(tmp_path, tiny_plan) -> None:  # noqa: F811
    run = synthetic_run(tmp_path / "run", tiny_plan)
    result = _check(run, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["passed"] and out["measured_steps"] == 5 and out["warmup_steps"] == 2
    lines = _lines(result)
    assert {k: lines[k]["verdict"] for k in ("step time", "bubble", "communication", "peak memory, pipeline rank 1",
                                             "GPU-hours vs budget")} == dict.fromkeys(
        ("step time", "bubble", "communication", "peak memory, pipeline rank 1", "GPU-hours vs budget"), "pass")
    assert abs(lines["step time"]["error"]) < 0.006  # the seeded noise only; warm-up steps (3x) left out
    assert (run / "run.html").stat().st_size > 1e6  # plotly.js inlined


def test_a_seeded_ten_percent_slowdown_fails(tmp_path, tiny_plan) -> None:  # noqa: F811
    run = synthetic_run(tmp_path / "run", tiny_plan, slowdown=1.10, seed=7)
    result = _check(run, "--json")
    assert result.exit_code == 1, result.output
    lines = _lines(result)
    assert lines["step time"]["verdict"] == "fail" and 0.09 < lines["step time"]["error"] < 0.11
    assert lines["MFU"]["verdict"] == lines["tokens/s/GPU"]["verdict"] == "fail"
    assert lines["bubble"]["verdict"] == "pass"  # every part slowed alike: the shares did not move
    plan = read_plan(tiny_plan)
    ratio = lines["step time"]["measured"] / plan.predictions.step.step_time_s
    assert math.isclose(lines["GPU-hours, whole run (projected)"]["measured"],
                        plan.predictions.run.gpu_hours_total * ratio, rel_tol=1e-9)
    assert _check(run, "--tolerance", "0.2").exit_code == 0  # the same run within a 20% tolerance


def test_memory_over_the_plan_fails_its_line(tmp_path, tiny_plan) -> None:  # noqa: F811
    run = synthetic_run(tmp_path / "run", tiny_plan, memory_frac=1.2)
    result = _check(run, "--json")
    assert result.exit_code == 1
    assert [k for k, v in _lines(result).items() if v["verdict"] == "fail"] == [
        "peak memory, pipeline rank 0", "peak memory, pipeline rank 1"]


def test_project_run_scales_the_whole_run(tiny_plan) -> None:  # noqa: F811
    plan = read_plan(tiny_plan)
    run = plan.predictions.run
    assert project_run(plan.inputs, run, 1.0) == run  # the run model itself, phase by phase
    slower = project_run(plan.inputs, run, 1.25)
    assert math.isclose(slower.gpu_hours_total, 1.25 * run.gpu_hours_total, rel_tol=1e-12)
    assert math.isclose(slower.tokens_per_day, run.tokens_per_day / 1.25, rel_tol=1e-12)


def _one_line_exit_2(result, *expected: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeplan: error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize("corruption, expected", [
    ('{"schema_version": 1, "plan_sha256": ', "malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"schema_version": 7}', "schema_version=7 is not supported"),
])
def test_a_corrupt_run_report_is_one_line(tmp_path, tiny_plan, corruption, expected) -> None:  # noqa: F811
    run = synthetic_run(tmp_path / "run", tiny_plan, steps=3)
    (run / "run.json").write_text(corruption)
    _one_line_exit_2(_check(run), "run.json", expected)
    assert not (run / "run.html").exists()


def test_a_plan_that_is_not_the_runs_is_one_line(tmp_path, tiny_plan) -> None:  # noqa: F811
    run = synthetic_run(tmp_path / "run", tiny_plan, steps=3)
    doc = json.loads((run / "run.json").read_text())
    doc["plan_sha256"] = "0" * 64
    (run / "run.json").write_text(json.dumps(doc))
    _one_line_exit_2(_check(run), "is not the plan this run executed", "plan_sha256=000000000000")


def test_other_bad_input_is_one_line(tmp_path, tiny_plan) -> None:  # noqa: F811
    run = synthetic_run(tmp_path / "run", tiny_plan, steps=3)
    _one_line_exit_2(_check(run, "--tolerance", "0"), "--tolerance=0.0")
    _one_line_exit_2(_check(tmp_path / "nowhere"), "not a run directory")
    (run / "traces" / "rank5.json").write_text('{"traceEvents": [{"name": "mystery", "ph": "X", "ts": 0, "dur": 1}]}')
    _one_line_exit_2(_check(run), "rank5.json", "name='mystery'")
    (run / "traces" / "rank5.json").unlink()
    _one_line_exit_2(_check(run), "rank5.json", "cannot read")
    warm = synthetic_run(tmp_path / "warm", tiny_plan, steps=2, warmup_steps=2)
    _one_line_exit_2(_check(warm), "all within warmup_steps=2")


def test_the_plan_trace_beside_the_run_is_used_and_without_one_only_idle_is_judged(tmp_path, tiny_plan,  # noqa: F811
                                                                                   monkeypatch) -> None:
    run = synthetic_run(tmp_path / "run", tiny_plan, steps=3)
    monkeypatch.setattr(check_cmd, "resimulated_trace", lambda plan: None)  # e.g. a plan made with a calibration
    lines = _lines(_check(run, "--json"))
    assert lines["bubble"]["verdict"] == "n/a" and "communication" not in lines
    assert lines["idle (bubble + exposed comm)"]["verdict"] == "pass"
    shutil.copy(tiny_plan / "trace.json", run / "plan-trace.json")  # what the launcher copies
    lines = _lines(_check(run, "--json"))
    assert lines["bubble"]["verdict"] == lines["communication"]["verdict"] == "pass"
