"""Export to and import from the ``torch.distributed.pipelining`` compute-only schedule CSV.

One row per rank, one cell per action, in order: ``0F0``, ``1B0``, ``1I0``, ``2W0`` (stage, type,
micro-batch); an overlapped pair is ``(0F7;7B3)OVERLAP_F_B``, forward first. ``torch`` reads this
with ``_PipelineScheduleRuntime._load_csv(path, format="compute_only")`` and infers the stage to
rank placement from the rows, so it fits every schedule with one stage placement: 1f1b,
interleaved, zb1p, dualpipev. DualPipe is refused: its two copies of each stage would share one
stage index in torch's notation.

On import, empty cells (torch's idle steps) are skipped and the bookkeeping actions torch inserts
itself (``REDUCE_GRAD``, ``UNSHARD``, ``RESHARD``) are dropped; communication actions
(``SEND_F`` ...) are refused because our schedules imply communication.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable

from moeplan.simulator.schedules.actions import Action, Op, ScheduleError
from moeplan.simulator.schedules.schedule import Schedule
from moeplan.simulator.schedules.validate import check_schedule
from moeplan.simulator.spec.parallel import ScheduleKind

_OVERLAP_RE = re.compile(r"^\(([^;()]+);([^;()]+)\)OVERLAP_F_B$")
_DROPPED_RE = re.compile(r"^\d+(REDUCE_GRAD|UNSHARD|RESHARD)\d*$")
_COMMS_RE = re.compile(r"^\d+(SEND_F|RECV_F|SEND_B|RECV_B)\d*$")


def torch_token(action: Action) -> str:
    """``Action`` -> torch's action string."""
    if action.kind == "FB":
        forward, backward = action.ops
        return f"({forward};{backward})OVERLAP_F_B"
    return str(action)


def write_torch_csv(schedule: Schedule, rows: Iterable[list[str]]) -> str:
    """CSV text of ``rows`` (one list of torch action strings per rank) for ``schedule``, refused
    unless ``schedule`` has one stage placement (``compute_only`` here, ``compute_comms`` in ``lowering``)."""
    if len(schedule.stage_ranks) != 1:
        raise ScheduleError(
            f"kind={schedule.kind} has {len(schedule.stage_ranks)} stage placements; the torch CSV "
            "names a stage by index only, so it can hold one"
        )
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def schedule_to_torch_csv(schedule: Schedule) -> str:
    """The torch compute-only CSV text for ``schedule`` (one row per rank)."""
    return write_torch_csv(schedule, ([torch_token(a) for a in actions] for actions in schedule.ranks))


def _parse_cell(cell: str, rank: int, column: int) -> Action | None:
    token = cell.strip()
    if not token or _DROPPED_RE.match(token):
        return None
    if _COMMS_RE.match(token):
        raise ScheduleError(f"csv rank={rank} column={column}: {token!r} is a communication action; use compute_only")
    match = _OVERLAP_RE.match(token)
    try:
        if match:
            ops = sorted((Op.parse(part) for part in match.groups()), key=lambda op: op.kind != "F")
            return Action.overlap(*ops)
        return Action(ops=(Op.parse(token),))
    except ValueError as error:
        raise ScheduleError(f"csv rank={rank} column={column}: cannot read {token!r} ({error})") from error


def _stage_ranks(rows: list[list[Action]]) -> tuple[int, ...]:
    placement: dict[int, int] = {}
    for rank, actions in enumerate(rows):
        for op in (op for action in actions for op in action.ops):
            if placement.setdefault(op.stage, rank) != rank:
                raise ScheduleError(f"csv stage={op.stage} appears on rank={placement[op.stage]} and rank={rank}")
    missing = sorted(set(range(max(placement, default=-1) + 1)) - set(placement))
    if not placement or missing:
        raise ScheduleError(f"csv has no actions for stages {missing or 'at all'}")
    return tuple(placement[s] for s in range(len(placement)))


def schedule_from_torch_csv(text: str, kind: ScheduleKind) -> Schedule:
    """Read torch's compute-only CSV as a validated ``Schedule`` of ``kind``."""
    rows = [
        [a for column, cell in enumerate(row) if (a := _parse_cell(cell, rank, column)) is not None]
        for rank, row in enumerate(csv.reader(io.StringIO(text)))
    ]
    stage_ranks = _stage_ranks(rows)
    num_microbatches = 1 + max(op.microbatch for actions in rows for a in actions for op in a.ops)
    schedule = Schedule(
        kind=kind,
        num_ranks=len(rows),
        num_stages=len(stage_ranks),
        num_microbatches=num_microbatches,
        stage_ranks=(stage_ranks,),
        direction_microbatches=(num_microbatches,),
        ranks=tuple(tuple(actions) for actions in rows),
    )
    check_schedule(schedule)
    return schedule
