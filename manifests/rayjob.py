"""A KubeRay ``RayJob`` (``ray.io/v1``) for a plan: a head without GPUs and one worker group of the plan's
nodes, the plan from a ConfigMap, ``moeplan launch`` as the entrypoint, limits from the budget (``limits``).

Kueue-ready: ``shutdownAfterJobFinishes: true``, in-tree autoscaling off, one worker group, no
``clusterSelector``; Kueue owns ``suspend``. The submitter pod (K8sJobMode, KubeRay's default) is given
explicitly so that it too is non-root and uses the plan's image; KubeRay fills in its ``ray job submit``
command.
"""

from __future__ import annotations

from typing import Any

from moeplan.manifests import pods
from moeplan.manifests.limits import JobLimits
from moeplan.manifests.target import K8sTarget, gpu_nodes
from moeplan.simulator.contracts.plan_file import PlanFile

API_VERSION = "ray.io/v1"
WORKER_GROUP = "gpu-workers"


def _start_params(memory_bytes: int, gpus: int, cpus: int) -> dict[str, str]:
    return {"num-cpus": str(cpus), "num-gpus": str(gpus),
            "object-store-memory": str(pods.object_store_bytes(memory_bytes))}


def head_group(plan: PlanFile, target: K8sTarget, limits: JobLimits, config_map: str) -> dict[str, Any]:
    vols, mounts = pods.volumes(config_map, pods.shm_bytes(pods.HEAD_MEMORY_BYTES, 0))
    ctr = pods.container(plan, target, "ray-head", pods.head_resources(), mounts)
    ctr["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                    {"containerPort": 10001, "name": "client"}]
    return {"rayStartParams": _start_params(pods.HEAD_MEMORY_BYTES, 0, 0),
            "template": {"metadata": pods.metadata(plan, target, limits, top=False),
                         "spec": pods.pod_spec(target, ctr, vols, root_for_rdma=False)}}


def worker_group(plan: PlanFile, target: K8sTarget, limits: JobLimits, config_map: str) -> dict[str, Any]:
    gpus = plan.inputs.cluster.node.gpus_per_node
    memory = pods.gpu_memory_bytes(plan, target)
    vols, mounts = pods.volumes(config_map, pods.shm_bytes(memory, gpus))
    ctr = pods.container(plan, target, "ray-worker", pods.gpu_resources(plan, target), mounts)
    template_meta = pods.metadata(plan, target, limits, top=False)
    if pods.tas_annotations(target):
        template_meta["annotations"] = pods.tas_annotations(target)
    nodes = gpu_nodes(plan)
    return {"groupName": WORKER_GROUP, "replicas": nodes, "minReplicas": nodes, "maxReplicas": nodes,
            "rayStartParams": _start_params(memory, gpus, target.cpu_per_gpu * gpus),
            "template": {"metadata": template_meta,
                         "spec": pods.pod_spec(target, ctr, vols, root_for_rdma=pods.rdma(plan, target))}}


def submitter(plan: PlanFile, target: K8sTarget, limits: JobLimits) -> dict[str, Any]:
    amounts = {"cpu": "1", "memory": "1Gi"}
    ctr = pods.container(plan, target, "submitter", {"requests": dict(amounts), "limits": dict(amounts)}, [])
    del ctr["volumeMounts"]
    spec = pods.pod_spec(target, ctr, [], root_for_rdma=False, restart_policy="Never")
    del spec["volumes"]
    return {"metadata": pods.metadata(plan, target, limits, top=False), "spec": spec}


def rayjob(plan: PlanFile, target: K8sTarget, limits: JobLimits, config_map: str) -> dict[str, Any]:
    """The RayJob of ``plan`` on ``target``, as a plain dict."""
    return {
        "apiVersion": API_VERSION, "kind": "RayJob",
        "metadata": pods.metadata(plan, target, limits, top=True),
        "spec": {
            "entrypoint": " ".join(pods.LAUNCH),
            "shutdownAfterJobFinishes": True,
            "activeDeadlineSeconds": limits.deadline_s,
            "backoffLimit": limits.restarts,
            "submissionMode": "K8sJobMode",
            "submitterPodTemplate": submitter(plan, target, limits),
            "rayClusterSpec": {
                "enableInTreeAutoscaling": False,
                "headGroupSpec": head_group(plan, target, limits, config_map),
                "workerGroupSpecs": [worker_group(plan, target, limits, config_map)],
            },
        },
    }
