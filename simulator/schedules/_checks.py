"""Argument checks shared by the generators: each failure names the field and its value."""

from __future__ import annotations

from moeplan.simulator.schedules.actions import ScheduleError


def require_positive(**values: int) -> None:
    """Raise unless every named value is an int >= 1."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{name}={value!r} must be a positive integer")


def require(condition: bool, message: str) -> None:
    """Raise ``ScheduleError(message)`` unless ``condition``."""
    if not condition:
        raise ScheduleError(message)


def require_no_error(error: str | None) -> None:
    """Raise ``ScheduleError(error)`` when a ``*_error`` check returned a reason."""
    if error is not None:
        raise ScheduleError(error)
