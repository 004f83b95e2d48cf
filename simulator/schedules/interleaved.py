"""Interleaved 1F1B (Narayanan et al. 2021, §2.2): ``v`` model chunks per rank, ``v * pp`` stages.

Rank ``r`` holds stages ``r, r + pp, ..., r + (v-1) pp``. Micro-batches move in rounds of
``per_round`` (``pp`` when ``pp`` divides ``M``): a rank runs a round through chunk 0, then the same
round through chunk 1, ... (depth first), and backwards visit the chunks in reverse. Warm-up is
``(v-1) * per_round + 2 (pp-1-r)`` forwards, capped at ``v M``; then one forward / one backward;
then the remaining backwards.

Like ``torch``'s ``ScheduleInterleaved1F1B`` we accept any ``M`` that splits into equal rounds:
``rounds = max(1, M // pp)`` must divide ``M``, and ``per_round = M / rounds``.
"""

from __future__ import annotations

from moeplan.simulator.schedules._checks import require_no_error, require_positive
from moeplan.simulator.schedules.actions import Action
from moeplan.simulator.schedules.schedule import Schedule, StageRanks


def interleaved_stage_ranks(pp: int, virtual_stages: int) -> StageRanks:
    """Stage ``s`` on rank ``s mod pp``: rank ``r`` holds ``r, r + pp, ..., r + (v-1) pp``."""
    return (tuple(s % pp for s in range(virtual_stages * pp)),)


def interleaved_microbatch_error(pp: int, num_microbatches: int) -> str | None:
    """Why ``num_microbatches`` cannot run interleaved on ``pp`` ranks, or None when it can."""
    rounds = max(1, num_microbatches // pp)
    if num_microbatches % rounds == 0:
        return None
    return (f"microbatches={num_microbatches} must split into {rounds} equal rounds for interleaved "
            f"1F1B with pp={pp} (rounds = max(1, microbatches // pp)), e.g. a multiple of pp")


def microbatches_per_round(pp: int, num_microbatches: int) -> int:
    """Micro-batches each chunk takes in a row before the rank moves to its next chunk."""
    require_no_error(interleaved_microbatch_error(pp, num_microbatches))
    return num_microbatches // max(1, num_microbatches // pp)


def _rank_actions(pp: int, v: int, rank: int, num_microbatches: int, per_round: int) -> list[Action]:
    total = v * num_microbatches  # forwards (and backwards) on this rank
    warmup = min((v - 1) * per_round + 2 * (pp - 1 - rank), total)
    next_mb = {"F": [0] * v, "B": [0] * v}

    def action(kind: str, step: int) -> Action:
        chunk = (step // per_round) % v
        if kind == "B":
            chunk = v - 1 - chunk
        mb = next_mb[kind][chunk]
        next_mb[kind][chunk] += 1
        return Action.single(kind, chunk * pp + rank, mb)

    actions = [action("F", step) for step in range(warmup)]
    for step in range(total - warmup):
        actions.append(action("F", warmup + step))
        actions.append(action("B", step))
    actions.extend(action("B", step) for step in range(total - warmup, total))
    return actions


def interleaved_1f1b(pp: int, num_microbatches: int, virtual_stages: int = 2) -> Schedule:
    """Interleaved 1F1B on ``pp`` ranks with ``virtual_stages`` chunks each."""
    require_positive(pp=pp, microbatches=num_microbatches, virtual_stages=virtual_stages)
    per_round = microbatches_per_round(pp, num_microbatches)
    stages = virtual_stages * pp
    return Schedule(
        kind="interleaved",
        num_ranks=pp,
        num_stages=stages,
        num_microbatches=num_microbatches,
        stage_ranks=interleaved_stage_ranks(pp, virtual_stages),
        direction_microbatches=(num_microbatches,),
        ranks=tuple(
            tuple(_rank_actions(pp, virtual_stages, r, num_microbatches, per_round)) for r in range(pp)
        ),
    )
