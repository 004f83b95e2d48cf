"""``--set a.b=value`` overrides on a nested dict, validated later by the pydantic specs."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from moeplan.orchestrator.errors import InputError
from moeplan.simulator.spec.json_input import JsonInputError, parse_json


class OverrideError(InputError):
    """A malformed or unknown ``--set`` key; the message names it."""


def parse_value(text: str) -> Any:
    """Strict JSON when it parses (numbers, true/false/null, lists, objects; ``json_input.parse_json``),
    the raw string otherwise (``bf16``, and ``NaN``, which the specs then refuse as a number)."""
    try:
        return parse_json(text, "--set")
    except JsonInputError:
        return text


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise OverrideError(f"--set {item!r}: expected KEY=VALUE, e.g. parallel.pp=8")
    return key.strip().split("."), parse_value(value.strip())


def apply_overrides(data: dict[str, Any], items: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with every ``KEY=VALUE`` applied. Every path segment must exist
    (list items by index), so a typo is an error rather than a silently ignored setting."""
    out = json.loads(json.dumps(data))
    for item in items:
        path, value = parse_override(item)
        node: Any = out
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            where = ".".join(path[: depth + 1])
            if isinstance(node, dict):
                if part not in node:
                    choices = ", ".join(sorted(node))
                    raise OverrideError(f"--set {'.'.join(path)}: {where!r} does not exist (choose from: {choices})")
                if last:
                    node[part] = value
                else:
                    node = node[part]
            elif isinstance(node, list):
                if not (part.isascii() and part.isdigit()) or int(part) >= len(node):
                    raise OverrideError(f"--set {'.'.join(path)}: {where!r} is not an index below {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            else:
                raise OverrideError(f"--set {'.'.join(path)}: {'.'.join(path[:depth])!r} is a value, not a section")
    return out
