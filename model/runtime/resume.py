"""A run directory taken back to a checkpoint on resume, the restarts it records, and test-only fault injection.

On a resume (an automatic restart after a worker failure, or ``moeplan launch --resume``) rank 0
``rewind``s the run directory to the checkpoint's step: ``metrics.jsonl`` keeps the steps before it
(rewritten atomically: the report's steps stay one per step, in order), and a ``Restart`` is appended
to ``RUN/restarts.json`` with the GPU-hours lost:

    lost_gpu_hours = world x (wall time of the recorded steps after the checkpoint + restart_s) / 3600

``restart_s`` is the time from the failure to the resumed start for an automatic restart (every GPU
stays held while the group restarts), 0 for a ``--resume`` (the GPUs were released in between). The
step in flight when a worker died was never recorded and is not counted (at most one step).

``inject_fault`` is **for tests only**: the worker calls it when ``RunConfig.fault_at`` names its rank
and step; it kills the process with ``os._exit(1)`` once per run directory (a marker file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.contracts.run_report import METRICS_NAME, Restart, StepMetrics, read_metrics

RESTARTS_NAME = "restarts.json"
SECONDS_PER_HOUR = 3600.0


def read_restarts(run_dir: str | Path) -> tuple[Restart, ...]:
    path = Path(run_dir) / RESTARTS_NAME
    if not path.is_file():
        return ()
    return tuple(Restart.model_validate(r) for r in json.loads(path.read_text()))


def rewind(run_dir: str | Path, at_step: int, reason: str, restart_s: float,
           world: int) -> tuple[list[StepMetrics], tuple[Restart, ...]]:
    """Rank 0: keep the steps before ``at_step`` in ``metrics.jsonl``, record the restart; returns the
    kept steps and every restart of the run so far."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_NAME
    recorded = read_metrics(path) if path.is_file() else []
    kept = [m for m in recorded if m.step < at_step]
    redone_s = sum(m.wall_time_s for m in recorded if m.step >= at_step)
    write_atomic(path, "".join(m.model_dump_json() + "\n" for m in kept))
    restart = Restart(at_step=at_step, reason=reason[:500],
                      lost_gpu_hours=world * (redone_s + max(restart_s, 0.0)) / SECONDS_PER_HOUR)
    restarts = (*read_restarts(run_dir), restart)
    write_atomic(run_dir / RESTARTS_NAME, json.dumps([r.model_dump() for r in restarts], indent=1))
    return kept, restarts


def fault_marker(run_dir: str | Path, rank: int, step: int) -> Path:
    return Path(run_dir) / f"fault-injected-rank{rank}-step{step}"


def inject_fault(run_dir: str | Path, rank: int, step: int) -> None:
    """TEST ONLY: end this process abruptly (``os._exit(1)``, as a killed worker) the first time it is
    called for this run directory, rank and step."""
    marker = fault_marker(run_dir, rank, step)
    if marker.exists():
        return
    with open(marker, "w") as f:
        f.write(f"rank {rank} killed itself at step {step} (RunConfig.fault_at, a test's fault injection)\n")
        f.flush()
        os.fsync(f.fileno())
    os._exit(1)
