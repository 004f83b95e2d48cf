"""Layout search: enumerate layouts that fit the cluster and memory, rank them by simulated
throughput.

The space: pipeline ranks (powers of two dividing the cluster, no more stages than layer units),
every schedule (interleaved with 2 or 4 chunks per rank), tensor-parallel sizes 1, 2, 4, 8 that split
the heads, the dense MLP and a node, with and without sequence parallelism (with it only, for MoE
models; TP is not combined with CP), expert-parallel sizes dividing both the experts and the stage's
``dp * cp * tp`` GPUs (whole nodes once past one node), micro-batch sizes 1, 2, 4, 8 that divide the batch, recompute none/selective/full, ZeRO-1.
Context parallelism: the main layout is ranked at the first phase's sequence length with ``cp``
from the powers of two that divide the stage's GPUs and the sequence's ``2 cp`` chunks while each
GPU keeps at least ``MIN_CP_TOKENS`` of it (so a 4K pre-training search stays at ``cp = 1`` and a 32K
one tries 1 to 8); phases at other lengths choose their own ``cp`` (``phase_layout``). Settings the user
fixed are not varied. Memory is checked by ``memory_check`` (the full replay's verdict, cheaper). Each layout
that fits gets a step bound (``step_bound``: its busiest rank's compute, no bubble, plus the TP collectives
no schedule of it can hide); in order of that bound, layouts are simulated coarsely (a stage's layers merged
into one unit, step time extrapolated to the full micro-batch count along the ``step_line`` of
``run_model``) until the bound of the next cannot beat the tenth best step: branch and bound, so no layout
that could enter the top ten is skipped (a simulated step below its own bound turns the pruning off). The
ten best are then simulated in full detail.

Each stage runs in a pool of processes where the search is large (``PARALLEL_MIN_LAYOUTS`` layouts or more,
``search_workers()`` processes, ``MOEPLAN_SEARCH_WORKERS`` or the CPUs this process may use): the first stage's
layouts in contiguous chunks, the coarse simulations a few a process ahead of the one awaited in bound order (each
result then met in that order, so the stop and the pruning switch fall where the serial search puts them, the
simulations in flight past the stop dropped), and the finalists side by side; the result is the serial search's.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Any

from moeplan.simulator.accounting.context_parallel import ContextParallelError, check_cp
from moeplan.simulator.accounting.flops import training_flops
from moeplan.simulator.accounting.layout import LayoutError, check_layout
from moeplan.simulator.accounting.tensor_parallel import TensorParallelError, check_tp
from moeplan.simulator.contracts.plan_file import Candidate
from moeplan.simulator.engine.build import SimOptions
from moeplan.simulator.engine.expert_traffic import group_placement
from moeplan.simulator.planning import memory_check
from moeplan.simulator.planning.memory_check import Profiles
from moeplan.simulator.planning.predict import simulate_at
from moeplan.simulator.planning.run_model import step_line
from moeplan.simulator.planning.step_bound import BoundMemo, step_bound_s
from moeplan.simulator.planning.wgrad_batch import WgradBatchChoice, applies, choose_wgrad_batch, with_wgrad_batch
from moeplan.simulator.schedules.registry import SCHEDULE_KINDS, microbatch_error, num_stages, schedule_kind
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import MAX_EXPERT_WGRAD_BATCH

logger = logging.getLogger(__name__)
MICRO_BATCH_SIZES = (1, 2, 4, 8)
VIRTUAL_STAGES = (2, 4)  # chunks per rank for interleaved 1F1B
RECOMPUTE = ("none", "selective", "full")
TP_SIZES = (1, 2, 4, 8)  # tensor-parallel sizes (inside a node; Megatron's usual 1..8)
FINALISTS = 10
BOUND_ROUNDING_FRAC = 1e-9  # a step this close under its bound is rounding, not a bound that fails
# Search-space bound, not a cost: CP that leaves a GPU fewer tokens of a sequence than a common 4K
# pre-training micro-batch only adds collectives (and shrinks the GEMMs) without saving memory that
# matters; the cost model still decides among the values that remain.
MIN_CP_TOKENS = 4096
# Fewer layouts than this are searched in this process: a pool's start (a fork server importing the simulator) costs
# more than a small search takes. DeepSeek-V3 on 256 x 8 H800 enumerates 13,296 (2026-12-08), 91 s in one process
# and 57 s in two on this 2-CPU machine; the tests' tiny models up to ~500.
PARALLEL_MIN_LAYOUTS = 2048
CHUNKS_PER_WORKER = 16  # the first stage's layouts in this many contiguous chunks a process (balance, progress)
AHEAD_PER_WORKER = 2  # coarse simulations in flight a process, ahead of the one whose result is awaited
WORKERS_ENV = "MOEPLAN_SEARCH_WORKERS"


@dataclass(frozen=True)
class SearchResult:
    best: ParallelSpec
    ranked: tuple[Candidate, ...]  # finalists, best first, simulated in detail
    enumerated: int
    evaluated: int  # fitted in memory and were bounded, ranked or simulated
    simulated: int  # simulated (coarse); the rest were proven slower by their compute bound
    # the best layout's expert Wgrad batch choice, where the search chose it (``search(..., wgrad_batch=True)``)
    wgrad_batch: WgradBatchChoice | None = None


def _ep_values(inputs: PlanInputs, group: int) -> list[int]:
    """EP sizes carved from a stage's ``group = dp * cp`` GPUs."""
    m, per_node = inputs.model, inputs.cluster.node.gpus_per_node
    if not m.is_moe:
        return [1]
    return [e for e in range(1, min(group, m.n_routed_experts) + 1)
            if group % e == 0 and m.n_routed_experts % e == 0 and (e <= per_node or e % per_node == 0)]


def _tp_values(inputs: PlanInputs, fixed: dict[str, Any]) -> list[tuple[int, bool]]:
    """(tp, sp) pairs: tp from ``TP_SIZES`` that split the heads, the dense MLP and a node; with experts
    only with SP (``accounting.tensor_parallel.check_tp``); settings the user fixed are kept."""
    out = []
    for tp in _choices(fixed, "tp", TP_SIZES):
        sps = [False] if tp == 1 else [True] if inputs.model.is_moe else [False, True]
        for sp in _choices(fixed, "sp", sps):
            par = inputs.parallel.model_copy(update={"tp": tp, "sp": sp, "cp": 1})
            try:
                check_tp(inputs.model, inputs.cluster, par)
            except TensorParallelError:
                continue
            out.append((tp, sp))
    return out


def _choices(fixed: dict[str, Any], key: str, default: Iterable[Any]) -> list[Any]:
    return [fixed[key]] if key in fixed else list(default)


def enumerate_layouts(inputs: PlanInputs, fixed: dict[str, Any],
                      schedules: tuple[str, ...] = SCHEDULE_KINDS) -> Iterator[ParallelSpec]:
    """Every layout of the search space that agrees with ``fixed`` (ParallelSpec field -> value), with one of
    ``schedules`` (``planning.techniques``: all of them unless some are left out)."""
    world = inputs.cluster.num_gpus
    units = inputs.model.num_hidden_layers + inputs.model.num_nextn_predict_layers
    # every kind has at least pp stages, and a stage at least one layer unit
    pps = _choices(fixed, "pp", [2**k for k in range(world.bit_length()) if world % 2**k == 0 and 2**k <= units])
    base = inputs.parallel.model_dump()
    seq = base["seq_len_tokens"]
    cps = _choices(fixed, "cp", [c for c in (2**k for k in range(world.bit_length()))
                                 if c == 1 or (seq % (2 * c) == 0 and seq // c >= MIN_CP_TOKENS)])
    tps = _tp_values(inputs, fixed)
    for pp, cp, (tp, sp), schedule, mbs, recompute in itertools.product(
        pps, cps, tps, _choices(fixed, "schedule", schedules),
        _choices(fixed, "micro_batch_size", MICRO_BATCH_SIZES), _choices(fixed, "recompute", RECOMPUTE),
    ):
        if world % (pp * cp * tp) or (tp > 1 and cp > 1):
            continue
        dp = fixed.get("dp") or world // (pp * cp * tp)
        chunks = ([base["virtual_stages"]] if not schedule_kind(schedule).uses_virtual_stages
                  else _choices(fixed, "virtual_stages", VIRTUAL_STAGES))
        for ep, v in itertools.product(_choices(fixed, "ep", _ep_values(inputs, dp * cp * tp)), chunks):
            data = {**base, **fixed, "pp": pp, "cp": cp, "tp": tp, "sp": sp, "dp": dp, "ep": ep, "schedule": schedule,
                    "virtual_stages": v, "micro_batch_size": mbs, "recompute": recompute, "stage_layers": None}
            par = ParallelSpec.model_validate(data)
            if num_stages(par) <= units:
                yield par


def _microbatches(inputs: PlanInputs, par: ParallelSpec, dp: int) -> int | None:
    """Micro-batches per step (fixed, or at the first phase's batch), or None when the batch does
    not split or the schedule cannot run the count (the kind registry decides, as for the planner)."""
    if par.microbatches is not None:
        m = par.microbatches
    else:
        batch, per = inputs.training.phases[0].global_batch_seqs, dp * par.micro_batch_size
        if batch % per:
            return None
        m = batch // per
    return None if microbatch_error(par, m) else m


def _fits(inputs: PlanInputs, par: ParallelSpec, profiles: Profiles, tried: list) -> tuple[int, int] | None:
    """(dp, micro-batches) of a layout that runs and fits, else None (``planning.memory_check``: the
    verdict of ``peak_bytes_per_gpu``). ``tried`` collects (layout, dp, micro-batches) of every layout
    that runs, for the message when nothing fits."""
    try:
        dp = check_layout(inputs.model, inputs.cluster, par)
    except LayoutError:
        return None
    m = _microbatches(inputs, par, dp)
    if m is None:
        return None
    tried.append((par, dp, m))
    return (dp, m) if memory_check.fits(inputs, par, dp, m, profiles)[0] else None


def _largest_fitting_batch(trial: PlanInputs, dp: int, m: int, profiles: Profiles) -> PlanInputs:
    """``trial`` at the largest expert Wgrad batch of 2..``MAX_EXPERT_WGRAD_BATCH`` that fits in memory (its stash
    included, ``memory_check.fits``), else as it is: the size the search's first stage ranks a layout at when it
    chooses the size (``search(..., wgrad_batch=True)``). A larger batch gives up memory only, never time (one
    main-gradient pass and one launch for more micro-batches: ``engine.unit_costs._experts``), so it is the one
    that can overtake; the finalists are then simulated at every size that fits."""
    for size in range(MAX_EXPERT_WGRAD_BATCH, 1, -1):
        batched = with_wgrad_batch(trial, size)
        if memory_check.fits(batched, trial.parallel, dp, m, profiles)[0]:
            return batched
    return trial


def _none_fits(inputs: PlanInputs, fixed: dict[str, Any], enumerated: int, tried: list) -> LayoutError:
    """The error when no layout fits: the smallest peak (full replay) among the layouts that run."""
    best = ""
    if tried:
        peak, p = min(((memory_check.peak_bytes(inputs, p, dp, m), p) for p, dp, m in tried), key=lambda t: t[0])
        best = (f"; the smallest peak is {peak / 2**30:,.1f} GiB of {inputs.cluster.usable_hbm_bytes / 2**30:,.1f} "
                f"usable (pp={p.pp} {p.schedule} ep={p.ep} recompute={p.recompute}): use more nodes")
    return LayoutError(
        f"no layout of {inputs.model.name} fits {inputs.cluster.num_gpus} x {inputs.cluster.gpu.name} "
        f"({enumerated} enumerated, fixed={fixed}){best}"
    )


def _holds_redundant(inputs: PlanInputs, ep: int, redundant: int) -> bool:
    """Whether an EP group of ``ep`` GPUs places ``redundant`` extra expert slots per layer (the
    placement refuses, with a ValueError, more slots on a GPU than its node has distinct experts)."""
    if not inputs.model.is_moe or ep == 1:
        return True
    try:
        group_placement(inputs.model, inputs.cluster, ep, redundant)
    except ValueError:
        return False
    return True


def check_fixed(inputs: PlanInputs, fixed: dict[str, Any]) -> None:
    """Fail early, naming the value, when a setting the user fixed can never run."""
    m, world = inputs.model, inputs.cluster.num_gpus
    if "pp" in fixed and world % fixed["pp"]:
        raise LayoutError(f"pp={fixed['pp']} does not divide the cluster's {world} GPUs")
    if "ep" in fixed:
        if not m.is_moe and fixed["ep"] != 1:
            raise LayoutError(f"ep={fixed['ep']} needs routed experts, but {m.name} is dense (n_routed_experts=0)")
        if m.is_moe and m.n_routed_experts % fixed["ep"]:
            raise LayoutError(f"ep={fixed['ep']} does not divide n_routed_experts={m.n_routed_experts}")
    if fixed.get("dp") and world % fixed["dp"]:
        raise LayoutError(f"dp={fixed['dp']} does not divide the cluster's {world} GPUs")
    if "tp" in fixed or "sp" in fixed:
        tp = fixed.get("tp", inputs.parallel.tp)  # an sp left free is the search's to choose: check the one that may run
        par = inputs.parallel.model_copy(update={"tp": tp, "sp": fixed.get("sp", tp > 1)})
        try:
            check_tp(m, inputs.cluster, par.model_copy(update={"cp": fixed.get("cp", 1)}))
        except TensorParallelError as exc:
            raise LayoutError(str(exc)) from exc
    if "cp" in fixed:
        if world % fixed["cp"]:
            raise LayoutError(f"cp={fixed['cp']} does not divide the cluster's {world} GPUs")
        try:
            check_cp(inputs.parallel.seq_len_tokens, fixed["cp"])
        except ContextParallelError as exc:
            raise LayoutError(str(exc)) from exc


def search_workers() -> int:
    """Processes a large search uses: ``MOEPLAN_SEARCH_WORKERS`` where set (1: this process alone), else the CPUs
    this process may run on. ValueError naming the variable for anything but a positive integer."""
    text = os.environ.get(WORKERS_ENV)
    if text is not None:
        try:
            workers = int(text)
        except ValueError:
            workers = 0
        if workers < 1:
            raise ValueError(f"{WORKERS_ENV}={text!r}: must be a positive integer (1: no worker processes)")
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _pool(workers: int) -> Executor:
    """``workers`` processes: forked from this one where it runs a single thread (fast, its imports and caches
    shared, and no main module run again); where it holds threads (the CLI's progress bar), from a fork server that
    has imported the simulator (forking a process with threads can deadlock); spawned where neither exists. The
    last two import the main module again, as multiprocessing does: a script must guard its work with
    ``if __name__ == "__main__"``."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        context = multiprocessing.get_context("fork")
    elif "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
    else:
        context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=context)


_WORKER_MEMO: dict[str, tuple[Profiles, BoundMemo]] = {}  # a pool process's: its search's memory profiles, bound memo


def _chunk_in_worker(search_id: str, inputs: PlanInputs, indexed: list[tuple[int, ParallelSpec]],
                     coarse: SimOptions, batched: bool):
    """``_check_layouts`` in a pool process, with the profiles and bound memo it keeps for ``search_id`` (each
    holds what one search asks many times, whichever of its chunks the process gets)."""
    if search_id not in _WORKER_MEMO:
        _WORKER_MEMO.clear()
        _WORKER_MEMO[search_id] = ({}, BoundMemo())
    fitting, tried = _check_layouts(inputs, indexed, coarse, batched, None, *_WORKER_MEMO[search_id])
    index_of = {id(par): i for i, par in indexed}
    # sent back small: a fitting layout's trial as its Wgrad batch (the parent makes it again), a tried one's index
    return ([(bound, i, dp, m, trial.training.kernels.expert_wgrad_batch) for bound, i, trial, dp, m in fitting],
            [(index_of[id(par)], dp, m) for par, dp, m in tried])


def _check_layouts(inputs: PlanInputs, indexed: list[tuple[int, ParallelSpec]], coarse: SimOptions,
                   batched: bool, progress: Callable[[int, int], None] | None = None,
                   profiles: Profiles | None = None, memo: BoundMemo | None = None,
                   ) -> tuple[list[tuple[float, int, PlanInputs, int, int]], list]:
    """The first stage on some layouts (``(index, layout)``): (bound, index, trial, dp, micro-batches) of each that
    fits, and the (layout, dp, micro-batches) tried, each in the layouts' order. One set of memory ``profiles`` and
    one bound ``memo`` for them all (new ones where not given). ``progress(done, len(indexed))`` after each."""
    fitting, tried = [], []
    profiles = {} if profiles is None else profiles
    memo = BoundMemo() if memo is None else memo
    for done, (i, par) in enumerate(indexed, 1):
        if progress:
            progress(done, len(indexed))
        fit = _fits(inputs, par, profiles, tried)
        if fit is not None:
            dp, m = fit
            trial = inputs.model_copy(update={"parallel": par})
            if batched:
                trial = _largest_fitting_batch(trial, dp, m, profiles)
            fitting.append((step_bound_s(trial, dp, m, coarse, memo), i, trial, dp, m))
    return fitting, tried


def _first_stage(inputs: PlanInputs, layouts: list[ParallelSpec], coarse: SimOptions, batched: bool,
                 progress: Callable[[int, int], None] | None, pool: Executor | None, workers: int):
    """Every layout checked (fits, step bound): the fitting ones in the serial search's order (by bound, then
    layout) and every layout tried."""
    indexed = list(enumerate(layouts))
    if pool is None:
        fitting, tried = _check_layouts(inputs, indexed, coarse, batched, progress)
    else:
        size = max(1, -(-len(indexed) // (workers * CHUNKS_PER_WORKER)))
        chunks = [indexed[i:i + size] for i in range(0, len(indexed), size)]
        search_id = uuid.uuid4().hex
        futures = {pool.submit(_chunk_in_worker, search_id, inputs, chunk, coarse, batched): n
                   for n, chunk in enumerate(chunks)}
        parts, done = [None] * len(chunks), 0
        for future in as_completed(futures):
            n = futures[future]
            parts[n] = future.result()
            done += len(chunks[n])
            if progress:
                progress(done, len(layouts))
        fitting = [(bound, i, _trial(inputs, layouts[i], batched, size), dp, m)
                   for part, _ in parts for bound, i, dp, m, size in part]
        tried = [(layouts[i], dp, m) for _, part in parts for i, dp, m in part]
    fitting.sort(key=lambda f: (f[0], f[1]))
    return fitting, tried


def _trial(inputs: PlanInputs, par: ParallelSpec, batched: bool, size: int) -> PlanInputs:
    """A layout's trial as ``_check_layouts`` made it, from its expert Wgrad batch ``size``."""
    trial = inputs.model_copy(update={"parallel": par})
    if batched and size != trial.training.kernels.expert_wgrad_batch:
        trial = with_wgrad_batch(trial, size)
    return trial


def _coarse_step_s(trial: PlanInputs, dp: int, m: int, coarse: SimOptions) -> float:
    return step_line(trial, dp, trial.parallel.seq_len_tokens, None, coarse).step_s(m)


def _finalist(inputs: PlanInputs, par: ParallelSpec, dp: int, m: int, opts: SimOptions,
              wgrad_batch: bool) -> tuple[float, float, WgradBatchChoice | None]:
    """(step seconds, peak bytes, the Wgrad batch choice or None) of a finalist simulated in detail."""
    trial = inputs.model_copy(update={"parallel": par})
    choice = choose_wgrad_batch(trial, opts, dp, m) if wgrad_batch else None  # None where the size does not matter
    if choice is None:
        return (simulate_at(trial, dp, m, par.seq_len_tokens, opts).step_time_s,
                memory_check.peak_bytes(inputs, par, dp, m), None)
    return choice.step_s[choice.chosen], choice.peak_bytes[choice.chosen], choice


def search(
    inputs: PlanInputs, fixed: dict[str, Any], opts: SimOptions = SimOptions(),
    progress: Callable[[int, int], None] | None = None, exhaustive: bool = False,
    schedules: tuple[str, ...] = SCHEDULE_KINDS,
    simulated: Callable[[int, int, float], None] | None = None, wgrad_batch: bool = False,
    workers: int | None = None,
) -> SearchResult:
    """Rank every fitting layout; raises ``LayoutError`` when none fits. ``exhaustive`` simulates
    every fitting layout instead of stopping at the bound (same result, for benchmarks and tests).
    ``progress(done, total)`` follows the first stage (each layout checked: fits, step bound);
    ``simulated(done, fitting, best_step_s)`` the second (each candidate simulated, in order of its bound,
    of at most ``fitting``; the stage stops early once no other can win). ``wgrad_batch``: each finalist is
    simulated in detail at every expert Wgrad batch that fits (``wgrad_batch.choose_wgrad_batch``, where the size
    matters) and ranked at its best, the size recorded in its ``Candidate``; the first stage, which picks them, ranks
    each layout at its largest size that fits (``_largest_fitting_batch``). ``workers``: processes for a large
    search (module docstring; None: ``search_workers()``), the result the same for any number."""
    check_fixed(inputs, fixed)
    layouts = list(enumerate_layouts(inputs, fixed, schedules))
    if opts.redundant_experts:  # only EP groups that can hold the redundant slots
        places = {ep: _holds_redundant(inputs, ep, opts.redundant_experts) for ep in {p.ep for p in layouts}}
        layouts = [p for p in layouts if places[p.ep]]
    coarse = replace(opts, expert_load=None, layer_loads=(), coarse=True)  # ranking assumes uniform routing
    batched = wgrad_batch and applies(inputs)  # the first stage ranks each layout at its largest batch that fits
    workers = search_workers() if workers is None else workers
    pool = _pool(workers) if workers > 1 and len(layouts) >= PARALLEL_MIN_LAYOUTS else None
    try:
        fitting, tried = _first_stage(inputs, layouts, coarse, batched, progress, pool, workers)
        if not fitting:
            raise _none_fits(inputs, fixed, len(layouts), tried)
        scored = _second_stage(fitting, coarse, exhaustive, simulated, pool, workers)
        finalists = scored[:FINALISTS]
        if pool is None:
            details = [_finalist(inputs, par, dp, m, opts, wgrad_batch) for _, par, dp, m in finalists]
        else:
            details = list(pool.map(_finalist, *zip(*((inputs, par, dp, m, opts, wgrad_batch)
                                                      for _, par, dp, m in finalists))))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    ranked: list[tuple[Candidate, WgradBatchChoice | None]] = []
    tokens = inputs.training.phases[0].global_batch_seqs * inputs.parallel.seq_len_tokens
    world = inputs.cluster.num_gpus
    for (_, par, dp, m), (step_s, peak, choice) in zip(finalists, details, strict=True):
        flops = training_flops(inputs.model, par.seq_len_tokens, par.recompute, par.cp).model_flops
        ranked.append((Candidate(
            parallel=par, microbatches=m, step_time_s=step_s, tokens_per_s_per_gpu=tokens / step_s / world,
            mfu_frac=tokens * flops / (step_s * world * inputs.cluster.gpu.bf16_flops_per_s),
            peak_memory_bytes_per_gpu=peak, expert_wgrad_batch=None if choice is None else choice.chosen), choice))
    ranked.sort(key=lambda rc: rc[0].step_time_s)  # stable: the coarse order on ties
    best, best_choice = ranked[0]
    logger.info("search: %d enumerated, %d fit, best %s", len(layouts), len(scored), best.parallel)
    return SearchResult(best=best.parallel, ranked=tuple(c for c, _ in ranked), enumerated=len(layouts),
                        evaluated=len(fitting), simulated=len(scored), wgrad_batch=best_choice)


def _second_stage(fitting: list, coarse: SimOptions, exhaustive: bool,
                  simulated: Callable[[int, int, float], None] | None, pool: Executor | None,
                  workers: int) -> list[tuple[float, ParallelSpec, int, int]]:
    """The fitting layouts simulated coarsely in order of their step bound until the bound cannot beat the tenth best
    step (every one where ``exhaustive``, or once a step falls below its bound), sorted by step. With a pool, the
    next ``AHEAD_PER_WORKER`` a process are in flight while the results are met one by one in the bound order, so
    the stop falls where the serial loop puts it (the simulations in flight past it are dropped)."""
    scored: list[tuple[float, ParallelSpec, int, int]] = []
    ahead = workers * AHEAD_PER_WORKER
    pending: dict[int, Any] = {}
    try:
        for n, (bound, _, trial, dp, m) in enumerate(fitting):
            if not exhaustive and len(scored) >= FINALISTS and bound >= sorted(s[0] for s in scored)[FINALISTS - 1]:
                break
            if pool is None:
                step_s = _coarse_step_s(trial, dp, m, coarse)
            else:
                for k in range(n, min(n + ahead + 1, len(fitting))):
                    if k not in pending:
                        _, _, t, d, mm = fitting[k]
                        pending[k] = pool.submit(_coarse_step_s, t, d, mm, coarse)
                step_s = pending.pop(n).result()
            if step_s < bound * (1 - BOUND_ROUNDING_FRAC) and not exhaustive:  # a bound that fails prunes nothing
                logger.warning("search: step %.6g s below its bound %.6g s (%s): simulating every layout", step_s,
                               bound, trial.parallel)
                exhaustive = True
            scored.append((step_s, trial.parallel, dp, m))
            if simulated:
                simulated(len(scored), len(fitting), min(s[0] for s in scored))
    finally:
        for future in pending.values():
            future.cancel()
    scored.sort(key=lambda s: s[0])
    return scored
