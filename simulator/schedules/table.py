"""The bubble table of ``docs/design/schedules.md``: closed form next to the executor, per kind and size."""

from __future__ import annotations

from collections.abc import Sequence

from moeplan.simulator.schedules.executor import Durations, execute
from moeplan.simulator.schedules.registry import SCHEDULE_KINDS, closed_form_bubble, make_schedule, schedule_kind
from moeplan.simulator.schedules.validate import check_schedule


def bubble_table_markdown(pps: Sequence[int], durations: Durations, microbatches_per_rank: int = 4) -> str:
    """Markdown rows: per kind, stages, formula, then ``closed form / executor`` bubble seconds per
    ``pp`` (``microbatches = microbatches_per_rank * pp``), then parameters and peak activations
    per rank at the largest ``pp``. ``conditions hold`` is for the largest ``pp``."""
    header = ["kind", "stages", "bubble", *(f"pp={pp}: closed / executor (s)" for pp in pps),
              "conditions hold", "params per rank (stages)", f"peak activations (pp={pps[-1]})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind in SCHEDULE_KINDS:
        cells, stats, schedule = [], None, None
        for pp in pps:
            schedule = make_schedule(kind, pp, microbatches_per_rank * pp)
            closed = closed_form_bubble(kind, pp, schedule.num_microbatches, durations)
            measured = execute(schedule, durations).bubble_s
            cells.append(f"{closed.bubble_s:g} / {measured:g}")
            stats = check_schedule(schedule)
        assert stats is not None and schedule is not None, f"{pps=}"
        per_rank = schedule_kind(kind).num_stages(1)  # stages per pp, at the default 2 chunks per rank
        stages = "pp" if per_rank == 1 else f"{per_rank} pp"
        lines.append(
            f"| {kind} | {stages} | {closed.formula} | " + " | ".join(cells)
            + f" | {'yes' if closed.holds else 'no'} | {max(stats.stages_per_rank)} | {max(stats.peak_activations)} |"
        )
    return "\n".join(lines) + "\n"
