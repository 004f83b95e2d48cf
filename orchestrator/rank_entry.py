"""What one rank runs inside its Ray actor: join the process group, train the plan, leave.

``RankJob`` is all a rank is given (picklable, no Ray in it): the run directory (the plan is read from
``RUN/plan.json``: the plan is the contract), the worker's ``RunConfig``, the budget guard's policy and
interval, the rendezvous (rank 0's address and a free port) and, on GPUs, the node's GPU ids, which
every rank of the node sees (``CUDA_VISIBLE_DEVICES`` shared, as Ray Train does, so NCCL can use
NVLink between local ranks), each rank using its own. gloo on CPU, NCCL on GPU; a short collective
timeout (``timeout_s``) so that ranks blocked on a dead peer give up instead of waiting 30 minutes.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from pathlib import Path

from moeplan.simulator.contracts.plan_file import PlanFile
from moeplan.simulator.contracts.run_report import PLAN_COPY_NAME


def on_cpu(plan: PlanFile) -> bool:
    """A ``cpu`` cluster plan (its "GPUs" are processes): ``GpuSpec.is_cpu``, the cost tables' own test."""
    return plan.inputs.cluster.gpu.is_cpu


def comm_sms(plan: PlanFile) -> int:
    """The SMs the plan gives the expert all-to-all's kernels, which the ranks' expert-parallel NCCL groups may then
    hold (``RunConfig.comm_sms``): ``engine.build.comm_sms`` of the plan's named cost tables, or of the GPU's default
    tables where this machine lacks the named ones (a calibration file's); 0 without expert parallelism."""
    from moeplan.simulator.costs.tables import default_tables, plan_named_tables
    from moeplan.simulator.engine.build import comm_sms as tables_comm_sms

    gpu = plan.inputs.cluster.gpu.name
    named = plan_named_tables(plan.predictions.cost_tables, gpu) if plan.predictions is not None else None
    return tables_comm_sms(plan.inputs, named or default_tables(gpu))


@dataclasses.dataclass(frozen=True)
class RankJob:
    rank: int
    world: int
    run_dir: str
    config: object  # model.runtime.worker.RunConfig (imported in the actor: torch stays out of the driver's pickle)
    guard_policy: str = "off"
    guard_every: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    node_gpus: tuple[str, ...] = ()  # GPU ids of this rank's node, in rank order; empty on CPU
    timeout_s: float = 300.0


def run_rank(job: RankJob) -> str | None:
    """Train ``job.rank``; rank 0 returns the run's status ("completed" / "stopped"), others None."""
    os.environ.update(MASTER_ADDR=job.master_addr, MASTER_PORT=str(job.master_port))
    if job.node_gpus:  # before CUDA initialises
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(job.node_gpus)
    import torch
    import torch.distributed as dist

    from moeplan.model.runtime.worker import train
    from moeplan.orchestrator.budget_guard import BudgetGuardObserver
    from moeplan.simulator.contracts.plan_file import read_plan

    device = None
    if job.node_gpus:
        device = torch.device("cuda", job.rank % len(job.node_gpus))
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if job.node_gpus else "gloo", rank=job.rank, world_size=job.world,
                            timeout=timedelta(seconds=job.timeout_s), device_id=device)
    try:
        run_dir = Path(job.run_dir)
        plan = read_plan(run_dir / PLAN_COPY_NAME)
        observer = None
        if job.rank == 0 and job.guard_policy != "off":
            observer = BudgetGuardObserver(plan, job.guard_policy, job.guard_every, job.config.warmup_steps)
        report = train(plan, run_dir, job.config, job.rank, device=device or torch.device("cpu"), observer=observer)
        return report.status if report is not None else None
    finally:
        dist.destroy_process_group()
