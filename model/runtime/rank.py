"""One rank of a plan, built and stepped: stages, groups, executor, gradient synchronisation.

``RankRuntime.create(plan, rank, options)`` runs inside an initialised default process group whose
world is the plan's. It checks the plan against the processes before building anything, forms every
process group the layout implies (``groups``/``dist_groups``), builds the stages this rank's pipeline
position holds (``model.stage.rank_stages_from_plan``: the plan's split, the one that was priced),
initialises them by parameter name (``Transformer.init_weights_by_name``: the same weights as the single-process model), and
lowers the plan's schedule for this rank (``simulator.schedules.lowering``).

Gradients accumulate in FP32 main-gradient buffers (``main_grad``), one per parameter set.
``forward_backward(step)`` runs the schedule once on this rank's data-parallel share of the batch;
``sync_gradients()`` then sums the copies the pipeline keeps of one parameter:
- a stage held by two pipeline ranks (DualPipe's r and pp-1-r) sums its two copies' gradients;
- an embedding used by both the first stage and the MTP modules of a head stage on another rank
  sums its two gradients (the tie Megatron keeps in its embedding group);
and ``optimizer_step()`` takes the ZeRO-1 AdamW step (``optimizer``): data-parallel mean by
reduce-scatter, global norm (each element counted once: a mirror pair's lower rank and the first
stage's embedding count), clipping, AdamW on the shard, all-gather.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch import nn

from moeplan.model.balance import BalanceSchedule, ExpertBiasUpdater
from moeplan.model.fp8 import clear_fp8_weight_cache
from moeplan.model.load_record import LoadAccumulator
from moeplan.model.losses import training_loss
from moeplan.model.options import ModelOptions
from moeplan.model.runtime.balancing import balance_step
from moeplan.model.runtime.data import SyntheticTask
from moeplan.model.runtime.dist_groups import RankGroups, new_groups
from moeplan.model.runtime.ep_slots import SlotMap
from moeplan.model.runtime.executor import Microbatch, PipelineExecutor, StepResult, Timeline
from moeplan.model.runtime.expert_parallel import ExpertParallelMoE, sync_replica_grads
from moeplan.model.runtime.groups import ProcessGroups, process_groups
from moeplan.model.runtime.main_grad import MainGrads, attach_main_grads
from moeplan.model.runtime.optimizer import ShardedParams, StepStats, ZeroAdamW, part_marker
from moeplan.model.stage import rank_stages_from_plan
from moeplan.model.transformer import build_rank
from moeplan.model.weight_grad import attach_expert_wgrad_batches
from moeplan.simulator.contracts.plan_file import PlanFile
from moeplan.simulator.contracts.runtime_support import PlanRuntimeError, check_plan_for_world  # noqa: F401 (re-exported)
from moeplan.simulator.schedules.lowering import lower

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How a rank runs the plan: parameter dtype (fp32 for exact CPU tests), seed of weights and data.
    Everything else (hyper-parameters, MTP weight, gamma) is the plan's."""

    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    expert_backend: str = "auto"
    fuse_memory_bound: bool = False  # model.fused on CUDA even when the plan's training.kernels.fusion is eager
    # SMs each expert-parallel NCCL group's collectives may hold (NCCL's maxCTAs; ``dist_groups.new_groups``): the
    # plan's communication SMs, which the launcher reads from its cost tables (``orchestrator.rank_entry.comm_sms``);
    # 0: NCCL's own choice
    comm_sms: int = 0


def model_options_for(plan: PlanFile, options: RuntimeOptions, device: torch.device) -> ModelOptions:
    """The model the plan's precision asks for. FP8 (TR §3.3: forward, Dgrad and Wgrad GEMMs in FP8 with
    fine-grained scales) runs our kernels on a GPU; on CPU it runs the reference FP8 path (quantise,
    dequantise, matmul), the same numbers without the kernels' speed. Dense weights are ``options.dtype``.
    ``training.kernels.fusion = fused`` (the plan priced fused memory-bound kernels) runs ``model.fused``'s
    compiled RMSNorm, RoPE and SwiGLU; they compile only on CUDA and run eager elsewhere."""
    fuse = options.fuse_memory_bound or plan.inputs.training.kernels.fusion == "fused"
    if plan.inputs.training.precision != "fp8" or options.dtype == torch.float32:  # fp32: exact rehearsals
        return ModelOptions(dtype=options.dtype, expert_backend=options.expert_backend, fuse_memory_bound=fuse)
    return ModelOptions(dtype=options.dtype, linear_precision="fp8", expert_backend="fp8",
                        fp8_kernel="kernels" if device.type == "cuda" else "reference", fp8_backward=True,
                        fuse_memory_bound=fuse)


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
    main_grads: MainGrads
    optimizer: ZeroAdamW
    balance: BalanceSchedule
    bias_updater: ExpertBiasUpdater
    progress: dict
    loads: LoadAccumulator = dataclasses.field(default_factory=LoadAccumulator)  # whole-batch expert loads
    _prefetched: tuple[int, Future] | None = dataclasses.field(default=None, repr=False)
    _data_thread: ThreadPoolExecutor | None = dataclasses.field(default=None, repr=False)

    def expert_loads(self) -> dict[int, torch.Tensor]:
        """Every MoE layer's routed tokens per logical expert over the steps so far, the whole job's (all
        ranks call it: each pipeline rank's layers are gathered)."""
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.loads.totals)
        return {layer: load for part in gathered for layer, load in part.items()}

    @classmethod
    def create(cls, plan: PlanFile, rank: int, options: RuntimeOptions, device: torch.device | None = None,
               backend: str | None = None) -> RankRuntime:
        check_plan_for_world(plan, dist.get_world_size())
        device = device or torch.device("cpu")
        spec, lay, par = plan.inputs.model, plan.layout, plan.inputs.parallel
        pg = process_groups(lay, plan.inputs.cluster.node.gpus_per_node)
        handles = new_groups(pg, rank, backend, max_ctas={"ep": options.comm_sms})
        pp_rank = pg.coords(rank).pp_rank
        model_options = model_options_for(plan, options, device)
        stages = rank_stages_from_plan(lay, spec, pp_rank)
        with torch.device(device):
            built = build_rank(spec, stages, model_options)
        modules = dict(zip(lay.rank_stages[pp_rank], built, strict=True))
        for module in _unique(built):
            module.init_weights_by_name(options.seed)
            if lay.ep > 1:
                _expert_parallel(module, plan, handles["ep"])
            # FP8 expert Wgrads of that many micro-batches as one launch; the executor flushes them each step
            attach_expert_wgrad_batches(module, plan.inputs.training.kernels.expert_wgrad_batch)
            for moe in module.moe_layers().values():
                moe.balance_loss_scale = 1.0 / lay.microbatches  # as the main loss: the DP mean is ZeRO's
        program = lower(plan.schedule).programs[pp_rank]
        shape = (par.micro_batch_size, par.seq_len_tokens // lay.cp, spec.hidden_size)
        balance = BalanceSchedule.from_training(plan.inputs.training)
        progress = {"tokens_seen": 0.0}  # the loss's MTP weight follows the plan's schedule in tokens
        # training.kernels.loss = fused: the Triton cross-entropy the plan priced; elsewhere the chunked one
        fused_loss = plan.inputs.training.kernels.loss == "fused" and device.type == "cuda"

        def loss_fn(out, mb: Microbatch) -> torch.Tensor:
            return training_loss(out, mb.labels.to(device), balance.mtp_weight(progress["tokens_seen"]),
                                 fused_loss).total

        executor = PipelineExecutor(program, lay.stages, lay.microbatches, modules, handles.ranks["pp"], shape,
                                    options.dtype, device, loss_fn, group=handles["pp"])
        task = SyntheticTask(spec.vocab_size, par.micro_batch_size, par.seq_len_tokens, options.seed)
        embedding_group = _embedding_group(pg, lay, rank)
        main_grads, optimizer = _optimizer(plan, pg, handles, rank, _named_parameters(built), embedding_group)
        return cls(plan, rank, pg, handles, modules, executor, task, device, embedding_group, main_grads, optimizer,
                   balance, ExpertBiasUpdater(_moe_layers(built)), progress)

    # ---- a step -----------------------------------------------------------------------------------

    def microbatches(self, step: int) -> dict[int, Microbatch]:
        """This rank's micro-batches of ``step``: the ones ``prefetch`` started, or made now."""
        ready, self._prefetched = self._prefetched, None
        if ready is not None and ready[0] == step:
            return ready[1].result()
        return self._make_microbatches(step)

    def prefetch(self, step: int) -> None:
        """Start making ``step``'s micro-batches on a host thread (torch's CPU ops release the GIL), so that the
        main thread keeps the GPU fed: made in line they left the GPU idle ~25 ms a step on an H100 host."""
        if self._data_thread is None:
            self._data_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeplan-data")
        self._prefetched = (step, self._data_thread.submit(self._make_microbatches, step))

    def _make_microbatches(self, step: int) -> dict[int, Microbatch]:
        dp_rank = self.groups.coords(self.rank).dp_rank
        return {m: self.task.microbatch(step, dp_rank, m) for m in range(self.plan.layout.microbatches)}

    def forward_backward(self, step: int, timeline: Timeline | None = None) -> StepResult:
        """One step's forward and backward passes; the next step's micro-batches are made meanwhile."""
        for module in self.unique_modules():
            module.train()
        timeline = timeline or Timeline(self.rank, cuda=self.device.type == "cuda")
        batches = self.microbatches(step)
        self.prefetch(step + 1)
        return self.executor.step(batches, timeline)

    def sync_gradients(self) -> None:
        """Sum the main gradients of parameters held twice: replicas of one expert in the EP group
        (redundant experts), mirrored stages, the tied embedding."""
        for moe in self.moe_layers().values():
            if isinstance(moe, ExpertParallelMoE):
                sync_replica_grads(moe)
        if self.handles["mirror"] is not None:
            for bucket in self.main_grads.buckets:
                dist.all_reduce(bucket.data, group=self.handles["mirror"])
        if self.embedding_group is not None:
            embed = self.named_parameters().get("embed_tokens.weight")
            if embed is not None:
                dist.all_reduce(embed.main_grad, group=self.embedding_group)

    @property
    def tokens_per_step(self) -> int:
        lay = self.plan.layout
        return lay.dp * lay.microbatches * lay.tokens_per_microbatch

    def optimizer_step(self, timeline: Timeline | None = None) -> StepStats:
        """Pipeline sums, the ZeRO-1 AdamW step at this step's learning rate (main grads zeroed), then the
        aux-loss-free bias update from the whole batch's expert loads (TR §2.1.2). Timed part by part, as the
        simulator prices it (``simulator.costs.optimizer_step``): ``"optimizer norm"`` (with the pipeline
        sums and the reduce-scatter before it), ``"optimizer update"``, ``"optimizer zero"``, ``"optimizer
        other"`` (the bias update)."""
        mark = part_marker(timeline, "optimizer")
        self.sync_gradients()
        tokens_seen = self.progress["tokens_seen"]
        stats = self.optimizer.step(tokens_seen=tokens_seen, mark=mark)
        clear_fp8_weight_cache()  # the weights changed: next step's FP8 copies are made afresh
        mirror = self.handles["mirror"]
        loads = balance_step(self.bias_updater, self.balance, tokens_seen, group=self.handles["stage"],
                             more_groups=(mirror,) if mirror is not None else ())
        self.loads.add(stats.step, loads)
        self.progress["tokens_seen"] = tokens_seen + self.tokens_per_step
        mark("other")
        return stats

    def moe_layers(self) -> dict[int, nn.Module]:
        return _moe_layers(self.modules.values())

    def unique_modules(self) -> list[nn.Module]:
        return _unique(self.modules.values())

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """Parameter name (the whole model's) -> parameter, each shared tensor once."""
        return _named_parameters(self.modules.values())


def _unique(modules) -> list[nn.Module]:
    """Each module once, in order (a module listed under two stage ids counts once)."""
    return list({id(m): m for m in modules}.values())


def _named_parameters(modules) -> dict[str, nn.Parameter]:
    out: dict[str, nn.Parameter] = {}
    for module in _unique(modules):
        for name, param in module.named_parameters():
            out.setdefault(name, param)
    return out


def _moe_layers(modules) -> dict[int, nn.Module]:
    return {i: moe for m in _unique(modules) for i, moe in m.moe_layers().items()}


def _optimizer(plan: PlanFile, pg: ProcessGroups, handles: RankGroups, rank: int, params: dict[str, nn.Parameter],
               embedding_group: dist.ProcessGroup | None) -> tuple[MainGrads, ZeroAdamW]:
    """FP32 main grads over this rank's parameters and the ZeRO-1 AdamW that shards them over the pipeline
    rank's ``stage`` group (dp x cp). Parameters the pipeline holds twice count once in the norm: a mirror
    pair's copy on the higher rank, and the head stage's copy of a tied embedding, stay out of it."""
    pp_rank = pg.coords(rank).pp_rank
    mirror = handles.ranks["mirror"]
    counted = mirror is None or rank == min(mirror)
    outside = {"embed_tokens.weight"} if embedding_group is not None and 0 not in plan.layout.rank_stages[pp_rank] \
        else set()
    inner = pg.dp * pg.cp
    experts = {n for n in params if ".mlp.experts." in n} if plan.layout.ep > 1 else set()
    dense = attach_main_grads([p for n, p in params.items() if n not in outside | experts], pad_multiple=inner)
    sets = [ShardedParams(dense, group=handles["stage"], in_norm=counted)]
    if outside:
        tied = attach_main_grads([params[n] for n in sorted(outside)], pad_multiple=inner)
        sets.append(ShardedParams(tied, group=handles["stage"], in_norm=False))
    if experts:  # this rank's slots: replicated over expert_dp; their gradients already hold the EP group's tokens
        slots = attach_main_grads([params[n] for n in params if n in experts],
                                  pad_multiple=len(handles.ranks["expert_dp"]))
        sets.append(ShardedParams(slots, group=handles["expert_dp"], grad_divisor=inner, in_norm=counted))
    return MainGrads.join(*(s.main_grads for s in sets)), ZeroAdamW(sets, plan.inputs.training.optimizer)


def _expert_parallel(module: nn.Module, plan: PlanFile, group: dist.ProcessGroup) -> None:
    """Swap every MoE layer of ``module`` for its expert-parallel form over ``group``: this rank keeps the
    experts of its slots in the plan's placement (EPLB ``phy2log``, redundant replicas included), or
    contiguous experts when the plan has no placement."""
    owners = list(module.layers.values()) + list(getattr(module, "mtp", []))
    for owner in owners:
        if not hasattr(owner.mlp, "gate"):
            continue
        slots = SlotMap.from_placement(plan.placement, owner.layer_id, plan.layout.ep) if plan.placement else None
        owner.mlp = ExpertParallelMoE.from_moe(owner.mlp, group, slots)


def _embedding_group(pg: ProcessGroups, layout, rank: int) -> dist.ProcessGroup | None:
    """Per (dp, cp) position, the pipeline ranks holding an ``embed_tokens`` copy when there are two
    (the first stage's and a head stage's MTP embedding on another rank); created collectively."""
    first = {p for p, stages in enumerate(layout.rank_stages) if 0 in stages}
    last = {p for p, stages in enumerate(layout.rank_stages) if layout.stages - 1 in stages}
    if first == last:  # every copy is the shared object on one rank (or mirrors: summed there)
        return None
    holders = sorted(first | last)
    mine = None
    for pp_ranks in pg.pp_groups:
        group = dist.new_group([pp_ranks[p] for p in holders])
        if rank in (pp_ranks[p] for p in holders):
            mine = group
    return mine
