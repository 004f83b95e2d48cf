"""One simulated (or measured) interval on one rank's lane: what Chrome/Perfetto traces and the
timeline figure are made of."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TraceEvent:
    rank: int
    lane: str
    name: str
    start_s: float
    end_s: float
