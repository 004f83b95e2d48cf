"""The Kubernetes edge of ``moeplan submit`` and ``moeplan status``: the official client from a kubeconfig
and context, create (with a server-side dry run), get, list and delete of the kinds we generate, and the
API server's refusals turned into one ``InputError`` line each (401/403, 404, 409, 422, unreachable, no
answer within ``request_timeout_s``).

Nothing from outside reaches the client unchecked (``kube_input``): the kubeconfig is bounded and
shape-checked first, answers are read raw (``_preload_content=False``), bounded and parsed as strict
JSON, urllib3 does not retry (one request waits ``request_timeout_s`` at most), and what the client logs
(an exec credential plugin that failed, a retry) is kept off the terminal and quoted in the error line.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from moeplan.orchestrator.errors import InputError
from moeplan.orchestrator.kube_input import check_kubeconfig, check_server, default_kubeconfig_paths, read_answer

REQUEST_TIMEOUT_S = 30.0
MAX_REQUEST_TIMEOUT_S = 600.0
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


class _Kept(logging.Handler):
    """Keeps the client's log records (on the root logger while it works) instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(" ".join(record.getMessage().split())[:200])


def check_request_timeout(request_timeout_s: float) -> None:
    """``--request-timeout-s`` in (0, ``MAX_REQUEST_TIMEOUT_S``]: checked before a command does any work."""
    if not 0 < request_timeout_s <= MAX_REQUEST_TIMEOUT_S:
        raise InputError(f"--request-timeout-s {request_timeout_s:g}: must be in (0, {MAX_REQUEST_TIMEOUT_S:g}]")


class Kube:
    """A client bound to one kubeconfig context; each request waits at most ``request_timeout_s``."""

    def __init__(self, kubeconfig: Path | None, context: str | None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        check_request_timeout(request_timeout_s)
        self.request_timeout_s = request_timeout_s
        self.logs = _Kept()
        where = f"--context {context}" if context else f"--kubeconfig {kubeconfig or '~/.kube/config'}"
        for path in [kubeconfig] if kubeconfig else default_kubeconfig_paths():
            check_kubeconfig(path, "--kubeconfig" if kubeconfig else "kubeconfig")
        file = str(kubeconfig) if kubeconfig else None
        configuration = client.Configuration()
        try:
            with self._quiet():
                config.load_kube_config(config_file=file, context=context, client_configuration=configuration,
                                        persist_config=False)
                contexts, active = config.list_kube_config_contexts(config_file=file)
        except (ConfigException, OSError, ValueError, TypeError, AttributeError, KeyError, yaml.YAMLError) as exc:
            raise InputError(f"{where}: cannot use the kubeconfig ({' '.join(str(exc).split())[:300]})") from None
        if context:
            active = next(c for c in contexts if c["name"] == context)
        self.namespace = ((active or {}).get("context") or {}).get("namespace") or "default"
        self.host = check_server(configuration.host, where)
        configuration.retries = False  # one try per request: a hanging server costs request_timeout_s, not four
        self.api = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        """The client's log records go to ``self.logs``, not the terminal (nor ``logging.basicConfig``)."""
        root = logging.getLogger()
        root.addHandler(self.logs)
        try:
            yield
        finally:
            root.removeHandler(self.logs)

    def _options(self) -> dict[str, Any]:
        return {"_request_timeout": self.request_timeout_s, "_preload_content": False}

    def create(self, doc: dict[str, Any], dry_run: bool) -> None:
        kind, ns = doc["kind"], doc["metadata"].get("namespace") or self.namespace
        extra = {"dry_run": "All" if dry_run else None, "field_validation": "Strict", "field_manager": FIELD_MANAGER,
                 **self._options()}
        with self.reported(doc, "create (dry run)" if dry_run else "create"):
            if kind == "ConfigMap":
                self.core.create_namespaced_config_map(ns, doc, **extra).close()
                return
            res = RESOURCES[kind]
            self.custom.create_namespaced_custom_object(res.group, res.version, ns, res.plural, doc, **extra).close()

    def delete(self, doc: dict[str, Any]) -> None:
        kind, name, ns = doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace") or self.namespace
        with self.reported(doc, "delete"):
            if kind == "ConfigMap":
                self.core.delete_namespaced_config_map(name, ns, **self._options()).close()
            else:
                res = RESOURCES[kind]
                self.custom.delete_namespaced_custom_object(res.group, res.version, ns, res.plural, name,
                                                            **self._options()).close()

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        """The object, or None when there is none of that kind and name."""
        res = RESOURCES[kind]
        what = f"get {kind}/{name}"
        try:
            with self._reporting(what, namespace, missing_ok=True):
                deadline = time.monotonic() + self.request_timeout_s
                return read_answer(self.custom.get_namespaced_custom_object(
                    res.group, res.version, namespace, res.plural, name, **self._options()), what, deadline)
        except _NotFound:
            return None

    def pod_phases(self, job: str, namespace: str, label: str) -> dict[str, int]:
        """Pods labelled ``label=job``, counted by phase."""
        what = f"list pods of {job}"
        with self._reporting(what, namespace):
            deadline = time.monotonic() + self.request_timeout_s
            answer = read_answer(self.core.list_namespaced_pod(namespace, label_selector=f"{label}={job}",
                                                               **self._options()), what, deadline)
        items = answer.get("items")
        phases: dict[str, int] = {}
        for pod in items if isinstance(items, list) else []:
            status = pod.get("status") if isinstance(pod, dict) else None
            phase = status.get("phase") if isinstance(status, dict) else None
            phase = phase if isinstance(phase, str) and phase else "Unknown"
            phases[phase] = phases.get(phase, 0) + 1
        return dict(sorted(phases.items()))

    @contextmanager
    def reported(self, doc: dict[str, Any], action: str) -> Iterator[None]:
        """An API refusal, a connection failure or a timeout inside becomes one ``InputError`` line."""
        meta = doc.get("metadata") or {}
        with self._reporting(f"{action} {doc.get('kind')}/{meta.get('name')}", meta.get("namespace") or self.namespace):
            yield

    @contextmanager
    def _reporting(self, what: str, namespace: str, missing_ok: bool = False) -> Iterator[None]:
        """``reported`` for a request described by ``what``; a 404 raises ``_NotFound`` where ``missing_ok``.
        The client's log lines are kept off the terminal."""
        try:
            with self._quiet():
                yield
        except ApiException as exc:
            if exc.status == 404 and missing_ok:
                raise _NotFound from None
            raise InputError(refusal(exc, what, namespace)) from None
        except HTTPError as exc:
            if isinstance(exc, Urllib3Timeout) and not isinstance(exc, NewConnectionError):  # urllib3's is both
                raise InputError(f"{what}: no answer from the API server at {self.host} within "
                                 f"--request-timeout-s {self.request_timeout_s:g}") from None
            logged = f"; the client logged: {self.logs.lines[-1]}" if self.logs.lines else ""
            raise InputError(f"{what}: cannot reach the API server at {self.host} ({type(exc).__name__}){logged}"
                             ) from None


class _NotFound(Exception):
    """A get answered 404."""


def refusal(exc: ApiException, what: str, namespace: str) -> str:
    """The one line for an API server refusal."""
    try:
        status = json.loads(exc.body or "{}")
    except (TypeError, ValueError, RecursionError):
        status = {}
    status = status if isinstance(status, dict) else {}
    message = str(status.get("message") or exc.reason or "")[:300]
    if exc.status == 409 and what.startswith("create"):
        return (f"{what}: already exists in namespace {namespace}; to replace it, delete it first "
                "(kubectl delete -f DIR) and submit again")
    if exc.status == 422:
        details = status.get("details")
        causes = details.get("causes") if isinstance(details, dict) else None
        causes = [c for c in causes[:10] if isinstance(c, dict)] if isinstance(causes, list) else []
        fields = "; ".join(f"{c.get('field', '?')}: {c.get('message', '')}" for c in causes)
        return f"{what}: invalid ({fields or message})"
    if exc.status in (401, 403):
        kind = "not authenticated (401)" if exc.status == 401 else "forbidden (403)"
        return f"{what}: {kind} in namespace {namespace}: {message}"
    return f"{what}: the API server answered {exc.status} {exc.reason}: {message}"
