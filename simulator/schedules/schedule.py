"""A whole pipeline schedule: per rank, the ordered actions it runs in one training step.

Communication is implied by the dependencies, never listed: the output of ``F(s, m)`` goes to
whichever rank runs ``F(s+1, m)``, the input gradient of ``B``/``I(s, m)`` to whichever rank runs the
backward of ``(s-1, m)``. ``stage_ranks`` says where each stage lives, per *direction*: every schedule
has one direction except DualPipe, whose second half of the micro-batches enters at the last rank
and walks the mirrored copies of the stages (stage ``s`` of direction 1 lives on rank ``PP-1-s``).

Micro-batch ids are global and contiguous per direction: ``direction_microbatches=(M/2, M/2)``
means ids ``0..M/2-1`` go down the pipeline and ``M/2..M-1`` go up.
"""

from __future__ import annotations

from functools import cached_property

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.simulator.schedules.actions import Action, Op, ScheduleError
from moeplan.simulator.spec.parallel import ScheduleKind

StageRanks = tuple[tuple[int, ...], ...]  # [direction][stage] -> rank holding it


def stages_held(stage_ranks: StageRanks, rank: int) -> tuple[int, ...]:
    """Distinct stages whose weights ``rank`` holds under the placement ``stage_ranks``, ascending
    (DualPipe: its stage and the mirror). The one definition: ``Schedule.stages_on_rank`` and the
    kind registry (``registry.rank_stages``, used by memory, costs and the plan file) both ask it."""
    return tuple(sorted({s for placement in stage_ranks for s, r in enumerate(placement) if r == rank}))


class Schedule(BaseModel):
    """Per-rank action lists plus the stage placement they assume. Serialise with
    ``model_dump(mode="json")`` (actions become tokens such as ``"3F0"``), load with
    ``Schedule.model_validate(data)``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ScheduleKind
    num_ranks: int = Field(gt=0)
    num_stages: int = Field(gt=0, description="Model stages a micro-batch passes through.")
    num_microbatches: int = Field(gt=0)
    stage_ranks: StageRanks = Field(description="[direction][stage] -> rank holding it.")
    direction_microbatches: tuple[int, ...] = Field(description="Micro-batches per direction, ids contiguous.")
    ranks: tuple[tuple[Action, ...], ...] = Field(description="[rank] -> actions in execution order.")

    @model_validator(mode="after")
    def _check_shape(self) -> Schedule:
        if len(self.ranks) != self.num_ranks:
            raise ScheduleError(f"ranks has {len(self.ranks)} rows but num_ranks={self.num_ranks}")
        if len(self.stage_ranks) != len(self.direction_microbatches):
            raise ScheduleError(
                f"stage_ranks has {len(self.stage_ranks)} directions but "
                f"direction_microbatches={self.direction_microbatches}"
            )
        if sum(self.direction_microbatches) != self.num_microbatches:
            raise ScheduleError(
                f"direction_microbatches={self.direction_microbatches} does not sum to "
                f"num_microbatches={self.num_microbatches}"
            )
        for direction, placement in enumerate(self.stage_ranks):
            if len(placement) != self.num_stages or not all(0 <= r < self.num_ranks for r in placement):
                raise ScheduleError(
                    f"stage_ranks[{direction}]={placement} must give a rank in 0..{self.num_ranks - 1} "
                    f"for each of num_stages={self.num_stages}"
                )
        for rank, actions in enumerate(self.ranks):
            for action in actions:
                for op in action.ops:
                    self._check_op_place(op, rank, action)
        return self

    def _check_op_place(self, op: Op, rank: int, action: Action) -> None:
        if op.stage >= self.num_stages or op.microbatch >= self.num_microbatches:
            raise ScheduleError(
                f"action={action} on rank={rank} is outside num_stages={self.num_stages}, "
                f"num_microbatches={self.num_microbatches}"
            )
        expected = self.rank_of(op.stage, op.microbatch)
        if expected != rank:
            raise ScheduleError(f"action={action} is listed on rank={rank} but stage {op.stage} lives on rank {expected}")

    @cached_property
    def _direction_starts(self) -> tuple[int, ...]:
        starts, total = [], 0
        for count in self.direction_microbatches:
            starts.append(total)
            total += count
        return tuple(starts)

    def direction_of(self, microbatch: int) -> int:
        """Which direction micro-batch ``microbatch`` travels (0 unless DualPipe's second half)."""
        for direction in reversed(range(len(self._direction_starts))):
            if microbatch >= self._direction_starts[direction]:
                return direction
        raise ScheduleError(f"microbatch={microbatch} is negative")

    def rank_of(self, stage: int, microbatch: int) -> int:
        """The rank that runs ``stage`` for ``microbatch``."""
        return self.stage_ranks[self.direction_of(microbatch)][stage]

    def stages_on_rank(self, rank: int) -> tuple[int, ...]:
        """Distinct model stages whose weights ``rank`` holds (DualPipe: its stage and the mirror)."""
        return stages_held(self.stage_ranks, rank)

    def chunks_on_rank(self, rank: int) -> tuple[tuple[int, int], ...]:
        """(direction, stage) pairs ``rank`` runs: the model chunks it keeps weights for."""
        return tuple((d, s) for d, placement in enumerate(self.stage_ranks) for s, r in enumerate(placement) if r == rank)
