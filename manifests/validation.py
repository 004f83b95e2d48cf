"""Validation layer by layer: each document through the CRD schema, the CEL rules, kubernetes-validate and
moeplan's policy, every problem a ``Finding`` naming its layer, so a mistake is reported by the layer that
owns it. The plan that policy checks against is the one in the ConfigMap beside the job.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeplan.manifests import pods
from moeplan.manifests.cel_check import cel_findings
from moeplan.manifests.crd_schema import CRDS
from moeplan.manifests.pod_check import KUBERNETES_VERSION, check_version, pod_findings
from moeplan.manifests.policy import policy_findings
from moeplan.manifests.render import load_documents
from moeplan.manifests.schema_check import schema_findings
from moeplan.manifests.target import ManifestError
from moeplan.simulator.contracts.plan_file import PlanError, PlanFile, parse_plan

LAYERS = ("schema", "cel", "pod", "policy")
MAX_FILE_BYTES = 4 * 2**20  # a manifest folder holds a plan (<= 1 MiB) and a job


@dataclass(frozen=True)
class Finding:
    layer: str  # one of LAYERS
    source: str  # file (and document index) it came from
    object: str  # Kind/name
    message: str

    def line(self) -> str:
        return f"[{self.layer}] {self.source} {self.object}: {self.message}"


def _label(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata")
    return f"{doc.get('kind')!s:.60}/{(meta.get('name') if isinstance(meta, dict) else None)!s:.80}"


def _envelope(doc: dict[str, Any]) -> str | None:
    """What is wrong with the fields every object has (the API server refuses an object without them, and
    the layers index them), or None."""
    for key in ("apiVersion", "kind"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            return f"{key}={doc.get(key)!r:.60} must be a non-empty string"
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return f"metadata={meta!r:.60} must be a mapping with a name"
    return None


def plan_of(docs: Iterable[tuple[str, dict[str, Any]]]) -> PlanFile | None:
    """The plan in the documents' ConfigMap (``data["plan.json"]``), or None where there is none."""
    for source, doc in docs:
        data = doc.get("data") if doc.get("kind") == "ConfigMap" else None
        if isinstance(data, dict) and isinstance(data.get(pods.PLAN_KEY), str):
            try:
                return parse_plan(data[pods.PLAN_KEY], f"{source} data[{pods.PLAN_KEY}]")
            except PlanError as exc:
                raise ManifestError(str(exc)) from None
    return None


def validate_documents(docs: list[tuple[str, dict[str, Any]]], version: str = KUBERNETES_VERSION) -> list[Finding]:
    """Every finding of every layer over ``[(source, document)]``; [] when all pass."""
    try:
        check_version(version)
    except ValueError as exc:
        raise ManifestError(str(exc)) from None
    found = [Finding("schema", s, _label(d), problem) for s, d in docs if (problem := _envelope(d)) is not None]
    docs = [(s, d) for s, d in docs if _envelope(d) is None]  # the layers index what is missing from the others
    plan = plan_of(docs)
    jobs = [(s, d) for s, d in docs if d.get("kind") in CRDS]
    if not jobs:
        found.append(Finding("policy", "(folder)", "-", f"no {' or '.join(CRDS)} among the manifests"))
    for source, doc in docs:
        layers = {"schema": schema_findings(doc), "cel": cel_findings(doc), "pod": pod_findings(doc, version)}
        if doc.get("kind") in CRDS and not layers["schema"]:  # the policy indexes the shapes the schema checks
            layers["policy"] = (policy_findings(doc, plan) if plan is not None
                                else [f"no ConfigMap holding {pods.PLAN_KEY}: nothing to check the job against"])
        found += [Finding(layer, source, _label(doc), m) for layer, lines in layers.items() for m in lines]
    return found


def read_documents(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """``[(source, document)]`` of every ``*.yaml``/``*.yml`` file in ``folder`` (sorted by name)."""
    try:
        if not folder.is_dir():
            raise ManifestError(f"--validate {folder}: not a directory")
        files = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    except OSError as exc:  # a name too long, no permission to list
        raise ManifestError(f"--validate {folder}: cannot use ({exc.strerror})") from None
    if not files:
        raise ManifestError(f"--validate {folder}: holds no .yaml files")
    out = []
    for path in files:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ManifestError(f"{path}: {path.stat().st_size} bytes; a manifest file holds at most {MAX_FILE_BYTES}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: cannot read ({exc})") from None
        docs = list(load_documents(text, str(path)))
        out += [(path.name if len(docs) == 1 else f"{path.name}#{i}", d) for i, d in enumerate(docs)]
    return out
