"""The ``moeplan`` command line (typer + rich). Thin shell: every command calls pure functions.

Bad input becomes one line on stderr naming the field and the value, exit code 2, and nothing
written; a bug becomes one line naming a log file that holds its traceback, exit code 3: commands
raise, ``errors.ReportingGroup`` reports; files are rendered first and written last, all or none
(``outputs.write_outputs``). JSON we print or write is strict (``outputs.strict_json``: no NaN/Infinity).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moeplan.orchestrator.calibrate_cmd import calibrate_command
from moeplan.orchestrator.check_cmd import check_command
from moeplan.orchestrator.errors import ReportingGroup
from moeplan.orchestrator.launch_cmd import launch_command
from moeplan.orchestrator.manifests_cmd import manifests_command
from moeplan.orchestrator.outputs import strict_json
from moeplan.orchestrator.placement_cmd import placement_command
from moeplan.orchestrator.plan_cmd import plan_command
from moeplan.orchestrator.render import plan_tables, presets_table
from moeplan.orchestrator.schedule_cmd import schedule_command
from moeplan.orchestrator.submit_cmd import status_command, submit_command
from moeplan.simulator.contracts.plan_file import PlanFile, read_plan
from moeplan.simulator.contracts.run_report import RunReport
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
app.command("manifests")(manifests_command)
app.command("submit")(submit_command)
app.command("status")(status_command)
app.command("check")(check_command)
app.command("calibrate")(calibrate_command)
app.command("launch")(launch_command)
console = Console(width=140)


def main() -> None:
    """Console entry point: ``ReportingGroup.main`` reports every error as one line and exits."""
    app()


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
        typer.echo(strict_json(summary(loaded)))
    else:
        console.print(plan_tables(loaded))


@app.command()
def schema(
    document: Annotated[str, typer.Argument(help="plan or run (the run directory's run.json).")] = "plan",
    run: Annotated[bool, typer.Option("--run", help="The run report's schema (same as `schema run`).")] = False,
) -> None:
    """Print the JSON Schema of the plan file (default) or of the run report."""
    if document not in ("plan", "run"):
        raise typer.BadParameter(f"document={document!r} must be plan or run", param_hint="DOCUMENT")
    model = RunReport if run or document == "run" else PlanFile
    typer.echo(strict_json(model.model_json_schema()))


if __name__ == "__main__":
    main()
