"""Export simulated operations as a Chrome / Perfetto trace: the format lives in ``contracts.trace``
(the runtime writes measured steps in it too); this module keeps the engine's name for it."""

from __future__ import annotations

from moeplan.simulator.contracts.trace import LANES, TraceEvent, chrome_trace

__all__ = ["LANES", "TraceEvent", "chrome_trace"]
