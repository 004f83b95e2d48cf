"""The schedule kinds, one entry each: the only place that tells kinds apart by name.

An entry gives, for ``pp`` ranks and ``v`` chunks per rank (read by interleaved only):

- ``generator``: the pure function that writes the per-rank action lists (``make_schedule``);
- ``stage_ranks``: where each stage lives, per direction: the stages a pipeline has and the stages a
  rank holds (``num_stages``, ``rank_stages``) both follow from it, and the generator uses it too;
- ``pp_error`` / ``microbatch_error``: the sizes the generator admits, as the reason it would refuse
  them (``accepts``, ``smallest_valid``): planner, search, phase layouts and step lines ask here;
- the closed-form bubble (``bubble.py``) and the in-flight activations at a rank's peak (the memory
  model's closed form when no schedule is replayed).

Everything outside ``schedules/`` asks this module (or a ``ParallelSpec`` helper below) instead of
comparing kind strings; ``tests/simulator/schedules/test_registry.py`` greps the tree for that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import get_args

from moeplan.simulator.schedules._checks import require, require_no_error
from moeplan.simulator.schedules.bubble import (
    ClosedForm,
    dualpipe_bubble,
    dualpipev_bubble,
    interleaved_bubble,
    one_f_one_b_bubble,
    zb1p_bubble,
)
from moeplan.simulator.schedules.dualpipe import (
    dualpipe,
    dualpipe_microbatch_error,
    dualpipe_pp_error,
    dualpipe_stage_ranks,
    dualpipev,
    dualpipev_microbatch_error,
    dualpipev_stage_ranks,
)
from moeplan.simulator.schedules.executor import Durations
from moeplan.simulator.schedules.interleaved import (
    interleaved_1f1b,
    interleaved_microbatch_error,
    interleaved_stage_ranks,
)
from moeplan.simulator.schedules.one_f_one_b import chain_stage_ranks, one_f_one_b, zb1p
from moeplan.simulator.schedules.schedule import Schedule, StageRanks, stages_held
from moeplan.simulator.spec.parallel import ParallelSpec, ScheduleKind


def _no_error(*_: int) -> str | None:
    return None


@dataclass(frozen=True)
class ScheduleKindEntry:
    """What one schedule kind means for a layout (see the module docstring)."""

    name: ScheduleKind
    generator: Callable[[int, int, int], Schedule]  # (pp, microbatches, v)
    stage_ranks: Callable[[int, int], StageRanks]  # (pp, v) -> [direction][stage] -> rank
    bubble: Callable[[int, int, Durations], tuple[float, bool]]  # (pp, microbatches, durations)
    bubble_formula: str
    bubble_condition: str
    in_flight: Callable[[int, int, int, int], float]  # (pp, v, rank, microbatches)
    pp_error: Callable[[int], str | None] = _no_error
    microbatch_error: Callable[[int, int], str | None] = _no_error  # (pp, microbatches), beyond >= 1
    uses_virtual_stages: bool = False  # ``v`` changes the layout (interleaved's chunks per rank)

    def num_stages(self, pp: int, v: int = 2) -> int:
        """Model stages a micro-batch passes through."""
        return len(self.stage_ranks(pp, v)[0])

    def directions(self, pp: int, v: int = 2) -> int:
        """Directions the micro-batches are split over; with 2 (DualPipe) each stage lives on two
        ranks (a mirrored copy whose gradients meet their twin's) and each copy runs half of them."""
        return len(self.stage_ranks(pp, v))

    def rank_stages(self, pp: int, v: int, rank: int) -> tuple[int, ...]:
        """Stages whose weights ``rank`` holds, ascending (``schedule.stages_held``)."""
        return stages_held(self.stage_ranks(pp, v), rank)

    def accepts(self, pp: int, microbatches: int) -> bool:
        """Whether the generator runs ``microbatches`` on ``pp`` ranks (a valid ``pp`` assumed)."""
        return microbatches >= 1 and self.microbatch_error(pp, microbatches) is None

    def smallest_valid(self, pp: int, microbatches: int) -> int:
        """The smallest micro-batch count >= ``microbatches`` (and >= 1) that ``accepts``."""
        m = max(1, microbatches)
        limit = m + 2 * pp + 2  # every kind accepts an even multiple of pp that is >= 2 pp
        while not self.accepts(pp, m):
            m += 1
            assert m <= limit, f"{self.name=} {pp=} {microbatches=}"
        return m


def _one_f_one_b_in_flight(pp: int, v: int, rank: int, m: int) -> float:
    return float(min(m, pp - rank))  # warm-up pp-1-rank, plus the one in its backward


def _zb1p_in_flight(pp: int, v: int, rank: int, m: int) -> float:
    return float(min(m, pp))  # deferred weight gradients keep inputs alive on every rank


def _interleaved_in_flight(pp: int, v: int, rank: int, m: int) -> float:
    return min(v * m, 2 * (pp - 1 - rank) + (v - 1) * pp + 1) / v  # Megatron's warm-up, in chunks


def _dualpipe_in_flight(pp: int, v: int, rank: int, m: int) -> float:
    return min(m, pp + 1) / 2  # pp + 1 stage micro-batches over the rank's 2 stages


def _dualpipev_in_flight(pp: int, v: int, rank: int, m: int) -> float:
    return min(2 * m, 2 * pp + 1) / 2  # PP + 1 with PP = 2 pp stages, over the rank's 2 chunks


_OVERLAP_CONDITION = "B-W = F, W <= F, max(F,B) <= F&B <= F+B"

ENTRIES: dict[ScheduleKind, ScheduleKindEntry] = {
    entry.name: entry
    for entry in (
        ScheduleKindEntry(
            name="1f1b", generator=lambda pp, m, v: one_f_one_b(pp, m), stage_ranks=lambda pp, v: chain_stage_ranks(pp),
            bubble=one_f_one_b_bubble, bubble_formula="(pp-1)(F+B)", bubble_condition="always",
            in_flight=_one_f_one_b_in_flight,
        ),
        ScheduleKindEntry(
            name="interleaved", generator=interleaved_1f1b, stage_ranks=interleaved_stage_ranks,
            bubble=interleaved_bubble, bubble_formula="(pp-1)(F+B)", bubble_condition="pp divides microbatches",
            in_flight=_interleaved_in_flight, microbatch_error=interleaved_microbatch_error, uses_virtual_stages=True,
        ),
        ScheduleKindEntry(
            name="zb1p", generator=lambda pp, m, v: zb1p(pp, m), stage_ranks=lambda pp, v: chain_stage_ranks(pp),
            bubble=zb1p_bubble, bubble_formula="(pp-1)(F+B-2W)", bubble_condition="microbatches >= pp, W <= F, W <= B-W",
            in_flight=_zb1p_in_flight,
        ),
        ScheduleKindEntry(
            name="dualpipe", generator=lambda pp, m, v: dualpipe(pp, m), stage_ranks=lambda pp, v: dualpipe_stage_ranks(pp),
            bubble=dualpipe_bubble, bubble_formula="(pp/2-1)(F&B+B-3W)", bubble_condition=_OVERLAP_CONDITION,
            in_flight=_dualpipe_in_flight, pp_error=dualpipe_pp_error, microbatch_error=dualpipe_microbatch_error,
        ),
        ScheduleKindEntry(
            name="dualpipev", generator=lambda pp, m, v: dualpipev(pp, m),
            stage_ranks=lambda pp, v: dualpipev_stage_ranks(pp),
            bubble=dualpipev_bubble, bubble_formula="(pp-1)(F&B+B-3W)", bubble_condition=_OVERLAP_CONDITION,
            in_flight=_dualpipev_in_flight, microbatch_error=dualpipev_microbatch_error,
        ),
    )
}
SCHEDULE_KINDS: tuple[ScheduleKind, ...] = tuple(ENTRIES)
assert SCHEDULE_KINDS == get_args(ScheduleKind), f"{SCHEDULE_KINDS=} {get_args(ScheduleKind)=}"


def schedule_kind(kind: str) -> ScheduleKindEntry:
    """The registry entry of ``kind``; ``ScheduleError`` naming the kinds for an unknown one."""
    require(kind in ENTRIES, f"kind={kind!r} must be one of {', '.join(SCHEDULE_KINDS)}")
    return ENTRIES[kind]  # type: ignore[index]


# A schedule holds stages x micro-batches forward passes (and as many backward): beyond this many the
# generators, the replay and the memory model would run for minutes, so the size is refused before any
# work (DeepSeek-V3's published layout has 16 x 120; the largest a default search builds, 16 x 4096).
MAX_STAGE_MICROBATCHES = 2**17


def size_error(kind: ScheduleKind, pp: int, num_microbatches: int, virtual_stages: int = 2) -> str | None:
    """Why a schedule of this size is refused (stages x micro-batches over ``MAX_STAGE_MICROBATCHES``), or None."""
    most = pp * max(2, virtual_stages)  # no kind has more stages; bounds the stage list before it is built
    stages = schedule_kind(kind).num_stages(pp, virtual_stages) if most <= MAX_STAGE_MICROBATCHES else most
    if stages * num_microbatches > MAX_STAGE_MICROBATCHES:
        return (f"microbatches={num_microbatches} over stages={stages} make {stages * num_microbatches:,} stage passes, "
                f"more than the {MAX_STAGE_MICROBATCHES:,} a schedule may hold")
    return None


@lru_cache(maxsize=256)  # schedules are frozen values; the search asks for the same ones many times
def make_schedule(kind: ScheduleKind, pp: int, num_microbatches: int, virtual_stages: int = 2) -> Schedule:
    """The ``kind`` schedule on ``pp`` ranks (GPUs in one pipeline) for ``num_microbatches``.

    ``virtual_stages`` (chunks per rank) is read only by ``interleaved``. Stages per kind:
    ``pp`` for 1f1b, zb1p, dualpipe; ``virtual_stages * pp`` for interleaved; ``2 pp`` for dualpipev.
    A size over ``MAX_STAGE_MICROBATCHES`` raises ``ScheduleError`` before any work.
    """
    require_no_error(size_error(kind, pp, num_microbatches, virtual_stages))
    return schedule_kind(kind).generator(pp, num_microbatches, virtual_stages)


def closed_form_bubble(kind: ScheduleKind, pp: int, num_microbatches: int, durations: Durations) -> ClosedForm:
    """The table's bubble for ``kind`` on ``pp`` ranks; ``holds`` says if the conditions are met."""
    entry = schedule_kind(kind)
    bubble_s, holds = entry.bubble(pp, num_microbatches, durations)
    return ClosedForm(formula=entry.bubble_formula, condition=entry.bubble_condition, bubble_s=bubble_s, holds=holds)


# ParallelSpec helpers: what a layout's schedule implies, for the rooms that hold a ParallelSpec.


def num_stages(parallel: ParallelSpec) -> int:
    """Pipeline stages (model chunks) of the layout."""
    return schedule_kind(parallel.schedule).num_stages(parallel.pp, parallel.virtual_stages)


def rank_stages(parallel: ParallelSpec, rank: int) -> tuple[int, ...]:
    """Stages whose parameters pipeline rank ``rank`` holds. 1F1B / ZB1P: ``rank``. Interleaved:
    ``rank + k*pp``. DualPipe: ``rank`` and its mirror ``pp-1-rank`` (2x parameters). DualPipeV:
    ``rank`` and ``2*pp-1-rank``."""
    return schedule_kind(parallel.schedule).rank_stages(parallel.pp, parallel.virtual_stages, rank)


def microbatch_error(parallel: ParallelSpec, microbatches: int) -> str | None:
    """Why the layout's schedule cannot run ``microbatches`` (or its ``pp``), or None."""
    entry = schedule_kind(parallel.schedule)
    if microbatches < 1:
        return f"microbatches={microbatches} must be >= 1"
    return (entry.pp_error(parallel.pp) or entry.microbatch_error(parallel.pp, microbatches)
            or size_error(parallel.schedule, parallel.pp, microbatches, parallel.virtual_stages))


def smallest_valid_microbatches(parallel: ParallelSpec, microbatches: int) -> int:
    """The smallest micro-batch count >= ``microbatches`` the layout's schedule runs."""
    return schedule_kind(parallel.schedule).smallest_valid(parallel.pp, microbatches)


def in_flight_microbatches(parallel: ParallelSpec, rank: int, microbatches: int) -> float:
    """Micro-batches whose activations rank ``rank`` holds at its peak, in units of one
    micro-batch through *all* the rank's stages (closed forms; replaying the schedule is exact).

    1F1B: ``pp - rank`` (Narayanan et al. 2021). ZB1P: ``pp`` on every rank, since deferred weight
    gradients keep inputs alive (DualPipe README table; the replay of our ZB1P agrees). Interleaved:
    Megatron's warm-up ``2(pp-1-rank) + (v-1)pp + 1`` chunk micro-batches, over ``v`` chunks.
    DualPipe: ``pp + 1`` stage micro-batches over 2 stages. DualPipeV: ``2pp + 1`` chunk
    micro-batches over 2 chunks (DualPipe README table: PP+1 with PP counted in stages).
    """
    entry = schedule_kind(parallel.schedule)
    return entry.in_flight(parallel.pp, parallel.virtual_stages, rank, microbatches)
