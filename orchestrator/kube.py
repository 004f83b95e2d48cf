"""The Kubernetes edge of ``moeplan submit`` and ``moeplan status``: the official client from a kubeconfig
and context, create (with a server-side dry run), get, list and delete of the kinds we generate, and the
API server's refusals turned into one ``InputError`` line each (401/403, 404, 409, 422, unreachable).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

from moeplan.orchestrator.errors import InputError

REQUEST_TIMEOUT_S = 30.0
FIELD_MANAGER = "moeplan"


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the API: ``group`` "" is the core group."""

    group: str
    version: str
    plural: str


RESOURCES = {
    "ConfigMap": Resource("", "v1", "configmaps"),
    "RayJob": Resource("ray.io", "v1", "rayjobs"),
    "JobSet": Resource("jobset.x-k8s.io", "v1alpha2", "jobsets"),
}


class Kube:
    """A client bound to one kubeconfig context."""

    def __init__(self, kubeconfig: Path | None, context: str | None) -> None:
        try:
            self.api = config.new_client_from_config(config_file=str(kubeconfig) if kubeconfig else None,
                                                     context=context, persist_config=False)
            _, active = config.list_kube_config_contexts(config_file=str(kubeconfig) if kubeconfig else None)
        except (ConfigException, OSError, ValueError) as exc:
            where = f"--context {context}" if context else f"--kubeconfig {kubeconfig or '~/.kube/config'}"
            raise InputError(f"{where}: cannot use the kubeconfig ({' '.join(str(exc).split())[:300]})") from None
        if context:
            contexts, _ = config.list_kube_config_contexts(config_file=str(kubeconfig) if kubeconfig else None)
            active = next(c for c in contexts if c["name"] == context)
        self.namespace = (active.get("context") or {}).get("namespace") or "default"
        self.host = self.api.configuration.host
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def create(self, doc: dict[str, Any], dry_run: bool) -> Any:
        kind, ns = doc["kind"], doc["metadata"].get("namespace") or self.namespace
        extra = {"dry_run": "All" if dry_run else None, "field_validation": "Strict", "field_manager": FIELD_MANAGER,
                 "_request_timeout": REQUEST_TIMEOUT_S}
        with self.reported(doc, "create (dry run)" if dry_run else "create"):
            if kind == "ConfigMap":
                return self.core.create_namespaced_config_map(ns, doc, **extra)
            res = RESOURCES[kind]
            return self.custom.create_namespaced_custom_object(res.group, res.version, ns, res.plural, doc, **extra)

    def delete(self, doc: dict[str, Any]) -> None:
        kind, name, ns = doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace") or self.namespace
        with self.reported(doc, "delete"):
            if kind == "ConfigMap":
                self.core.delete_namespaced_config_map(name, ns, _request_timeout=REQUEST_TIMEOUT_S)
            else:
                res = RESOURCES[kind]
                self.custom.delete_namespaced_custom_object(res.group, res.version, ns, res.plural, name,
                                                            _request_timeout=REQUEST_TIMEOUT_S)

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        """The object, or None when there is none of that kind and name."""
        res = RESOURCES[kind]
        try:
            return self.custom.get_namespaced_custom_object(res.group, res.version, namespace, res.plural, name,
                                                            _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise InputError(refusal(exc, f"get {kind}/{name}", namespace)) from None
        except HTTPError as exc:
            raise InputError(f"cannot reach the API server at {self.host} ({type(exc).__name__})") from None

    def pod_phases(self, job: str, namespace: str, label: str) -> dict[str, int]:
        """Pods labelled ``label=job``, counted by phase."""
        try:
            pods = self.core.list_namespaced_pod(namespace, label_selector=f"{label}={job}",
                                                 _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as exc:
            raise InputError(refusal(exc, f"list pods of {job}", namespace)) from None
        except HTTPError as exc:
            raise InputError(f"cannot reach the API server at {self.host} ({type(exc).__name__})") from None
        phases: dict[str, int] = {}
        for pod in pods.items:
            phase = (pod.status.phase if pod.status else None) or "Unknown"
            phases[phase] = phases.get(phase, 0) + 1
        return dict(sorted(phases.items()))

    @contextmanager
    def reported(self, doc: dict[str, Any], action: str) -> Iterator[None]:
        """An API refusal or a connection failure inside becomes one ``InputError`` line."""
        meta = doc.get("metadata") or {}
        what = f"{action} {doc.get('kind')}/{meta.get('name')}"
        try:
            yield
        except ApiException as exc:
            raise InputError(refusal(exc, what, meta.get("namespace") or self.namespace)) from None
        except HTTPError as exc:
            raise InputError(f"{what}: cannot reach the API server at {self.host} ({type(exc).__name__})") from None


def refusal(exc: ApiException, what: str, namespace: str) -> str:
    """The one line for an API server refusal."""
    try:
        status = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        status = {}
    message = str(status.get("message") or exc.reason or "")[:300]
    if exc.status == 409:
        return (f"{what}: already exists in namespace {namespace}; to replace it, delete it first "
                "(kubectl delete -f DIR) and submit again")
    if exc.status == 422:
        causes = (status.get("details") or {}).get("causes") or []
        fields = "; ".join(f"{c.get('field', '?')}: {c.get('message', '')}" for c in causes[:10])
        return f"{what}: invalid ({fields or message})"
    if exc.status in (401, 403):
        kind = "not authenticated (401)" if exc.status == 401 else "forbidden (403)"
        return f"{what}: {kind} in namespace {namespace}: {message}"
    return f"{what}: the API server answered {exc.status} {exc.reason}: {message}"
