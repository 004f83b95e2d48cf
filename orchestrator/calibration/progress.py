"""What ``moeplan calibrate`` shows while it measures, on stderr: each measurement as it starts, and its seconds
(or why it was skipped) when it ends, with the seconds since calibration began.

On a terminal a rich progress bar shows the measurement under way, its own time counting, above a line per
measurement done. Elsewhere (a pipe, a log file) there is no bar: one line as a measurement starts and one as it
ends, each written at once, so a run killed mid-measurement shows which one it was in and how long the others took.
Every such line matches ``LINE``. At the end, one line of the seconds spent per kind of measurement.
"""

from __future__ import annotations

import re
import time
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moeplan.orchestrator.calibration.measure import Measurement

LINE = re.compile(r"^calibrate \[ *\d+\.\d s\] \d+/\d+ \w+: ")


class ProgressLines:
    """A ``measure.Reporter`` writing to ``console`` (see module docstring); use it as a context manager."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started = time.perf_counter()
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console, transient=True) if console.is_terminal else None
        self.task = None
        self.index = self.total = 0
        self.by_kind: dict[str, tuple[float, int]] = {}  # kind -> (seconds, measurements)

    def __enter__(self) -> Self:
        self.started = time.perf_counter()
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.stop()
        if kind is None:
            spent = ", ".join(f"{k} {s:.1f} s ({n})" for k, (s, n) in self.by_kind.items())
            self._print(f"calibrate: {time.perf_counter() - self.started:.1f} s in all; by kind (measurements): {spent}")

    def _line(self, item: Measurement, rest: str = "") -> str:
        return (f"calibrate [{time.perf_counter() - self.started:6.1f} s] {self.index + 1}/{self.total} {item.kind}: "
                f"{item.what}{rest}")

    def _print(self, line: str, style: str | None = None) -> None:
        self.console.print(line, style=style, markup=False, highlight=False, soft_wrap=True)

    def start(self, index: int, total: int, item: Measurement) -> None:
        self.index, self.total = index, total
        if self.bar is None:
            self._print(self._line(item, " ..."))
            return
        if self.task is None:
            self.task = self.bar.add_task("", total=total)
        self.bar.reset(self.task, total=total, completed=index, description=f"{item.kind}: {item.what}")

    def done(self, item: Measurement, elapsed_s: float, skipped: list[str]) -> None:
        seconds, count = self.by_kind.get(item.kind, (0.0, 0))
        self.by_kind[item.kind] = (seconds + elapsed_s, count + 1)
        if skipped:
            reason = "; ".join(s.removeprefix(f"{item.what}: ") for s in skipped)
            self._print(self._line(item, f" skipped after {elapsed_s:.2f} s: {reason}"), "bold red")
        else:
            self._print(self._line(item, f" {elapsed_s:.2f} s"))
