"""Closed-form pipeline bubbles (DualPipe README table; DeepSeek-V3 TR Table 2) and when they hold.

``F``, ``B`` (full backward), ``W`` (weight backward) and ``F&B`` are per-action durations, ``I = B - W``.
``pp`` counts ranks. The executor's bubble is ``makespan - min(busy)``: the longest any rank idles.

==============  ================================  =============================================
kind            bubble                            holds when (checked by the executor tests)
==============  ================================  =============================================
1f1b            (pp-1)(F+B)                       always
interleaved     (pp-1)(F+B), F, B per chunk       pp divides M
zb1p            (pp-1)(F+B-2W)                    M >= pp, W <= F and W <= I
dualpipe        (pp/2-1)(F&B+B-3W)                I = F, W <= F, max(F, B) <= F&B <= F+B
dualpipev       (pp-1)(F&B+B-3W), 2 pp stages     I = F, W <= F, max(F, B) <= F&B <= F+B
==============  ================================  =============================================

The README writes DualPipeV's row with PP = stages = 2 pp, i.e. ``(PP/2-1)(F&B+B-3W)``; with ``pp``
ranks that is ``(pp-1)(F&B+B-3W)``. Outside the conditions the executor is the answer; the closed
form is then only indicative (for DualPipe(V) with ``I != F`` it is off by multiples of ``I - F``).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from moeplan.simulator.schedules.executor import Durations
from moeplan.simulator.spec.parallel import ScheduleKind

FORMULAS: dict[ScheduleKind, str] = {
    "1f1b": "(pp-1)(F+B)",
    "interleaved": "(pp-1)(F+B)",
    "zb1p": "(pp-1)(F+B-2W)",
    "dualpipe": "(pp/2-1)(F&B+B-3W)",
    "dualpipev": "(pp-1)(F&B+B-3W)",
}
CONDITIONS: dict[ScheduleKind, str] = {
    "1f1b": "always",
    "interleaved": "pp divides microbatches",
    "zb1p": "microbatches >= pp, W <= F, W <= B-W",
    "dualpipe": "B-W = F, W <= F, max(F,B) <= F&B <= F+B",
    "dualpipev": "B-W = F, W <= F, max(F,B) <= F&B <= F+B",
}


class ClosedForm(BaseModel):
    """A closed-form bubble, its formula, and whether its conditions hold for these inputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    formula: str
    condition: str
    bubble_s: float
    holds: bool


def _overlap_conditions(d: Durations) -> bool:
    return (
        math.isclose(d.i_s, d.f_s, rel_tol=1e-9)
        and d.w_s <= d.f_s
        and max(d.f_s, d.b_s) <= d.overlap_s <= d.f_s + d.b_s
    )


def closed_form_bubble(kind: ScheduleKind, pp: int, num_microbatches: int, durations: Durations) -> ClosedForm:
    """The table's bubble for ``kind`` on ``pp`` ranks; ``holds`` says if the conditions are met."""
    f_s, b_s, w_s, fb_s = durations.f_s, durations.b_s, durations.w_s, durations.overlap_s
    bubble_s, holds = {
        "1f1b": ((pp - 1) * (f_s + b_s), True),
        "interleaved": ((pp - 1) * (f_s + b_s), num_microbatches % pp == 0),
        "zb1p": (
            (pp - 1) * (f_s + b_s - 2 * w_s),
            num_microbatches >= pp and w_s <= f_s and w_s <= durations.i_s,
        ),
        "dualpipe": ((pp / 2 - 1) * (fb_s + b_s - 3 * w_s), _overlap_conditions(durations)),
        "dualpipev": ((pp - 1) * (fb_s + b_s - 3 * w_s), _overlap_conditions(durations)),
    }[kind]
    return ClosedForm(formula=FORMULAS[kind], condition=CONDITIONS[kind], bubble_s=bubble_s, holds=holds)
