"""Check a schedule and measure what it costs a rank: action counts, peak in-flight activations.

``check_schedule`` raises ``ScheduleError`` unless

1. every (stage, micro-batch) runs exactly one ``F`` and either one ``B`` or one ``I`` and one ``W``;
2. on its rank, ``F`` comes before the backward of the same (stage, micro-batch), and ``I`` before ``W``;
3. stages run in order and nothing deadlocks when receives block and sends do not: the reference
   executor can replay the schedule (``F(s, m)`` after ``F(s-1, m)``, backward of ``s`` after ``s+1``).

Activations are counted in units of one stage's activations for one micro-batch: ``F`` adds one
when its action starts, ``B`` or ``W`` frees one when its action ends (an ``I`` keeps the
activation until the matching ``W``, a conservative choice), so an overlapped ``F&B`` briefly holds
both micro-batches. Zero-bubble splits therefore cost no extra activation units here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from moeplan.simulator.schedules.actions import ACTION_KINDS, Action, ActionKind, ScheduleError
from moeplan.simulator.schedules.executor import Durations, execute
from moeplan.simulator.schedules.schedule import Schedule


class ScheduleStats(BaseModel):
    """What one step of the schedule asks of each rank."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    action_counts: tuple[dict[ActionKind, int], ...] = Field(description="[rank] -> actions of each kind.")
    peak_activations: tuple[int, ...] = Field(description="[rank] -> peak stage-micro-batch activations held.")
    stages_per_rank: tuple[int, ...] = Field(
        description="[rank] -> stages whose weights the rank holds (parameters per device, in stages)."
    )


def _check_complete(schedule: Schedule, positions: dict[tuple[str, int, int], list[int]]) -> None:
    for m in range(schedule.num_microbatches):
        for s in range(schedule.num_stages):
            count = {kind: len(positions.get((kind, s, m), [])) for kind in "FBIW"}
            if count["F"] != 1 or (count["B"], count["I"], count["W"]) not in ((1, 0, 0), (0, 1, 1)):
                raise ScheduleError(
                    f"stage={s} microbatch={m} runs F x{count['F']}, B x{count['B']}, I x{count['I']}, "
                    f"W x{count['W']}; need F once and either B once or I and W once each"
                )


def _check_local_order(schedule: Schedule, positions: dict[tuple[str, int, int], list[int]]) -> None:
    for (kind, s, m), (position,) in positions.items():
        before = {"B": "F", "I": "F", "W": "I"}.get(kind)
        if before is not None and positions[(before, s, m)][0] >= position:
            rank = schedule.rank_of(s, m)
            raise ScheduleError(f"rank={rank} runs {s}{kind}{m} at or before {s}{before}{m}")


def _positions(schedule: Schedule) -> dict[tuple[str, int, int], list[int]]:
    """(kind, stage, mb) -> positions in its rank's list (one entry unless duplicated)."""
    positions: dict[tuple[str, int, int], list[int]] = {}
    for actions in schedule.ranks:
        for index, action in enumerate(actions):
            for op in action.ops:
                positions.setdefault((op.kind, op.stage, op.microbatch), []).append(index)
    return positions


def peak_activations(actions: Sequence[Action]) -> int:
    """Peak activation units one rank holds while running ``actions`` in order."""
    held = peak = 0
    for action in actions:
        held += sum(op.kind == "F" for op in action.ops)
        peak = max(peak, held)
        held -= sum(op.kind in ("B", "W") for op in action.ops)
    return peak


def check_schedule(schedule: Schedule) -> ScheduleStats:
    """Validate ``schedule`` (see module docstring) and return its per-rank statistics."""
    positions = _positions(schedule)
    _check_complete(schedule, positions)
    _check_local_order(schedule, positions)
    execute(schedule, Durations())  # raises on deadlock; durations do not matter for that
    counts = []
    for actions in schedule.ranks:
        counter = Counter(action.kind for action in actions)
        counts.append({kind: counter.get(kind, 0) for kind in ACTION_KINDS})
    return ScheduleStats(
        action_counts=tuple(counts),
        peak_activations=tuple(peak_activations(actions) for actions in schedule.ranks),
        stages_per_rank=tuple(len(schedule.stages_on_rank(r)) for r in range(schedule.num_ranks)),
    )
