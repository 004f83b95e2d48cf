"""Export simulated operations as a Chrome / Perfetto trace (the JSON "traceEvents" format):
one process per pipeline rank, one thread per lane (compute, NIC, NVLink), times in microseconds."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from moeplan.simulator.contracts.trace import TraceEvent

LANES = ("compute", "nic", "nvlink")


def chrome_trace(events: Iterable[TraceEvent]) -> dict[str, Any]:
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
    return {"traceEvents": out, "displayTimeUnit": "ms"}
