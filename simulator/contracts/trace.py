"""One simulated (or measured) interval on one rank's lane, and the Chrome/Perfetto trace made of them.

The trace is the JSON "traceEvents" format: one process per rank, one thread per lane (compute, NIC,
NVLink), times in microseconds. ``moeplan plan --trace`` writes the simulated step this way and the
runtime writes each rank's measured step the same way (``otherData.step_time_s`` = the step's window),
so both load side by side in Perfetto and go through one analyser (``report.trace_analysis``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

LANES = ("compute", "nic", "nvlink")


@dataclass
class TraceEvent:
    rank: int
    lane: str
    name: str
    start_s: float
    end_s: float


def chrome_trace(events: Iterable[TraceEvent], other: dict[str, Any] | None = None) -> dict[str, Any]:
    """``events`` as a Chrome/Perfetto trace document; ``other`` goes to its ``otherData``."""
    out: list[dict[str, Any]] = []
    ranks = set()
    for e in events:
        ranks.add(e.rank)
        out.append({"name": e.name, "cat": e.lane, "ph": "X", "pid": e.rank, "tid": LANES.index(e.lane),
                    "ts": e.start_s * 1e6, "dur": (e.end_s - e.start_s) * 1e6})
    for r in sorted(ranks):
        out.append({"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"pipeline rank {r}"}})
        for tid, lane in enumerate(LANES):
            out.append({"name": "thread_name", "ph": "M", "pid": r, "tid": tid, "args": {"name": lane}})
    doc: dict[str, Any] = {"traceEvents": out, "displayTimeUnit": "ms"}
    if other:
        doc["otherData"] = dict(other)
    return doc
