"""The RayJob and JobSet builders, asserted path by path against the plan they come from."""

from __future__ import annotations

import pytest
import yaml

from moeplan.manifests import pods
from moeplan.manifests.limits import job_limits
from moeplan.manifests.render import CONFIGMAP_FILE, documents, render
from moeplan.manifests.target import GiB, K8sTarget


def _job(case, kind, **target):
    return documents(case.plan, case.text, K8sTarget(**target), kind)[f"{kind}.yaml"]


def _gpu_template(doc):
    if doc["kind"] == "RayJob":
        return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
    return doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]


def test_rayjob_worker_group_is_the_plans_nodes(v3) -> None:
    doc = _job(v3, "rayjob")
    cluster = v3.plan.inputs.cluster
    spec = doc["spec"]
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 256 == cluster.nodes
    assert group["replicas"] * cluster.node.gpus_per_node == v3.plan.layout.world == 2048
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"] == res["limits"]
    assert res["limits"]["nvidia.com/gpu"] == "8" and res["limits"]["rdma/rdma_shared_device_a"] == "1"
    assert res["limits"]["cpu"] == "96" and res["limits"]["memory"] == "768Gi"
    assert group["rayStartParams"]["num-gpus"] == "8"
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert spec["entrypoint"] == "moeplan launch /plan/plan.json --address auto"
    assert spec["shutdownAfterJobFinishes"] is True and spec["rayClusterSpec"]["enableInTreeAutoscaling"] is False
    limits = job_limits(v3.plan, K8sTarget())
    assert (spec["activeDeadlineSeconds"], spec["backoffLimit"]) == (limits.deadline_s, limits.restarts)


def test_jobset_is_one_indexed_job_of_the_plans_nodes(tiny) -> None:
    doc = _job(tiny, "jobset", exclusive_topology="example.com/block")
    (rj,) = doc["spec"]["replicatedJobs"]
    job = rj["template"]["spec"]
    assert rj["replicas"] == 1 and job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == 2 == tiny.plan.inputs.cluster.nodes
    assert doc["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == "example.com/block"
    limits = job_limits(tiny.plan, K8sTarget())
    assert doc["spec"]["failurePolicy"]["maxRestarts"] == limits.restarts and job["activeDeadlineSeconds"] == (
        limits.deadline_s)
    script = _gpu_template(doc)["spec"]["containers"][0]["command"][2]
    assert "exec moeplan launch /plan/plan.json --address auto" in script
    assert f"--address={doc['metadata']['name']}-node-0-0.{doc['spec']['network']['subdomain']}:6379" in script


@pytest.mark.parametrize("kind", ["rayjob", "jobset"])
def test_security_non_root_except_rdma_pods_with_ipc_lock(tiny, kind) -> None:
    for rdma, want_root in (("rdma/ib", True), (None, False)):
        doc = _job(tiny, kind, rdma_resource=rdma)
        pod = _gpu_template(doc)["spec"]
        ctr = pod["containers"][0]["securityContext"]
        assert ctr["privileged"] is False and ctr["allowPrivilegeEscalation"] is False
        assert ctr["capabilities"] == ({"drop": ["ALL"], "add": ["IPC_LOCK"]} if want_root else {"drop": ["ALL"]})
        assert pod["securityContext"]["runAsNonRoot"] is (not want_root)
        assert ("rdma/ib" in pod["containers"][0]["resources"]["limits"]) is want_root
        assert (pods.CAPABILITIES_ANNOTATION in doc["metadata"]["annotations"]) is want_root
    if kind == "rayjob":  # the head and the submitter never need RDMA
        for tpl in (doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"], doc["spec"]["submitterPodTemplate"]):
            assert tpl["spec"]["securityContext"]["runAsNonRoot"] is True


def test_dev_shm_holds_the_object_store_and_nccls_share_within_memory(tiny) -> None:
    doc = _job(tiny, "rayjob", memory_per_gpu_bytes=16 * GiB)
    pod = _gpu_template(doc)["spec"]
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    memory = 16 * GiB * 8
    want = int(0.3 * memory) // 2**20 * 2**20 + 8 * GiB
    assert pods.quantity(want) == shm["emptyDir"]["sizeLimit"]
    start = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]
    assert int(start["object-store-memory"]) + 8 * GiB == want < memory


def test_labels_queue_and_topology(tiny) -> None:
    doc = _job(tiny, "rayjob", queue="team-a", topology_required="example.com/block")
    labels = doc["metadata"]["labels"]
    assert labels[pods.QUEUE_LABEL] == "team-a"
    assert labels[pods.PLAN_SHA_LABEL] == tiny.plan.inputs_sha256[:16]
    assert doc["metadata"]["annotations"][pods.PLAN_SHA_ANNOTATION] == tiny.plan.inputs_sha256
    assert labels[pods.PLAN_NAME_LABEL] == f"tiny-moe-{tiny.plan.inputs_sha256[:8]}"
    assert _gpu_template(doc)["metadata"]["annotations"] == {pods.TAS_REQUIRED: "example.com/block"}
    assert "annotations" not in _job(tiny, "rayjob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"][
        "metadata"]


def test_single_node_has_no_rdma(tiny) -> None:
    env = {e["name"]: e["value"] for e in _gpu_template(_job(tiny, "rayjob", rdma_resource=None))["spec"][
        "containers"][0]["env"]}
    assert env["NCCL_IB_DISABLE"] == "1" and env["MOEPLAN_WORLD_SIZE"] == "16"
    assert env["MOEPLAN_INPUTS_SHA256"] == tiny.plan.inputs_sha256


@pytest.mark.parametrize("kind", ["rayjob", "jobset"])
def test_output_is_deterministic_and_the_configmap_holds_the_plan_byte_for_byte(tiny, kind) -> None:
    first = render(tiny.plan, tiny.text, K8sTarget(), kind)
    assert render(tiny.plan, tiny.text, K8sTarget(), kind) == first
    configmap = yaml.safe_load(first[CONFIGMAP_FILE])
    assert configmap["data"]["plan.json"] == tiny.text
    assert first[f"{kind}.yaml"].startswith("# moeplan ")
    assert yaml.safe_load(first[f"{kind}.yaml"]) == documents(tiny.plan, tiny.text, K8sTarget(), kind)[f"{kind}.yaml"]
