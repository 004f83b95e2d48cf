"""The run report contract: round trips, strict reading, one-line errors, metrics.jsonl appends."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moeplan.simulator.contracts.run_report import (
    BudgetGuard,
    Environment,
    GpuTelemetry,
    RankTimeline,
    ReasonSeries,
    RunReport,
    RunReportError,
    RunSettings,
    Series,
    StepEnergy,
    StepMetrics,
    TraceRef,
    append_metrics,
    dump_run_report,
    parse_run_report,
    read_metrics,
    read_run_report,
    write_run_report,
)

SHA = "ab" * 32


def _step(i: int, wall: float = 0.5, world: int = 2) -> StepMetrics:
    return StepMetrics(step=i, wall_time_s=wall, tokens=1000, loss=3.0, mtp_loss=3.5, grad_norm=0.7, lr=1e-4,
                       peak_memory_bytes=(10, 20), tokens_per_s_per_gpu=1000 / wall / world)


def _report(**changes) -> RunReport:
    missing = Series(missing="NVML: no driver")
    telemetry = GpuTelemetry(rank=1, uuid=None, sample_hz=2.0, power_w=Series(t_s=(0.0, 0.5), values=(300.0, 310.0)),
                             energy_j=missing, step_energy_j=StepEnergy(steps=(0,), joules=(150.0,)),
                             memory_used_bytes=missing, sm_clock_mhz=missing, temperature_c=missing,
                             clock_event_reasons=ReasonSeries(t_s=(0.0,), values=(4,)))
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
    (lambda d: d.update(schema_version=2), "schema_version=2 is not supported"),
    (lambda d: d["steps"][1].update(tokens_per_s_per_gpu=1.0), "step 1: tokens_per_s_per_gpu=1.0"),
    (lambda d: d["steps"][1].update(step=0), "increasing step order"),
    (lambda d: d["traces"][0].update(path="../../etc/passwd"), "traces.0.path"),
    (lambda d: d["settings"].update(pp_rank_of=[0]), "pp_rank_of has 1 entries"),
    (lambda d: d["timelines"][0].update(pp_rank=0), "timelines: rank=1 pp_rank=0"),
    (lambda d: d["steps"][0].update(peak_memory_bytes=[1]), "peak_memory_bytes has 1 ranks"),
    (lambda d: d.update(plan_sha256="x"), "plan_sha256"),
    (lambda d: d["telemetry"][0]["power_w"].update(missing="gone"), "marked missing holds no values"),
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
