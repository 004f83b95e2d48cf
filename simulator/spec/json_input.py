"""Reading JSON input: the one reader of every file moeplan is given (a model's ``config.json``, a
plan, an expert-load record, a calibration, a placement) and of ``--set`` values.

Input is data, never code: ``json`` only (no pickle, no eval, no YAML), and bounded before it is
used. A file is at most ``MAX_FILE_BYTES``, UTF-8 (a leading BOM is allowed), strict JSON: no
``NaN``/``Infinity``, no number too large for a float (``1e999``), no integer of more than 64 bits,
and nested at most ``MAX_DEPTH`` deep. Every failure is one ``JsonInputError`` line naming the
source and the problem.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, BinaryIO

MAX_FILE_BYTES = 64 * 2**20
MAX_DEPTH = 32  # a plan file is 8 deep
MAX_INT = 2**63 - 1


class JsonInputError(ValueError):
    """Input that is not the bounded, strict JSON we read; the message names the source."""


class _Refused(ValueError):
    """A value ``json`` parsed that strict JSON does not allow (raised from the parse hooks)."""


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"{text[:40]} does not fit a float")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 19 or not -MAX_INT - 1 <= (value := int(text)) <= MAX_INT:
        raise _Refused(f"integer {text[:40]}{'...' if len(text) > 40 else ''} does not fit 64 bits")
    return value


def _tree_problem(value: Any) -> str | None:
    """What is wrong with a parsed document's shape: nesting past ``MAX_DEPTH``, or a string (or key)
    holding a lone surrogate (``"\\ud800"``), which no file or terminal can encode. Walks without recursion."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    return f"string {node[:40]!r} holds a lone surrogate (not Unicode text)"
        elif isinstance(node, dict | list):
            if depth >= MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return None


def parse_json(data: bytes | str, source: str) -> Any:
    """Parse ``data`` as strict, bounded JSON; ``JsonInputError`` names ``source``."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise JsonInputError(f"{source}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    try:
        value = json.loads(data, parse_constant=_constant, parse_float=_finite, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise JsonInputError(f"{source}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except _Refused as exc:
        raise JsonInputError(f"{source}: {exc}") from None
    except RecursionError:
        raise JsonInputError(f"{source}: nested deeper than {MAX_DEPTH} levels") from None
    problem = _tree_problem(value)
    if problem:
        raise JsonInputError(f"{source}: {problem}")
    return value


def open_input(path: str | Path) -> BinaryIO:
    """``path`` opened for reading without waiting for a writer: a named pipe that nobody writes to is opened at
    once and reads as empty (a plain ``open`` of it never returns); reads then block as usual, so a pipe that is
    being written (``<(cat plan.json)``) is read whole."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_json_file(path: str | Path) -> Any:
    """The JSON document in the file at ``path`` (see the module docstring for what is refused)."""
    path = Path(path)
    try:
        with open_input(path) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise JsonInputError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise JsonInputError(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MiB")
    return parse_json(data, str(path))
