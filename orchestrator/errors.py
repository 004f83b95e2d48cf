"""User errors: one line on stderr naming the field and the value, exit code 2."""

from __future__ import annotations

from typing import NoReturn

import typer

from orchestrator.inputs import InputError
from orchestrator.overrides import OverrideError
from simulator.accounting.layout import LayoutError
from simulator.plan import PlanError
from simulator.schedules.actions import ScheduleError

USER_ERRORS = (InputError, OverrideError, LayoutError, PlanError, ScheduleError)


def fail(message: str) -> NoReturn:
    typer.echo(f"moeplan: error: {message}", err=True)
    raise typer.Exit(code=2)
