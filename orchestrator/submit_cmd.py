"""``moeplan submit DIR`` and ``moeplan status NAME``: a validated manifest folder sent to the cluster of a
kubeconfig context, and a job watched until it ends.

``submit`` validates the folder (every layer, as ``moeplan manifests --validate``), sends each object as a
server-side dry run (``dryRun=All``, ConfigMap first), then creates them in the same order; if a create
fails, the objects it already created are deleted before the error is reported. ``status`` polls the
RayJob's deployment and job status, or the JobSet's conditions, and the pods' phases, shows them live, and
returns the job's result as the exit code: 0 succeeded, 1 failed. Each request to the API server waits at
most ``--request-timeout-s``; ``status --timeout-s`` bounds the whole watch (one line, exit 2, when it
passes). What the server says is shown as one printable line (``errors.one_line``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from moeplan.manifests import pods
from moeplan.manifests.cel_check import skipped_rules
from moeplan.manifests.pod_check import KUBERNETES_VERSION
from moeplan.manifests.target import ManifestError
from moeplan.manifests.validation import read_documents, validate_documents
from moeplan.orchestrator.errors import InputError, note, one_line
from moeplan.orchestrator.kube import REQUEST_TIMEOUT_S, RESOURCES, Kube, check_request_timeout
from moeplan.orchestrator.kube_input import NAMESPACE_RE, check_manifest_integers, check_name

FAILED_EXIT_CODE = 1
Opt = typer.Option
KubeconfigOpt = Annotated[Path | None, Opt(help="Kubeconfig file (default: $KUBECONFIG or ~/.kube/config).")]
ContextOpt = Annotated[str | None, Opt(help="Kubeconfig context (default: the current one).")]
RequestTimeoutOpt = Annotated[float, Opt(help="Seconds one request to the API server may take.")]
MAX_STATUS_TEXT_CHARS = 200  # what the server says about a job, shown at most this long


def submit_command(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Folder written by `moeplan manifests`.")],
    context: ContextOpt = None,
    dry_run: Annotated[bool, Opt("--dry-run", help="Only the server-side dry run; create nothing.")] = False,
    kubeconfig: KubeconfigOpt = None,
    kubernetes_version: Annotated[str, Opt(help="Kubernetes version for the pod-template check.")] = KUBERNETES_VERSION,
    request_timeout_s: RequestTimeoutOpt = REQUEST_TIMEOUT_S,
) -> None:
    """Validate a manifest folder, dry-run it on the server, then create it."""
    check_request_timeout(request_timeout_s)  # before the validation's seconds
    docs = _valid_documents(folder, kubernetes_version)
    ordered = sorted((d for _, d in docs), key=lambda d: d.get("kind") != "ConfigMap")  # the plan before its job
    unknown = [d.get("kind") for d in ordered if d.get("kind") not in RESOURCES]
    if unknown:
        raise InputError(f"{folder}: kind {unknown[0]!r:.60} is not one moeplan submits ({', '.join(RESOURCES)})")
    kube = Kube(kubeconfig, context, request_timeout_s)
    for doc in ordered:
        kube.create(doc, dry_run=True)
        typer.echo(f"dry run ok: {doc['kind']}/{doc['metadata']['name']}")
    if dry_run:
        return
    created: list[dict[str, Any]] = []
    try:
        for doc in ordered:
            kube.create(doc, dry_run=False)
            created.append(doc)
            typer.echo(f"created: {doc['kind']}/{doc['metadata']['name']}")
    except BaseException as exc:
        left = []
        for doc in reversed(created):  # leave nothing half-made behind
            try:
                kube.delete(doc)
            except InputError as failed:
                left.append(f"{failed}")
        if left and isinstance(exc, InputError):  # still one line: what failed, then what is left to delete
            raise InputError(f"{exc}; and could not undo it: {'; '.join(left)} (delete it by hand)") from None
        for line in left:
            note(f"{line} (delete it by hand)")
        raise
    job = ordered[-1]["metadata"]["name"]
    typer.echo(f"watch it with: moeplan status {job} --namespace {ordered[-1]['metadata'].get('namespace')}")


def _valid_documents(folder: Path, version: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        docs = read_documents(folder)
        check_manifest_integers(folder, docs)
        findings = validate_documents(docs, version)
    except ManifestError as exc:
        raise InputError(str(exc)) from None
    for finding in findings:
        typer.echo(finding.line())
    if findings:
        raise InputError(f"{folder}: {len(findings)} problem(s) (listed above); nothing was sent")
    skipped = sum(len(skipped_rules(k)) for k in ("RayJob", "JobSet"))
    typer.echo(f"valid: schema, CEL ({skipped} transition rules left to the server), pod templates, policy")
    return docs


def _text(value: Any, default: str) -> str:
    """A status field as short printable text (the server's word for it; ``default`` where it says nothing)."""
    return one_line(str(value))[:MAX_STATUS_TEXT_CHARS] if value not in (None, "", [], {}) else default


def job_state(kind: str, obj: dict[str, Any]) -> tuple[str, bool | None]:
    """(what the job's status says, its result: True succeeded, False failed, None not finished). Fields of
    an unexpected type count as absent: the server's answer is data, not a promise."""
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    if kind == "RayJob":
        deployment = _text(status.get("jobDeploymentStatus"), "Pending")
        job = _text(status.get("jobStatus"), "-")
        reason = f" {_text(status['reason'], '')}" if status.get("reason") else ""
        text = f"{deployment} (job {job}{reason})"
        if deployment == "Failed" or (deployment == "Complete" and job != "SUCCEEDED"):
            return text, False
        return text, True if deployment == "Complete" else None
    listed = status.get("conditions") if isinstance(status.get("conditions"), list) else []
    conditions = {c.get("type"): c for c in listed
                  if isinstance(c, dict) and c.get("status") == "True" and isinstance(c.get("type"), str)}
    restarts = _text(status.get("restarts"), "0")
    for kind_, result in (("Completed", True), ("Failed", False)):
        if kind_ in conditions:
            return f"{kind_} ({_text(conditions[kind_].get('reason'), '-')}, restarts {restarts})", result
    current = _text(", ".join(sorted(conditions)), "Running")
    return f"{current} (restarts {restarts})", None


def status_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The RayJob's or JobSet's name.")],
    namespace: Annotated[str | None, Opt(help="Namespace (default: the context's).")] = None,
    context: ContextOpt = None,
    kubeconfig: KubeconfigOpt = None,
    interval_s: Annotated[float, Opt(help="Seconds between polls.")] = 10.0,
    timeout_s: Annotated[float, Opt(help="Give up watching after this many seconds (default: never).")] = math.inf,
    request_timeout_s: RequestTimeoutOpt = REQUEST_TIMEOUT_S,
) -> int:
    """Watch a RayJob or JobSet and its pods until it ends; exit 0 if it succeeded, 1 if it failed."""
    if not 0 < interval_s <= 3600:
        raise InputError(f"--interval-s {interval_s:g}: must be in (0, 3600]")
    if not timeout_s > 0:  # NaN too
        raise InputError(f"--timeout-s {timeout_s:g}: must be positive")
    check_name(name, "NAME")
    if namespace is not None:
        check_name(namespace, "--namespace", NAMESPACE_RE)
    deadline = time.monotonic() + timeout_s
    kube = Kube(kubeconfig, context, request_timeout_s)
    ns = namespace or kube.namespace
    console = Console(stderr=False)
    shown: tuple[str, dict[str, int]] | None = None
    with Live(console=console, auto_refresh=False, transient=False) if console.is_terminal else _NoLive() as live:
        while True:
            kind, obj = _find(kube, name, ns)
            text, result = job_state(kind, obj)
            phases = kube.pod_phases(name, ns, pods.JOB_LABEL)
            if live is not None:
                live.update(_table(kind, name, text, phases), refresh=True)
            elif (text, phases) != shown:
                typer.echo(f"{kind}/{name}: {text}; pods: {_phases(phases)}")
            shown = (text, phases)
            if result is not None:
                typer.echo(f"{kind}/{name} {'succeeded' if result else 'failed'}: {text}")
                return 0 if result else FAILED_EXIT_CODE
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise InputError(f"--timeout-s {timeout_s:g}: {kind}/{name} has not ended ({text}); it runs on, "
                                 "watch again with a longer --timeout-s")
            time.sleep(min(interval_s, left_s))


def _find(kube: Kube, name: str, namespace: str) -> tuple[str, dict[str, Any]]:
    for kind in ("RayJob", "JobSet"):
        obj = kube.get(kind, name, namespace)
        if obj is not None:
            return kind, obj
    raise InputError(f"NAME {name!r:.80}: no RayJob or JobSet of that name in namespace {namespace}")


def _phases(phases: dict[str, int]) -> str:
    return ", ".join(f"{n} {_text(p, '?')}" for p, n in phases.items()) or "none yet"


def _table(kind: str, name: str, text: str, phases: dict[str, int]) -> Table:
    table = Table(title=f"{kind}/{name}", show_header=False)
    table.add_row("status", text)
    table.add_row("pods", _phases(phases))
    return table


class _NoLive:
    """Stands in for ``Live`` where the output is not a terminal: one line per change instead."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
