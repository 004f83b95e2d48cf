"""``moeplan manifests``: Kubernetes manifests (a RayJob or a JobSet, and the plan's ConfigMap) generated
from a plan file, validated layer by layer before they are written; ``--validate DIR`` checks a folder.

Thin shell over ``manifests``: the target from the options (defaults live in ``manifests.target``), the
files rendered and validated, then written all or none (``outputs.write_outputs``).
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Annotated, Any

import typer

from moeplan.manifests.cel_check import skipped_rules
from moeplan.manifests.crd_schema import CRDS
from moeplan.manifests.pod_check import KUBERNETES_VERSION
from moeplan.manifests.render import BUILDERS, CONFIGMAP_MAX_BYTES, documents, load_documents, render
from moeplan.manifests.target import GiB, K8sTarget, ManifestError
from moeplan.manifests.validation import Finding, read_documents, validate_documents
from moeplan.orchestrator.errors import InputError, one_line
from moeplan.orchestrator.kube_input import check_manifest_integers
from moeplan.orchestrator.outputs import check_out_dir, out_path, write_outputs
from moeplan.simulator.contracts.plan_file import PlanFile, parse_plan

Opt = typer.Option


def manifests_command(
    plan_path: Annotated[Path | None, typer.Argument(metavar="PLAN", help="plan.json or its directory.")] = None,
    kind: Annotated[str, Opt(help=f"{' or '.join(BUILDERS)}.")] = "rayjob",
    out: Annotated[Path | None, Opt(help="Folder for the manifests (never inside the package).", parser=out_path)] = None,
    validate: Annotated[Path | None, Opt("--validate", metavar="DIR", help="Validate the manifests in DIR.")] = None,
    image: Annotated[str | None, Opt(help="Container image (default moeplan:<plan's moeplan version>).")] = None,
    namespace: Annotated[str | None, Opt(help="Namespace (default: default).")] = None,
    queue: Annotated[str | None, Opt(help="Kueue LocalQueue name.")] = None,
    rdma_resource: Annotated[str | None, Opt(help="RDMA extended resource; 'none' for no RDMA.")] = None,
    service_account: Annotated[str | None, Opt(help="Service account of the pods.")] = None,
    name: Annotated[str | None, Opt(help="Job name (default moeplan-<model>-<inputs hash>).")] = None,
    topology_required: Annotated[str | None, Opt(help="Kueue TAS: required topology level label.")] = None,
    topology_preferred: Annotated[str | None, Opt(help="Kueue TAS: preferred topology level label.")] = None,
    exclusive_topology: Annotated[str | None, Opt(help="JobSet: exclusive placement node label.")] = None,
    pod_security: Annotated[str | None, Opt(help="Namespace's Pod Security level.")] = None,
    cpu_per_gpu: Annotated[int | None, Opt(help="CPUs per GPU in a GPU pod.")] = None,
    memory_per_gpu_gib: Annotated[int | None, Opt(help="Memory per GPU in a GPU pod, GiB.")] = None,
    checkpoint_interval_s: Annotated[float | None, Opt(help="Work a restart loses at most, seconds.")] = None,
    restart_overhead_s: Annotated[float | None, Opt(help="What a restart costs besides lost work, seconds.")] = None,
    kubernetes_version: Annotated[str, Opt(help="Kubernetes version the pod templates are checked against.")
                                  ] = KUBERNETES_VERSION,
) -> None:
    """Generate Kubernetes manifests (KubeRay RayJob or JobSet) from a plan, or validate a folder of them."""
    if validate is not None:
        if plan_path is not None or out is not None:
            raise InputError("--validate DIR: give it alone, without PLAN or --out")
        _validated(read_documents_or_fail(validate), kubernetes_version)
        _echo_passed(kubernetes_version)
        return
    if plan_path is None or out is None:
        raise InputError("PLAN and --out DIR are required (or --validate DIR)")
    if kind not in BUILDERS:
        raise InputError(f"--kind {kind!r:.60}: must be one of {', '.join(BUILDERS)}")
    check_out_dir(out, "--out")
    given = {"image": image, "namespace": namespace, "queue": queue, "service_account": service_account,
             "name": name, "topology_required": topology_required, "topology_preferred": topology_preferred,
             "exclusive_topology": exclusive_topology, "pod_security": pod_security, "cpu_per_gpu": cpu_per_gpu,
             "memory_per_gpu_bytes": memory_per_gpu_gib * GiB if memory_per_gpu_gib is not None else None,
             "checkpoint_interval_s": checkpoint_interval_s, "restart_overhead_s": restart_overhead_s}
    if rdma_resource is not None:
        given["rdma_resource"] = None if rdma_resource == "none" else rdma_resource
    if topology_required and topology_preferred:
        raise InputError("--topology-required and --topology-preferred: give one (Kueue takes one per pod set)")
    target = K8sTarget(**{k: v for k, v in given.items() if v is not None or k == "rdma_resource"})
    plan, text = _read_plan(plan_path)
    try:
        texts = render(plan, text, target, kind)  # type: ignore[arg-type]
        docs = documents(plan, text, target, kind)  # type: ignore[arg-type]
    except ManifestError as exc:
        raise InputError(str(exc)) from None
    assert [load_documents(t, n) for n, t in texts.items()] == [[d] for d in docs.values()], "YAML round trip"
    _validated(list(docs.items()), kubernetes_version)
    write_outputs({out / file: t for file, t in texts.items()})
    typer.echo(f"wrote {', '.join(str(out / file) for file in texts)}")
    _echo_passed(kubernetes_version)


def read_documents_or_fail(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        docs = read_documents(folder)
    except ManifestError as exc:
        raise InputError(str(exc)) from None
    check_manifest_integers(folder, docs)
    return docs


def _read_plan(path: Path) -> tuple[PlanFile, str]:
    """The plan and its text, which the ConfigMap carries byte for byte."""
    file = path
    try:
        if path.is_dir():
            file = path / "plan.json"
        st = file.stat()
        if not stat.S_ISREG(st.st_mode):  # a device or a pipe: its size says nothing, reading may never end
            raise InputError(f"PLAN {file}: not a regular file")
        if st.st_size > CONFIGMAP_MAX_BYTES:
            raise InputError(f"{file}: {st.st_size} bytes exceed a ConfigMap's {CONFIGMAP_MAX_BYTES}")
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{file}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    return parse_plan(text, str(file)), text


def _validated(docs: list[tuple[str, dict[str, Any]]], version: str) -> None:
    """Every layer over ``docs``; the findings on stdout and one ``InputError`` if there are any."""
    try:
        findings: list[Finding] = validate_documents(docs, version)
    except ManifestError as exc:
        raise InputError(str(exc)) from None
    for finding in findings:  # one line each, a document's text spelled out (no terminal escapes from a file)
        typer.echo(one_line(finding.line()))
    if findings:
        layers = sorted({f.layer for f in findings})
        raise InputError(f"manifests: {len(findings)} problem(s) found by layer(s) {', '.join(layers)} (listed above)")


def _echo_passed(version: str) -> None:
    skipped = sum(len(skipped_rules(kind)) for kind in CRDS)
    typer.echo(f"valid: CRD schema (strict), CEL rules ({skipped} transition rules need the previous object: "
               f"skipped), pod templates (Kubernetes {version}, strict), moeplan policy")
