"""Reference executor: replay a schedule with fixed per-action durations and zero communication.

Each rank runs its actions in order. An action starts when the rank is free and every input it
needs has been produced (a blocking receive; sends never block, as with ``isend``):

- ``F(s, m)`` needs ``F(s-1, m)`` (the activation from the previous stage).
- ``B(s, m)`` / ``I(s, m)`` need ``F(s, m)`` and the backward of ``(s+1, m)`` (the output gradient).
- ``W(s, m)`` needs ``I(s, m)``.

An overlapped ``F&B`` waits for the inputs of both ops and delivers both outputs at its end.
If no rank can move, the schedule deadlocks and ``execute`` raises ``ScheduleError`` naming each
rank's blocked action; since that depends on the order only, ``validate`` uses it as the check.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.simulator.schedules.actions import Action, Op, ScheduleError
from moeplan.simulator.schedules.schedule import Schedule

# Keys of produced values: ("F", stage, mb) activation, ("G", stage, mb) input gradient,
# ("W", stage, mb) weight gradient.
_Key = tuple[str, int, int]


class Durations(BaseModel):
    """Seconds per action. ``I`` (backward for input) takes ``b_s - w_s``; ``F&B`` takes ``fb_s``,
    by default ``f_s + b_s`` (no overlap gain)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    f_s: float = Field(1.0, gt=0, description="Forward of one stage, one micro-batch.")
    b_s: float = Field(2.0, gt=0, description="Full backward (input + weights).")
    w_s: float = Field(1.0, ge=0, description="Backward for weights alone.")
    fb_s: float | None = Field(None, gt=0, description="Overlapped forward + backward pair (F&B).")

    @model_validator(mode="after")
    def _check_split(self) -> Durations:
        if self.w_s >= self.b_s:
            raise ScheduleError(f"w_s={self.w_s} must be < b_s={self.b_s} (the input backward takes b_s - w_s)")
        return self

    @property
    def i_s(self) -> float:
        return self.b_s - self.w_s

    @property
    def overlap_s(self) -> float:
        return self.f_s + self.b_s if self.fb_s is None else self.fb_s

    def of(self, action: Action) -> float:
        """Duration of ``action`` in seconds."""
        return {"F": self.f_s, "B": self.b_s, "I": self.i_s, "W": self.w_s, "FB": self.overlap_s}[action.kind]


class TimedAction(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    action: Action
    start_s: float
    end_s: float


class Timeline(BaseModel):
    """Per rank, when each action ran; the step's makespan and each rank's idle time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ranks: tuple[tuple[TimedAction, ...], ...]
    makespan_s: float
    busy_s: tuple[float, ...] = Field(description="[rank] -> seconds spent computing.")

    @property
    def idle_s(self) -> tuple[float, ...]:
        """[rank] -> makespan minus that rank's busy time."""
        return tuple(self.makespan_s - busy for busy in self.busy_s)

    @property
    def bubble_s(self) -> float:
        """Makespan minus the least busy rank's compute: the longest any rank idles. Ranks do equal
        work except that DualPipe(V) overlaps more ``F&B`` pairs on some ranks than on others, so
        when ``F&B < F + B`` the rank with the most pairs is the least busy."""
        return max(self.idle_s)

    @property
    def bubble_frac(self) -> float:
        return self.bubble_s / self.makespan_s


def needs(op: Op, num_stages: int) -> tuple[_Key, ...]:
    """Values ``op`` consumes (see the module docstring)."""
    s, m = op.stage, op.microbatch
    if op.kind == "F":
        return (("F", s - 1, m),) if s > 0 else ()
    if op.kind == "W":
        return (("G", s, m),)
    return (("F", s, m), ("G", s + 1, m)) if s < num_stages - 1 else (("F", s, m),)


def produces(op: Op) -> tuple[_Key, ...]:
    """Values ``op`` makes available to other actions."""
    s, m = op.stage, op.microbatch
    return {"F": (("F", s, m),), "B": (("G", s, m), ("W", s, m)), "I": (("G", s, m),), "W": (("W", s, m),)}[op.kind]


def execute(schedule: Schedule, durations: Durations) -> Timeline:
    """Replay ``schedule``; raise ``ScheduleError`` on deadlock."""
    ready_s: dict[_Key, float] = {}
    position = [0] * schedule.num_ranks
    clock_s = [0.0] * schedule.num_ranks
    timed: list[list[TimedAction]] = [[] for _ in range(schedule.num_ranks)]
    moved = True
    while moved:
        moved = False
        for rank, actions in enumerate(schedule.ranks):
            while position[rank] < len(actions):
                action = actions[position[rank]]
                inputs = [key for op in action.ops for key in needs(op, schedule.num_stages)]
                if not all(key in ready_s for key in inputs):
                    break
                start_s = max([clock_s[rank], *(ready_s[key] for key in inputs)])
                end_s = start_s + durations.of(action)
                for op in action.ops:
                    ready_s.update(dict.fromkeys(produces(op), end_s))
                timed[rank].append(TimedAction(action=action, start_s=start_s, end_s=end_s))
                clock_s[rank] = end_s
                position[rank] += 1
                moved = True
    stuck = [f"rank {r} at {actions[position[r]]}" for r, actions in enumerate(schedule.ranks) if position[r] < len(actions)]
    if stuck:
        raise ScheduleError(f"{schedule.kind} schedule deadlocks: {'; '.join(stuck)} wait for inputs never produced")
    return Timeline(
        ranks=tuple(tuple(row) for row in timed),
        makespan_s=max(clock_s),
        busy_s=tuple(sum(t.end_s - t.start_s for t in row) for row in timed),
    )
