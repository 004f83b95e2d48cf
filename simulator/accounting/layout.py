"""Resolve a parallel layout against a model and a cluster: stage contents and rank -> stages.

A pipeline stage holds a contiguous run of "layer units": the decoder layers 0..L-1 followed by
the MTP modules (each one unit). The first stage also holds the embedding, the last the final
norm and output head, and every MTP module: they run after the last decoder layer and reuse the
head (and the embedding, which DualPipe makes free by putting the first and last stage on the same
rank, DeepSeek-V3 TR §3.2.3).

``pipeline_stages`` is the one stage split: memory and time are priced with it, the plan file
records it (``layout.stage_records``) and the runtime builds its stages from that record. Which
stages a rank holds is the schedule kind's (``schedules.registry.rank_stages``).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeplan.simulator.accounting.context_parallel import ContextParallelError, check_cp
from moeplan.simulator.accounting.tensor_parallel import TensorParallelError, check_tp
from moeplan.simulator.schedules.registry import num_stages, schedule_kind
from moeplan.simulator.spec.hardware import ClusterSpec
from moeplan.simulator.spec.model import ModelSpec
from moeplan.simulator.spec.parallel import ParallelSpec


class LayoutError(ValueError):
    """A layout that cannot run on this model and cluster; the message names the values."""


@dataclass(frozen=True)
class Stage:
    index: int
    layers: tuple[int, ...]  # layer units; >= num_hidden_layers means an MTP module
    has_embedding: bool
    has_head: bool


def balanced_stage_sizes(units: int, stages: int) -> tuple[int, ...]:
    """Split ``units`` layer units into ``stages`` contiguous parts whose sizes differ by at most
    one. The smaller parts go to the two ends first, since those stages also carry the embedding
    and the head. (DeepSeek-V3: 61 layers + 1 MTP over 16 stages -> 3, 4 x 14, 3.)"""
    if stages > units:
        raise LayoutError(f"stages={stages} exceeds layer units={units} (decoder layers + MTP modules)")
    base, extra = divmod(units, stages)
    small = stages - extra  # stages of ``base`` units
    order = []  # stage indices from the ends inwards: 0, S-1, 1, S-2, ...
    lo, hi = 0, stages - 1
    while lo <= hi:
        order.append(lo)
        if hi != lo:
            order.append(hi)
        lo, hi = lo + 1, hi - 1
    small_set = set(order[:small])
    return tuple(base if i in small_set else base + 1 for i in range(stages))


def pipeline_stages(model: ModelSpec, parallel: ParallelSpec) -> tuple[Stage, ...]:
    """The stages of one pipeline, from ``parallel.stage_layers`` or a balanced split."""
    units = model.num_hidden_layers + model.num_nextn_predict_layers
    stages = num_stages(parallel)
    sizes = parallel.stage_layers or balanced_stage_sizes(units, stages)
    if len(sizes) != stages:
        raise LayoutError(f"stage_layers has {len(sizes)} entries but the layout has stages={stages}")
    if sum(sizes) != units or min(sizes) < 1:
        raise LayoutError(
            f"stage_layers={list(sizes)} must be positive and sum to {units} "
            f"(num_hidden_layers={model.num_hidden_layers} + num_nextn_predict_layers={model.num_nextn_predict_layers})"
        )
    if sum(sizes[:-1]) > model.num_hidden_layers:
        raise LayoutError(
            f"stage_layers={list(sizes)} (layer units per stage) puts an MTP module before the last stage; all "
            f"num_nextn_predict_layers={model.num_nextn_predict_layers} must sit on the last stage (they share its head)"
        )
    out, start = [], 0
    for i, size in enumerate(sizes):
        out.append(Stage(i, tuple(range(start, start + size)), has_embedding=i == 0, has_head=i == stages - 1))
        start += size
    return tuple(out)


def resolve_dp(parallel: ParallelSpec, cluster: ClusterSpec) -> int:
    """The data-parallel degree: given, or world / (pp * cp * tp); checks world = pp * dp * cp * tp."""
    world, pp, cp, tp = cluster.num_gpus, parallel.pp, parallel.cp, parallel.tp
    if world % pp:
        raise LayoutError(f"pp={pp} does not divide the cluster's {world} GPUs")
    if world % (pp * cp):
        raise LayoutError(f"cp={cp} does not divide the {world // pp} GPUs of a pipeline stage (world {world} / pp={pp})")
    if world % (pp * cp * tp):
        raise LayoutError(f"tp={tp} does not divide the {world // (pp * cp)} GPUs left by pp={pp} x cp={cp} "
                          f"(world {world})")
    dp = parallel.dp or world // (pp * cp * tp)
    if pp * dp * cp * tp != world:
        what = f"pp={pp} x dp={dp} x cp={cp}" + (f" x tp={tp}" if tp > 1 else "")
        raise LayoutError(f"{what} = {pp * dp * cp * tp} differs from the cluster's {world} GPUs")
    return dp


def check_layout(model: ModelSpec, cluster: ClusterSpec, parallel: ParallelSpec) -> int:
    """Validate ``parallel`` against model and cluster; returns dp. Messages name the values."""
    dp = resolve_dp(parallel, cluster)
    try:
        check_cp(parallel.seq_len_tokens, parallel.cp)
    except ContextParallelError as exc:
        raise LayoutError(str(exc)) from exc
    try:
        check_tp(model, cluster, parallel)
    except TensorParallelError as exc:
        raise LayoutError(str(exc)) from exc
    group = dp * parallel.cp * parallel.tp  # GPUs of one stage: experts are sharded inside them
    if model.is_moe and model.n_routed_experts % parallel.ep:
        raise LayoutError(f"ep={parallel.ep} does not divide n_routed_experts={model.n_routed_experts}")
    if not model.is_moe and parallel.ep != 1:
        raise LayoutError(f"ep={parallel.ep} needs routed experts, but {model.name} is dense (n_routed_experts=0)")
    if group % parallel.ep:
        where = f"dp={dp}" if group == dp else f"dp x cp x tp={group}"
        raise LayoutError(f"ep={parallel.ep} must divide {where} (expert groups live inside the data-parallel group)")
    pp_error = schedule_kind(parallel.schedule).pp_error(parallel.pp)
    if pp_error:
        raise LayoutError(pp_error)
    pipeline_stages(model, parallel)
    return dp
