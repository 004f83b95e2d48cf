"""Pipeline schedules as data: per-rank action lists made by pure generators, validated, replayed.

May import: ``spec``. The core (this package without ``figure``) imports neither torch nor plotly.

- ``make_schedule(kind, pp, num_microbatches, virtual_stages=2) -> Schedule``
- ``schedule_kind(kind) -> ScheduleKindEntry`` (``registry``): everything a kind implies (stages, the
  stages a rank holds, valid micro-batch counts, closed forms); nothing outside this package compares
  kind names
- ``check_schedule(schedule) -> ScheduleStats`` (raises ``ScheduleError``)
- ``execute(schedule, Durations(...)) -> Timeline`` (makespan, busy, bubble); ``needs(op, num_stages)``
  and ``produces(op)`` are the dependency rules it (and any other engine) applies
- ``closed_form_bubble(kind, pp, num_microbatches, durations) -> ClosedForm``
- ``schedule_to_torch_csv`` / ``schedule_from_torch_csv`` (``torch.distributed.pipelining`` CSV)
- ``lower(schedule, receives="early") -> LoweredSchedule`` (``lowering``): the implied point-to-point
  communication as per-rank batches (``RankProgram``, ``Step``, ``Batch``, ``P2POp``), and
  ``check_rendezvous(lowered)`` (raises ``ScheduleError``): the replay with blocking sends;
  ``lowered_to_torch_csv(lowered)`` (torch's ``compute_comms`` CSV)
- ``Schedule.model_dump(mode="json")`` / ``Schedule.model_validate(data)`` for the plan file.
"""

from moeplan.simulator.schedules.actions import ACTION_KINDS, Action, ActionKind, Op, OpKind, ScheduleError
from moeplan.simulator.schedules.bubble import ClosedForm
from moeplan.simulator.schedules.executor import Durations, TimedAction, Timeline, execute, needs, produces
from moeplan.simulator.schedules.lowering import (
    Batch,
    LoweredSchedule,
    P2POp,
    RankProgram,
    Step,
    check_rendezvous,
    lower,
    lowered_to_torch_csv,
)
from moeplan.simulator.schedules.registry import (
    SCHEDULE_KINDS,
    ScheduleKindEntry,
    closed_form_bubble,
    make_schedule,
    schedule_kind,
)
from moeplan.simulator.schedules.schedule import Schedule
from moeplan.simulator.schedules.torch_csv import schedule_from_torch_csv, schedule_to_torch_csv
from moeplan.simulator.schedules.validate import ScheduleStats, check_schedule, peak_activations

__all__ = [
    "ACTION_KINDS",
    "SCHEDULE_KINDS",
    "Action",
    "ActionKind",
    "Batch",
    "ClosedForm",
    "Durations",
    "LoweredSchedule",
    "Op",
    "OpKind",
    "P2POp",
    "RankProgram",
    "Schedule",
    "ScheduleError",
    "ScheduleKindEntry",
    "ScheduleStats",
    "Step",
    "TimedAction",
    "Timeline",
    "check_rendezvous",
    "check_schedule",
    "closed_form_bubble",
    "execute",
    "lower",
    "lowered_to_torch_csv",
    "make_schedule",
    "needs",
    "peak_activations",
    "produces",
    "schedule_from_torch_csv",
    "schedule_kind",
    "schedule_to_torch_csv",
]
