"""The launch's progress bar (rich, on stderr), fed by tailing ``RUN/metrics.jsonl`` from the driver.

Rank 0 appends and fsyncs one ``StepMetrics`` line per step; ``MetricsTail.poll`` reads the whole
lines added since the last poll (a rewound file, after a restart, is read again from its start).
``RunProgress`` shows step, loss, tokens/s/GPU, MFU (tokens/s/GPU x the plan's
``flops.model_flops_per_token`` / the cluster GPU's dense BF16 peak: the plan's and ``check``'s
definition; on the ``cpu`` cluster the preset's measured peak), ETA, and the whole run's GPU-hours
projected from the median step so far (``budget_guard.projected_gpu_hours``).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Self

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from moeplan.orchestrator.budget_guard import projected_gpu_hours
from moeplan.simulator.contracts.plan_file import PlanFile
from moeplan.simulator.contracts.run_report import METRICS_NAME, StepMetrics


class MetricsTail:
    """The steps appended to a ``metrics.jsonl`` since the last poll."""

    def __init__(self, run_dir: Path) -> None:
        self.path, self.offset = Path(run_dir) / METRICS_NAME, 0

    def poll(self) -> list[StepMetrics]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        if len(data) < self.offset:  # rewound to a checkpoint: read it again
            self.offset = 0
        end = data.rfind(b"\n") + 1
        if end <= self.offset:
            return []
        out = []
        for line in data[self.offset:end].splitlines():
            try:
                out.append(StepMetrics.model_validate_json(line))
            except ValidationError:
                continue  # the worker validated it; a line that is not one is not progress
        self.offset = end
        return out


def mfu_frac(plan: PlanFile, tokens_per_s_per_gpu: float) -> float:
    return tokens_per_s_per_gpu * plan.flops.model_flops_per_token / plan.inputs.cluster.gpu.bf16_flops_per_s


class RunProgress:
    """A rich progress bar over the run's steps (use as a context manager; call ``poll`` often)."""

    def __init__(self, plan: PlanFile, run_dir: Path, steps: int, console: Console, warmup_steps: int = 1) -> None:
        self.plan, self.tail, self.steps, self.warmup = plan, MetricsTail(run_dir), steps, warmup_steps
        self.walls: dict[int, float] = {}
        self.progress = Progress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console,
                                 transient=False)
        self.task = self.progress.add_task("train", total=steps, stats="starting the ranks")
        self.last: StepMetrics | None = None

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.poll()
        self.progress.stop()

    def poll(self) -> None:
        for m in self.tail.poll():
            self.walls = {s: w for s, w in self.walls.items() if s < m.step}
            self.walls[m.step] = m.wall_time_s
            self.last = m
        if self.last is not None:
            self.progress.update(self.task, completed=self.last.step + 1, stats=self.stats_line(self.last))

    def stats_line(self, m: StepMetrics) -> str:
        after = [w for s, w in sorted(self.walls.items()) if s >= self.warmup] or list(self.walls.values())
        hours = projected_gpu_hours(self.plan, statistics.median(after))
        shown = f"{hours:.4g}" if hours is not None else "-"
        return (f"loss {m.loss:.4f}  {m.tokens_per_s_per_gpu:,.0f} tok/s/GPU  "
                f"MFU {100 * mfu_frac(self.plan, m.tokens_per_s_per_gpu):.2f}%  run {shown} GPU-h")
