"""One entry point from a schedule kind to its generator."""

from __future__ import annotations

from functools import lru_cache

from moeplan.simulator.schedules._checks import require
from moeplan.simulator.schedules.dualpipe import dualpipe, dualpipev
from moeplan.simulator.schedules.interleaved import interleaved_1f1b
from moeplan.simulator.schedules.one_f_one_b import one_f_one_b, zb1p
from moeplan.simulator.schedules.schedule import Schedule
from moeplan.simulator.spec.parallel import ScheduleKind

SCHEDULE_KINDS: tuple[ScheduleKind, ...] = ("1f1b", "interleaved", "zb1p", "dualpipe", "dualpipev")


@lru_cache(maxsize=256)  # schedules are frozen values; the search asks for the same ones many times
def make_schedule(kind: ScheduleKind, pp: int, num_microbatches: int, virtual_stages: int = 2) -> Schedule:
    """The ``kind`` schedule on ``pp`` ranks (GPUs in one pipeline) for ``num_microbatches``.

    ``virtual_stages`` (chunks per rank) is read only by ``interleaved``. Stages per kind:
    ``pp`` for 1f1b, zb1p, dualpipe; ``virtual_stages * pp`` for interleaved; ``2 pp`` for dualpipev.
    """
    require(kind in SCHEDULE_KINDS, f"kind={kind!r} must be one of {', '.join(SCHEDULE_KINDS)}")
    if kind == "interleaved":
        return interleaved_1f1b(pp, num_microbatches, virtual_stages)
    generators = {"1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev}
    return generators[kind](pp, num_microbatches)


def valid_microbatches(kind: ScheduleKind, pp: int, num_microbatches: int) -> int:
    """The smallest micro-batch count >= ``num_microbatches`` that ``kind`` accepts on ``pp`` ranks
    (DualPipe: even and >= 2 pp; DualPipeV: >= 2 pp; interleaved: a multiple of pp)."""
    m = max(1, num_microbatches)
    if kind in ("dualpipe", "dualpipev"):
        m = max(m, 2 * pp)
        if kind == "dualpipe" and m % 2:
            m += 1
    if kind == "interleaved":
        m = pp * -(-max(m, pp) // pp)
    return m
