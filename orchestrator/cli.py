"""The ``moeplan`` command line (typer + rich). Thin shell: every command calls pure functions.

Bad input becomes one line on stderr naming the field and the value, exit code 2, and nothing
written (files are written last, atomically).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from orchestrator.inputs import InputError, build_inputs
from orchestrator.overrides import OverrideError
from orchestrator.placement_cmd import placement_command
from orchestrator.render import plan_tables, presets_table
from orchestrator.schedule_cmd import schedule_command
from simulator.accounting.layout import LayoutError
from simulator.plan import PlanError, PlanFile, read_plan, write_plan
from simulator.planner import build_plan, summary

app = typer.Typer(
    name="moeplan",
    help="Plan, simulate, launch and check DeepSeek-V3-style MoE training runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("schedule")(schedule_command)
app.command("placement")(placement_command)
console = Console(width=140)
USER_ERRORS = (InputError, OverrideError, LayoutError, PlanError)


def fail(message: str) -> NoReturn:
    typer.echo(f"moeplan: error: {message}", err=True)
    raise typer.Exit(code=2)


@app.command()
def presets() -> None:
    """List the model and cluster presets."""
    console.print(presets_table())


@app.command()
def plan(
    model: Annotated[str, typer.Option(help="Model preset or path to a HF config.json.")] = "deepseek-v3",
    cluster: Annotated[str, typer.Option(help="Cluster preset (see `moeplan presets`).")] = "h800",
    nodes: Annotated[int | None, typer.Option(help="Nodes; default: the cluster preset's.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a setting: a.b=value (repeatable).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for plan.json.")] = Path("out"),
    json_: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Plan a training run: accounting, layout and memory; writes OUT/plan.json."""
    try:
        inputs, ignored = build_inputs(model, cluster, nodes, set_ or [])
        result = build_plan(inputs, tuple(ignored))
    except USER_ERRORS as exc:
        fail(str(exc))
    write_plan(result, out / "plan.json")
    if json_:
        typer.echo(json.dumps(summary(result), indent=2))
        return
    if ignored:
        console.print(f"[dim]config keys not modelled (ignored): {', '.join(ignored)}[/dim]")
    console.print(plan_tables(result))
    console.print(f"wrote {out / 'plan.json'}")


@app.command()
def show(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="plan.json or its directory.")],
    json_: Annotated[bool, typer.Option("--json", help="Print the flat summary object.")] = False,
) -> None:
    """Show a plan file."""
    try:
        loaded = read_plan(plan_path)
    except USER_ERRORS as exc:
        fail(str(exc))
    if json_:
        typer.echo(json.dumps(summary(loaded), indent=2))
    else:
        console.print(plan_tables(loaded))


@app.command()
def schema() -> None:
    """Print the plan file's JSON Schema."""
    typer.echo(json.dumps(PlanFile.model_json_schema(), indent=2))
