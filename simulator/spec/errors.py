"""One line from a pydantic ``ValidationError``: what bad input is reported as, everywhere."""

from __future__ import annotations

from pydantic import ValidationError


def first_error_line(exc: ValidationError, prefix: str = "", whole: str = "") -> str:
    """The first error as ``[prefix: ]field.path: message (got value)``.

    The value is left out where it adds nothing: a missing field, a validator's own message (it
    names what it checked), or a whole object or list. ``whole`` names the location of an error
    about the input as a whole (no field path); without it the line is just the message.
    """
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or whole
    value = err.get("input")
    quiet = err.get("type") in ("missing", "value_error") or isinstance(value, dict | list)
    line = f"{where}: {err['msg']}" if where else err["msg"]
    line += "" if quiet else f" (got {value!r})"
    return f"{prefix}: {line}" if prefix else line
