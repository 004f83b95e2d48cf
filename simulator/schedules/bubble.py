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

Each row is one function below, ``(pp, num_microbatches, durations) -> (bubble_s, holds)``; the kind
registry (``registry.py``) pairs them with their kinds and formulas and serves ``closed_form_bubble``.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from moeplan.simulator.schedules.executor import Durations


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


def one_f_one_b_bubble(pp: int, num_microbatches: int, d: Durations) -> tuple[float, bool]:
    """(pp-1)(F+B), always."""
    return (pp - 1) * (d.f_s + d.b_s), True


def interleaved_bubble(pp: int, num_microbatches: int, d: Durations) -> tuple[float, bool]:
    """(pp-1)(F+B) with per-chunk F and B, when pp divides the micro-batches."""
    return (pp - 1) * (d.f_s + d.b_s), num_microbatches % pp == 0


def zb1p_bubble(pp: int, num_microbatches: int, d: Durations) -> tuple[float, bool]:
    """(pp-1)(F+B-2W), when M >= pp, W <= F and W <= I."""
    return (pp - 1) * (d.f_s + d.b_s - 2 * d.w_s), num_microbatches >= pp and d.w_s <= d.f_s and d.w_s <= d.i_s


def dualpipe_bubble(pp: int, num_microbatches: int, d: Durations) -> tuple[float, bool]:
    """(pp/2-1)(F&B+B-3W), under the overlap conditions."""
    return (pp / 2 - 1) * (d.overlap_s + d.b_s - 3 * d.w_s), _overlap_conditions(d)


def dualpipev_bubble(pp: int, num_microbatches: int, d: Durations) -> tuple[float, bool]:
    """(pp-1)(F&B+B-3W) on pp ranks (2 pp stages), under the overlap conditions."""
    return (pp - 1) * (d.overlap_s + d.b_s - 3 * d.w_s), _overlap_conditions(d)
