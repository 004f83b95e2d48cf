"""Bad input, reported one way: one line on stderr naming the field and the value, exit code 2.

Commands raise; they never print errors or exit themselves. ``ReportingGroup``, the ``moeplan``
app's command group, turns the errors in ``USER_ERRORS`` into ``moeplan: error: ...``. Since every
command renders its files before it writes any (``outputs.write_outputs``), such an error leaves
nothing behind. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from moeplan.simulator.accounting.layout import LayoutError
from moeplan.simulator.contracts.plan_file import PlanError
from moeplan.simulator.schedules.actions import ScheduleError
from moeplan.simulator.spec.errors import first_error_line

BAD_INPUT_EXIT_CODE = 2


class InputError(ValueError):
    """Bad user input (an option, a file it names); the message is one line naming the field and the value."""


# Our boundaries' errors. A pydantic ValidationError is a spec built straight from options; OSError on a
# user's path is turned into InputError where the path is read or written, so a stray OSError stays a bug.
USER_ERRORS = (InputError, LayoutError, PlanError, ScheduleError, ValidationError)


def error_line(exc: Exception) -> str:
    """The one line an error is reported as (pydantic errors as ``field.path: message (got value)``)."""
    return first_error_line(exc) if isinstance(exc, ValidationError) else str(exc)


class ReportingGroup(TyperGroup):
    """The ``moeplan`` group: a command's ``USER_ERRORS`` become one line on stderr and exit code 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            typer.echo(f"moeplan: error: {error_line(exc)}", err=True)
            raise typer.Exit(BAD_INPUT_EXIT_CODE) from None
