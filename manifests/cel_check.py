"""Layer 2: the CRDs' CEL rules (``x-kubernetes-validations``), evaluated with cel-python where they do not
need the previous object. A transition rule (one reading ``oldSelf``: immutability) is skipped, and
``skipped_rules`` says which: only the API server, on an update, can check it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache
from typing import Any

from moeplan.manifests.crd_schema import CRDS, ITEMS, VALUES, rules_file
from moeplan.manifests.schema_check import where


@cache
def rules(kind: str) -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(rules_file(kind).read_text(encoding="utf-8"))["rules"])


@cache
def _program(rule: str) -> Any:
    import celpy  # cel-python, only where rules are checked: the CLI starts without it

    env = celpy.Environment()
    return env.program(env.compile(rule))


def skipped_rules(kind: str) -> list[str]:
    """The transition rules of ``kind`` (not checked offline), as ``path: rule``."""
    return [f"{'.'.join(r['path'])}: {r['rule']}" for r in rules(kind) if r["transition"]]


def values_at(doc: Any, path: list[str], at: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every value ``path`` reaches in ``doc`` (``[]`` walks a list's items, ``{}`` a map's values)."""
    if not path:
        yield at, doc
        return
    step, rest = path[0], path[1:]
    if step == ITEMS and isinstance(doc, list):
        for i, item in enumerate(doc):
            yield from values_at(item, rest, (*at, i))
    elif step == VALUES and isinstance(doc, dict):
        for key, value in sorted(doc.items()):
            yield from values_at(value, rest, (*at, key))
    elif isinstance(doc, dict) and step in doc:
        yield from values_at(doc[step], rest, (*at, step))


def cel_findings(doc: dict[str, Any]) -> list[str]:
    """One line per CEL rule a RayJob or JobSet breaks (non-transition rules only); [] for other kinds."""
    if doc.get("kind") not in CRDS:
        return []
    import celpy

    found = []
    for rule in rules(doc["kind"]):
        if rule["transition"]:
            continue
        for at, value in values_at(doc, rule["path"]):
            try:
                result = _program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
            except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
                # a value of the wrong type (a null or a number where the rule walks a list): celpy raises where
                # the API server's schema layer refuses first; a finding here, beside the schema layer's
                result = f"{type(exc).__name__}: {exc}"
            if not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
                why = "" if isinstance(result, celpy.celtypes.BoolType) else f" (rule error: {str(result)[:120]})"
                found.append(f"{where(at)}: {rule['message']}{why}")
    return found
