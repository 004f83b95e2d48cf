"""The run report contract: round trips, strict reading, one-line errors, metrics.jsonl appends."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moeplan.simulator.contracts.run_report import (
    MAX_REPORT_STEPS,
    BudgetGuard,
    Environment,
    RankTimeline,
    RunReport,
    RunReportError,
    RunSettings,
    StepMetrics,
    TraceRef,
    append_metrics,
    dump_run_report,
    fold_metrics,
    fold_steps,
    parse_run_report,
    read_metrics,
    read_run_report,
    write_run_report,
)
from moeplan.simulator.contracts.run_telemetry import (
    GpuTelemetry,
    ReasonSeries,
    Series,
    StepEnergy,
    read_telemetry,
    write_telemetry,
)

SHA = "ab" * 32


def _step(i: int, wall: float = 0.5, world: int = 2) -> StepMetrics:
    return StepMetrics(step=i, wall_time_s=wall, tokens=1000, loss=3.0, mtp_loss=3.5, grad_norm=0.7, lr=1e-4,
                       peak_memory_bytes=(10, 20), tokens_per_s_per_gpu=1000 / wall / world)


def _record(rank: int = 1) -> GpuTelemetry:
    missing = Series(missing="NVML: no driver")
    return GpuTelemetry(rank=rank, uuid=None, sample_hz=2.0, power_w=Series(t_s=(0.0, 0.5), values=(300.0, 310.0)),
                        energy_j=missing, step_energy_j=StepEnergy(steps=(0,), joules=(150.0,)),
                        memory_used_bytes=missing, sm_clock_mhz=missing, temperature_c=missing,
                        clock_event_reasons=ReasonSeries(t_s=(0.0, 0.5), values=(4, 1)))


def _report(telemetry=None, **changes) -> RunReport:
    from moeplan.simulator.contracts.run_telemetry import summarise_telemetry

    telemetry = telemetry or summarise_telemetry(_record(), "telemetry/rank1.json")
    timeline = RankTimeline(rank=1, pp_rank=1, window_s=0.5, compute_s=0.3, comm_s=0.2, hidden_comm_s=0.1,
                            exposed_comm_s=0.1, bubble_s=0.1,
                            op_class_s={"gemm": 0.2, "attention": 0.1, "communication": 0.2, "idle": 0.1})
    fields = {"plan_sha256": SHA, "plan_file": "plan.json", "status": "completed",
                  "environment": Environment(torch_version="2.13.0", hostnames=("a",)),
                  "settings": RunSettings(steps=3, warmup_steps=1, world_size=2, backend="gloo", pp_rank_of=(0, 1)),
                  "steps": (_step(0), _step(1), _step(2, 0.25)), "timelines": (timeline,),
                  "traces": (TraceRef(rank=0, path="traces/rank0.json"),), "telemetry": (telemetry,),
                  "budget_guard": BudgetGuard(policy="warn", budget_gpu_hours=10.0, checks=1, last_projected_gpu_hours=2.0)}
    return RunReport(**(fields | changes))


def test_round_trip_through_the_run_directory(tmp_path) -> None:
    report = _report()
    path = write_run_report(tmp_path, report)
    assert path == tmp_path / "run.json"
    assert read_run_report(tmp_path) == report == read_run_report(path)
    assert [s.step for s in report.measured_steps] == [1, 2]
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary behind


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.update(schema_version=3), "schema_version=3 is not supported"),
    (lambda d: d.update(schema_version=True), "schema_version=True is not supported"),
    (lambda d: d.pop("step_totals"), "step_totals: Field required"),
    (lambda d: d["step_totals"].update(count=2), "steps holds 3 but step_totals.count=2"),
    (lambda d: d["step_totals"].update(count=9), "steps holds 3 but step_totals.count=9"),
    (lambda d: d["steps"][0].update(peak_memory_bytes=[1, 2]), "step 0: peak_memory_bytes is kept in step_totals"),
    (lambda d: d["telemetry"][0].update(samples="/etc/passwd"), "telemetry.0.samples"),
    (lambda d: d["steps"][1].update(tokens_per_s_per_gpu=1.0), "step 1: tokens_per_s_per_gpu=1.0"),
    (lambda d: d["steps"][1].update(step=0), "increasing step order"),
    (lambda d: d["traces"][0].update(path="../../etc/passwd"), "traces.0.path"),
    (lambda d: d["settings"].update(pp_rank_of=[0]), "pp_rank_of has 1 entries"),
    (lambda d: d["timelines"][0].update(pp_rank=0), "timelines: rank=1 pp_rank=0"),
    (lambda d: d["step_totals"].update(peak_memory_bytes=[1]), "step_totals: peak_memory_bytes has 1 ranks, not 2"),
    (lambda d: d.update(plan_sha256="x"), "plan_sha256"),
    (lambda d: d["telemetry"][0]["power_w"].update(missing="gone"), "a quantity marked missing has none"),
    (lambda d: d["telemetry"][0]["power_w"].update(max=None), "needs min, mean and max"),
    (lambda d: d.update(surprise=1), "surprise"),
])
def test_bad_reports_are_one_line(edit, expected) -> None:
    doc = json.loads(dump_run_report(_report()))
    edit(doc)
    with pytest.raises(RunReportError) as info:
        parse_run_report(json.dumps(doc), "run.json")
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["{", '{"schema_version": 1, "x": NaN}', "[]", ""])
def test_corrupt_json_is_one_line(text, tmp_path) -> None:
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(RunReportError) as info:
        read_run_report(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "run.json")) and "\n" not in str(info.value)


def test_metrics_lines_append_and_a_torn_last_line_is_dropped(tmp_path) -> None:
    steps = [_step(i) for i in range(3)]
    for s in steps:
        append_metrics(tmp_path, s)
    assert read_metrics(tmp_path) == steps
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "wall_ti')  # the process died writing step 3
    assert read_metrics(tmp_path / "metrics.jsonl") == steps
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n' + steps[1].model_dump_json() + "\n")
    with pytest.raises(RunReportError, match=r"metrics.jsonl:1: wall_time_s: Field required"):
        read_metrics(tmp_path)


def test_the_schema_command_prints_the_run_report_schema() -> None:
    from typer.testing import CliRunner

    from moeplan.orchestrator.cli import app

    for args in (["schema", "--run"], ["schema", "run"]):
        result = CliRunner().invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == RunReport.model_json_schema()
    plan = json.loads(CliRunner().invoke(app, ["schema"], catch_exceptions=False).stdout)
    assert plan["title"] == "PlanFile"


def test_the_report_loads_without_the_simulator(tmp_path) -> None:
    code = ("import sys, moeplan.simulator.contracts.run_report\n"
            "print(' '.join(m for m in sys.modules if m.startswith(('torch', 'simpy', 'plotly', "
            "'moeplan.simulator.engine', 'moeplan.simulator.planning'))))")
    result = subprocess.run([sys.executable, "-P", "-c", code], check=False, capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_the_report_keeps_the_last_steps_and_the_totals_of_all(tmp_path) -> None:
    steps = [_step(i, wall=0.5 + i / 1e4) for i in range(MAX_REPORT_STEPS + 5)]
    steps[3] = steps[3].model_copy(update={"peak_memory_bytes": (99, 1)})  # in the kept tail's totals only
    steps[0] = steps[0].model_copy(update={"peak_memory_bytes": (500, 500)})  # warm-up: left out
    report = _report(steps=tuple(steps))
    assert [s.step for s in report.steps] == list(range(5, MAX_REPORT_STEPS + 5))
    assert all(s.peak_memory_bytes is None for s in report.steps)
    totals = report.step_totals
    assert totals.count == len(steps) and totals.peak_memory_bytes == (99, 20)
    assert totals.wall_time_s == pytest.approx(sum(s.wall_time_s for s in steps), rel=1e-12)
    assert report.measured_steps == report.steps  # the warm-up step is not among the kept ones
    assert read_run_report(write_run_report(tmp_path, report)) == report
    short = _report(settings=RunSettings(steps=3, warmup_steps=2, world_size=2, backend="gloo", pp_rank_of=(0, 1)))
    assert [s.step for s in short.measured_steps] == [2] and short.step_totals.peak_memory_bytes == (10, 20)


def test_a_version_1_report_is_read_as_version_2(tmp_path) -> None:
    v2 = _report()
    v1 = json.loads(dump_run_report(v2))
    v1.update(schema_version=1, steps=[s.model_dump(mode="json") for s in (_step(0), _step(1), _step(2, 0.25))],
              telemetry=[_record().model_dump(mode="json")])
    del v1["step_totals"]
    (tmp_path / "run.json").write_text(json.dumps(v1, indent=2))
    read = read_run_report(tmp_path)
    assert read == v2.model_copy(update={"telemetry": (v2.telemetry[0].model_copy(update={"samples": None}),)})
    with pytest.raises(RunReportError, match="rank 1's telemetry samples were not kept apart"):
        read_telemetry(tmp_path, read.telemetry[0])
    v1["telemetry"][0]["power_w"]["values"] = [1.0]
    with pytest.raises(RunReportError, match=r"run.json: telemetry.*t_s has 2 samples but values 1"):
        parse_run_report(json.dumps(v1), "run.json")


def test_telemetry_samples_are_written_apart_and_read_when_asked(tmp_path) -> None:
    summary = write_telemetry(tmp_path, _record(rank=1))
    assert summary.samples == "telemetry/rank1.json" and summary.power_w.mean == 305.0
    assert summary.clock_event_reasons.seen == 5 and summary.step_energy_j.max == 150.0
    assert summary.energy_j.missing == "NVML: no driver" and summary.energy_j.count == 0
    assert read_telemetry(tmp_path, summary) == _record(rank=1)
    (tmp_path / "telemetry" / "rank1.json").write_text(_record(rank=0).model_dump_json())
    with pytest.raises(RunReportError, match="holds rank 0's telemetry, not rank 1's"):
        read_telemetry(tmp_path, summary)
    (tmp_path / "telemetry" / "rank1.json").unlink()
    with pytest.raises(RunReportError, match=r"rank1.json: cannot read"):
        read_telemetry(tmp_path, summary)


def test_a_report_no_reader_would_take_is_not_written(tmp_path, monkeypatch) -> None:
    from moeplan.simulator.contracts import run_report

    write_run_report(tmp_path, _report())
    before = (tmp_path / "run.json").read_bytes()
    monkeypatch.setattr(run_report, "MAX_FILE_BYTES", len(before) + 8)
    with pytest.raises(RunReportError, match="past the .* every reader accepts; not written"):
        write_run_report(tmp_path, _report(plan_file="p" * 40 + ".json"))  # 36 bytes more
    assert (tmp_path / "run.json").read_bytes() == before


def test_the_metrics_file_folds_as_the_steps_do_a_line_at_a_time(tmp_path) -> None:
    steps = [_step(i, wall=0.5 + i / 1e3).model_copy(update={"peak_memory_bytes": (i % 7, 100 - i % 5)})
             for i in range(MAX_REPORT_STEPS + 30)]
    for s in steps:
        append_metrics(tmp_path, s)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 99999, "wall')  # the step in flight when the process died
    kept, totals = fold_metrics(tmp_path, 2)
    assert (kept, totals) == fold_steps(steps, 2) and totals.peak_memory_bytes == (6, 100)
    assert len(kept) == MAX_REPORT_STEPS and kept[0].step == 30 and totals.count == len(steps)
    (tmp_path / "metrics.jsonl").write_text(steps[0].model_dump_json() + "\n" + _step(1).model_copy(
        update={"peak_memory_bytes": (1,)}).model_dump_json() + "\n")
    with pytest.raises(RunReportError, match=r"metrics.jsonl: step 1: peak_memory_bytes has 1 ranks, the steps before 2"):
        fold_metrics(tmp_path / "metrics.jsonl", 0)
