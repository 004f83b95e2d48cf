"""Errors, reported one way: one line on stderr, never a traceback.

Commands raise; they never print errors or exit themselves. ``ReportingGroup``, the ``moeplan`` app's
command group, reports:

- bad input (the errors in ``USER_ERRORS``, and usage errors such as a mistyped option or a value
  of the wrong type) as ``moeplan: error: ...`` naming the field and the value, exit code 2. Since
  every command renders its files before it writes any (``outputs.write_outputs``), nothing is left
  behind;
- a run that failed (``RunFailedError``: its workers kept failing) as ``moeplan: run failed: ...``,
  exit code 5;
- output whose reader went away (``moeplan show P | head -1``) as nothing at all, exit code 141, as a
  shell reports a writer whose pipe closed (1 while the help is printed: click's own handling);
- anything else, a bug, as ``moeplan: internal error: ...`` plus the path of a log file holding the
  traceback (``moeplan-crash-*.log`` in the temporary directory), exit code 3.

``note`` is the one other line a command may print on stderr: what it assumed (exit code 0).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Self

import click
import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from moeplan.simulator.accounting.layout import LayoutError
from moeplan.simulator.contracts.plan_file import PlanError
from moeplan.simulator.schedules.actions import ScheduleError
from moeplan.simulator.spec.errors import first_error_line

BAD_INPUT_EXIT_CODE = 2
INTERNAL_ERROR_EXIT_CODE = 3
INTERRUPTED_EXIT_CODE = 130
RUN_FAILED_EXIT_CODE = 5
TERMINATED_EXIT_CODE = 143  # 128 + SIGTERM, as a shell reports it
BROKEN_PIPE_EXIT_CODE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader closed the pipe
MAX_LINE_CHARS = 2000  # a reported line quotes what it was given, up to this long


class InputError(ValueError):
    """Bad user input (an option, a file it names); the message is one line naming the field and the value."""


class RunFailedError(RuntimeError):
    """A launched run that failed (not bad input, not a bug); the message is one line."""


# Our boundaries' errors. A pydantic ValidationError is a spec built straight from options; OSError on a
# user's path is turned into InputError where the path is read or written, so a stray OSError stays a bug.
USER_ERRORS = (InputError, LayoutError, PlanError, ScheduleError, ValidationError)
# typer >= 0.22 vendors click; its exceptions are not click's. BadParameter's bases are UsageError, then
# ClickException, in both.
_CLICK_ERRORS = (click.ClickException, typer.BadParameter.__mro__[2])
_CLICK_FLOW = (click.exceptions.Exit, typer.Exit, click.Abort, typer.Abort, *_CLICK_ERRORS)


def one_line(text: str) -> str:
    """``text`` as one printable line: line breaks and other control characters escaped, and cut to
    ``MAX_LINE_CHARS``, so that what a user typed or a file held cannot spill over several lines."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return line if len(line) <= MAX_LINE_CHARS else line[: MAX_LINE_CHARS - 3] + "..."


def error_line(exc: Exception) -> str:
    """The one line an error is reported as (pydantic errors as ``field.path: message (got value)``)."""
    return one_line(first_error_line(exc) if isinstance(exc, ValidationError) else str(exc))


def note(line: str) -> None:
    """What a command assumed where its inputs disagree without being unusable: ``moeplan: note: ...`` on
    stderr (stdout stays the command's output, strict JSON with ``--json``)."""
    typer.echo(f"moeplan: note: {one_line(line)}", err=True)


def crash_log(exc: BaseException) -> str | None:
    """Write ``exc``'s traceback to a new ``moeplan-crash-*.log`` in the temporary directory; its path,
    or None when it cannot be written."""
    try:
        with tempfile.NamedTemporaryFile("w", prefix="moeplan-crash-", suffix=".log", delete=False,
                                         encoding="utf-8", errors="backslashreplace") as log:
            log.write(f"moeplan {' '.join(sys.argv[1:])}\n\n")
            log.write("".join(traceback.format_exception(exc)))
            return log.name
    except OSError:
        return None


def report_internal_error(exc: BaseException) -> int:
    """One line for a bug: what broke and where its traceback is; returns ``INTERNAL_ERROR_EXIT_CODE``."""
    path = crash_log(exc)
    where = f"traceback in {path}" if path else "its traceback could not be written"
    what = one_line(f"{type(exc).__name__}: {exc}")[:300]
    typer.echo(f"moeplan: internal error (a bug; please report it): {what} ({where})", err=True)
    return INTERNAL_ERROR_EXIT_CODE


class Terminated(BaseException):
    """SIGTERM, raised wherever the process is, so that cleanups run (``write_outputs`` removes its
    temporaries) instead of the process vanishing mid-write."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextmanager
def _terminate_by_exception() -> Iterator[None]:
    """While a command runs (in the main thread), SIGTERM raises ``Terminated``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class DeferredSignals:
    """While a command waits on something that is not Python (Ray's ``wait``: an exception raised inside
    it comes out as a ``SystemError``), SIGTERM and SIGINT are only noted; ``check()``, called where the
    command polls, raises ``Terminated`` or ``KeyboardInterrupt`` there. Main thread only (else a no-op)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum

    def check(self) -> None:
        if self.received == signal.SIGTERM:
            raise Terminated
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.check()  # a signal that came after the last poll still stops the command


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (an in-process test runner's stream)
        pass


class ReportingGroup(TyperGroup):
    """The ``moeplan`` group: bad input is one line and exit code 2, a bug one line and exit code 3."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            typer.echo(f"moeplan: error: {error_line(exc)}", err=True)
            raise typer.Exit(BAD_INPUT_EXIT_CODE) from None
        except RunFailedError as exc:
            typer.echo(f"moeplan: run failed: {one_line(str(exc))}", err=True)
            raise typer.Exit(RUN_FAILED_EXIT_CODE) from None
        except _CLICK_FLOW:  # usage errors, exits and aborts: ``main`` reports them
            raise
        except BrokenPipeError:  # `moeplan show P | head -1`: the reader has what it wanted
            _stdout_to_devnull()
            raise typer.Exit(BROKEN_PIPE_EXIT_CODE) from None
        except Exception as exc:  # noqa: BLE001 -- a bug: one line here, the traceback in a log file
            raise typer.Exit(report_internal_error(exc)) from None

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        """As typer's, but a usage error is one line too (``moeplan: error: plan: Invalid value for ...``),
        a bare ``moeplan`` prints the help, an interrupt exits 130 and SIGTERM 143, without a traceback
        and after cleaning up (``Terminated``)."""
        try:
            with _terminate_by_exception():
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Terminated:
            typer.echo("moeplan: terminated (SIGTERM); files are written whole or not at all", err=True)
            code = TERMINATED_EXIT_CODE
        except _CLICK_ERRORS as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `moeplan`: help was wanted
                super().main(["--help"], prog_name, complete_var, standalone_mode=False, **extra)
                code = 0
            else:
                where = f"{exc.ctx.command_path}: " if getattr(exc, "ctx", None) else ""
                message = exc.format_message().replace("Value error, ", "")  # pydantic's, from typer's parsers
                typer.echo(f"moeplan: error: {one_line(where + message)}", err=True)
                code = exc.exit_code
        except (click.Abort, typer.Abort, KeyboardInterrupt):
            code = INTERRUPTED_EXIT_CODE
        except Exception as exc:  # noqa: BLE001 -- a bug while parsing the command line
            code = report_internal_error(exc)
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code
