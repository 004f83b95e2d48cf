"""One line from a pydantic ``ValidationError``: what bad input is reported as, everywhere.

The one formatter of pydantic errors: the CLI, the expert-load record and the memory-kernel tables call it, so
a bad value reads the same whichever door it came in by.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

_VALIDATOR_PREFIX = "Value error, "  # pydantic's prefix to a validator's own ValueError message
MAX_VALUE_CHARS = 200  # a value is quoted up to this long: a line, not a file's worth


def first_error_line(exc: ValidationError, prefix: str = "", whole: str = "", names: Mapping[str, str] = {}) -> str:
    """The first error as ``[prefix: ]field.path: message (got value)``.

    The value is left out where it adds nothing: a missing field, a validator's own message (it
    names what it checked; pydantic's "Value error, " before it is dropped too), or a whole object
    or list; a long value is cut to ``MAX_VALUE_CHARS``. ``whole`` names the location of an error about the input as a whole (no field path);
    without it the line is just the message. ``names`` renames path parts to what the user typed
    (``{"schedule": "kind"}`` where ``--kind`` sets ``ParallelSpec.schedule``).
    """
    err = exc.errors()[0]
    where = ".".join(names.get(str(part), str(part)) for part in err["loc"]) or whole
    value = err.get("input")
    quiet = err.get("type") in ("missing", "value_error") or isinstance(value, dict | list)
    message = err["msg"].removeprefix(_VALIDATOR_PREFIX)
    line = f"{where}: {message}" if where else message
    shown = repr(value)
    shown = shown if len(shown) <= MAX_VALUE_CHARS else shown[: MAX_VALUE_CHARS - 3] + "..."
    line += "" if quiet else f" (got {shown})"
    return f"{prefix}: {line}" if prefix else line
