"""1F1B and ZB1P (zero-bubble ZB-H1): one stage per rank, ``pp`` ranks = ``pp`` stages.

1F1B (PipeDream-Flush, Narayanan et al. 2021): rank ``r`` runs ``min(pp-1-r, M)`` warm-up forwards,
then alternates one forward and one full backward, then drains the remaining backwards.

ZB1P (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", ZB-H1): the same order with each backward
split into ``I`` (input gradient, on the critical path) and ``W`` (weight gradient). Rank ``r``
holds back its first ``r`` weight passes, so the ``W`` fill the cool-down bubble; activation memory
stays at ``pp`` micro-batches as in 1F1B. This is the order ``torch`` builds for
``ScheduleInterleavedZeroBubble`` with one stage per rank.
"""

from __future__ import annotations

from moeplan.simulator.schedules._checks import require_positive
from moeplan.simulator.schedules.actions import Action
from moeplan.simulator.schedules.schedule import Schedule, StageRanks


def chain_stage_ranks(pp: int) -> StageRanks:
    """Stage ``s`` on rank ``s``: one stage per rank, one direction."""
    return (tuple(range(pp)),)


def _rank_actions(pp: int, rank: int, num_microbatches: int, split_backward: bool) -> list[Action]:
    """Actions of one rank. ``split_backward`` turns each ``B`` into ``I`` plus a deferred ``W``."""
    warmup = min(pp - 1 - rank, num_microbatches)
    held_weights = rank if split_backward else 0
    actions = [Action.single("F", rank, m) for m in range(warmup)]
    next_weight = 0
    for backward_mb in range(num_microbatches):
        if warmup + backward_mb < num_microbatches:
            actions.append(Action.single("F", rank, warmup + backward_mb))
        actions.append(Action.single("I" if split_backward else "B", rank, backward_mb))
        if split_backward and backward_mb >= held_weights:
            actions.append(Action.single("W", rank, next_weight))
            next_weight += 1
    if split_backward:
        actions.extend(Action.single("W", rank, m) for m in range(next_weight, num_microbatches))
    return actions


def _single_stage(kind: str, pp: int, num_microbatches: int, split_backward: bool) -> Schedule:
    require_positive(pp=pp, microbatches=num_microbatches)
    return Schedule(
        kind=kind,
        num_ranks=pp,
        num_stages=pp,
        num_microbatches=num_microbatches,
        stage_ranks=chain_stage_ranks(pp),
        direction_microbatches=(num_microbatches,),
        ranks=tuple(tuple(_rank_actions(pp, r, num_microbatches, split_backward)) for r in range(pp)),
    )


def one_f_one_b(pp: int, num_microbatches: int) -> Schedule:
    """1F1B on ``pp`` ranks; any ``pp >= 1`` and ``num_microbatches >= 1``."""
    return _single_stage("1f1b", pp, num_microbatches, split_backward=False)


def zb1p(pp: int, num_microbatches: int) -> Schedule:
    """ZB1P / ZB-H1 on ``pp`` ranks; any ``pp >= 1`` and ``num_microbatches >= 1``."""
    return _single_stage("zb1p", pp, num_microbatches, split_backward=True)
