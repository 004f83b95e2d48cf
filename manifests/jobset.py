"""A ``JobSet`` (``jobset.x-k8s.io/v1alpha2``) for a plan: one replicated Indexed Job whose pods are the
plan's nodes (``completions = parallelism = nodes``), placed together in one domain of the
exclusive-topology label, restarted at most ``limits.restarts`` times, each attempt bounded by the deadline.

No Ray operator here: pod 0 starts the Ray head and runs ``moeplan launch``; the others join it by its
stable DNS name (``<jobset>-node-0-0.<jobset>``: JobSet's headless service, DNS published before pods are
ready) and block. The Job succeeds when index 0 does (Job ``successPolicy``; the other pods are then
stopped). A Job that fails its deadline fails the JobSet rather than restarting it: a restart would spend
past the budget.
"""

from __future__ import annotations

import shlex
from typing import Any

from moeplan.manifests import pods
from moeplan.manifests.limits import JobLimits
from moeplan.manifests.target import K8sTarget, gpu_nodes, job_name
from moeplan.simulator.contracts.plan_file import PlanFile

API_VERSION = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "node"
EXCLUSIVE_TOPOLOGY = "alpha.jobset.sigs.k8s.io/exclusive-topology"
RAY_PORT = 6379


def head_address(name: str) -> str:
    """Pod 0's stable DNS name: ``<jobset>-<replicated job>-<job index>-<pod index>.<subdomain>``."""
    return f"{name}-{REPLICATED_JOB}-0-0.{name}"


def node_script(plan: PlanFile, target: K8sTarget) -> str:
    """The shell script each pod runs: the Ray head and ``moeplan launch`` on index 0, a Ray worker elsewhere."""
    gpus = plan.inputs.cluster.node.gpus_per_node
    memory = pods.gpu_memory_bytes(plan, target)
    common = (f"--num-gpus={gpus} --num-cpus={target.cpu_per_gpu * gpus} "
              f"--object-store-memory={pods.object_store_bytes(memory)} --disable-usage-stats")
    launch = " ".join(shlex.quote(a) for a in pods.LAUNCH)
    return "\n".join([
        "set -eu",
        'if [ "$JOB_COMPLETION_INDEX" = "0" ]; then',
        f"  ray start --head --port={RAY_PORT} {common}",
        f"  exec {launch}",
        "fi",
        f"exec ray start --address={head_address(job_name(plan, target))}:{RAY_PORT} {common} --block",
    ]) + "\n"


def job_template(plan: PlanFile, target: K8sTarget, limits: JobLimits, config_map: str) -> dict[str, Any]:
    gpus = plan.inputs.cluster.node.gpus_per_node
    vols, mounts = pods.volumes(config_map, pods.shm_bytes(pods.gpu_memory_bytes(plan, target), gpus))
    ctr = pods.container(plan, target, "node", pods.gpu_resources(plan, target), mounts,
                         command=["/bin/sh", "-c", node_script(plan, target)])
    ctr["ports"] = [{"containerPort": RAY_PORT, "name": "gcs"}]
    template_meta = pods.metadata(plan, target, limits, top=False)
    if pods.tas_annotations(target):
        template_meta["annotations"] = pods.tas_annotations(target)
    nodes = gpu_nodes(plan)
    return {"spec": {
        "completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
        "backoffLimit": 0, "activeDeadlineSeconds": limits.deadline_s,
        "successPolicy": {"rules": [{"succeededIndexes": "0"}]},
        "template": {"metadata": template_meta,
                     "spec": pods.pod_spec(target, ctr, vols, root_for_rdma=pods.rdma(plan, target),
                                           restart_policy="Never")},
    }}


def jobset(plan: PlanFile, target: K8sTarget, limits: JobLimits, config_map: str) -> dict[str, Any]:
    """The JobSet of ``plan`` on ``target``, as a plain dict."""
    meta = pods.metadata(plan, target, limits, top=True)
    meta["annotations"][EXCLUSIVE_TOPOLOGY] = target.exclusive_topology
    name = job_name(plan, target)
    return {
        "apiVersion": API_VERSION, "kind": "JobSet", "metadata": meta,
        "spec": {
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True, "subdomain": name},
            "successPolicy": {"operator": "All"},
            "failurePolicy": {
                "maxRestarts": limits.restarts, "restartStrategy": "Recreate",
                "rules": [{"name": "deadline-is-final", "action": "FailJobSet",
                           "onJobFailureReasons": ["DeadlineExceeded"]}],
            },
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1,
                                "template": job_template(plan, target, limits, config_map)}],
        },
    }
