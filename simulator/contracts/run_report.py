"""The run report: what a training run writes into its run directory, and what ``moeplan check`` reads.

A run directory holds (``docs/design/run-report.md``)::

    RUN/run.json            RunReport, written atomically (write_run_report)
    RUN/metrics.jsonl       one StepMetrics per line, appended and fsynced every step (append_metrics)
    RUN/traces/rank{r}.json measured Perfetto trace of one profiled step of global rank r (simulator schema)
    RUN/plan.json           the plan the run executed (copied by the launcher)

The report names the plan by its ``inputs_sha256``; ``check`` refuses a plan whose hash differs.
Every time is in seconds, every size in bytes. Reading is strict like the plan file's
(``spec.json_input``: bounded JSON, no NaN/Infinity), refuses another ``schema_version`` and reports
the first problem as one line (``RunReportError``). Telemetry (NVML) fields carry a ``missing`` reason
instead of values where NVML is absent or refuses a query.
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.spec.errors import first_error_line
from moeplan.simulator.spec.json_input import JsonInputError, parse_json, read_json_file
from moeplan.simulator.spec.numbers import Float, Int

RUN_SCHEMA_VERSION = 1
RUN_REPORT_NAME = "run.json"
METRICS_NAME = "metrics.jsonl"
PLAN_COPY_NAME = "plan.json"
EXPERT_LOAD_NAME = "expert-load.json"  # the run's routed tokens per layer and expert: `plan --load` reads it
TRACES_DIR = "traces"
MAX_RANKS = 2**20
READ_BACK_BYTES = 2**16  # append_metrics looks back this much at a time for the last line's end
OP_CLASSES = ("gemm", "grouped_gemm", "attention", "memory_bound", "communication", "idle")
OpClass = Literal["gemm", "grouped_gemm", "attention", "memory_bound", "communication", "idle"]
TOKENS_RATE_RTOL = 1e-6  # tokens_per_s_per_gpu must equal tokens / wall_time_s / world_size this closely
# A step takes at least a microsecond and at most about three years: outside, a time is corrupt, and rates,
# projections and GPU-hours made from it overflow to infinity.
MIN_STEP_S, MAX_STEP_S = 1e-6, 1e8


class RunReportError(ValueError):
    """A run report or metrics file that cannot be used; the message names the file and the problem."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def trace_path(rank: int) -> str:
    """Where global rank ``rank``'s measured trace lives, relative to the run directory."""
    return f"{TRACES_DIR}/rank{rank}.json"


class GpuIdentity(_Frozen):
    rank: Int = Field(..., ge=0, lt=MAX_RANKS, description="Global rank using the GPU.")
    hostname: str | None = None
    name: str | None = Field(None, description="torch.cuda.get_device_name, e.g. 'NVIDIA H200'.")
    uuid: str | None = Field(None, description="torch.cuda.get_device_properties(i).uuid, as NVML spells it (GPU-...).")


class Environment(_Frozen):
    """Software and hardware the run saw; every field optional (a CPU run has no CUDA)."""

    moeplan_version: str | None = None
    python_version: str | None = None
    torch_version: str | None = None
    cuda_version: str | None = None
    nccl_version: str | None = None
    driver_version: str | None = None
    ray_version: str | None = None
    hostnames: tuple[str, ...] = ()
    gpus: tuple[GpuIdentity, ...] = ()


class RunSettings(_Frozen):
    steps: Int = Field(..., gt=0, description="Steps the run was asked for.")
    warmup_steps: Int = Field(..., ge=0, description="First steps left out of every statistic (compilation, NCCL setup).")
    world_size: Int = Field(..., gt=0, lt=MAX_RANKS)
    backend: Literal["nccl", "gloo"]
    pp_rank_of: tuple[Int, ...] = Field(..., description="[global rank] -> pipeline rank (the plan's per-rank index).")

    @model_validator(mode="after")
    def _ranks(self) -> RunSettings:
        if len(self.pp_rank_of) != self.world_size:
            raise ValueError(f"pp_rank_of has {len(self.pp_rank_of)} entries but world_size={self.world_size}")
        if any(not 0 <= p < self.world_size for p in self.pp_rank_of):
            raise ValueError(f"pp_rank_of={self.pp_rank_of[:16]} names a pipeline rank outside 0..{self.world_size - 1}")
        return self


class StepMetrics(_Frozen):
    """One training step, as rank 0 logs it: one line of ``metrics.jsonl``."""

    step: Int = Field(..., ge=0)
    wall_time_s: Float = Field(..., ge=MIN_STEP_S, le=MAX_STEP_S,
                               description="From the step's start to its end on every rank (max over ranks).")
    tokens: Int = Field(..., gt=0, description="Tokens the whole job trained on in the step (all DP replicas).")
    loss: Float
    mtp_loss: Float | None = None
    grad_norm: Float | None = Field(None, ge=0, description="Before clipping.")
    lr: Float = Field(..., ge=0)
    peak_memory_bytes: tuple[Int, ...] | None = Field(
        None, description="[global rank] torch.cuda.max_memory_allocated over the step; null on CPU.")
    tokens_per_s_per_gpu: Float = Field(..., gt=0, description="tokens / wall_time_s / world_size.")


class RankTimeline(_Frozen):
    """One rank's measured step timeline, summarised by ``simulator.report.trace_analysis`` (its definitions)."""

    rank: Int = Field(..., ge=0, lt=MAX_RANKS, description="Global rank.")
    pp_rank: Int = Field(..., ge=0, lt=MAX_RANKS)
    window_s: Float = Field(..., gt=0, description="The step the trace covers.")
    compute_s: Float = Field(..., ge=0, description="Union of compute intervals.")
    comm_s: Float = Field(..., ge=0, description="Union of communication intervals.")
    hidden_comm_s: Float = Field(..., ge=0, description="Communication while compute ran: |comm ∩ compute|.")
    exposed_comm_s: Float = Field(..., ge=0, description="Communication with no compute: |comm \\ compute|.")
    bubble_s: Float = Field(..., ge=0, description="Neither compute nor communication.")
    op_class_s: dict[OpClass, Float] = Field(..., description="Union of each op class's intervals; idle = bubble_s.")


class TraceRef(_Frozen):
    rank: Int = Field(..., ge=0, lt=MAX_RANKS)
    path: str = Field(..., description="Relative to the run directory, e.g. traces/rank0.json.")

    @field_validator("path")
    @classmethod
    def _inside_the_run(cls, path: str) -> str:
        pure = PurePosixPath(path)
        if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path or "\0" in path:
            raise ValueError(f"path={path!r:.80} must be a relative path inside the run directory")
        return path


class Series(_Frozen):
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


class StepEnergy(_Frozen):
    """Energy per step from the total-energy counter read at step boundaries."""

    steps: tuple[Int, ...] = ()
    joules: tuple[Float, ...] = ()
    missing: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> StepEnergy:
        if len(self.steps) != len(self.joules) or (self.missing is not None and self.joules):
            raise ValueError("steps and joules must have one entry each, and none when missing")
        return self


class GpuTelemetry(_Frozen):
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


class Restart(_Frozen):
    at_step: Int = Field(..., ge=0, description="The step the run resumed from (its last checkpoint).")
    reason: str
    lost_gpu_hours: Float = Field(..., ge=0, description="GPU-hours of work redone or spent restarting.")


class BudgetGuard(_Frozen):
    policy: Literal["off", "warn", "stop"]
    budget_gpu_hours: Float | None = Field(None, gt=0)
    checks: Int = Field(0, ge=0, description="Projections made during the run.")
    last_projected_gpu_hours: Float | None = Field(None, ge=0)
    action: Literal["none", "warned", "stopped"] = "none"
    at_step: Int | None = Field(None, ge=0, description="Step of the first warning or of the stop.")


class RunReport(_Frozen):
    schema_version: Literal[1] = RUN_SCHEMA_VERSION
    plan_sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$", description="inputs_sha256 of the plan executed.")
    plan_file: str = Field(..., description="Name of the plan file the run was launched with.")
    status: Literal["running", "completed", "stopped", "failed"]
    environment: Environment
    settings: RunSettings
    steps: tuple[StepMetrics, ...] = ()
    timelines: tuple[RankTimeline, ...] = ()
    traces: tuple[TraceRef, ...] = ()
    telemetry: tuple[GpuTelemetry, ...] = ()
    restarts: tuple[Restart, ...] = ()
    budget_guard: BudgetGuard

    @property
    def lost_gpu_hours(self) -> float:
        return sum(r.lost_gpu_hours for r in self.restarts)

    @property
    def measured_steps(self) -> tuple[StepMetrics, ...]:
        """The steps every statistic is taken over: those after the warm-up."""
        return self.steps[self.settings.warmup_steps:]

    @model_validator(mode="after")
    def _steps_agree(self) -> RunReport:
        world = self.settings.world_size
        if any(b.step <= a.step for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError("steps must be in increasing step order, each once")
        for s in self.steps:
            if s.peak_memory_bytes is not None and len(s.peak_memory_bytes) != world:
                raise ValueError(f"step {s.step}: peak_memory_bytes has {len(s.peak_memory_bytes)} ranks, not {world}")
            rate = s.tokens / s.wall_time_s / world
            if not math.isclose(s.tokens_per_s_per_gpu, rate, rel_tol=TOKENS_RATE_RTOL):
                raise ValueError(f"step {s.step}: tokens_per_s_per_gpu={s.tokens_per_s_per_gpu} is not tokens / "
                                 f"wall_time_s / world_size = {rate:.6g}")
        return self

    @model_validator(mode="after")
    def _ranks_exist(self) -> RunReport:
        world, pp_of = self.settings.world_size, self.settings.pp_rank_of
        for t in self.timelines:
            if t.rank >= world or t.pp_rank != pp_of[t.rank]:
                raise ValueError(f"timelines: rank={t.rank} pp_rank={t.pp_rank} is not a rank of the run's "
                                 f"world_size={world} with its pipeline rank")
        for name, ranks in (("traces", [t.rank for t in self.traces]), ("telemetry", [g.rank for g in self.telemetry])):
            if any(r >= world for r in ranks) or len(set(ranks)) != len(ranks):
                raise ValueError(f"{name}: ranks {ranks[:16]} must be distinct and below world_size={world}")
        return self


def dump_run_report(report: RunReport) -> str:
    return report.model_dump_json(indent=2) + "\n"


def parse_run_report(text: str | bytes, source: str = "<run report>") -> RunReport:
    """Parse and check a run report: strict JSON, schema version, schema."""
    try:
        raw = parse_json(text, source)
    except JsonInputError as exc:
        raise RunReportError(str(exc)) from None
    return _checked(raw, source)


def _checked(raw: object, source: str) -> RunReport:
    if not isinstance(raw, dict):
        raise RunReportError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version")
    if version != RUN_SCHEMA_VERSION:
        raise RunReportError(f"{source}: schema_version={version!r:.40} is not supported; this moeplan reads run "
                             f"report version {RUN_SCHEMA_VERSION}")
    try:
        return RunReport.model_validate(raw)
    except ValidationError as exc:
        raise RunReportError(first_error_line(exc, prefix=source, whole="run report")) from None


def read_run_report(path: str | Path) -> RunReport:
    """The report at ``path`` (``run.json``, or the run directory holding it)."""
    path = Path(path)
    try:
        if path.is_dir():
            path = path / RUN_REPORT_NAME
        raw = read_json_file(path)
    except OSError as exc:
        raise RunReportError(f"{path}: cannot read ({exc.strerror})") from None
    except JsonInputError as exc:
        raise RunReportError(str(exc)) from None
    return _checked(raw, str(path))


def write_run_report(run_dir: str | Path, report: RunReport) -> Path:
    """Write ``run_dir/run.json`` atomically (a reader sees the old report or the new one, never half). A
    failed write (a full disk) leaves the previous report and raises ``OSError`` naming the file."""
    path = Path(run_dir) / RUN_REPORT_NAME
    try:
        write_atomic(path, dump_run_report(report))
    except OSError as exc:
        raise OSError(exc.errno, f"{path}: cannot write the run report ({exc.strerror or exc}); "
                                 "the previous one is left as it was") from exc
    return path


def append_metrics(path: str | Path, metrics: StepMetrics) -> None:
    """Append one line to ``metrics.jsonl`` (``path`` is the file or the run directory) and fsync it,
    so a crash loses at most the step in flight. A line cut short by an earlier crash is dropped first
    (the next line would join it); a failed write (a full disk) is cut away again, leaving the steps
    before it, and raises ``OSError`` naming the file and the step."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    line = (metrics.model_dump_json() + "\n").encode()
    with open(path, "a+b") as f:
        size = _whole_lines(f)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            f.truncate(size)  # no torn line for the next append to join
            raise OSError(exc.errno, f"{path}: cannot append step {metrics.step} ({exc.strerror or exc}); "
                                     f"the steps before it are kept") from exc


def _whole_lines(f: BinaryIO) -> int:
    """Cut an unfinished last line (the step in flight when a process died) off the open file ``f``; its
    size after."""
    size = end = f.seek(0, os.SEEK_END)
    while end > 0:
        start = max(0, end - READ_BACK_BYTES)
        f.seek(start)
        chunk = f.read(end - start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    if end != size:
        f.truncate(end)
    return end


def read_metrics(path: str | Path) -> list[StepMetrics]:
    """Every step of ``metrics.jsonl`` (the file or its run directory). A last line cut short by a
    crash (no newline) is the step in flight and is dropped; any other bad line is a ``RunReportError``."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise RunReportError(f"{path}: cannot read ({exc.strerror})") from None
    lines = text.split(b"\n")
    if lines and lines[-1]:  # no newline after it: written when the process died
        lines = lines[:-1]
    steps = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        source = f"{path}:{i}"
        try:
            steps.append(StepMetrics.model_validate(parse_json(line, source)))
        except JsonInputError as exc:
            raise RunReportError(str(exc)) from None
        except ValidationError as exc:
            raise RunReportError(first_error_line(exc, prefix=source, whole="line")) from None
    return steps

