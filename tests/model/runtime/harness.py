"""Real multi-process runs for runtime tests: spawn N processes on gloo over 127.0.0.1, run a function
on each rank, collect what each returns (through files, torch.save), and fail with the rank's
traceback when one fails. Also the plans and the single-process reference the tests compare against."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from moeplan.model.balance import BalanceSchedule, ExpertBiasUpdater
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
from moeplan.simulator.spec.training import OptimizerSpec, Phase, TrainingSpec
from tests.model.runtime.spawn import free_port

TIMEOUT_S = 120


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
    except ProcessException as exc:
        errors = "\n".join(p.read_text() for p in sorted(tmp.glob("rank*.err")))
        raise AssertionError(f"a rank failed:\n{errors or exc}") from None
    if not finished:
        for process in ctx.processes:
            process.kill()
        raise AssertionError(f"the {world} ranks did not finish within {TIMEOUT_S} s (a hang)")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def tiny_plan(kind: str, pp: int, dp: int = 1, ep: int = 1, seq_len: int = 16, microbatches: int | None = None,
              spec=None, optimizer: OptimizerSpec | None = None) -> PlanFile:
    """A plan of the tiny model on one node of ``pp * dp`` processes."""
    world = pp * dp
    # a balance loss strong enough that a wrong scale of its gradient shows at the tests' tolerance
    spec = (spec or tiny_moe()).model_copy(update={"aux_loss_alpha": 0.1})
    cluster = h200(1)
    cluster = cluster.model_copy(update={"node": cluster.node.model_copy(update={"gpus_per_node": world})})
    m = microbatches or schedule_kind(kind).smallest_valid(pp, 2 * pp)
    par = ParallelSpec(pp=pp, dp=dp, ep=ep, schedule=kind, micro_batch_size=1, seq_len_tokens=seq_len, microbatches=m)
    training = TrainingSpec(phases=(Phase(name="pretrain", tokens=1e9, global_batch_seqs=dp * m),),
                            optimizer=optimizer or OptimizerSpec())
    return build_plan(PlanInputs(model=spec, cluster=cluster, parallel=par, training=training,
                                 budget=default_recipe().budget))


def reference_step(plan: PlanFile, step: int = 0, seed: int = 0):
    """The single-process model on the same micro-batches (every DP rank's), gradient accumulation of
    the mean loss: (losses [dp][mb], grads by parameter name, tokens routed per layer and expert)."""
    spec, lay = plan.inputs.model, plan.layout
    model = Transformer(spec, ModelOptions(dtype=torch.float32))
    model.init_weights_by_name(seed)
    mtp_weight = BalanceSchedule.from_training(plan.inputs.training).mtp_weight(0.0)
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
    loads = {layer: moe.tokens_per_expert.clone() for layer, moe in model.moe_layers().items()}
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}, loads


def reference_training(plan: PlanFile, steps: int, seed: int = 0) -> list[float]:
    """The single-process model trained ``steps`` steps with ``torch.optim.AdamW`` and
    ``clip_grad_norm_`` at the plan's hyper-parameters (FP32 moments), the plan's MTP weight and the
    aux-loss-free bias update from the whole batch's loads: the mean loss of each step."""
    spec, lay, opt = plan.inputs.model, plan.layout, plan.inputs.training.optimizer
    model = Transformer(spec, ModelOptions(dtype=torch.float32))
    model.init_weights_by_name(seed)
    for moe in model.moe_layers().values():
        moe.balance_loss_scale = 1.0 / lay.microbatches
    adamw = torch.optim.AdamW(model.parameters(), lr=opt.lr.peak_lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                              weight_decay=opt.weight_decay)
    task = SyntheticTask(spec.vocab_size, plan.inputs.parallel.micro_batch_size, plan.inputs.parallel.seq_len_tokens,
                         seed)
    tokens_per_step = lay.dp * lay.microbatches * lay.tokens_per_microbatch
    balance, updater = BalanceSchedule.from_training(plan.inputs.training), ExpertBiasUpdater(model.moe_layers())
    out = []
    for step in range(steps):
        losses, per_replica = [], []
        mtp_weight = balance.mtp_weight(step * tokens_per_step)
        for d in range(lay.dp):  # each replica's sum first, then their mean: the runtime's order of additions
            for m in range(lay.microbatches):
                mb = task.microbatch(step, d, m)
                loss = training_loss(model(mb.input_ids), mb.labels, mtp_weight).total
                (loss / lay.microbatches).backward()
                losses.append(float(loss.detach()))
            per_replica.append([p.grad.clone() for p in model.parameters()])
            model.zero_grad()
        for p, *grads in zip(model.parameters(), *per_replica):
            p.grad = sum(grads[1:], grads[0]) / lay.dp
        if opt.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
        for group in adamw.param_groups:
            group["lr"] = opt.lr.lr_at(step, step * tokens_per_step)
        adamw.step()
        adamw.zero_grad()
        updater.step(balance.gamma(step * tokens_per_step))
        out.append(sum(losses) / len(losses))
    return out
