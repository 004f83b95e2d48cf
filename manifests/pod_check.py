"""Layer 3: core kinds and the pod templates inside a RayJob or JobSet, strictly, with kubernetes-validate
against a Kubernetes version's own OpenAPI schemas (unknown fields fail). A RayJob's head, worker and
submitter templates are checked as ``v1 PodTemplate``; a JobSet's replicated Job templates as
``batch/v1 Job`` (which holds its pod template). The custom kinds themselves are not this layer's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# The oldest Kubernetes the manifests are for: Job successPolicy (JobSet's pod 0 decides) is beta and on by
# default since 1.31. Check against your cluster's with ``--kubernetes-version``.
KUBERNETES_VERSION = "1.31"


def check_version(version: str) -> str:
    """``version`` if kubernetes-validate has its schemas (``1.25`` .. ``1.37``); ``ValueError`` otherwise."""
    import kubernetes_validate  # only where manifests are checked: the CLI starts without it

    known = sorted({".".join(v.split(".")[:2]) for v in kubernetes_validate.utils.all_versions()},
                   key=lambda v: tuple(map(int, v.split("."))))
    if version not in known:
        raise ValueError(f"kubernetes_version={version!r:.40} is not one of {known[0]}..{known[-1]}")
    return version


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def embedded(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, core object) for each pod or Job template a RayJob or JobSet carries. A field of the wrong type (a
    number where a list or an object belongs) carries none: the schema layer reports it."""
    spec = _dict(doc.get("spec"))
    if doc.get("kind") == "RayJob":
        cluster = _dict(spec.get("rayClusterSpec"))
        parts = [("spec.rayClusterSpec.headGroupSpec.template", _dict(cluster.get("headGroupSpec")).get("template"))]
        parts += [(f"spec.rayClusterSpec.workerGroupSpecs[{i}].template", g.get("template"))
                  for i, g in enumerate(_list(cluster.get("workerGroupSpecs"))) if isinstance(g, dict)]
        parts.append(("spec.submitterPodTemplate", spec.get("submitterPodTemplate")))
        for path, template in parts:
            if isinstance(template, dict):
                yield path, {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "template"},
                             "template": template}
    elif doc.get("kind") == "JobSet":
        for i, job in enumerate(_list(spec.get("replicatedJobs"))):
            template = job.get("template") if isinstance(job, dict) else None
            if isinstance(template, dict):
                yield f"spec.replicatedJobs[{i}].template", {"apiVersion": "batch/v1", "kind": "Job",
                                                             "metadata": {"name": "job"}, **template}


def _errors(obj: dict[str, Any], prefix: str, version: str) -> list[str]:
    """kubernetes-validate's first error in ``obj`` as one line, its path relative to the document."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        steps = [str(p) for p in exc.absolute_path]
        if obj.get("kind") == "PodTemplate" and steps[:1] == ["template"]:
            steps = steps[1:]  # the wrapper's own field: the path continues from the template itself
        path = ".".join([prefix, *steps] if prefix else steps) or obj.get("kind", "(top)")
        return [f"{path}: {exc.message[:300]} (Kubernetes {version})"]
    except kubernetes_validate.SchemaNotFoundError:
        return [(f"{prefix or obj.get('kind')}: Kubernetes {version} has no schema for "
                f"{obj.get('apiVersion')}/{obj.get('kind')}")]
    except kubernetes_validate.InvalidSchemaError as exc:
        return [f"{prefix or obj.get('kind')}: {str(exc)[:200]}"]
    return []


def pod_findings(doc: dict[str, Any], version: str = KUBERNETES_VERSION) -> list[str]:
    """Errors of a core object, or of a RayJob's or JobSet's embedded templates (the first per template)."""
    check_version(version)
    if doc.get("kind") in ("RayJob", "JobSet"):
        return [e for path, obj in embedded(doc) for e in _errors(obj, path, version)]
    return _errors(doc, "", version)
