"""``plan --search``'s progress on a terminal's stderr (rich; off elsewhere: errors and notes are whole lines).

``planning.search`` reports its first stage, each layout checked (fits in memory, gets a step bound), as
``progress(done, total)``; its second, the candidates simulated in order of their bound until no other can
win, as ``simulated(done, fitting, best_step_s)``. The second is most of a large search's time (DeepSeek-V3 on
1,024 H800 nodes: 21 s checking 13,824 layouts, then 162 s simulating 861 of them), so it is a line of its own:
how many simulated, of at most how many (it stops early), the best step so far, and the elapsed time.
"""

from __future__ import annotations

from typing import Self

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

CHECKING = "checking layouts {done:,}/{total:,}"
SIMULATING = "simulating the layouts that may win"
SIMULATED = "simulated {done:,} of at most {fitting:,} layouts that fit, best step {best_s:.3g} s"


class SearchProgress:
    """The ``progress`` callback of ``search``, drawn as a transient rich progress bar while ``enabled``."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20), TimeElapsedColumn(),
                            console=console, transient=True, disable=not enabled)
        self.checking = self.bar.add_task("searching layouts", total=None)
        self.simulating: int | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.simulating is not None:
            return
        self.bar.update(self.checking, completed=done, total=total, description=CHECKING.format(done=done, total=total))
        if done == total:  # the last layout checked: the simulations come next, and say nothing
            self.bar.update(self.checking, visible=False)
            self.simulating = self.bar.add_task(SIMULATING, total=None)
        if done in (1, total):  # each stage drawn at once (then 10 times a second, by rich's thread)
            self.bar.refresh()

    def simulated(self, done: int, fitting: int, best_s: float) -> None:
        """``search``'s ``simulated`` callback: the second stage's count and best step so far."""
        if self.simulating is None:
            self.simulating = self.bar.add_task(SIMULATING, total=None)
        self.bar.update(self.simulating, description=SIMULATED.format(done=done, fitting=fitting, best_s=best_s))

    def __enter__(self) -> Self:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)
