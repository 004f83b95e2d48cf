"""The number types of every spec and contract field: what a JSON number may be when we read one.

- ``Int``: an integer, never ``true``/``false`` (JSON ``true`` is not 1), a string or a float.
- ``Float``: a finite number (ints accepted); never a bool, a string, NaN or an infinity, so nothing
  we validate can carry NaN/Infinity into a file we write.
- ``Bool``: ``true`` or ``false`` only (not 1, not ``"yes"``).
- ``Choice``: wraps a ``Literal`` of numbers so that ``true`` is not taken for 1.

Sizes that drive work (layers, experts, ranks, micro-batches, tokens) also carry an upper bound where
they are declared, so that a huge value is refused before any work starts.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AllowInfNan, BeforeValidator, Strict


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")  # noqa: TRY004 (pydantic reports it)
    return value


Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]
NOT_BOOL = BeforeValidator(_not_bool)  # for Literal choices of numbers (``Annotated[Literal[0, 1], NOT_BOOL]``)
