"""The run report: what a training run writes into its run directory, and what ``moeplan check`` reads.

A run directory holds (``docs/design/run-report.md``)::

    RUN/run.json               RunReport, written atomically (write_run_report)
    RUN/metrics.jsonl          one StepMetrics per line, appended and fsynced every step (append_metrics)
    RUN/traces/rank{r}.json    measured Perfetto trace of one profiled step of global rank r (simulator schema)
    RUN/telemetry/rank{r}.json the NVML samples of global rank r (``run_telemetry``)
    RUN/plan.json              the plan the run executed (copied by the launcher)

The report names the plan by its ``inputs_sha256``; ``check`` refuses a plan whose hash differs.
Every time is in seconds, every size in bytes. Reading is strict like the plan file's
(``spec.json_input``: bounded JSON, no NaN/Infinity) and reports the first problem as one line
(``RunReportError``). Telemetry (NVML) fields carry a ``missing`` reason instead of values where NVML is
absent or refuses a query.

The report's size is bounded by the world, never by the run's length (schema version 2): it keeps the
last ``MAX_REPORT_STEPS`` steps (every step stays in ``metrics.jsonl``), each without its per-rank peak
memory, and ``step_totals`` over all of them (their count, summed wall time, and per rank the peak after
the warm-up); each rank's telemetry summarised, its samples apart. Version 1 kept every step with a peak
per rank and every NVML sample: a whole DeepSeek-V3 run (the default plan: 2,048 GPUs, 244,782 steps)
would have written about 32 GB (8.6 GB of steps, 11 MB of samples and step energies per rank), against the
64 MiB every reader accepts (``tests/simulator/contracts/test_run_report_size.py`` measures both). Version
2 writes about 1.8 KB per rank plus 0.25 MB of kept steps: 3.9 MB at 2,048 ranks; the 64 MiB would be
reached near 37,000 ranks, where ``write_run_report`` refuses to write a report no reader would take. A
version 1 report is still read: its steps folded and its telemetry summarised as if written now (its
samples are not kept apart).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.contracts.run_fields import MAX_RANKS, RunReportError, inside_the_run
from moeplan.simulator.contracts.run_fields import Frozen as _Frozen
from moeplan.simulator.contracts.run_telemetry import GpuTelemetry, TelemetrySummary, summarise_telemetry
from moeplan.simulator.spec.errors import first_error_line
from moeplan.simulator.spec.json_input import MAX_FILE_BYTES, JsonInputError, open_input, parse_json, read_json_file
from moeplan.simulator.spec.numbers import Float, Int

RUN_SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: every step and sample inside run.json, upgraded when read (_upgraded)
# The steps run.json keeps, the last ones: check's medians are taken over them. 1,024 steps of V3's 14.5 s step
# are the last 4.1 hours, and 0.25 MB of run.json (measured: test_run_report_size).
MAX_REPORT_STEPS = 1024
RUN_REPORT_NAME = "run.json"
METRICS_NAME = "metrics.jsonl"
PLAN_COPY_NAME = "plan.json"
EXPERT_LOAD_NAME = "expert-load.json"  # the run's routed tokens per layer and expert: `plan --load` reads it
TRACES_DIR = "traces"
READ_BACK_BYTES = 2**16  # append_metrics looks back this much at a time for the last line's end
OP_CLASSES = ("gemm", "grouped_gemm", "attention", "memory_bound", "communication", "idle")
OpClass = Literal["gemm", "grouped_gemm", "attention", "memory_bound", "communication", "idle"]
TOKENS_RATE_RTOL = 1e-6  # tokens_per_s_per_gpu must equal tokens / wall_time_s / world_size this closely
# A step takes at least a microsecond and at most about three years: outside, a time is corrupt, and rates,
# projections and GPU-hours made from it overflow to infinity.
MIN_STEP_S, MAX_STEP_S = 1e-6, 1e8


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
        return inside_the_run(path)


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


class StepTotals(_Frozen):
    """Every step the run recorded (``metrics.jsonl`` holds each), as ``run.json`` keeps them."""

    count: Int = Field(0, ge=0, description="Steps recorded, the warm-up included.")
    wall_time_s: Float = Field(0.0, ge=0, description="Their wall times summed (GPU-hours spent: x world / 3600).")
    peak_memory_bytes: tuple[Int, ...] | None = Field(
        None, description="[global rank] the largest peak_memory_bytes of the steps after the warm-up; null on CPU.")


def fold_steps(steps: Iterable[StepMetrics], warmup_steps: int) -> tuple[tuple[StepMetrics, ...], StepTotals]:
    """Every step of a run -> (the last ``MAX_REPORT_STEPS``, without per-rank peak memory; the totals), in one
    pass holding one step's peaks at a time (``fold_metrics`` streams a whole run's file through it)."""
    kept: deque[StepMetrics] = deque(maxlen=MAX_REPORT_STEPS)
    walls, peak, width = [], None, None
    for i, s in enumerate(steps):
        walls.append(s.wall_time_s)
        if s.peak_memory_bytes is not None:
            width = len(s.peak_memory_bytes) if width is None else width
            if len(s.peak_memory_bytes) != width:
                raise ValueError(f"step {s.step}: peak_memory_bytes has {len(s.peak_memory_bytes)} ranks, the steps "
                                 f"before {width}")
            if i >= warmup_steps:
                peak = list(s.peak_memory_bytes) if peak is None else list(map(max, peak, s.peak_memory_bytes))
            s = s.model_copy(update={"peak_memory_bytes": None})
        kept.append(s)
    totals = StepTotals(count=len(walls), wall_time_s=math.fsum(walls),
                        peak_memory_bytes=tuple(peak) if peak is not None else None)
    return tuple(kept), totals


class RunReport(_Frozen):
    """What ``run.json`` holds. Built from every step of a run (``steps`` without ``step_totals``), it keeps
    the last ``MAX_REPORT_STEPS`` and their totals (``fold_steps``)."""

    schema_version: Literal[2] = RUN_SCHEMA_VERSION
    plan_sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$", description="inputs_sha256 of the plan executed.")
    plan_file: str = Field(..., description="Name of the plan file the run was launched with.")
    status: Literal["running", "completed", "stopped", "failed"]
    environment: Environment
    settings: RunSettings
    steps: tuple[StepMetrics, ...] = Field((), description=f"The last {MAX_REPORT_STEPS} steps (metrics.jsonl "
                                                            "holds every one), their peak memory in step_totals.")
    step_totals: StepTotals = StepTotals()
    timelines: tuple[RankTimeline, ...] = ()
    traces: tuple[TraceRef, ...] = ()
    telemetry: tuple[TelemetrySummary, ...] = ()
    restarts: tuple[Restart, ...] = ()
    budget_guard: BudgetGuard

    @property
    def lost_gpu_hours(self) -> float:
        return sum(r.lost_gpu_hours for r in self.restarts)

    @property
    def measured_steps(self) -> tuple[StepMetrics, ...]:
        """The steps every statistic is taken over: those kept after the warm-up."""
        return self.steps[max(0, self.settings.warmup_steps - (self.step_totals.count - len(self.steps))):]

    @model_validator(mode="before")
    @classmethod
    def _fold(cls, data: Any) -> Any:
        """Every step given and no totals (a run just ended, or a version 1 report): keep what run.json keeps."""
        if not isinstance(data, dict) or "step_totals" in data:
            return data
        settings = data.get("settings")
        warmup = settings.get("warmup_steps") if isinstance(settings, dict) else getattr(settings, "warmup_steps", None)
        try:
            steps = [StepMetrics.model_validate(s) for s in data.get("steps", ())]
        except (ValidationError, TypeError):
            return data  # the fields' own validation names the problem
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            return data
        kept, totals = fold_steps(steps, warmup)
        return {**data, "steps": kept, "step_totals": totals}

    @model_validator(mode="after")
    def _steps_agree(self) -> RunReport:
        world, totals = self.settings.world_size, self.step_totals
        if any(b.step <= a.step for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError("steps must be in increasing step order, each once")
        if len(self.steps) > MAX_REPORT_STEPS or totals.count < len(self.steps) or (
                totals.count > len(self.steps) and len(self.steps) != MAX_REPORT_STEPS):
            raise ValueError(f"steps holds {len(self.steps)} but step_totals.count={totals.count}: the report keeps "
                             f"the last min(count, {MAX_REPORT_STEPS})")
        if totals.peak_memory_bytes is not None and len(totals.peak_memory_bytes) != world:
            raise ValueError(f"step_totals: peak_memory_bytes has {len(totals.peak_memory_bytes)} ranks, not {world}")
        for s in self.steps:
            if s.peak_memory_bytes is not None:
                raise ValueError(f"step {s.step}: peak_memory_bytes is kept in step_totals, not per step")
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
    return report.model_dump_json(indent=1) + "\n"


def parse_run_report(text: str | bytes, source: str = "<run report>") -> RunReport:
    """Parse and check a run report: strict JSON, schema version, schema."""
    try:
        raw = parse_json(text, source)
    except JsonInputError as exc:
        raise RunReportError(str(exc)) from None
    return _checked(raw, source)


def _upgraded(raw: dict, source: str) -> dict:
    """A version 1 report as version 2: its telemetry summarised (the samples were inside it: not kept apart),
    its steps left for ``RunReport`` to fold."""
    telemetry = raw.get("telemetry", [])
    if isinstance(telemetry, list):
        try:
            telemetry = [summarise_telemetry(GpuTelemetry.model_validate(t), None) for t in telemetry]
        except ValidationError as exc:
            raise RunReportError(first_error_line(exc, prefix=f"{source}: telemetry", whole="record")) from None
    return {**raw, "schema_version": RUN_SCHEMA_VERSION, "telemetry": telemetry}


def _checked(raw: object, source: str) -> RunReport:
    if not isinstance(raw, dict):
        raise RunReportError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise RunReportError(f"{source}: schema_version={version!r:.40} is not supported; this moeplan reads run "
                             f"report versions {', '.join(map(str, READABLE_VERSIONS))}")
    if version == 1:
        raw = _upgraded(raw, source)
    elif "step_totals" not in raw:  # a version 2 report always has them: folding here would hide the loss
        raise RunReportError(f"{source}: step_totals: Field required (a version 2 report keeps its steps' totals)")
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
    text = dump_run_report(report)
    if len(text.encode()) > MAX_FILE_BYTES:  # a world past ~37,000 ranks: no reader would take it
        raise RunReportError(f"{path}: the report of {report.settings.world_size} ranks is {len(text.encode()):,} "
                             f"bytes, past the {MAX_FILE_BYTES:,} every reader accepts; not written")
    try:
        write_atomic(path, text)
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


def _metrics_lines(path: str | Path) -> Iterator[StepMetrics]:
    """The steps of ``metrics.jsonl`` (the file or its run directory), read a line at a time. A last line cut
    short by a crash (no newline) is the step in flight and is dropped; any other bad line, or one longer
    than ``MAX_FILE_BYTES``, is a ``RunReportError``."""
    path = Path(path)
    try:
        if path.is_dir():
            path = path / METRICS_NAME
        with open_input(path) as f:
            for i, line in enumerate(iter(lambda: f.readline(MAX_FILE_BYTES + 1), b""), start=1):
                if len(line) > MAX_FILE_BYTES:
                    raise RunReportError(f"{path}:{i}: a line longer than {MAX_FILE_BYTES // 2**20} MiB")
                if not line.endswith(b"\n"):  # no newline after it: written when the process died
                    return
                if line.strip():
                    yield _step_line(line, f"{path}:{i}")
    except OSError as exc:
        raise RunReportError(f"{path}: cannot read ({exc.strerror})") from None


def _step_line(line: bytes, source: str) -> StepMetrics:
    try:
        return StepMetrics.model_validate(parse_json(line, source))
    except JsonInputError as exc:
        raise RunReportError(str(exc)) from None
    except ValidationError as exc:
        raise RunReportError(first_error_line(exc, prefix=source, whole="line")) from None


def read_metrics(path: str | Path) -> list[StepMetrics]:
    """Every step of ``metrics.jsonl`` (the file or its run directory); see ``_metrics_lines``."""
    return list(_metrics_lines(path))


def fold_metrics(path: str | Path, warmup_steps: int) -> tuple[tuple[StepMetrics, ...], StepTotals]:
    """``fold_steps`` over ``metrics.jsonl``, streamed: what ``run.json`` keeps of a run of any length, in the
    memory of ``MAX_REPORT_STEPS`` steps (a whole V3 run's file, a peak per rank on each line, is ~6 GB)."""
    try:
        return fold_steps(_metrics_lines(path), warmup_steps)
    except ValueError as exc:
        if isinstance(exc, RunReportError):
            raise
        raise RunReportError(f"{path}: {exc}") from None

