"""``moeplan calibrate``: micro-benchmarks at the shapes a plan needs, written as a cost-table file.

``--plan PLAN`` takes the shapes from a plan file; otherwise ``--model``/``--cluster``/``--set`` make the
inputs as ``moeplan plan`` does (the layout from ``--set parallel.*``). What is measured and how each entry
is derived: ``orchestrator.calibration`` (``shapes``, ``measure``, ``tables_out``) and
``docs/design/calibration.md``; each measurement is shown on stderr as it runs (``calibration.progress``). The device is the plan's: the CPU for the ``cpu`` cluster (one torch
thread per process, gloo between real processes), else a CUDA GPU (NCCL over the visible GPUs). A shape
that fails is reported and left out; the file is written whole or not at all (``outputs.write_outputs``).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from moeplan.orchestrator.errors import InputError
from moeplan.orchestrator.inputs import build_request
from moeplan.orchestrator.outputs import check_out_file, out_path, strict_json, write_outputs
from moeplan.simulator.accounting.layout import resolve_dp
from moeplan.simulator.contracts.plan_file import read_plan
from moeplan.simulator.costs.tables import CostTables
from moeplan.simulator.spec.inputs import PlanInputs

if TYPE_CHECKING:  # every other command of the CLI imports this module: torch stays out of it
    import torch

console = Console(width=140, stderr=True)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # torch dtypes by name: torch loads only when calibrating


def _inputs(plan: Path | None, model: str | None, cluster: str | None, nodes: int | None,
            sets: list[str]) -> tuple[PlanInputs, int]:
    if plan is not None:
        if model is not None or cluster is not None or nodes is not None or sets:
            raise InputError(f"--plan {plan}: give the plan, or --model/--cluster/--nodes/--set, not both")
        loaded = read_plan(plan)
        return loaded.inputs, loaded.layout.dp
    inputs = build_request(model or "deepseek-v3", cluster or "h800", nodes, sets).inputs
    return inputs, resolve_dp(inputs.parallel, inputs.cluster)


def _device(inputs: PlanInputs) -> torch.device:
    import torch

    if inputs.cluster.gpu.is_cpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError(f"--cluster {inputs.cluster.name}: GPU {inputs.cluster.gpu.name} is calibrated on a CUDA GPU, "
                         "and this machine has none (the cpu cluster calibrates here)")
    return torch.device("cuda", torch.cuda.current_device())


def _summary(tables: CostTables, skipped: list[str]) -> Table:
    table = Table(title=f"cost tables {tables.name!r}")
    for column in ("entry", "measured", "value"):
        table.add_column(column)
    for g in tables.gemm:
        table.add_row("GEMM", f"{g.groups}x{g.m}x{g.n}x{g.k}", f"{g.flops_per_s / 1e9:,.2f} GFLOP/s")
    for a in tables.attention_by_seq:
        table.add_row("attention", f"seq {a.seq_len}", f"fwd {a.fwd_frac:.2%}, fwd+bwd {a.fwd_bwd_frac:.2%} of peak")
    for k in tables.memory_kernels:
        fixed = [f"{name} {s * 1e6:,.1f} us" for name, s in (("fwd", k.fwd_fixed_s), ("bwd", k.bwd_fixed_s)) if s]
        table.add_row("memory class", k.kernel, f"fwd {k.fwd_frac:.2%}" + (f", bwd {k.bwd_frac:.2%}" if k.bwd_frac else "")
                      + (f" of hbm + {', '.join(fixed)} a call" if fixed else ""))
    if tables.host is not None:
        h = tables.host
        table.add_row("host per op", h.mode, ", ".join(f"{c} {h.op_s(c) * 1e6:.2f} us"
                                                        for c in ("fwd_compute", "fwd_view", "bwd")))
        for c in h.counts:
            f, b = h.seconds(c.piece)
            table.add_row("host ops", c.piece, f"{c.fwd_compute + c.fwd_view} fwd, {c.bwd} bwd: "
                                               f"{f * 1e6:,.0f} + {b * 1e6:,.0f} us per micro-batch")
    for b in tables.compute_beside_comm:
        table.add_row("GEMM beside comm", f"{b.m}x{b.n}x{b.k}, {b.comm_sms} of {b.sm_count} SMs",
                      f"{b.beside_s / b.alone_s:.2f}x alone, {b.interference_frac:+.1%} beyond waves")
    for f in tables.links:
        table.add_row("link", f"{f.collective} x{f.processes}", f"{f.latency_s * 1e6:,.1f} us + {f.bytes_per_s / 1e9:.3f} GB/s")
    for s in skipped:
        table.add_row("[bold red]skipped[/]", s, "")
    return table


@contextmanager
def _children_killed_on_signal() -> Iterator[None]:
    """SIGINT and SIGTERM kill the measuring processes first, then do what they did before (raise
    ``KeyboardInterrupt`` or ``Terminated``): a measurement's own cleanup waits for its processes (the gloo pair
    of ``calibration.beside`` is joined for up to 10 s each), and processes still starting or waiting for a
    peer that never came would hold the command that long. Main thread only (else a no-op)."""
    import multiprocessing

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def kill_then_raise(signum: int, frame: Any) -> None:
        for child in multiprocessing.active_children():
            with suppress(OSError):
                child.kill()
        previous[signum](signum, frame)

    handled = [s for s, handler in previous.items() if callable(handler)]  # an ignored signal stays ignored
    for s in handled:
        signal.signal(s, kill_then_raise)
    try:
        yield
    finally:
        for s in handled:
            signal.signal(s, previous[s])


def _stop_children(grace_s: float = 2.0) -> None:
    """Terminate the processes measuring collectives (``calibration.links``), then kill what outlives ``grace_s``."""
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(grace_s)
        if child.is_alive():
            child.kill()
            child.join()


def calibrate_command(
    out: Annotated[Path, typer.Option(help="The cost-table JSON to write (for `plan --calibration`).", parser=out_path)],
    plan: Annotated[Path | None, typer.Option(help="Measure at this plan's shapes.")] = None,
    model: Annotated[str | None, typer.Option(help="Model preset or HF config.json (without --plan).")] = None,
    cluster: Annotated[str | None, typer.Option(help="Cluster preset (without --plan).")] = None,
    nodes: Annotated[int | None, typer.Option(help="Nodes (without --plan).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a setting, a.b=value (without --plan).")] = None,
    reps: Annotated[int, typer.Option(help="Timed repetitions per measurement (median; fewer past 1 s).")] = 10,
    threads: Annotated[int, typer.Option(help="torch threads per process (CPU; the runtime's ranks run 1).")] = 1,
    dtype: Annotated[str, typer.Option(help="fp32 or bf16: what the plan's non-FP8 precision runs in (CPU).")] = "fp32",
    name: Annotated[str, typer.Option(help="The tables' name.")] = "calibrated",
    json_: Annotated[bool, typer.Option("--json", help="Print the tables as JSON too.")] = False,
) -> None:
    """Measure GEMMs, attention, memory-bound kernels, the host's per-op cost and collectives at a plan's shapes."""
    if not 1 <= reps <= 10_000:
        raise InputError(f"--reps={reps} must be in 1..10000")
    if not 1 <= threads <= 1024:
        raise InputError(f"--threads={threads} must be in 1..1024")
    if dtype not in DTYPES:
        raise InputError(f"--dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    check_out_file(out, "--out")
    inputs, dp = _inputs(plan, model, cluster, nodes, set_ or [])
    device = _device(inputs)
    import torch

    from moeplan.orchestrator.calibration.machine_info import load_average, machine_facts
    from moeplan.orchestrator.calibration.measure import Setup, measure_all
    from moeplan.orchestrator.calibration.progress import ProgressLines
    from moeplan.orchestrator.calibration.shapes import plan_shapes
    from moeplan.orchestrator.calibration.tables_out import CalibrationError, calibrated_tables, machine_record, now

    gpus = machine_facts()["cores"] if device.type == "cpu" else torch.cuda.device_count()
    shapes = plan_shapes(inputs, dp, max(2, gpus))
    label = f"[CAL] moeplan calibrate {now()}"
    setup = Setup(spec=inputs.model, device=device, dtype=getattr(torch, DTYPES[dtype]) if device.type == "cpu" else torch.bfloat16,
                  reps=reps, threads=threads, backend="gloo" if device.type == "cpu" else "nccl", label=label,
                  optimizer=inputs.training.optimizer)
    before, threads_before = load_average(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _children_killed_on_signal(), ProgressLines(console) as progress:
            measured = measure_all(shapes, setup, inputs.cluster.gpu.hbm_bytes_per_s, progress)
    except BaseException:  # SIGTERM or Ctrl-C: the collectives' processes go too, before their queue does
        _stop_children()
        raise
    finally:
        torch.set_num_threads(threads_before)
    command = "moeplan calibrate " + (f"--plan {plan}" if plan else f"--model {model} --cluster {cluster}")
    machine = machine_record(measured, setup, inputs.cluster.gpu, command, before)
    try:
        tables = calibrated_tables(name, measured, setup, inputs.cluster.gpu, machine)
    except CalibrationError as exc:
        raise InputError(str(exc)) from None
    text = strict_json(tables.model_dump(mode="json"), indent=1) + "\n"
    write_outputs({out: text})
    console.print(_summary(tables, measured.skipped))
    if json_:
        typer.echo(text)
    console.print(f"wrote {out} ({len(measured.skipped)} skipped)")
