"""One rank of a plan, built and stepped: stages, groups, executor, gradient synchronisation.

``RankRuntime.create(plan, rank, options)`` runs inside an initialised default process group whose
world is the plan's. It checks the plan against the processes before building anything, forms every
process group the layout implies (``groups``/``dist_groups``), builds the stages this rank's pipeline
position holds (``model.stage.rank_stages_from_plan``: the plan's split, the one that was priced),
initialises them by parameter name (``Transformer.init_weights_by_name``: the same weights as the single-process model), and
lowers the plan's schedule for this rank (``simulator.schedules.lowering``).

``forward_backward(step)`` runs the schedule once on this rank's data-parallel share of the batch;
``sync_gradients()`` then makes every gradient the whole batch's mean:
- a stage held by two pipeline ranks (DualPipe's r and pp-1-r) sums its two copies' gradients;
- an embedding used by both the first stage and the MTP modules of a head stage on another rank
  sums its two gradients (the tie Megatron keeps in its embedding group);
- data parallelism averages over the pipeline rank's ``stage`` group (``optimizer`` shards this as
  ZeRO-1's reduce-scatter).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist
from torch import nn

from moeplan.model.losses import training_loss
from moeplan.model.options import ModelOptions
from moeplan.model.runtime.data import SyntheticTask
from moeplan.model.runtime.dist_groups import RankGroups, new_groups
from moeplan.model.runtime.executor import Microbatch, PipelineExecutor, StepResult, Timeline
from moeplan.model.runtime.groups import ProcessGroups, process_groups
from moeplan.model.stage import rank_stages_from_plan
from moeplan.model.transformer import build_rank
from moeplan.simulator.contracts.plan_file import PlanFile
from moeplan.simulator.schedules.lowering import lower

log = logging.getLogger(__name__)


class PlanRuntimeError(ValueError):
    """A plan the runtime cannot execute on the processes given (one line, names the field)."""


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How a rank runs the plan: parameter dtype (fp32 for exact CPU tests), seed of weights and data,
    the balance loss's ``mtp_weight``."""

    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    mtp_weight: float = 0.3
    expert_backend: str = "auto"


def check_plan_for_world(plan: PlanFile, world: int) -> None:
    """One-line errors for a plan the runtime cannot run on ``world`` processes (before any group forms)."""
    lay = plan.layout
    if lay.world != world:
        raise PlanRuntimeError(f"layout.world={lay.world} but {world} processes were given")
    if plan.schedule is None:
        raise PlanRuntimeError("plan.schedule is null: re-run `moeplan plan` to write the schedule")
    if lay.cp != 1:
        raise PlanRuntimeError(f"layout.cp={lay.cp}: the runtime does not run context parallelism yet (cp must be 1)")


@dataclasses.dataclass
class RankRuntime:
    plan: PlanFile
    rank: int
    groups: ProcessGroups
    handles: RankGroups
    modules: dict[int, nn.Module]
    executor: PipelineExecutor
    task: SyntheticTask
    device: torch.device
    embedding_group: dist.ProcessGroup | None

    @classmethod
    def create(cls, plan: PlanFile, rank: int, options: RuntimeOptions, device: torch.device | None = None,
               backend: str | None = None) -> RankRuntime:
        check_plan_for_world(plan, dist.get_world_size())
        device = device or torch.device("cpu")
        spec, lay, par = plan.inputs.model, plan.layout, plan.inputs.parallel
        pg = process_groups(lay, plan.inputs.cluster.node.gpus_per_node)
        handles = new_groups(pg, rank, backend)
        pp_rank = pg.coords(rank).pp_rank
        model_options = ModelOptions(dtype=options.dtype, expert_backend=options.expert_backend)
        stages = rank_stages_from_plan(lay, spec, pp_rank)
        with torch.device(device):
            built = build_rank(spec, stages, model_options)
        modules = dict(zip(lay.rank_stages[pp_rank], built, strict=True))
        for module in {id(m): m for m in built}.values():
            module.init_weights_by_name(options.seed)
            for moe in module.moe_layers().values():
                moe.balance_loss_scale = 1.0 / (lay.microbatches * pg.dp)
        program = lower(plan.schedule).programs[pp_rank]
        shape = (par.micro_batch_size, par.seq_len_tokens // lay.cp, spec.hidden_size)

        def loss_fn(out, mb: Microbatch) -> torch.Tensor:
            return training_loss(out, mb.labels.to(device), options.mtp_weight).total

        executor = PipelineExecutor(program, lay.stages, lay.microbatches, modules, handles.ranks["pp"], shape,
                                    options.dtype, device, loss_fn, group=handles["pp"])
        task = SyntheticTask(spec.vocab_size, par.micro_batch_size, par.seq_len_tokens, options.seed)
        return cls(plan, rank, pg, handles, modules, executor, task, device, _embedding_group(pg, lay, rank))

    # ---- a step -----------------------------------------------------------------------------------

    def microbatches(self, step: int) -> dict[int, Microbatch]:
        dp_rank = self.groups.coords(self.rank).dp_rank
        return {m: self.task.microbatch(step, dp_rank, m) for m in range(self.plan.layout.microbatches)}

    def forward_backward(self, step: int, timeline: Timeline | None = None) -> StepResult:
        for module in self.unique_modules():
            module.train()
        timeline = timeline or Timeline(self.rank, cuda=self.device.type == "cuda")
        return self.executor.step(self.microbatches(step), timeline)

    def unique_modules(self) -> list[nn.Module]:
        return list({id(m): m for m in self.modules.values()}.values())

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """Parameter name (the whole model's) -> parameter, each shared tensor once."""
        out: dict[str, nn.Parameter] = {}
        for module in self.unique_modules():
            for name, param in module.named_parameters():
                out.setdefault(name, param)
        return out

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Sum mirrored stages' and the tied embedding's gradients, then average over data parallelism."""
        params = self.named_parameters()
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
        for name, param in params.items():
            param.grad = grads[name]
        if self.handles["mirror"] is not None:
            for name in sorted(grads):
                dist.all_reduce(grads[name], group=self.handles["mirror"])
        if self.embedding_group is not None and "embed_tokens.weight" in grads:
            dist.all_reduce(grads["embed_tokens.weight"], group=self.embedding_group)
        if self.groups.dp * self.groups.cp > 1:
            for name in sorted(grads):
                dist.all_reduce(grads[name], group=self.handles["stage"])
                grads[name].div_(self.groups.dp * self.groups.cp)


def _embedding_group(pg: ProcessGroups, layout, rank: int) -> dist.ProcessGroup | None:
    """Per (dp, cp) position, the pipeline ranks holding an ``embed_tokens`` copy when there are two
    (the first stage's and a head stage's MTP embedding on another rank); created collectively."""
    holders = [p for p, stages in enumerate(layout.rank_stages) if 0 in stages or layout.stages - 1 in stages]
    first = [p for p, stages in enumerate(layout.rank_stages) if 0 in stages]
    last = [p for p, stages in enumerate(layout.rank_stages) if layout.stages - 1 in stages]
    if set(first) == set(last):  # every copy is the shared object on one rank (or mirrors: summed there)
        return None
    mine = None
    for pp_ranks in pg.pp_groups:
        group = dist.new_group([pp_ranks[p] for p in holders])
        if rank in (pp_ranks[p] for p in holders):
            mine = group
    return mine
