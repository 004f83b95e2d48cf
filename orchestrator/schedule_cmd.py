"""``moeplan schedule``: build a pipeline schedule, replay it, report its bubble, draw or export it.

Registered in ``orchestrator/cli.py`` as ``app.command("schedule")(schedule_command)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.schedules import (
    Durations,
    Schedule,
    ScheduleError,
    Timeline,
    check_schedule,
    closed_form_bubble,
    execute,
    make_schedule,
    schedule_to_torch_csv,
)
from moeplan.simulator.spec.parallel import ParallelSpec

_OUT_SUFFIXES = (".html", ".csv")


def _duration_help(field: str) -> str:
    """Help text from the ``Durations`` field, so the CLI never restates a default."""
    info = Durations.model_fields[field]
    default = "F+B" if info.default is None else f"{info.default:g}"
    return f"{info.description} Seconds; default {default}."


_OPTION_OF_FIELD = {"schedule": "kind"}  # ParallelSpec field -> the option that set it


def _one_line(error: ValidationError) -> str:
    """First pydantic error as ``field=value: message`` (model-level errors name their fields)."""
    first = error.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:
        return message
    field = ".".join(_OPTION_OF_FIELD.get(str(part), str(part)) for part in first["loc"])
    return f"{field}={first.get('input')!r}: {message}"


def _report(spec: ParallelSpec, schedule: Schedule, durations: Durations, timeline: Timeline) -> dict[str, Any]:
    stats = check_schedule(schedule)
    closed = closed_form_bubble(schedule.kind, spec.pp, schedule.num_microbatches, durations)
    return {
        "kind": schedule.kind,
        "pp": schedule.num_ranks,
        "stages": schedule.num_stages,
        "microbatches": schedule.num_microbatches,
        "virtual_stages": spec.virtual_stages if schedule.kind == "interleaved" else None,
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


def _print_table(report: dict[str, Any]) -> None:
    console = Console()
    closed = report["closed_form"]
    console.print(
        f"[bold]{report['kind']}[/]: pp={report['pp']} ranks, {report['stages']} stages, "
        f"{report['microbatches']} micro-batches; makespan {report['makespan_s']:.6g} s, "
        f"bubble {report['bubble_s']:.6g} s ({100 * report['bubble_frac']:.2f}%); closed form "
        f"{closed['formula']} = {closed['bubble_s']:.6g} s "
        f"({'holds' if closed['holds'] else 'conditions not met: ' + closed['condition']})"
    )
    table = Table("rank", "idle (s)", "peak activations", "parameter copies", "F", "B", "I", "W", "F&B")
    for rank, idle_s in enumerate(report["idle_s_per_rank"]):
        counts = report["action_counts_per_rank"][rank]
        table.add_row(
            str(rank),
            f"{idle_s:.6g}",
            str(report["peak_activations_per_rank"][rank]),
            str(report["parameter_copies_per_rank"][rank]),
            *(str(counts[k]) for k in ("F", "B", "I", "W", "FB")),
        )
    console.print(table)


def schedule_command(
    kind: Annotated[str, typer.Option(help="1f1b, interleaved, zb1p, dualpipe or dualpipev.")],
    pp: Annotated[int, typer.Option(help="Pipeline ranks (GPUs in one pipeline), for every kind.")],
    microbatches: Annotated[int, typer.Option(help="Micro-batches per step.")],
    f_s: Annotated[float | None, typer.Option("--f-s", help=_duration_help("f_s"))] = None,
    b_s: Annotated[float | None, typer.Option("--b-s", help=_duration_help("b_s"))] = None,
    w_s: Annotated[float | None, typer.Option("--w-s", help=_duration_help("w_s"))] = None,
    fb_s: Annotated[float | None, typer.Option("--fb-s", help=_duration_help("fb_s"))] = None,
    virtual_stages: Annotated[int | None, typer.Option(help="Chunks per rank (interleaved only).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write FILE.html (timeline) or FILE.csv (torch).")] = None,
) -> None:
    """Build a pipeline schedule, replay it with the given durations, report the bubble."""
    try:
        if out is not None and out.suffix not in _OUT_SUFFIXES:
            raise ScheduleError(f"out={str(out)!r} must end in .html or .csv")
        spec = ParallelSpec(
            pp=pp,
            schedule=kind,
            microbatches=microbatches,
            **({} if virtual_stages is None else {"virtual_stages": virtual_stages}),
        )
        given = {"f_s": f_s, "b_s": b_s, "w_s": w_s, "fb_s": fb_s}
        durations = Durations(**{name: value for name, value in given.items() if value is not None})
        schedule = make_schedule(spec.schedule, spec.pp, microbatches, spec.virtual_stages)
        assert schedule.num_stages == spec.stages, f"{schedule.num_stages=} {spec.stages=}"
        timeline = execute(schedule, durations)
        report = _report(spec, schedule, durations, timeline)
        text = None
        if out is not None and out.suffix == ".csv":
            text = schedule_to_torch_csv(schedule)
        elif out is not None:
            from moeplan.simulator.schedules.figure import timeline_html  # plotly only when drawing

            text = timeline_html(schedule, timeline)
    except ValidationError as error:
        typer.echo(f"error: {_one_line(error)}", err=True)
        raise typer.Exit(2) from None
    except ScheduleError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    if out is not None and text is not None:
        try:
            write_atomic(out, text)
        except OSError as error:
            typer.echo(f"error: out={str(out)!r}: {error.strerror}", err=True)
            raise typer.Exit(2) from None
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_table(report)
        if out is not None:
            typer.echo(f"wrote {out}")
