"""The search's memory check: the same verdict and peak as ``accounting.memory.peak_bytes_per_gpu``, cheaper.

A search checks thousands of layouts and most share a few schedules, so replaying each layout's whole
schedule (up to ``pp x 2M`` actions) repeats the same walk thousands of times. Two exact shortcuts:

1. A lower bound without the schedule: each rank's memory with no activations (``rank_memory`` on an
   empty action list). A layout already over the HBM with it is rejected before its schedule is built
   (asked only while that schedule is not built: after, step 2 costs the same).
2. The schedule's in-flight profile, once per (kind, pp, micro-batches, chunks): ``activation_peak_bytes``
   is ``max_k bytes . c_k`` over the per-stage counts ``c_k`` of micro-batches held at each action's peak.
   For non-negative stage bytes only the counts that no other count covers in every stage can reach the
   maximum, so each rank's actions are replaced by a list that climbs to each such count and frees it
   again (where that list is the shorter: interleaved schedules hold many such counts): ``rank_memory``
   replays it to the same peak, up to rounding.

Rounding: the short list adds the same bytes in another order, so its peak may differ from the full
replay in the last bits. A layout whose peak lies within ``ROUNDING_FRAC`` of the usable HBM is decided
by the full replay, and ``peak_bytes`` (the value a plan records) always replays the full schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

from moeplan.simulator.accounting.memory import peak_bytes_per_gpu, rank_memory
from moeplan.simulator.schedules.actions import Action
from moeplan.simulator.schedules.registry import make_schedule
from moeplan.simulator.spec.inputs import PlanInputs
from moeplan.simulator.spec.parallel import ParallelSpec

# Relative margin around the usable HBM inside which the reordered sum is not trusted: a few hundred
# float64 additions (relative error ~1e-16 each) stay many orders of magnitude below it.
ROUNDING_FRAC = 1e-9

ProfileKey = tuple[str, int, int, int]  # schedule kind, pp, micro-batches, chunks per rank
Profiles = dict[ProfileKey, tuple[tuple[Action, ...], ...]]


def held_counts(actions: Sequence[Action], num_stages: int) -> list[tuple[int, ...]]:
    """Per action, micro-batches held per stage at its peak (after its forwards, before its frees),
    the walk of ``accounting.memory.activation_peak_bytes``; shape ``[actions][num_stages]``."""
    held, out = [0] * num_stages, []
    for action in actions:
        freed = []
        for op in action.ops:
            if op.kind == "F":
                held[op.stage] += 1
            elif op.kind == "B" or op.kind == "W":
                freed.append(op.stage)
        out.append(tuple(held))
        for s in freed:
            held[s] -= 1
    return out


def maximal_counts(counts: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The distinct counts that no other count covers in every stage (the only ones that can give the
    peak for some non-negative stage bytes), largest total first."""
    distinct = sorted(set(counts), key=lambda c: (-sum(c), c))
    kept: list[tuple[int, ...]] = []
    for c in distinct:  # a count is covered only by one of larger or equal total, kept before it
        if not any(all(a >= b for a, b in zip(k, c, strict=True)) for k in kept):
            kept.append(c)
    return kept


def climb_actions(counts: Sequence[tuple[int, ...]]) -> tuple[Action, ...]:
    """Single-op actions whose replay holds exactly each of ``counts`` in turn: forwards up to it, then
    full backwards down to nothing. Micro-batch ids are not read by the replay: all are 0."""
    out: list[Action] = []
    for c in counts:
        ups = [s for s, n in enumerate(c) for _ in range(n)]
        out += [Action.single("F", s, 0) for s in ups]
        out += [Action.single("B", s, 0) for s in ups]
    return tuple(out)


def _profile(key: ProfileKey, profiles: Profiles) -> tuple[tuple[Action, ...], ...]:
    """Per rank, the short action list of step 2, built once per schedule and kept in ``profiles``."""
    if key not in profiles:
        schedule = make_schedule(*key)
        short = (climb_actions(maximal_counts(held_counts(actions, schedule.num_stages))) for actions in schedule.ranks)
        profiles[key] = tuple(min(pair, key=len) for pair in zip(schedule.ranks, short, strict=True))
    return profiles[key]


def fits(inputs: PlanInputs, par: ParallelSpec, dp: int, microbatches: int, profiles: Profiles) -> tuple[bool, float]:
    """(fits, a peak not above the true one): whether the layout's ``peak_bytes_per_gpu`` is within the
    usable HBM, decided exactly. The peak is step 1's or step 2's, of the ranks looked at: the ranks are
    walked in order and the first over the HBM decides."""
    m, tr, usable = inputs.model, inputs.training, inputs.cluster.usable_hbm_bytes
    over = usable * (1 + ROUNDING_FRAC)

    def peak(lists: Sequence[Sequence[Action]]) -> float:
        most = 0.0
        for r in range(par.pp):
            most = max(most, rank_memory(m, par, tr.optimizer, tr.precision, dp, r, microbatches, lists[r],
                                         tr.kernels.fusion, tr.kernels.expert_wgrad_batch).total_bytes)
            if most > over:
                break
        return most

    key = (par.schedule, par.pp, microbatches, par.virtual_stages)
    if key not in profiles:  # step 1 first, while the schedule is not built yet
        low = peak([()] * par.pp)
        if low > over:
            return False, low
    estimate = peak(_profile(key, profiles))
    if abs(estimate - usable) <= usable * ROUNDING_FRAC:
        exact = peak_bytes(inputs, par, dp, microbatches)
        return exact <= usable, exact
    return estimate <= usable, estimate


def peak_bytes(inputs: PlanInputs, par: ParallelSpec, dp: int, microbatches: int) -> float:
    """The peak a plan records: the full replay (``accounting.memory.peak_bytes_per_gpu``)."""
    tr = inputs.training
    return peak_bytes_per_gpu(inputs.model, par, tr.optimizer, tr.precision, dp, microbatches, tr.kernels.fusion,
                              tr.kernels.expert_wgrad_batch)
