"""Layer 1: RayJob and JobSet against their CRDs' schemas, converted to strict JSON Schema
(``crd_schema``; committed under ``schemas/``). Unknown or misspelt fields, wrong types, values outside an
enum and missing required fields fail. Other kinds are not this layer's: it returns nothing for them.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from jsonschema import Draft7Validator

from moeplan.manifests.crd_schema import CRDS, schema_file


@cache
def validator(kind: str) -> Draft7Validator:
    return Draft7Validator(json.loads(schema_file(kind).read_text(encoding="utf-8")))


def where(path: Any) -> str:
    """A jsonschema path as ``spec.workerGroupSpecs[0].template``."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out or "(top)"


def schema_findings(doc: dict[str, Any]) -> list[str]:
    """One line per schema error of a RayJob or JobSet document (sorted by path); [] for other kinds."""
    if doc.get("kind") not in CRDS:
        return []
    errors = sorted(validator(doc["kind"]).iter_errors(doc), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [f"{where(e.absolute_path)}: {e.message[:300]}" for e in errors]
