"""``moeplan schedule``: build a pipeline schedule, replay it, report its bubble, draw or export it.

Registered in ``orchestrator/cli.py`` as ``app.command("schedule")(schedule_command)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from moeplan.orchestrator.errors import InputError
from moeplan.orchestrator.inputs import finite_float
from moeplan.orchestrator.outputs import check_out_file, out_path, strict_json, write_outputs
from moeplan.orchestrator.render import schedule_view
from moeplan.simulator.schedules import (
    Durations,
    Schedule,
    Timeline,
    check_schedule,
    closed_form_bubble,
    execute,
    make_schedule,
    schedule_kind,
    schedule_to_torch_csv,
)
from moeplan.simulator.spec.errors import first_error_line
from moeplan.simulator.spec.parallel import ParallelSpec

_OUT_SUFFIXES = (".html", ".csv")
MAX_DURATION_S = 1e6  # a pass of more than 11 days is a typo; it also keeps every makespan finite


def _duration_help(field: str) -> str:
    """Help text from the ``Durations`` field, so the CLI never restates a default."""
    info = Durations.model_fields[field]
    default = "F+B" if info.default is None else f"{info.default:g}"
    return f"{info.description} Seconds; default {default}."


_OPTION_OF_FIELD = {"schedule": "kind"}  # ParallelSpec field -> the option that set it


def _spec(kind: str, pp: int, microbatches: int, virtual_stages: int | None) -> ParallelSpec:
    """The pipeline the options describe; a bad value is named by its option (``--kind`` sets ``schedule``)."""
    try:
        return ParallelSpec(
            pp=pp,
            schedule=kind,
            microbatches=microbatches,
            **({} if virtual_stages is None else {"virtual_stages": virtual_stages}),
        )
    except ValidationError as exc:
        raise InputError(first_error_line(exc, names=_OPTION_OF_FIELD)) from exc


def _report(spec: ParallelSpec, schedule: Schedule, durations: Durations, timeline: Timeline) -> dict[str, Any]:
    stats = check_schedule(schedule)
    closed = closed_form_bubble(schedule.kind, spec.pp, schedule.num_microbatches, durations)
    return {
        "kind": schedule.kind,
        "pp": schedule.num_ranks,
        "stages": schedule.num_stages,
        "microbatches": schedule.num_microbatches,
        "virtual_stages": spec.virtual_stages if schedule_kind(schedule.kind).uses_virtual_stages else None,
        "durations_s": {"f": durations.f_s, "b": durations.b_s, "w": durations.w_s, "fb": durations.overlap_s},
        "makespan_s": timeline.makespan_s,
        "bubble_s": timeline.bubble_s,
        "bubble_frac": timeline.bubble_frac,
        "closed_form": closed.model_dump(),
        "idle_s_per_rank": list(timeline.idle_s),
        "peak_activations_per_rank": list(stats.peak_activations),
        "parameter_copies_per_rank": list(stats.stages_per_rank),
        "action_counts_per_rank": [dict(counts) for counts in stats.action_counts],
    }


def _export(out: Path, schedule: Schedule, timeline: Timeline) -> str:
    """The ``--out`` file's text: the torch CSV, or the timeline drawn as self-contained HTML."""
    if out.suffix == ".csv":
        return schedule_to_torch_csv(schedule)
    from moeplan.simulator.schedules.figure import timeline_html  # plotly only when drawing

    return timeline_html(schedule, timeline)


def schedule_command(
    kind: Annotated[str, typer.Option(help="1f1b, interleaved, zb1p, dualpipe or dualpipev.")],
    pp: Annotated[int, typer.Option(help="Pipeline ranks (GPUs in one pipeline), for every kind.")],
    microbatches: Annotated[int, typer.Option(help="Micro-batches per step.")],
    f_s: Annotated[float | None, typer.Option("--f-s", help=_duration_help("f_s"), parser=finite_float)] = None,
    b_s: Annotated[float | None, typer.Option("--b-s", help=_duration_help("b_s"), parser=finite_float)] = None,
    w_s: Annotated[float | None, typer.Option("--w-s", help=_duration_help("w_s"), parser=finite_float)] = None,
    fb_s: Annotated[float | None, typer.Option("--fb-s", help=_duration_help("fb_s"), parser=finite_float)] = None,
    virtual_stages: Annotated[int | None, typer.Option(help="Chunks per rank (interleaved only).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write FILE.html (timeline) or FILE.csv (torch).", parser=out_path)] = None,
) -> None:
    """Build a pipeline schedule, replay it with the given durations, report the bubble."""
    if out is not None:
        if out.suffix not in _OUT_SUFFIXES:
            raise InputError(f"--out {out}: must end in .html or .csv")
        check_out_file(out, "--out")
    spec = _spec(kind, pp, microbatches, virtual_stages)
    given = {"f_s": f_s, "b_s": b_s, "w_s": w_s, "fb_s": fb_s}
    for name, value in given.items():
        if value is not None and value > MAX_DURATION_S:
            raise InputError(f"--{name.replace('_', '-')} {value:g}: must be at most {MAX_DURATION_S:g} seconds")
    durations = Durations(**{name: value for name, value in given.items() if value is not None})
    schedule = make_schedule(spec.schedule, spec.pp, microbatches, spec.virtual_stages)
    timeline = execute(schedule, durations)
    report = _report(spec, schedule, durations, timeline)
    if out is not None:
        write_outputs({out: _export(out, schedule, timeline)})
    if json_output:
        typer.echo(strict_json(report))
    else:
        Console().print(schedule_view(report))
        if out is not None:
            typer.echo(f"wrote {out}")
