"""A whole DeepSeek-V3 run's report stays readable (issue 23): 2,048 ranks, every step of the run, NVML
telemetry at the default rate at its cap on every rank, a timeline and a trace per rank. Version 1 kept all
of it in ``run.json``; its size is measured here from one rank's and one step's share. Version 2 is built
in memory at that size, written, read back whole, and must stay under the 64 MiB readers accept, in seconds."""

from __future__ import annotations

import json
import time

import pytest

from moeplan.model.runtime.telemetry import MAX_SAMPLES
from moeplan.simulator.contracts import run_telemetry as tel
from moeplan.simulator.contracts.run_report import (
    MAX_REPORT_STEPS,
    BudgetGuard,
    Environment,
    GpuIdentity,
    RankTimeline,
    RunReport,
    RunSettings,
    StepMetrics,
    TraceRef,
    read_run_report,
    trace_path,
    write_run_report,
)
from moeplan.simulator.spec.json_input import MAX_FILE_BYTES

WORLD, PP, GPUS_PER_NODE = 2048, 16, 8  # V3's published layout (moeplan plan with no arguments)
V3_STEPS = 244_782  # that plan's run: 242,782 pretraining steps + 1,000 at 32k + 1,000 at 128k
STEPS_BUILT = 3 * MAX_REPORT_STEPS  # more than the report keeps: the folding runs; its cost is per step kept
HBM_BYTES = 80 * 2**30


def _step(i: int) -> StepMetrics:
    wall = 14.45 + 0.01 * (i % 7)
    return StepMetrics(step=i, wall_time_s=wall, tokens=62_914_560, loss=2.0 + 1.0 / (i + 1), mtp_loss=2.5,
                       grad_norm=0.3, lr=2.2e-4, peak_memory_bytes=tuple(HBM_BYTES - 2**20 * ((r + i) % 97)
                                                                         for r in range(WORLD)),
                       tokens_per_s_per_gpu=62_914_560 / wall / WORLD)


def _capped_record(rank: int, steps: int) -> tel.GpuTelemetry:
    """A rank's NVML record at the sampler's cap: MAX_SAMPLES samples per series, ``steps`` step energies."""
    t = tuple(0.5 * 2**7 * k + 0.123456789 for k in range(MAX_SAMPLES))  # a long run: the rate halved 7 times
    series = {name: tel.Series(t_s=t, values=tuple(base + (k % 13) * 1.0000001 for k in range(MAX_SAMPLES)))
              for name, base in (("power_w", 612.25), ("energy_j", 1.5e9), ("memory_used_bytes", 8.1e10),
                                 ("sm_clock_mhz", 1980.0), ("temperature_c", 61.0))}
    energy = tel.StepEnergy(steps=tuple(range(steps)), joules=tuple(9876.54321 + k % 11 for k in range(steps)))
    reasons = tel.ReasonSeries(t_s=t, values=tuple(4 * (k % 2) for k in range(MAX_SAMPLES)))
    return tel.GpuTelemetry(rank=rank, uuid=f"GPU-{rank:08x}-1111-2222-3333-444455556666", sample_hz=2.0,
                            step_energy_j=energy, clock_event_reasons=reasons, **series)


def _timeline(rank: int) -> RankTimeline:
    return RankTimeline(rank=rank, pp_rank=rank % PP, window_s=14.452069973502176, compute_s=11.123456789012345,
                        comm_s=6.0123456789, hidden_comm_s=5.0123456789, exposed_comm_s=1.0000000001,
                        bubble_s=2.3286243058, op_class_s={"gemm": 4.1234567, "grouped_gemm": 3.7654321,
                                                           "attention": 2.2345678, "memory_bound": 1.0000001,
                                                           "communication": 6.0123456789, "idle": 2.3286243058})


def _report(steps: list[StepMetrics], telemetry: tuple) -> RunReport:
    return RunReport(
        plan_sha256="ab" * 32, plan_file="plan.json", status="completed",
        environment=Environment(moeplan_version="0.1.0", torch_version="2.13.0", hostnames=tuple(
            f"node-{n:04d}.cluster.example" for n in range(WORLD // GPUS_PER_NODE)), gpus=tuple(
            GpuIdentity(rank=r, hostname=f"node-{r // GPUS_PER_NODE:04d}.cluster.example", name="NVIDIA H800",
                        uuid=f"GPU-{r:08x}-1111-2222-3333-444455556666") for r in range(WORLD))),
        settings=RunSettings(steps=V3_STEPS, warmup_steps=1, world_size=WORLD, backend="nccl",
                             pp_rank_of=tuple(r % PP for r in range(WORLD))),
        steps=tuple(steps), timelines=tuple(_timeline(r) for r in range(WORLD)),
        traces=tuple(TraceRef(rank=r, path=trace_path(r)) for r in range(WORLD)), telemetry=telemetry,
        budget_guard=BudgetGuard(policy="stop", budget_gpu_hours=2.8e6, checks=V3_STEPS // 100,
                                 last_projected_gpu_hours=2.6e6))


def test_version_1_of_a_whole_v3_run_was_far_past_the_readers_limit():
    # version 1's indent-2 JSON: every step with a peak per rank, every rank's samples and step energies
    step_bytes = len(json.dumps(_step(5).model_dump(mode="json"), indent=2))
    record = _capped_record(0, 10_000)
    per_energy = (len(json.dumps(record.step_energy_j.model_dump(mode="json"), indent=2)) / 10_000)
    samples = len(json.dumps(record.model_copy(update={"step_energy_j": tel.StepEnergy()}).model_dump(mode="json"),
                             indent=2))
    v1_bytes = V3_STEPS * step_bytes + WORLD * (samples + V3_STEPS * per_energy)
    assert v1_bytes > 400 * MAX_FILE_BYTES, f"{v1_bytes / 1e9:.1f} GB"


def test_a_whole_v3_run_report_is_written_and_read_back_under_the_limit_in_seconds(tmp_path):
    steps = [_step(i) for i in range(STEPS_BUILT)]
    summary = tel.write_telemetry(tmp_path, _capped_record(0, MAX_SAMPLES))  # the sampler caps its step energies too
    telemetry = tuple(summary.model_copy(update={"rank": r, "samples": tel.telemetry_path(r)}) for r in range(WORLD))
    start = time.perf_counter()
    report = _report(steps, telemetry)
    write_run_report(tmp_path, report)
    back = read_run_report(tmp_path)
    elapsed_s = time.perf_counter() - start
    size = (tmp_path / "run.json").stat().st_size
    assert back == report
    assert size < MAX_FILE_BYTES / 8, f"{size:,} bytes"  # room for eight times the world
    assert elapsed_s < 20, f"{elapsed_s:.1f} s"  # ~3 s on this project's 2-core box
    assert len(back.steps) == MAX_REPORT_STEPS and back.step_totals.count == STEPS_BUILT
    assert back.step_totals.peak_memory_bytes == tuple(map(max, zip(*(s.peak_memory_bytes for s in steps[1:]))))
    assert back.step_totals.wall_time_s == pytest.approx(sum(s.wall_time_s for s in steps), rel=1e-12)
    raw = tmp_path / tel.telemetry_path(0)
    assert raw.stat().st_size < MAX_FILE_BYTES / 4, raw.stat().st_size  # one rank's samples, at the cap
    assert tel.read_telemetry(tmp_path, back.telemetry[0]) == _capped_record(0, MAX_SAMPLES)


def test_the_report_grows_with_the_world_not_with_the_steps(tmp_path):
    record = _capped_record(0, 10)
    summary = tel.write_telemetry(tmp_path, record)
    sizes = {}
    for n in (MAX_REPORT_STEPS, 4 * MAX_REPORT_STEPS):
        write_run_report(tmp_path, _report([_step(i) for i in range(n)], (summary,)))
        sizes[n] = (tmp_path / "run.json").stat().st_size
    # 3,072 more steps of ~450 bytes each would be 1.4 MB more; only the kept steps' digits differ
    assert abs(sizes[4 * MAX_REPORT_STEPS] - sizes[MAX_REPORT_STEPS]) < 0.01 * sizes[MAX_REPORT_STEPS], sizes
