"""CustomResourceDefinition OpenAPI v3 schemas converted to strict JSON Schema, and the CEL rules beside them.

The converted files live in ``manifests/schemas/`` (package data), so validation never needs the CRDs at
run time. Re-create them from the vendored CRDs (a test checks that this reproduces the committed files):

    python -P -m moeplan.manifests.crd_schema ../shared/reference/k8s-crds manifests/schemas

Conversion (``strict_schema``): ``x-kubernetes-*`` keys and descriptions dropped; ``x-kubernetes-int-or-string`` becomes
integer-or-string; ``nullable: true`` adds ``null`` to the type; every object with ``properties`` gets
``additionalProperties: false`` unless it has ``x-kubernetes-preserve-unknown-fields`` (then unknown
fields pass, as the API server keeps them). The CEL rules (``x-kubernetes-validations``) are collected
(``cel_rules``) with the path of the schema node they sit on; a rule reading ``oldSelf`` is a transition
rule, marked so, because it needs the previous object.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).parent / "schemas"
# (CRD file, version) for each kind we generate: the stored versions the builders write.
CRDS = {
    "RayJob": ("ray.io_rayjobs.yaml", "v1"),
    "JobSet": ("jobset.x-k8s.io_jobsets.yaml", "v1alpha2"),
}
# A path step: a property name, ITEMS for every element of a list, VALUES for every value of a map.
ITEMS = "[]"
VALUES = "{}"


def strict_schema(node: Any) -> Any:
    """The JSON Schema (draft 7) of one OpenAPI v3 schema node, strict about unknown fields."""
    if isinstance(node, list):
        return [strict_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k not in ("nullable", "description", "properties")}
    if "properties" in node:  # a map of field names to schemas: its keys are names, never keywords
        out["properties"] = {name: strict_schema(child) for name, child in node["properties"].items()}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def cel_rules(node: Any, path: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every ``x-kubernetes-validations`` rule under ``node``: ``{path, rule, message, transition}``."""
    if not isinstance(node, dict):
        return []
    found = [{"path": list(path), "rule": r["rule"], "message": r.get("message", r["rule"]),
              "transition": "oldSelf" in r["rule"]} for r in node.get("x-kubernetes-validations", ())]
    for name, child in sorted(node.get("properties", {}).items()):
        found += cel_rules(child, (*path, name))
    if isinstance(node.get("items"), dict):
        found += cel_rules(node["items"], (*path, ITEMS))
    if isinstance(node.get("additionalProperties"), dict):
        found += cel_rules(node["additionalProperties"], (*path, VALUES))
    return found


def version_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    """The OpenAPI v3 schema of ``version`` in a CRD document."""
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise KeyError(f"CRD {crd['metadata']['name']} has no version {version}")


def schema_file(kind: str) -> Path:
    return SCHEMA_DIR / f"{kind.lower()}.schema.json"


def rules_file(kind: str) -> Path:
    return SCHEMA_DIR / f"{kind.lower()}.cel.json"


def converted(crd_dir: Path) -> dict[str, str]:
    """``{file name: text}`` of the converted schemas and rule lists of every kind in ``CRDS``."""
    import yaml  # only the converter reads the CRDs

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    out = {}
    for kind, (name, version) in CRDS.items():
        crd = yaml.load((crd_dir / name).read_text(encoding="utf-8"), Loader=loader)
        schema = version_schema(crd, version)
        source = {"crd": name, "group": crd["spec"]["group"], "version": version, "kind": kind}
        whole = {"$schema": "http://json-schema.org/draft-07/schema#", "$comment": source, **strict_schema(schema)}
        out[schema_file(kind).name] = json.dumps(whole, sort_keys=True, separators=(",", ":")) + "\n"
        out[rules_file(kind).name] = json.dumps({"source": source, "rules": cel_rules(schema)}, indent=1,
                                                sort_keys=True) + "\n"
    return out


def main(argv: list[str]) -> int:
    """``crd_schema CRD_DIR OUT_DIR``: write the converted files."""
    if len(argv) != 2:
        print("usage: python -m moeplan.manifests.crd_schema CRD_DIR OUT_DIR", file=sys.stderr)
        return 2
    out_dir = Path(argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in converted(Path(argv[0])).items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
