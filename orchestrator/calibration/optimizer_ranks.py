"""The runtime's optimizer step over each pipeline rank's own parameter tensors, timed part by part.

``time_rank_optimizer(inputs, dp, pp_rank, dtype, reps, label)`` builds the stage modules pipeline rank
``pp_rank`` holds (``model.transformer.build_rank``, the plan's split), their FP32 main gradients
(``main_grad.attach_main_grads``) and the runtime's ``ZeroAdamW``, ``ExpertBiasUpdater`` and balance schedule,
then runs what ``model.runtime.rank.RankRuntime.optimizer_step`` runs, ``reps`` times after two untimed
steps, marking the same four parts (``costs.optimizer_step.OPTIMIZER_PARTS``). Each part's median is one
``MeasuredOp`` of layer kind ``optimizer`` at the rank's parameter set (``engine.build.rank_optimizer_set``),
which the engine uses for that rank in place of the ``optimizer`` class's bytes and the host term.

Why not the class alone: the runtime on a ZeRO group of one updates each parameter tensor apart, and on a
CPU a small tensor's update costs the host far more than its counted ops at the tiny-op cost (tiny-moe,
2026-12-06: pipeline rank 1's 52 tensors take 4.1 ms to update, priced 2.6 ms from one flat shard of
292,664 parameters plus 52 x 28 us of counted ops).

Only where both ZeRO groups have one rank (dp x cp = 1, no expert parallelism): one process runs that step
whole; its collectives are over one rank (a process group of one, made here when none exists). The wait at
the gradient norm's all-reduce is the engine's barrier, not measured here.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as dist

from moeplan.model.balance import BalanceSchedule, ExpertBiasUpdater
from moeplan.model.fp8 import clear_fp8_weight_cache
from moeplan.model.load_record import LoadAccumulator
from moeplan.model.options import ModelOptions
from moeplan.model.runtime.balancing import balance_step
from moeplan.model.runtime.executor import Timeline
from moeplan.model.runtime.main_grad import MainGrads, attach_main_grads
from moeplan.model.runtime.optimizer import ShardedParams, ZeroAdamW, part_marker
from moeplan.model.stage import StageSpec
from moeplan.model.transformer import build_rank
from moeplan.simulator.accounting.layout import pipeline_stages
from moeplan.simulator.contracts.trace import TraceEvent
from moeplan.simulator.costs.machine import Collective
from moeplan.simulator.costs.measured_ops import MeasuredOp
from moeplan.simulator.costs.optimizer_step import OPTIMIZER_PARTS
from moeplan.simulator.engine.build import rank_optimizer_set
from moeplan.simulator.schedules.registry import rank_stages
from moeplan.simulator.spec.inputs import PlanInputs

SEED = 0
FP32_BYTES = 4  # a main gradient's element
NORM_BYTES = 8  # the squared norm, one FP64 element


def rank_stage_specs(inputs: PlanInputs, pp_rank: int) -> list[StageSpec]:
    """The model's ``StageSpec`` of each stage pipeline rank ``pp_rank`` holds, from the planner's split
    (``accounting.layout.pipeline_stages``: what a plan's stage records hold)."""
    m, par = inputs.model, inputs.parallel
    stages = pipeline_stages(m, par)
    out = []
    for s in rank_stages(par, pp_rank):
        decoder = [u for u in stages[s].layers if u < m.num_hidden_layers]
        first = decoder[0] if decoder else m.num_hidden_layers
        out.append(StageSpec(first, first + len(decoder), has_embedding=stages[s].has_embedding,
                             has_head=stages[s].has_head))
    return out


@contextmanager
def one_process_group():
    """A gloo group of this process alone for the step's collectives; refuses to replace an existing one."""
    if dist.is_initialized():
        raise RuntimeError("a process group exists in this process: the optimizer step is timed in its own")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def norm_collectives(inputs: PlanInputs, dp: int, pp_rank: int) -> tuple[tuple[Collective, int, int], ...]:
    """(collective, buffer bytes, processes) of what the rank's ``norm`` part runs across processes, which one
    process does not: the FP32 gradient of the embedding's two copies summed (``RankRuntime.sync_gradients``, where
    the first stage and a head stage's MTP sit on different ranks) and the squared norm's FP64 all-reduce over the
    world (``ZeroAdamW.grad_norm``)."""
    m, par = inputs.model, inputs.parallel
    out: list[tuple[Collective, int, int]] = []
    holders = [{r for r in range(par.pp) if s in rank_stages(par, r)}
               for s in (0, len(pipeline_stages(m, par)) - 1)]
    if holders[0] != holders[1] and (m.num_nextn_predict_layers or m.tie_word_embeddings) and pp_rank in holders[0] | holders[1]:
        out.append(("all_reduce", m.vocab_size * m.hidden_size * FP32_BYTES, len(holders[0] | holders[1])))
    world = par.pp * dp * par.cp * par.tp
    if world > 1:
        out.append(("all_reduce", NORM_BYTES, world))
    return tuple(out)


def check_zero_groups_of_one(inputs: PlanInputs, dp: int) -> None:
    par = inputs.parallel
    if dp * par.cp != 1 or par.ep != 1:
        raise NotImplementedError(f"dp={dp}, cp={par.cp}, ep={par.ep}: the step of a ZeRO group larger than one "
                                  "runs over several processes; timed in one only where dp x cp = 1 and ep = 1")


def rank_modules(inputs: PlanInputs, pp_rank: int, dtype: torch.dtype) -> tuple[list[torch.nn.Module], MainGrads]:
    """The stage modules pipeline rank ``pp_rank`` holds, initialised by name as the runtime does, and the FP32
    main gradients of their parameters (each shared tensor once)."""
    torch.manual_seed(SEED)
    built = build_rank(inputs.model, rank_stage_specs(inputs, pp_rank), ModelOptions(dtype=dtype))
    params = {}
    for module in built:
        module.init_weights_by_name(SEED)
        params |= {id(p): p for p in module.parameters() if p.requires_grad}
    return built, attach_main_grads(list(params.values()))


def optimizer_step(inputs: PlanInputs, built: list[torch.nn.Module], main_grads: MainGrads
                   ) -> Callable[[Callable[[str], None]], None]:
    """``step(mark)``: what ``model.runtime.rank.RankRuntime.optimizer_step`` runs on a ZeRO group of one (the
    AdamW step marking norm, update and zero, the FP8 cache cleared, the bias update marked ``other``). Needs a
    process group (``one_process_group``)."""
    training = inputs.training
    optimizer = ZeroAdamW([ShardedParams(main_grads)], training.optimizer)
    updater = ExpertBiasUpdater({i: moe for m in built for i, moe in m.moe_layers().items()})
    balance, loads = BalanceSchedule.from_training(training), LoadAccumulator()

    def step(mark: Callable[[str], None]) -> None:
        stats = optimizer.step(tokens_seen=0.0, mark=mark)
        clear_fp8_weight_cache()
        loads.add(stats.step, balance_step(updater, balance, 0.0))
        mark("other")
    return step


def part_ops(inputs: PlanInputs, pp_rank: int, seconds: dict[str, list[float]], built: tuple[int, int], how: str,
             label: str) -> list[MeasuredOp]:
    """One ``MeasuredOp`` per optimizer part of pipeline rank ``pp_rank`` from its timed ``seconds``; ``built``:
    the (parameters, tensors) the runtime's modules hold, which must be what the planner counts."""
    par = inputs.parallel
    params, tensors = rank_optimizer_set(inputs, pp_rank)
    assert built == (params, tensors), f"{built=} {params=} {tensors=}: the model and the planner disagree"
    src = f"{label}: the runtime's optimizer step over pipeline rank {pp_rank}'s {tensors} tensors ({params:,} " \
          f"parameters), {how}"
    return [MeasuredOp(layer_kind="optimizer", action="F", op=part, tokens=par.micro_batch_size * par.seq_len_tokens,
                       seq_len=par.seq_len_tokens, s=statistics.median(seconds[part]), samples=len(seconds[part]),
                       params=params, tensors=tensors, source=f"{src}, median of {len(seconds[part])}: its {part} part")
            for part in OPTIMIZER_PARTS]


def set_shape(main_grads: MainGrads) -> tuple[int, int]:
    """(parameters, tensors) of a main-gradient set."""
    return sum(p.numel() for p in main_grads.params), len(main_grads.params)


def part_seconds(events: list[TraceEvent]) -> dict[str, float]:
    """The ``"optimizer {part}"`` events' seconds by part."""
    return {e.name.removeprefix("optimizer "): e.end_s - e.start_s for e in events if e.name.startswith("optimizer ")}


def time_rank_optimizer(inputs: PlanInputs, dp: int, pp_rank: int, dtype: torch.dtype, reps: int,
                        label: str) -> list[MeasuredOp]:
    """One ``MeasuredOp`` per optimizer part of pipeline rank ``pp_rank`` (see module docstring)."""
    check_zero_groups_of_one(inputs, dp)
    spec, par = inputs.model, inputs.parallel
    routed = spec.num_experts_per_tok * par.micro_batch_size * par.seq_len_tokens
    seconds: dict[str, list[float]] = {part: [] for part in OPTIMIZER_PARTS}
    built, main_grads = rank_modules(inputs, pp_rank, dtype)
    with one_process_group():
        step = optimizer_step(inputs, built, main_grads)
        for i in range(reps + 2):
            for bucket in main_grads.buckets:  # a backward's gradients, small enough that the step stays sane
                bucket.data.normal_(std=1e-3)
            for module in built:  # a micro-batch's routed tokens, spread evenly
                for moe in module.moe_layers().values():
                    moe.tokens_per_expert.fill_(routed // moe.tokens_per_expert.numel())
            timeline = Timeline(rank=0, cuda=False)
            step(part_marker(timeline, "optimizer"))
            if i >= 2:
                for part, s in part_seconds(timeline.events()).items():
                    seconds[part].append(s)
    main_grads.detach()
    how = f"{str(dtype).removeprefix('torch.')}, one process, on synthetic gradients"
    return part_ops(inputs, pp_rank, seconds, set_shape(main_grads), how, label)
