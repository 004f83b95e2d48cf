"""A training run on one rank: steps of the plan's schedule, metrics, traces, telemetry, run directory.

``train(plan, run_dir, config, rank)`` runs inside an initialised default process group (spawned
locally, or by Ray Train: ``orchestrator.launch``). Every rank runs the same loop:

1. forward and backward of the plan's schedule on its micro-batches (``rank.RankRuntime``), timed per
   action; the step's wall time is the slowest rank's, from a barrier to the end of the optimizer step;
2. the optimizer step (ZeRO-1 AdamW over FP32 main gradients, the plan's hyper-parameters);
3. rank 0 appends the step's ``StepMetrics`` to ``RUN/metrics.jsonl`` (fsynced: a crash loses at most
   the step in flight) and calls ``on_step`` (the launcher's progress bar and budget guard);
4. on the profiled step (the last one by default) every rank writes its measured timeline to
   ``RUN/traces/rank{r}.json`` in the simulator's trace format (``contracts.trace``);
5. at the end rank 0 writes the run's expert loads (``RUN/expert-load.json``, the load-file format
   ``plan --load`` reads) and ``RUN/run.json`` (``contracts.run_report.RunReport``) atomically, with the
   environment, per-GPU NVML telemetry (fields marked missing where NVML is absent) and the traces.

``observer`` (rank 0's; the launcher's progress bar and budget guard) sees each step's metrics and
answers "continue" or "stop"; the decision is broadcast, so every rank stops after the same step, after
a checkpoint. Its ``guard_report()`` is the report's ``budget_guard``.

Checkpoints (``checkpoint``): every ``checkpoint_every`` steps, at the last step when checkpointing,
and at a stop. With ``RunConfig.resume`` set, every rank loads the run's latest checkpoint (if any)
and rank 0 rewinds the run directory to it and records the ``Restart`` (``resume``).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import platform
import socket
import time
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from moeplan.model.load_record import load_record, write_load_file
from moeplan.model.runtime.checkpoint import latest_checkpoint, load_checkpoint, remove_partial, save_checkpoint
from moeplan.model.runtime.executor import Timeline
from moeplan.model.runtime.overlap import NODE_RANGE
from moeplan.model.runtime.rank import RankRuntime, RuntimeOptions
from moeplan.model.runtime.resume import inject_fault, rewind
from moeplan.model.runtime.telemetry import NvmlSampler, driver_version
from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.contracts.plan_file import PlanFile
from moeplan.simulator.contracts.run_report import (
    EXPERT_LOAD_NAME,
    TRACES_DIR,
    BudgetGuard,
    Environment,
    GpuIdentity,
    RunReport,
    RunSettings,
    StepMetrics,
    TraceRef,
    append_metrics,
    trace_path,
    write_run_report,
)
from moeplan.simulator.contracts.run_telemetry import write_telemetry
from moeplan.simulator.contracts.runtime_support import DTYPE_NAMES, check_run_settings
from moeplan.simulator.contracts.trace import chrome_trace
from moeplan.simulator.contracts.versions import installed_version

log = logging.getLogger(__name__)

class StepObserver(Protocol):
    def __call__(self, metrics: StepMetrics) -> str: ...  # "continue" | "stop"

    def guard_report(self) -> BudgetGuard: ...


@dataclasses.dataclass(frozen=True)
class Resume:
    """Continue from the run directory's latest checkpoint: why, and when the failure that caused it was
    seen (unix seconds; None for ``moeplan launch --resume``, whose restart time held no GPU)."""

    reason: str
    failed_unix_s: float | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What a launch asks of every rank (the plan says the rest)."""

    steps: int
    warmup_steps: int = 1
    seed: int = 0
    dtype: str = "bf16"  # "fp32": exact CPU rehearsals and equivalence tests
    profile_step: int | None = None  # None: the measured step nearest the run's median wall time (TracedStep)
    telemetry_hz: float = 2.0
    plan_file: str = "plan.json"
    checkpoint_every: int = 0  # 0: a checkpoint only when the budget guard stops the run
    resume: Resume | None = None  # None: a fresh run (the run directory holds no checkpoint)
    fault_at: tuple[int, int] | None = None  # TEST ONLY: (rank, step) that kills itself once (resume.inject_fault)
    kernel_trace: bool = False  # one more step after the run under torch.profiler (_kernel_trace)
    comm_sms: int = 0  # RuntimeOptions.comm_sms: the SMs an expert-parallel NCCL group's collectives may hold

    def __post_init__(self) -> None:
        check_run_settings(self.steps, self.warmup_steps, self.dtype, self.checkpoint_every)


TRACE_KEEP = 5  # measured steps whose events are kept in memory while the run goes on (TracedStep)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # keys: runtime_support.DTYPE_NAMES
assert tuple(DTYPES) == DTYPE_NAMES


def train(plan: PlanFile, run_dir: Path, config: RunConfig, rank: int, device: torch.device | None = None,
          observer: StepObserver | None = None) -> RunReport | None:
    """Run ``config.steps`` steps of ``plan`` on this rank; rank 0 returns the written report."""
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                        else torch.device("cpu"))
    backend = dist.get_backend()
    rt = RankRuntime.create(plan, rank, RuntimeOptions(dtype=DTYPES[config.dtype], seed=config.seed,
                                                       comm_sms=config.comm_sms), device)
    run_dir = Path(run_dir)
    if rank == 0:
        (run_dir / "traces").mkdir(parents=True, exist_ok=True)
        remove_partial(run_dir)
    dist.barrier()
    start_step, steps, restarts = _resume(rt, run_dir, config)
    sampler = NvmlSampler.for_device(rank, device.index or 0, config.telemetry_hz) if device.type == "cuda" else \
        NvmlSampler(rank, None, config.telemetry_hz)
    sampler.start()
    status, traced = "completed", config.profile_step is not None and config.profile_step < start_step
    traced_step = TracedStep(config.warmup_steps)
    for step in range(start_step, config.steps):
        if config.fault_at == (rank, step):
            inject_fault(run_dir, rank, step)
        metrics, events = _one_step(rt, step, rt.tokens_per_step, device)
        sampler.step_boundary(step)
        if rank == 0:
            append_metrics(run_dir / "metrics.jsonl", metrics)
            steps.append(metrics)
        # on the rank's device: NCCL, the GPU runs' only backend, reduces no CPU tensor
        decision = torch.tensor([0 if rank != 0 or observer is None or observer(metrics) != "stop" else 1],
                                device=device)
        dist.broadcast(decision, src=0)
        stop = int(decision) == 1
        if config.profile_step is None:
            traced_step.offer(metrics.wall_time_s, step, events)
        elif step == config.profile_step or (stop and not traced):
            _write_trace(run_dir, rank, events, metrics.wall_time_s, step)
            traced = True
        done = step + 1
        if stop or (config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.steps)):
            save_checkpoint(rt, run_dir, done)
        if stop:
            status = "stopped"
            break
    if config.kernel_trace and status == "completed":
        _kernel_trace(rt, config.steps, device, run_dir, rank)
    if config.profile_step is None and traced_step.kept:  # the same step on every rank: the walls are all-reduced
        wall_s, step, events = traced_step.choice()
        _write_trace(run_dir, rank, events, wall_s, step)
        traced = True
    telemetry = write_telemetry(run_dir, sampler.stop())  # the samples apart, their summary into run.json
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (telemetry, _identity(rank, device), socket.gethostname()))
    loads = rt.expert_loads()  # collective: every pipeline rank's layers
    if rank != 0:
        return None
    if loads:  # the load file `moeplan plan --load` and `moeplan placement --load` read
        spec = plan.inputs.model
        write_load_file(run_dir / EXPERT_LOAD_NAME, load_record(
            spec.name, loads, spec.num_experts_per_tok, rt.loads.step_start or 0, rt.loads.step_end))
    world = dist.get_world_size()
    report = RunReport(
        plan_sha256=plan.inputs_sha256, plan_file=config.plan_file, status=status,
        environment=_environment(gathered, backend), steps=tuple(steps),
        settings=RunSettings(steps=config.steps, warmup_steps=config.warmup_steps, world_size=world,
                             backend=backend, pp_rank_of=tuple(rt.groups.coords(r).pp_rank for r in range(world))),
        traces=tuple(TraceRef(rank=r, path=trace_path(r)) for r in range(world)) if traced else (),
        telemetry=tuple(t for t, _, _ in gathered), restarts=restarts,
        budget_guard=observer.guard_report() if observer is not None else BudgetGuard(policy="off"),
    )
    write_run_report(run_dir, report)
    return report


def _resume(rt: RankRuntime, run_dir: Path, config: RunConfig) -> tuple[int, list[StepMetrics], tuple]:
    """Where this attempt starts: (first step, rank 0's steps kept from before, the run's restarts).
    A fresh run starts at 0; a resume loads the latest checkpoint (or none: step 0) on every rank."""
    if config.resume is None:
        return 0, [], ()
    meta = latest_checkpoint(run_dir)
    if meta is not None:
        load_checkpoint(rt, meta)
    at_step = meta.steps_done if meta is not None else 0
    kept, restarts = [], ()
    if rt.rank == 0:
        failed = config.resume.failed_unix_s
        restart_s = time.time() - failed if failed is not None else 0.0
        kept, restarts = rewind(run_dir, at_step, config.resume.reason, restart_s, dist.get_world_size())
    dist.barrier()
    return at_step, kept, restarts


def _one_step(rt: RankRuntime, step: int, tokens: int, device: torch.device):
    """Forward, backward and optimizer step; the step's metrics (gathered) and this rank's trace events."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    origin = time.perf_counter()
    timeline = Timeline(rt.rank, cuda=device.type == "cuda", origin_s=0.0 if device.type == "cuda" else origin)
    result = rt.forward_backward(step, timeline)
    with torch.profiler.record_function(NODE_RANGE + "optimizer"):
        stats = rt.optimizer_step(timeline)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = torch.tensor([time.perf_counter() - origin], dtype=torch.float64, device=device)  # device: NCCL
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    loss = torch.tensor([sum(result.losses.values()), len(result.losses)], dtype=torch.float64, device=device)
    dist.all_reduce(loss)
    peak = [None] * dist.get_world_size()
    dist.all_gather_object(peak, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    wall = float(elapsed)
    metrics = StepMetrics(
        step=step, wall_time_s=wall, tokens=tokens, loss=float(loss[0] / loss[1]), grad_norm=stats.grad_norm,
        lr=stats.lr, peak_memory_bytes=None if peak[0] is None else tuple(peak),
        tokens_per_s_per_gpu=tokens / wall / dist.get_world_size(),
    )
    return metrics, timeline.events()


class TracedStep:
    """Which step's events a run writes as its trace: the measured step whose wall time is nearest the median of
    all the run's measured steps (``moeplan check`` compares that median; ``check --recalibrate`` takes its op times
    from the trace, so a step slowed or sped by a neighbour's burst would move every op). At most ``TRACE_KEEP``
    steps' events are held: when one more comes, the one farthest from the median so far is dropped (the later
    one of a tie). Until a measured step comes, the latest warm-up step stands in (a run stopped early). Every
    rank sees the same all-reduced wall times, so every rank keeps and picks the same step."""

    def __init__(self, warmup_steps: int, keep: int = TRACE_KEEP) -> None:
        self.warmup_steps, self.keep = warmup_steps, keep
        self.kept: list[tuple[float, int, list]] = []  # (wall s, step, events)
        self.walls: list[float] = []  # every measured step's wall time, sorted (a median per step, no re-sort)

    def offer(self, wall_s: float, step: int, events: list) -> None:
        if step < self.warmup_steps:
            self.kept = [(wall_s, step, events)]
            return
        if self.kept and self.kept[0][1] < self.warmup_steps:
            self.kept = []
        bisect.insort(self.walls, wall_s)
        self.kept.append((wall_s, step, events))
        if len(self.kept) > self.keep:
            median = self._median()
            self.kept.remove(max(self.kept, key=lambda k: (abs(k[0] - median), k[1])))

    def choice(self) -> tuple[float, int, list]:
        """(wall s, step, events) of the kept step nearest the median of every measured step (the earlier of a
        tie); the stand-in warm-up step where none was measured."""
        median = self._median() if self.walls else self.kept[-1][0]
        return min(self.kept, key=lambda k: (abs(k[0] - median), k[1]))

    def _median(self) -> float:
        n, w = len(self.walls), self.walls
        return w[n // 2] if n % 2 else (w[n // 2 - 1] + w[n // 2]) / 2


KERNEL_TRACE = TRACES_DIR + "/rank{rank}-kernels.json"  # under the run directory


def _kernel_trace(rt: RankRuntime, step: int, device: torch.device, run_dir: Path, rank: int) -> None:
    """One more step (``step``, after the run's last) under ``torch.profiler``, its Chrome trace written to
    ``KERNEL_TRACE``: every kernel with the host op that launched it, inside the ``NODE_RANGE`` of its compute
    node (``benchmarks/one_gpu_loop.kernels_by_node`` gives the kernels to the nodes). After the measured steps and their
    checkpoint, so that it times none of them; its weights' update is kept (the run is over)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        _one_step(rt, step, rt.tokens_per_step, device)
    path = run_dir / KERNEL_TRACE.format(rank=rank)
    partial = path.with_name(path.name + ".partial")
    prof.export_chrome_trace(str(partial))
    partial.replace(path)


def _write_trace(run_dir: Path, rank: int, events, step_time_s: float, step: int) -> None:
    doc = chrome_trace(events, other={"step_time_s": step_time_s, "rank": rank, "step": step})
    write_atomic(run_dir / trace_path(rank), json.dumps(doc, allow_nan=False))


def _identity(rank: int, device: torch.device) -> GpuIdentity:
    if device.type != "cuda":
        return GpuIdentity(rank=rank)
    props = torch.cuda.get_device_properties(device)
    uuid = str(props.uuid)
    return GpuIdentity(rank=rank, name=props.name, uuid=uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")


def _environment(gathered: list, backend: str) -> Environment:
    cuda = torch.version.cuda if torch.cuda.is_available() else None
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda and backend == "nccl" else None
    return Environment(
        moeplan_version=installed_version("moeplan"), python_version=platform.python_version(),
        torch_version=torch.__version__, cuda_version=cuda, nccl_version=nccl,
        driver_version=driver_version(), ray_version=installed_version("ray"),
        hostnames=tuple(sorted({h for _, _, h in gathered})), gpus=tuple(g for _, g, _ in gathered if g.name),
    )
