"""The ``moeplan`` command line (typer + rich). Thin shell: every command calls pure functions.

Bad input becomes one line on stderr naming the field and the value, exit code 2, and nothing
written: commands raise, ``errors.ReportingGroup`` reports (and ``main`` reports usage errors the
same way); files are rendered first and written last, all or none (``outputs.write_outputs``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console

from moeplan.orchestrator.errors import BAD_INPUT_EXIT_CODE, ReportingGroup
from moeplan.orchestrator.placement_cmd import placement_command
from moeplan.orchestrator.plan_cmd import plan_command
from moeplan.orchestrator.render import plan_tables, presets_table
from moeplan.orchestrator.schedule_cmd import schedule_command
from moeplan.simulator.contracts.plan_file import PlanFile, read_plan
from moeplan.simulator.planning.planner import summary

app = typer.Typer(
    name="moeplan",
    help="Plan, simulate, launch and check DeepSeek-V3-style MoE training runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=ReportingGroup,
)
app.command("plan")(plan_command)
app.command("schedule")(schedule_command)
app.command("placement")(placement_command)
console = Console(width=140)


# typer >= 0.22 vendors click; its exceptions are not click's. BadParameter's base is UsageError in both.
_USAGE_ERRORS = (click.UsageError, typer.BadParameter.__mro__[1])


def main() -> None:
    """Console entry point: a usage error (mistyped option, bad value) becomes one line, exit 2."""
    try:
        code = app(standalone_mode=False)
    except _USAGE_ERRORS as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `moeplan`: help was wanted
            app(["--help"], standalone_mode=False)
            raise SystemExit(0) from None
        where = f"{exc.ctx.command_path}: " if getattr(exc, "ctx", None) else ""
        typer.echo(f"moeplan: error: {where}{exc.format_message()}", err=True)
        raise SystemExit(BAD_INPUT_EXIT_CODE) from None
    except (click.exceptions.Exit, typer.Exit) as exc:
        raise SystemExit(exc.exit_code) from None
    except (click.Abort, typer.Abort):
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)


@app.command()
def presets() -> None:
    """List the model and cluster presets."""
    console.print(presets_table())


@app.command()
def show(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="plan.json or its directory.")],
    json_: Annotated[bool, typer.Option("--json", help="Print the flat summary object.")] = False,
) -> None:
    """Show a plan file."""
    loaded = read_plan(plan_path)
    if json_:
        typer.echo(json.dumps(summary(loaded), indent=2))
    else:
        console.print(plan_tables(loaded))


@app.command()
def schema() -> None:
    """Print the plan file's JSON Schema."""
    typer.echo(json.dumps(PlanFile.model_json_schema(), indent=2))


if __name__ == "__main__":
    main()
