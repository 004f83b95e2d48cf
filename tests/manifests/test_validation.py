"""Validation layer by layer: generated manifests pass every layer; one seeded mistake per layer is
caught by that layer and by no other (where the others cannot see it); the CRD conversion reproduces the
committed schemas from the vendored CRDs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft7Validator

from moeplan.manifests.cel_check import cel_findings, skipped_rules
from moeplan.manifests.crd_schema import SCHEMA_DIR, converted, strict_schema
from moeplan.manifests.render import CONFIGMAP_FILE, documents, load_documents
from moeplan.manifests.target import K8sTarget, ManifestError
from moeplan.manifests.validation import validate_documents

CRD_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "k8s-crds"


def _docs(case, kind, **target) -> list[tuple[str, dict]]:
    return list(documents(case.plan, case.text, K8sTarget(**target), kind).items())


def _layers(docs, version="1.31") -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in validate_documents(docs, version):
        out.setdefault(f.layer, []).append(f.message)
    return out


def _job(docs):
    return docs[1][1]


def _gpu_pod(job):
    if job["kind"] == "RayJob":
        return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    return job["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("kind", ["rayjob", "jobset"])
@pytest.mark.parametrize("case", ["v3", "tiny"])
def test_generated_manifests_pass_every_layer(case, kind, request) -> None:
    planned = request.getfixturevalue(case)
    assert _layers(_docs(planned, kind, queue="q", topology_preferred="example.com/rack")) == {}


@pytest.mark.parametrize("kind", ["rayjob", "jobset"])
def test_unknown_field_is_the_schemas(tiny, kind) -> None:
    docs = _docs(tiny, kind)
    _job(docs)["spec"]["suspnd"] = True
    assert _layers(docs) == {"schema": ["spec: Additional properties are not allowed ('suspnd' was unexpected)"]}


def test_cel_violation_is_cels_rayjob(tiny) -> None:
    docs = _docs(tiny, "rayjob")
    _job(docs)["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}  # onFailure missing
    assert _layers(docs) == {"cel": [("spec.deletionStrategy: deletionStrategy requires either BOTH onSuccess and "
                                     "onFailure, OR the deletionRules field (cannot be empty)")]}


def test_cel_violation_is_cels_jobset(tiny) -> None:
    docs = _docs(tiny, "jobset")
    spec = _job(docs)["spec"]
    spec["startupPolicy"] = {"startupPolicyOrder": "InOrder"}
    spec["replicatedJobs"][0]["dependsOn"] = [{"name": "node", "status": "Ready"}]
    assert _layers(docs) == {"cel": ["spec: StartupPolicy and DependsOn APIs are mutually exclusive"]}


@pytest.mark.parametrize("kind", ["rayjob", "jobset"])
def test_pod_template_error_is_the_pod_layers(tiny, kind) -> None:
    """Pod-level resources: in the CRDs' PodSpec, but not in Kubernetes 1.31 (alpha in 1.32)."""
    docs = _docs(tiny, kind)
    _gpu_pod(_job(docs))["resources"] = {"limits": {"cpu": "96"}}
    found = _layers(docs)
    assert list(found) == ["pod"] and len(found["pod"]) == 1
    assert "'resources' was unexpected" in found["pod"][0] and "(Kubernetes 1.31)" in found["pod"][0]
    assert _layers(docs, "1.34") == {}  # a cluster that has the field


def test_configmap_error_is_the_pod_layers(tiny) -> None:
    docs = _docs(tiny, "rayjob")
    docs[0][1]["metadata"]["lables"] = {"a": "b"}
    assert _layers(docs) == {"pod": [("metadata: Additional properties are not allowed ('lables' was unexpected) "
                                     "(Kubernetes 1.31)")]}


@pytest.mark.parametrize("kind", ["rayjob", "jobset"])
def test_gpu_count_other_than_the_world_is_policys(tiny, kind) -> None:
    docs = _docs(tiny, kind)
    job = _job(docs)
    if kind == "rayjob":
        group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        group["replicas"] = group["minReplicas"] = group["maxReplicas"] = 3
    else:
        job["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] = 3
    assert _layers(docs) == {"policy": ["pods x GPUs per pod = 24, but the plan's layout.world=16"]}


def test_privileged_container_is_policys(tiny) -> None:
    docs = _docs(tiny, "rayjob")
    _gpu_pod(_job(docs))["containers"][0]["securityContext"]["privileged"] = True
    (line,) = _layers(docs)["policy"]
    assert line.endswith("securityContext.privileged: true: no moeplan container runs privileged")
    assert list(_layers(docs)) == ["policy"]


def test_deadline_shorter_than_predicted_is_policys(tiny) -> None:
    docs = _docs(tiny, "rayjob")
    _job(docs)["spec"]["activeDeadlineSeconds"] = 60
    found = _layers(docs)
    assert list(found) == ["policy"]
    assert found["policy"][0].startswith("activeDeadlineSeconds=60 is shorter than the predicted wall time")


def test_deadline_past_the_budget_and_too_many_restarts_are_policys(tiny) -> None:
    docs = _docs(tiny, "jobset")
    job = _job(docs)
    job["spec"]["replicatedJobs"][0]["template"]["spec"]["activeDeadlineSeconds"] = 10**6
    job["spec"]["failurePolicy"]["maxRestarts"] = 10**4
    found = _layers(docs)["policy"]
    assert [line.split(" ")[0] for line in found] == ["activeDeadlineSeconds=1000000", "restarts=10000"]
    assert "exceeds the budget of 100" in found[0]


def test_ipc_lock_in_a_baseline_namespace_and_kueue_limits_are_policys(tiny) -> None:
    docs = _docs(tiny, "rayjob", queue="q", pod_security="baseline")
    _job(docs)["spec"]["shutdownAfterJobFinishes"] = False
    found = _layers(docs)
    assert list(found) == ["policy"] and len(found["policy"]) == 2
    assert "['IPC_LOCK'] not allowed at Pod Security level 'baseline'" in found["policy"][0]
    assert found["policy"][1] == "spec.shutdownAfterJobFinishes: Kueue admits a RayJob only with true"


def test_missing_rdma_hostname_exclusivity_and_latest_image_are_policys(tiny) -> None:
    docs = _docs(tiny, "jobset", rdma_resource=None, exclusive_topology="kubernetes.io/hostname",
                 image="moeplan:latest")
    found = _layers(docs)["policy"]
    assert len(found) == 3
    assert "puts the whole job on one node, but it has 2" in found[0]
    assert "no RDMA resource, but the job spans 2 nodes" in found[1]
    assert found[2].endswith(".image='moeplan:latest': name a version tag or a digest, not latest")


def test_a_job_without_its_plan_is_reported() -> None:
    assert [f.message for f in validate_documents([("x.yaml", {"kind": "ConfigMap", "apiVersion": "v1",
                                                                "metadata": {"name": "x"}})])] == [
        "no RayJob or JobSet among the manifests"]


def test_a_tampered_plan_in_the_configmap_is_refused(tiny) -> None:
    docs = _docs(tiny, "rayjob")
    docs[0][1]["data"]["plan.json"] = tiny.text.replace('"nodes": 2', '"nodes": 3', 1)
    with pytest.raises(ManifestError, match="inputs_sha256"):
        validate_documents(docs)
    assert docs[0][0] == CONFIGMAP_FILE


def test_transition_rules_are_skipped_and_listed() -> None:
    assert skipped_rules("RayJob") == ["spec.managedBy: self == oldSelf",
                                       "spec.rayClusterSpec.gcsFaultToleranceOptions.backend: self == oldSelf",
                                       "spec.rayClusterSpec.managedBy: self == oldSelf"]
    assert len(skipped_rules("JobSet")) == 6
    job = {"kind": "RayJob", "spec": {"managedBy": "someone-else"}}
    assert cel_findings(job) == [("spec.managedBy: the managedBy field value must be either 'ray.io/kuberay-operator' "
                                 "or 'kueue.x-k8s.io/multikueue'")]


def test_strict_schema_conversion() -> None:
    node = {"type": "object", "properties": {
        "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
        "note": {"type": "string", "nullable": True, "description": "dropped"},
        "description": {"type": "string"},  # a field called description is a field
        "free": {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-preserve-unknown-fields": True},
    }}
    schema = strict_schema(node)
    assert set(schema["properties"]) == {"port", "note", "description", "free"}
    v = Draft7Validator(schema)
    good = [{"port": 80, "note": None, "description": "x", "free": {"b": 1}}, {"port": "http"}]
    bad = [{"port": 1.5}, {"note": 3}, {"other": 1}, {"free": {"a": 1}}]
    assert [v.is_valid(d) for d in good + bad] == [True, True, False, False, False, False]


def test_committed_schemas_are_the_vendored_crds_converted() -> None:
    if not CRD_DIR.is_dir():
        pytest.skip(f"the vendored CRDs are not beside the repository ({CRD_DIR}); nothing to compare with")
    fresh = converted(CRD_DIR)
    assert sorted(fresh) == sorted(p.name for p in SCHEMA_DIR.glob("*.json"))
    for name, text in fresh.items():
        assert (SCHEMA_DIR / name).read_text() == text, f"{name}: re-run python -P -m moeplan.manifests.crd_schema"
    assert json.loads(fresh["rayjob.schema.json"])["$comment"]["version"] == "v1"


def test_yaml_aliases_are_refused_before_anything_walks_them() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    with pytest.raises(ManifestError, match=r"x.yaml: holds a YAML alias"):
        load_documents(bomb, "x.yaml")
    assert load_documents("kind: ConfigMap\n---\nkind: RayJob\n", "y.yaml") == [{"kind": "ConfigMap"},
                                                                                  {"kind": "RayJob"}]
