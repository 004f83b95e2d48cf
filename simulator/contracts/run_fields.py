"""What the run directory's records share (``run_report``, ``run_telemetry``): the frozen model base, the
bound on ranks, the one error they raise, and the check that a path a record names stays inside the run."""

from __future__ import annotations

from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict

MAX_RANKS = 2**20


class RunReportError(ValueError):
    """A run report, metrics or telemetry file that cannot be used; the message names the file and the problem."""


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def inside_the_run(path: str) -> str:
    """``path`` if it is relative and stays inside the run directory; ``ValueError`` otherwise."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path or "\0" in path:
        raise ValueError(f"path={path!r:.80} must be a relative path inside the run directory")
    return path
