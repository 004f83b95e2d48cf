"""A plan rendered as manifest files: the plan's ConfigMap and the job (RayJob or JobSet), as deterministic
YAML (keys sorted, no flow style, multi-line strings as literal blocks) under a header comment that states
the deadline and restart arithmetic. ``render`` returns ``{file name: text}``; the caller writes them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import yaml

from moeplan.manifests import pods
from moeplan.manifests.jobset import jobset
from moeplan.manifests.limits import JobLimits, job_limits
from moeplan.manifests.rayjob import rayjob
from moeplan.manifests.target import K8sTarget, ManifestError, gpu_nodes, job_name
from moeplan.simulator.contracts.plan_file import PlanFile

Kind = Literal["rayjob", "jobset"]
BUILDERS = {"rayjob": rayjob, "jobset": jobset}
CONFIGMAP_MAX_BYTES = 2**20  # the API server refuses a ConfigMap whose data exceeds 1 MiB
CONFIGMAP_FILE = "plan-configmap.yaml"


class _Dumper(yaml.SafeDumper):
    """Block style; multi-line strings as literal blocks (``|``) so the plan reads as it was written."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(doc: dict[str, Any]) -> str:
    """One document as YAML: sorted keys, so the same dict gives the same bytes."""
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=4096, allow_unicode=False)


def config_map(plan: PlanFile, plan_text: str, target: K8sTarget) -> dict[str, Any]:
    """The plan file, byte for byte, in a ConfigMap mounted at /plan."""
    size = len(plan_text.encode("utf-8"))
    if size > CONFIGMAP_MAX_BYTES:
        raise ManifestError(f"plan: {size} bytes exceed a ConfigMap's {CONFIGMAP_MAX_BYTES} bytes; bake the plan "
                            "into the image at /plan/plan.json instead")
    name = job_name(plan, target)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{name}-plan", "namespace": target.namespace, "labels": pods.labels(plan, name),
                         "annotations": {pods.PLAN_SHA_ANNOTATION: plan.inputs_sha256}},
            "data": {pods.PLAN_KEY: plan_text}}


def header(plan: PlanFile, target: K8sTarget, limits: JobLimits, kind: Kind) -> str:
    """The comment at the top of the job's file."""
    cluster = plan.inputs.cluster
    lines = [f"moeplan {kind} for plan {plan.inputs_sha256} (moeplan {plan.moeplan_version})",
             (f"{plan.inputs.model.name} on {gpu_nodes(plan)} x {cluster.node.gpus_per_node} {cluster.gpu.name} "
             f"(layout pp={plan.layout.pp} dp={plan.layout.dp} cp={plan.layout.cp} ep={plan.layout.ep})"),
             "Deadline and restarts (T predicted wall time, B budget, P predicted GPU-hours, D deadline):",
             *(f"  {line}" for line in limits.arithmetic())]
    if pods.rdma(plan, target):
        lines.append(pods.IPC_LOCK_WHY)
    return "".join(f"# {line}\n" for line in lines)


def documents(plan: PlanFile, plan_text: str, target: K8sTarget, kind: Kind) -> dict[str, dict[str, Any]]:
    """``{file name: document}`` of the manifests (pure)."""
    limits = job_limits(plan, target)
    cm = config_map(plan, plan_text, target)
    return {CONFIGMAP_FILE: cm, f"{kind}.yaml": BUILDERS[kind](plan, target, limits, cm["metadata"]["name"])}


def render(plan: PlanFile, plan_text: str, target: K8sTarget, kind: Kind) -> dict[str, str]:
    """``{file name: YAML text}``: the ConfigMap, and the job under its header comment."""
    docs = documents(plan, plan_text, target, kind)
    texts = {name: dump(doc) for name, doc in docs.items()}
    texts[f"{kind}.yaml"] = header(plan, target, job_limits(plan, target), kind) + texts[f"{kind}.yaml"]
    return texts


def load_documents(text: str, source: str) -> Iterable[dict[str, Any]]:
    """The YAML documents of one file (safe loader), each a mapping; ``ManifestError`` otherwise."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        # An alias repeats a node without copying it: a few lines can stand for 10**9 nodes that every
        # validator would walk. Manifests need none, so any is refused (events are read in linear time).
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=loader)):
            raise ManifestError(f"{source}: holds a YAML alias (*name); write the objects out in full")
        docs = [d for d in yaml.load_all(text, Loader=loader) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: not YAML ({' '.join(str(exc).split())[:200]})") from None
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ManifestError(f"{source}: document {i} is a {type(doc).__name__}, not a Kubernetes object")
    return docs
