"""NVML telemetry in the run directory: each rank's samples in ``RUN/telemetry/rank{r}.json`` (a
``GpuTelemetry``), their summary (``TelemetrySummary``) in ``run.json``.

A whole run's samples do not fit ``run.json``: at the sampler's default 2 Hz a series reaches its cap
(``model.runtime.telemetry.MAX_SAMPLES`` = 20,000 samples) after 2.8 hours; six series of 20,000 (time,
value) pairs are 5.1 MB per rank in indented JSON, and a whole V3 run's 244,782 step energies 6.3 MB more:
23 GB at 2,048 ranks, against the 64 MiB readers accept (``spec.json_input.MAX_FILE_BYTES``; measured in
``tests/simulator/contracts/test_run_report_size.py``). So each rank writes its own record
(``write_telemetry``: compact JSON, six series and the step energies each capped at 20,001 entries, 3.8 MB
at the cap), hands back the summary the report keeps (count, min, mean, max per quantity; the union of the
clock event reasons seen), and ``read_telemetry`` reads one rank's samples only when asked.
"""

from __future__ import annotations

import json
import statistics
from functools import reduce
from operator import or_
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator

from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.contracts.run_fields import MAX_RANKS, Frozen, RunReportError, inside_the_run
from moeplan.simulator.spec.errors import first_error_line
from moeplan.simulator.spec.json_input import JsonInputError, read_json_file
from moeplan.simulator.spec.numbers import Float, Int

TELEMETRY_DIR = "telemetry"
SERIES = ("power_w", "energy_j", "memory_used_bytes", "sm_clock_mhz", "temperature_c")


def telemetry_path(rank: int) -> str:
    """Where global rank ``rank``'s telemetry samples live, relative to the run directory."""
    return f"{TELEMETRY_DIR}/rank{rank}.json"


class Series(Frozen):
    """Samples of one NVML quantity, or the reason there are none."""

    t_s: tuple[Float, ...] = Field((), description="Seconds since the sampler started.")
    values: tuple[Float, ...] = ()
    missing: str | None = Field(None, description="Why there are no samples (no NVML, NOT_SUPPORTED, ...).")

    @model_validator(mode="after")
    def _shape(self) -> Series:
        if len(self.t_s) != len(self.values):
            raise ValueError(f"t_s has {len(self.t_s)} samples but values {len(self.values)}")
        if self.missing is not None and self.values:
            raise ValueError("a series marked missing holds no values")
        return self


class ReasonSeries(Series):
    """NVML clock event (throttle) reasons: ``nvmlClocksEventReason*`` bit masks."""

    values: tuple[Int, ...] = ()  # type: ignore[assignment]


class StepEnergy(Frozen):
    """Energy per step from the total-energy counter read at step boundaries: ``joules[i]`` from the end of
    ``steps[i-1]`` (or the sampler's start) to the end of ``steps[i]`` (a long run merges neighbours)."""

    steps: tuple[Int, ...] = ()
    joules: tuple[Float, ...] = ()
    missing: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> StepEnergy:
        if len(self.steps) != len(self.joules) or (self.missing is not None and self.joules):
            raise ValueError("steps and joules must have one entry each, and none when missing")
        return self


class GpuTelemetry(Frozen):
    """What NVML said about one process's GPU (``model.runtime.telemetry`` samples it)."""

    rank: Int = Field(..., ge=0, lt=MAX_RANKS)
    uuid: str | None = None
    sample_hz: Float = Field(..., gt=0)
    power_w: Series
    energy_j: Series = Field(..., description="Counter delta since the sampler started, at each read.")
    step_energy_j: StepEnergy
    memory_used_bytes: Series = Field(..., description="NVML's: CUDA context and NCCL buffers included.")
    sm_clock_mhz: Series
    temperature_c: Series
    clock_event_reasons: ReasonSeries


class FieldSummary(Frozen):
    """One quantity over the run: how many values, their min, mean and max; or why there are none."""

    count: Int = Field(0, ge=0)
    min: Float | None = None
    mean: Float | None = None
    max: Float | None = None
    missing: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> FieldSummary:
        given = {v is not None for v in (self.min, self.mean, self.max)}
        if given != {self.count > 0} or (self.missing is not None and self.count):
            raise ValueError(f"count={self.count} needs min, mean and max (and none without values); "
                             "a quantity marked missing has none")
        return self

    @classmethod
    def of(cls, values: tuple[float, ...], missing: str | None) -> FieldSummary:
        if not values:
            return cls(missing=missing)
        return cls(count=len(values), min=min(values), mean=statistics.fmean(values), max=max(values))


class ReasonSummary(Frozen):
    """The clock event reasons over the run: how many reads, and every reason bit seen in any of them."""

    count: Int = Field(0, ge=0)
    seen: Int | None = Field(None, ge=0, description="Bitwise OR of every mask read (nvmlClocksEventReason*).")
    missing: str | None = None


class TelemetrySummary(Frozen):
    """One rank's telemetry as ``run.json`` keeps it; the samples are in ``samples`` (``read_telemetry``)."""

    rank: Int = Field(..., ge=0, lt=MAX_RANKS)
    uuid: str | None = None
    sample_hz: Float = Field(..., gt=0)
    samples: str | None = Field(..., description="The rank's GpuTelemetry, relative to the run directory; null "
                                                 "where not kept apart (read from a version 1 report).")
    power_w: FieldSummary
    energy_j: FieldSummary = Field(..., description="Counter deltas: max is the energy since the sampler started.")
    step_energy_j: FieldSummary = Field(..., description="Over the per-step energies (joules per step).")
    memory_used_bytes: FieldSummary
    sm_clock_mhz: FieldSummary
    temperature_c: FieldSummary
    clock_event_reasons: ReasonSummary

    @field_validator("samples")
    @classmethod
    def _inside_the_run(cls, path: str | None) -> str | None:
        return None if path is None else inside_the_run(path)


def summarise_telemetry(record: GpuTelemetry, samples: str | None) -> TelemetrySummary:
    """``record`` as ``run.json`` keeps it, its samples at ``samples`` (relative to the run directory)."""
    reasons = record.clock_event_reasons
    return TelemetrySummary(
        rank=record.rank, uuid=record.uuid, sample_hz=record.sample_hz, samples=samples,
        step_energy_j=FieldSummary.of(record.step_energy_j.joules, record.step_energy_j.missing),
        clock_event_reasons=ReasonSummary(count=len(reasons.values), seen=reduce(or_, reasons.values, 0)
                                          if reasons.values else None, missing=reasons.missing),
        **{name: FieldSummary.of(getattr(record, name).values, getattr(record, name).missing) for name in SERIES},
    )


def write_telemetry(run_dir: str | Path, record: GpuTelemetry) -> TelemetrySummary:
    """Write ``record`` to ``RUN/telemetry/rank{r}.json`` atomically; its summary for ``run.json``. A failed
    write (a full disk) raises ``OSError`` naming the file."""
    relative = telemetry_path(record.rank)
    path = Path(run_dir) / relative
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(record.model_dump(mode="json"), allow_nan=False, separators=(",", ":")))
    except OSError as exc:
        why = exc.strerror or exc
        raise OSError(exc.errno, f"{path}: cannot write rank {record.rank}'s telemetry ({why})") from exc
    return summarise_telemetry(record, relative)


def read_telemetry(run_dir: str | Path, summary: TelemetrySummary) -> GpuTelemetry:
    """The samples behind ``summary`` (one rank's), read from the run directory ``run_dir``."""
    if summary.samples is None:
        raise RunReportError(f"{run_dir}: rank {summary.rank}'s telemetry samples were not kept apart (a version 1 "
                             "run report holds its summary only)")
    path = Path(run_dir) / summary.samples
    try:
        raw = read_json_file(path)
        record = GpuTelemetry.model_validate(raw)
    except OSError as exc:
        raise RunReportError(f"{path}: cannot read ({exc.strerror})") from None
    except JsonInputError as exc:
        raise RunReportError(str(exc)) from None
    except ValidationError as exc:
        raise RunReportError(first_error_line(exc, prefix=str(path), whole="telemetry record")) from None
    if record.rank != summary.rank:
        raise RunReportError(f"{path}: holds rank {record.rank}'s telemetry, not rank {summary.rank}'s")
    return record
