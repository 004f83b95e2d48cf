"""``moeplan launch PLAN``: the plan's ranks trained through Ray, with a progress bar, the budget guard,
checkpoints and restarts; the run directory is what ``moeplan check RUN`` reads.

Before Ray starts: the options, the plan (a schedule, a world the runtime runs, a budget when guarded),
the run directory (new and empty, or ``--resume RUN`` with a checkpoint) and, for a local cluster, the
GPUs this machine has; after it starts, the cluster's resources (``ray_launch.missing_resources``). Each
is one line and exit 2, with nothing written. Then ``RUN/plan.json`` (the plan's own text),
``RUN/plan-trace.json`` (its simulated step, when that reproduces the prediction), ``RUN/launch.json``
(the launch's settings, ``--resume``'s defaults), and the ranks write the rest (docs/design/run-report.md).

Exit codes: 0 completed; 2 bad input; 4 stopped by the budget guard (after a checkpoint,
``status="stopped"``); 5 the run failed more often than ``--max-failures`` (``run.json`` then says
``failed``; the directory keeps every checkpoint, metric and restart); 143 on SIGTERM and 130 on Ctrl-C
(the ranks and a local Ray stopped within seconds, the metrics and checkpoints kept for ``--resume``).
docs/design/launch.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import signal
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer
from pydantic import TypeAdapter, ValidationError
from rich.console import Console

from moeplan.orchestrator.budget_guard import guard_problem
from moeplan.orchestrator.errors import DeferredSignals, InputError, RunFailedError
from moeplan.orchestrator.inputs import finite_float
from moeplan.orchestrator.launch_progress import RunProgress
from moeplan.orchestrator.outputs import out_path, strict_json, write_outputs
from moeplan.orchestrator.rank_entry import RankJob, comm_sms, on_cpu
from moeplan.orchestrator.ray_address import ADDRESS_TIMEOUT_S, check_address
from moeplan.simulator.contracts.plan_file import PlanFile, read_plan
from moeplan.simulator.contracts.run_report import PLAN_COPY_NAME, Restart, read_run_report
from moeplan.simulator.contracts.runtime_support import check_plan_for_world, check_run_settings
from moeplan.simulator.spec.errors import first_error_line
from moeplan.simulator.spec.json_input import MAX_FILE_BYTES, open_input, read_json_file

STOPPED_EXIT_CODE = 4
LAUNCH_SETTINGS_NAME = "launch.json"
PLAN_TRACE_NAME = "plan-trace.json"
RAY_LOG_NAME = "ray-driver.log"
FAULT_ENV = "MOEPLAN_TEST_FAULT_AT"  # TEST ONLY: "rank:step" kills that rank once at that step
console = Console(width=140)


def _settings(resume: Path | None, given: dict) -> dict:
    """The launch's settings: ``--resume``'s saved ones, overridden by the options given."""
    saved = {}
    if resume is not None:
        path = resume / LAUNCH_SETTINGS_NAME
        try:
            saved = read_json_file(path)
        except ValueError as exc:
            raise InputError(f"--resume {resume}: no readable {LAUNCH_SETTINGS_NAME} (not a run of moeplan launch: "
                             f"{str(exc)[-200:]})") from None
        if not isinstance(saved, dict):
            raise InputError(f"--resume {resume}: {LAUNCH_SETTINGS_NAME} is {type(saved).__name__}, not an object")
    defaults = {"dtype": None, "budget_guard": "off", "guard_every": 5, "checkpoint_every": 0, "max_failures": 0,
                "steps": None, "kernel_trace": False}
    s = defaults | saved | {k: v for k, v in given.items() if v is not None}
    for name in ("dtype", "budget_guard"):  # a --resume's launch.json may hold anything
        if s[name] is not None and not isinstance(s[name], str):
            raise InputError(f"--{name.replace('_', '-')}={s[name]!r:.80} must be a word")
    if not isinstance(s["kernel_trace"], bool):
        raise InputError(f"--kernel-trace={s['kernel_trace']!r:.80} must be true or false")
    for name, low, high in RANGES:  # before anything is read or imported: a typo fails in milliseconds
        value = s[name]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high):
            raise InputError(f"--{name.replace('_', '-')}={value!r} must be an integer in {low}..{high}")
    return s


MAX_STEPS = 2**40  # as the plan's phases (simulator.spec.training: steps <= 2**40)
RANGES = (("steps", 1, MAX_STEPS), ("guard_every", 1, MAX_STEPS), ("checkpoint_every", 0, MAX_STEPS),
          ("max_failures", 0, 1000))


def _whole_run_steps(plan: PlanFile) -> int:
    pred = plan.predictions
    if pred is None or len(pred.run.phases) != 1:
        raise InputError("--steps is needed: the plan's run has no single-phase prediction to run in full "
                         f"({0 if pred is None else len(pred.run.phases)} phases)")
    return math.ceil(pred.run.phases[0].steps)


def _check_plan(plan: PlanFile, s: dict) -> None:
    """One-line errors for a plan these settings cannot run (before any process starts)."""
    problem = guard_problem(plan, s["budget_guard"], s["guard_every"])  # before torch's import: within a second
    if problem:
        raise InputError(problem)
    if s["max_failures"] < 0:
        raise InputError(f"--max-failures={s['max_failures']} must be >= 0")
    try:  # the ranks' own checks, torch-free: a refusal within a second
        check_plan_for_world(plan, plan.inputs.cluster.num_gpus)
        check_run_settings(s["steps"], min(1, s["steps"] - 1), s["dtype"], s["checkpoint_every"])
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _run_dir(plan_path: Path | None, run_dir: Path | None, resume: Path | None) -> tuple[Path, Path]:
    """(the plan file to read, the run directory)."""
    if resume is not None:
        if run_dir is not None and run_dir != resume:  # before torch is imported: a refusal within a second
            raise InputError(f"--run-dir {run_dir} and --resume {resume}: a resumed run stays in its directory")
        from moeplan.model.runtime.checkpoint import LATEST_NAME, CheckpointError, checkpoints_dir, latest_checkpoint

        _regular_files(resume, [checkpoints_dir(resume) / LATEST_NAME])
        try:
            latest = latest_checkpoint(resume)
        except CheckpointError as exc:
            raise InputError(f"--resume {resume}: {exc}") from None
        if latest is None:
            raise InputError(f"--resume {resume}: the run has no checkpoint (checkpoints/latest) to continue from")
        _regular_files(resume, Path(latest.path).iterdir())
        _check_shards(resume, Path(latest.path))
        _check_restarts(resume)
        return resume / PLAN_COPY_NAME, resume
    if plan_path is None:
        raise InputError("PLAN is needed (or --resume RUN)")
    try:
        out = run_dir if run_dir is not None else (plan_path if plan_path.is_dir() else plan_path.parent) / "run"
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise InputError(f"--run-dir {out}: exists and is not an empty directory (give another, or --resume {out})")
    except OSError as exc:  # a name too long, a folder we may not list
        raise InputError(f"PLAN {str(plan_path)[:200]} / --run-dir {str(run_dir)[:200]}: {exc.strerror}") from None
    return plan_path, out


def _regular_files(resume: Path, paths: Iterable[Path]) -> None:
    """None of ``paths`` is a named pipe, a device or a socket (links followed): one in a run's checkpoint would
    block, or never end, the read that resuming makes of it (folders and missing files are left to the reader)."""
    for path in paths:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:  # a loop of links, a name too long
            raise InputError(f"--resume {resume}: {path}: cannot read ({exc.strerror})") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise InputError(f"--resume {resume}: {path}: not a regular file")


def _check_shards(resume: Path, folder: Path) -> None:
    """The checkpoint's ``.metadata`` (unpickled as data only by the runtime's ``MetadataUnpickler``) and the shard
    files it places items in: each one a plain name in ``folder``, there, and as long as its last item's end (an
    emptied or truncated shard failed in rank 0's load after Ray had started)."""
    from moeplan.model.runtime.checkpoint_reader import MetadataUnpickler

    path = folder / ".metadata"
    try:
        with open_input(path) as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES // 2**20} MiB")
        ends: dict[str, int] = {}
        for info in MetadataUnpickler(io.BytesIO(data)).load().storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    except OSError as exc:
        raise InputError(f"--resume {resume}: {path}: cannot read ({exc.strerror})") from None
    except Exception as exc:  # noqa: BLE001 -- bytes from a run folder: any unpickling failure is bad input
        raise InputError(f"--resume {resume}: {path}: not a checkpoint's metadata ({type(exc).__name__}: "
                         f"{str(exc)[:200]})") from None
    for name, end in sorted(ends.items()):
        shard = folder / str(name)
        size = shard.stat().st_size if Path(str(name)).name == str(name) and shard.is_file() else None
        if size is None or size < end:
            raise InputError(f"--resume {resume}: {shard}: {'missing' if size is None else f'{size} bytes'}, but the "
                             f"checkpoint's metadata places data up to byte {end}")


def _check_restarts(resume: Path) -> None:
    """A resumed run's ``restarts.json``, if any, is a list of ``Restart`` records: rank 0 appends to it when the
    run resumes and the report reads it, so a tampered one is refused here rather than inside a worker."""
    from moeplan.model.runtime.resume import RESTARTS_NAME

    path = resume / RESTARTS_NAME
    if not (path.exists() or path.is_symlink()):
        return
    try:
        data = read_json_file(path)
    except ValueError as exc:
        raise InputError(f"--resume {resume}: {exc}") from None
    try:
        TypeAdapter(list[Restart]).validate_python(data)
    except ValidationError as exc:
        raise InputError(f"--resume {resume}: {RESTARTS_NAME}: {first_error_line(exc)}") from None


def _local_gpus_missing(plan: PlanFile) -> None:
    """Before a local Ray starts: a GPU plan needs this machine's GPUs (Ray would wait for them forever)."""
    if on_cpu(plan):
        return
    import torch

    have = torch.cuda.device_count()
    if have < plan.layout.world:
        raise InputError(f"the plan needs {plan.layout.world} GPUs ({plan.inputs.cluster.gpu.name}) but this machine "
                         f"has {have}: plan with --cluster cpu, or give --address of a Ray cluster with the GPUs")


def _prepare(plan_path: Path, plan: PlanFile, run: Path, s: dict, fresh: bool) -> None:
    """Write the run directory's launch files (a fresh run: the plan's text and its simulated trace), all of
    them or none (``write_outputs``: a kill never leaves a run directory with a plan and no settings)."""
    files = {}
    if fresh:
        from moeplan.simulator.engine.trace import chrome_trace
        from moeplan.simulator.report.run_comparison import resimulated_trace

        source = plan_path / PLAN_COPY_NAME if plan_path.is_dir() else plan_path
        files[run / PLAN_COPY_NAME] = source.read_text()
        events = resimulated_trace(plan)
        if events is not None:
            files[run / PLAN_TRACE_NAME] = strict_json(chrome_trace(events), indent=None)
    files[run / LAUNCH_SETTINGS_NAME] = strict_json(s)
    write_outputs(files)


def _fault_at() -> tuple[int, int] | None:
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        return None
    rank, step = raw.split(":")
    return int(rank), int(step)


def _resources(plan: PlanFile, address: str | None) -> bool:
    """Start or join Ray and check that it can hold the plan (``InputError`` otherwise, Ray shut down);
    True when a local cluster was started here."""
    import ray

    from moeplan.orchestrator.ray_launch import cluster_nodes, missing_resources, start_ray

    on_sigterm = signal.getsignal(signal.SIGTERM)  # ray.init replaces it with sys.exit(15): exit 143, cleaned up
    try:
        started = start_ray(address, num_cpus=max(os.cpu_count() or 1, plan.layout.world) + 1)
    except (ValueError, ConnectionError, TimeoutError) as exc:  # Ray's words for an address it cannot use
        raise InputError(f"--address {address!r:.200}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
                         ) from None
    finally:
        if on_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
    problem = missing_resources(plan, cluster_nodes())
    if problem:
        if started:
            ray.shutdown()
        raise InputError(problem)
    return started


def _execute(plan: PlanFile, run: Path, s: dict, local: bool, resumed: bool, show: bool) -> str | None:
    """Run the ranks in one placement group (restarts included); rank 0's status."""
    from moeplan.model.runtime.worker import Resume, RunConfig
    from moeplan.orchestrator.ray_launch import RankGroup

    config = RunConfig(steps=s["steps"], warmup_steps=min(1, s["steps"] - 1), dtype=s["dtype"],
                       checkpoint_every=s["checkpoint_every"], fault_at=_fault_at(), kernel_trace=s["kernel_trace"],
                       comm_sms=comm_sms(plan))
    g, gpu = plan.inputs.cluster.node.gpus_per_node, not on_cpu(plan)

    def make_job(rank: int, master: str, port: int, places: list, failure) -> RankJob:
        resume = Resume(f"worker failure: {failure[0]}", failure[1]) if failure else \
            Resume("moeplan launch --resume") if resumed else None
        node = places[rank // g * g:(rank // g + 1) * g]
        return RankJob(rank=rank, world=plan.layout.world, run_dir=str(run.resolve()),
                       config=dataclasses.replace(config, resume=resume), guard_policy=s["budget_guard"],
                       guard_every=s["guard_every"], master_addr=master, master_port=port,
                       node_gpus=tuple(p["gpus"][0] for p in node) if gpu else ())

    group = RankGroup.create(plan, local=local)
    # Ray prints worker deaths on stdout from a thread of its own: into RUN/ray-driver.log, so that stdout
    # holds only what the command prints (strict JSON with --json) and a failure stays one line on stderr
    try:
        err = Console(stderr=True)
        err.quiet = not (show and err.is_terminal)  # a bar in a terminal; logs and pipes get the summary line
        progress = RunProgress(plan, run, s["steps"], err)
        with open(run / RAY_LOG_NAME, "a") as log, contextlib.redirect_stdout(log), progress, \
                DeferredSignals() as signals:  # Ctrl-C / SIGTERM: raised at the next poll, then every actor killed
            return group.run(make_job, s["max_failures"], on_poll=lambda: (signals.check(), progress.poll()))
    finally:
        group.close()


def launch_command(
    plan_path: Annotated[Path | None, typer.Argument(metavar="PLAN", help="plan.json or its directory.")] = None,
    steps: Annotated[int | None, typer.Option(help="Steps to run (a rehearsal); default: the whole run.")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Where the run's files go; default PLAN/../run.",
                                                 parser=out_path)] = None,
    address: Annotated[str | None, typer.Option(help="Join a Ray cluster (auto, ray://...); default: start one here.")]
    = None,
    address_timeout_s: Annotated[float, typer.Option(help="How long --address may take to answer as Ray's GCS does.",
                                                     parser=finite_float)] = ADDRESS_TIMEOUT_S,
    budget_guard: Annotated[str | None, typer.Option(help="off, warn or stop when the projected GPU-hours exceed "
                                                          "the plan's budget.")] = None,
    guard_every: Annotated[int | None, typer.Option(help="Project the run every K steps after the warm-up.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint every K steps (0: only at a stop).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory from its latest "
                                                      "checkpoint.", parser=out_path)] = None,
    max_failures: Annotated[int | None, typer.Option(help="Restarts from the last checkpoint after worker "
                                                          "failures.")] = None,
    dtype: Annotated[str | None, typer.Option(help="bf16 or fp32; default: fp32 on a cpu cluster (its cost tables "
                                                    "are FP32's), bf16 on GPUs.")] = None,
    kernel_trace: Annotated[bool, typer.Option("--kernel-trace", help="After the run, one more step under "
                                               "torch.profiler: RUN/traces/rankN-kernels.json, every kernel "
                                               "with its compute node.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the run's summary as JSON.")] = False,
) -> int:
    """Launch a plan through Ray: exit 0 completed, 2 bad input, 4 stopped by the budget guard, 5 failed."""
    given = {"steps": steps, "budget_guard": budget_guard, "guard_every": guard_every,
             "checkpoint_every": checkpoint_every, "max_failures": max_failures, "dtype": dtype,
             "kernel_trace": kernel_trace or None}
    s = _settings(resume, given)
    check_address(address, address_timeout_s)
    source, run = _run_dir(plan_path, run_dir, resume)
    plan = read_plan(source)
    if resume is not None and plan_path is not None and read_plan(plan_path).inputs_sha256 != plan.inputs_sha256:
        raise InputError(f"PLAN {plan_path} is not the plan of the run {resume} (inputs_sha256 differs)")
    s["steps"] = s["steps"] if s["steps"] is not None else _whole_run_steps(plan)
    s["dtype"] = s["dtype"] or ("fp32" if on_cpu(plan) else "bf16")  # the cpu cost tables are FP32's
    _check_plan(plan, s)
    if address is None:
        _local_gpus_missing(plan)
    started = _resources(plan, address)
    try:
        _prepare(source, plan, run, s, fresh=resume is None)
        status = _execute(plan, run, s, local=started or address is None, resumed=resume is not None,
                          show=not json_)
    except RunFailedError:
        from moeplan.orchestrator.launch_report import failed_report

        failed_report(plan, run, s)
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    from moeplan.orchestrator.launch_report import launch_summary

    report = read_run_report(run)
    summary = launch_summary(plan, run, report)
    if json_:
        typer.echo(strict_json(summary))
    else:
        projected = summary["projected_gpu_hours"]
        guard = report.budget_guard
        console.print(f"{report.status}: {summary['steps']} steps, loss {summary['final_loss']:.4f}, median step "
                      f"{1e3 * summary['median_step_s']:.1f} ms, {summary['tokens_per_s_per_gpu']:,.0f} tok/s/GPU")
        console.print(f"whole run projected at {'-' if projected is None else f'{projected:.4g}'} GPU-hours (budget "
                      f"{summary['budget_gpu_hours']})" + (f"; budget guard {guard.action} at step {guard.at_step}"
                                                           if guard.action != "none" else ""))
        console.print(f"compare it with the plan: moeplan check {run}")
    assert status == report.status, f"{status=} {report.status=}"
    return STOPPED_EXIT_CODE if report.status == "stopped" else 0
