"""``launch``'s run directory files (plan copy, simulated trace, settings) go in together: an interrupt while
they are written leaves no run directory, so the next ``launch --run-dir`` is not refused as "not empty"."""

from __future__ import annotations

import json

import pytest

from moeplan.orchestrator import launch_cmd, outputs
from moeplan.orchestrator.errors import InputError
from moeplan.simulator.contracts.plan_file import read_plan
from moeplan.simulator.contracts.run_report import PLAN_COPY_NAME
from tests.orchestrator.run_dirs import tiny_plan  # noqa: F401 -- the session fixture (h200, pp2 ep4, budget 50)


def test_the_launch_files_appear_together(tmp_path, tiny_plan):  # noqa: F811
    run = tmp_path / "run"
    launch_cmd._prepare(tiny_plan, read_plan(tiny_plan), run, {"steps": 3}, fresh=True)
    assert {p.name for p in run.iterdir()} == {PLAN_COPY_NAME, launch_cmd.PLAN_TRACE_NAME,
                                               launch_cmd.LAUNCH_SETTINGS_NAME}
    assert json.loads((run / launch_cmd.LAUNCH_SETTINGS_NAME).read_text()) == {"steps": 3}
    assert (run / PLAN_COPY_NAME).read_text() == (tiny_plan / PLAN_COPY_NAME).read_text()


@pytest.mark.parametrize("failing", [1, 2, 3])
def test_a_failure_while_preparing_leaves_no_run_directory(tmp_path, tiny_plan, monkeypatch, failing):  # noqa: F811
    written = outputs._write_synced
    calls = []

    def full_disk(path, text):
        calls.append(path)
        if len(calls) == failing:
            raise OSError(28, "No space left on device")
        written(path, text)

    monkeypatch.setattr(outputs, "_write_synced", full_disk)
    run = tmp_path / "run"
    with pytest.raises(InputError, match="No space left"):
        launch_cmd._prepare(tiny_plan, read_plan(tiny_plan), run, {"steps": 3}, fresh=True)
    assert list(tmp_path.iterdir()) == []


def test_the_driver_s_report_of_a_failed_run_folds_its_metrics(tmp_path, tiny_plan):  # noqa: F811
    from moeplan.orchestrator.launch_report import failed_report
    from moeplan.simulator.contracts.run_report import MAX_REPORT_STEPS, StepMetrics, append_metrics, read_run_report

    plan = read_plan(tiny_plan)
    world = plan.layout.world
    for i in range(MAX_REPORT_STEPS + 3):
        append_metrics(tmp_path, StepMetrics(step=i, wall_time_s=0.5, tokens=1024, loss=1.0, lr=1e-3,
                                             peak_memory_bytes=tuple(range(i, i + world)),
                                             tokens_per_s_per_gpu=1024 / 0.5 / world))
    report = failed_report(plan, tmp_path, {"steps": 2000, "budget_guard": "off"})
    assert read_run_report(tmp_path) == report and report.status == "failed"
    assert report.step_totals.count == MAX_REPORT_STEPS + 3 and report.steps[0].step == 3
    assert report.step_totals.peak_memory_bytes == tuple(range(MAX_REPORT_STEPS + 2, MAX_REPORT_STEPS + 2 + world))


def test_kernel_trace_is_off_unless_asked_and_a_resumed_run_keeps_it(tmp_path):
    assert launch_cmd._settings(None, {"kernel_trace": None})["kernel_trace"] is False
    assert launch_cmd._settings(None, {"kernel_trace": True})["kernel_trace"] is True
    run = tmp_path / "run"
    run.mkdir()
    (run / launch_cmd.LAUNCH_SETTINGS_NAME).write_text(json.dumps({"kernel_trace": True}))
    assert launch_cmd._settings(run, {"kernel_trace": None})["kernel_trace"] is True
    (run / launch_cmd.LAUNCH_SETTINGS_NAME).write_text(json.dumps({"kernel_trace": "yes"}))
    with pytest.raises(InputError, match="--kernel-trace='yes' must be true or false"):
        launch_cmd._settings(run, {})
