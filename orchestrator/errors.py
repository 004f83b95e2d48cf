"""User errors: one line on stderr naming the field and the value, exit code 2."""

from __future__ import annotations

from typing import NoReturn

import typer

from moeplan.orchestrator.inputs import InputError
from moeplan.orchestrator.overrides import OverrideError
from moeplan.simulator.accounting.layout import LayoutError
from moeplan.simulator.contracts.plan_file import PlanError
from moeplan.simulator.schedules.actions import ScheduleError

USER_ERRORS = (InputError, OverrideError, LayoutError, PlanError, ScheduleError)


def fail(message: str) -> NoReturn:
    typer.echo(f"moeplan: error: {message}", err=True)
    raise typer.Exit(code=2)
