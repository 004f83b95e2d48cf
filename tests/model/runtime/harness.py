"""Real multi-process runs for runtime tests: spawn N processes on gloo over 127.0.0.1, run a function
on each rank, collect what each returns (through files, torch.save), and fail with the rank's
traceback when one fails. Also the plans and the single-process reference the tests compare against."""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeplan.model.losses import training_loss
from moeplan.model.options import ModelOptions
from moeplan.model.runtime.data import SyntheticTask
from moeplan.model.transformer import Transformer
from moeplan.simulator.contracts.plan_file import PlanFile, PlanInputs
from moeplan.simulator.planning.planner import build_plan
from moeplan.simulator.presets.clusters import h200
from moeplan.simulator.presets.models import tiny_moe
from moeplan.simulator.presets.recipes import default_recipe
from moeplan.simulator.schedules import schedule_kind
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import Phase, TrainingSpec

TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, *args)
        dist.barrier()
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn: Callable, *args, tmp: Path) -> list:
    """``fn(rank, *args)`` on ``world`` spawned gloo processes; returns each rank's result."""
    tmp.mkdir(parents=True, exist_ok=True)
    # Spawned children unpickle ``fn`` by module name (``tests.*``) and take the parent's sys.path: the
    # repository root goes on its end (never the front: it would shadow Hugging Face's ``kernels``),
    # only while the children start.
    root = str(Path(__file__).resolve().parents[3])
    sys.path.append(root)
    try:
        ctx = mp.spawn(_entry, args=(world, free_port(), str(tmp), fn, args), nprocs=world, join=False)
    finally:
        sys.path.remove(root)
    deadline = time.monotonic() + TIMEOUT_S
    try:  # join returns as each process ends: False while some still run
        finished = False
        while not finished and time.monotonic() < deadline:
            finished = ctx.join(timeout=max(0.1, deadline - time.monotonic()))
    except mp.ProcessException as exc:
        errors = "\n".join(p.read_text() for p in sorted(tmp.glob("rank*.err")))
        raise AssertionError(f"a rank failed:\n{errors or exc}") from None
    if not finished:
        for process in ctx.processes:
            process.kill()
        raise AssertionError(f"the {world} ranks did not finish within {TIMEOUT_S} s (a hang)")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def tiny_plan(kind: str, pp: int, dp: int = 1, ep: int = 1, seq_len: int = 16, microbatches: int | None = None,
              spec=None) -> PlanFile:
    """A plan of the tiny model on one node of ``pp * dp`` processes."""
    world = pp * dp
    cluster = h200(1)
    cluster = cluster.model_copy(update={"node": cluster.node.model_copy(update={"gpus_per_node": world})})
    m = microbatches or schedule_kind(kind).smallest_valid(pp, 2 * pp)
    par = ParallelSpec(pp=pp, dp=dp, ep=ep, schedule=kind, micro_batch_size=1, seq_len_tokens=seq_len, microbatches=m)
    training = TrainingSpec(phases=(Phase(name="pretrain", tokens=1e9, global_batch_seqs=dp * m),))
    return build_plan(PlanInputs(model=spec or tiny_moe(), cluster=cluster, parallel=par, training=training,
                                 budget=default_recipe().budget))


def reference_step(plan: PlanFile, step: int = 0, seed: int = 0, mtp_weight: float = 0.3):
    """The single-process model on the same micro-batches (every DP rank's), gradient accumulation of
    the mean loss: (losses [dp][mb], grads by parameter name)."""
    spec, lay = plan.inputs.model, plan.layout
    model = Transformer(spec, ModelOptions(dtype=torch.float32))
    model.init_weights_by_name(seed)
    total = lay.microbatches * lay.dp
    for moe in model.moe_layers().values():
        moe.balance_loss_scale = 1.0 / total
    task = SyntheticTask(spec.vocab_size, plan.inputs.parallel.micro_batch_size, plan.inputs.parallel.seq_len_tokens,
                         seed)
    losses = []
    for d in range(lay.dp):
        row = []
        for m in range(lay.microbatches):
            mb = task.microbatch(step, d, m)
            loss = training_loss(model(mb.input_ids), mb.labels, mtp_weight).total
            (loss / total).backward()
            row.append(float(loss.detach()))
        losses.append(row)
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}
