"""Layer 4: moeplan's own checks of a job against the plan it carries (the plan comes from the ConfigMap
beside the job). Each check is a pure function returning one line per violation:

- the GPU pods add up to the plan: pods x GPUs per pod = ``layout.world``, GPUs per pod = the node's,
  worker groups fixed in size, requests equal to limits;
- no privileged container, no privilege escalation, no host namespaces; added capabilities allowed by the
  namespace's Pod Security level (``moeplan.dev/pod-security``);
- deadlines: at least the predicted wall time, within the budget, with room for the restarts allowed;
- Kueue's limits on a queued RayJob; at most one topology annotation per pod template;
- ``/dev/shm`` within the memory limit; an RDMA resource when the job spans nodes; an exclusive topology
  that can hold the whole job;
- DNS-1123 names, images with a tag other than ``latest`` (or a digest), the plan's hash on the job.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moeplan.manifests import pods
from moeplan.manifests.limits import DAY_S
from moeplan.manifests.target import MAX_NAME_CHARS, check_dns_label
from moeplan.simulator.contracts.plan_file import PlanFile

_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]*)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?")
ROUNDING_S = 1.0  # deadlines are whole seconds


def quantity_value(text: Any) -> float | None:
    """A Kubernetes quantity (``768Gi``, ``96``, ``500m``) as a number; None if it is not one."""
    match = _QUANTITY.fullmatch(str(text))
    return float(match.group(1)) * _SUFFIX[match.group(2) or ""] if match else None


@dataclass(frozen=True)
class PodGroup:
    path: str
    pods: int
    template: dict[str, Any]
    fixed_size: bool  # a RayJob worker group's replicas = minReplicas = maxReplicas


@dataclass(frozen=True)
class Job:
    """A RayJob or JobSet with its pod groups, and the plan from its ConfigMap."""

    doc: dict[str, Any]
    plan: PlanFile
    groups: tuple[PodGroup, ...]

    @property
    def annotations(self) -> dict[str, str]:
        return self.doc.get("metadata", {}).get("annotations") or {}

    def containers(self):
        for group in self.groups:
            for i, ctr in enumerate(group.template.get("spec", {}).get("containers") or []):
                yield f"{group.path}.spec.containers[{i}]", group, ctr


def pod_groups(doc: dict[str, Any]) -> tuple[PodGroup, ...]:
    """The pod templates of a RayJob (head, worker groups, submitter) or JobSet, with their pod counts."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob":
        cluster = spec.get("rayClusterSpec") or {}
        out = [PodGroup("spec.rayClusterSpec.headGroupSpec.template", 1,
                        (cluster.get("headGroupSpec") or {}).get("template") or {}, True)]
        for i, g in enumerate(cluster.get("workerGroupSpecs") or []):
            sizes = {g.get("replicas"), g.get("minReplicas"), g.get("maxReplicas")}
            out.append(PodGroup(f"spec.rayClusterSpec.workerGroupSpecs[{i}].template", g.get("replicas") or 0,
                                g.get("template") or {}, len(sizes) == 1))
        if spec.get("submitterPodTemplate"):
            out.append(PodGroup("spec.submitterPodTemplate", 1, spec["submitterPodTemplate"], True))
        return tuple(out)
    return tuple(PodGroup(f"spec.replicatedJobs[{i}].template.spec.template",
                          (rj.get("replicas") or 1) * ((rj.get("template") or {}).get("spec") or {}).get("parallelism", 1),
                          ((rj.get("template") or {}).get("spec") or {}).get("template") or {}, True)
                 for i, rj in enumerate(spec.get("replicatedJobs") or []))


def _gpus(ctr: dict[str, Any]) -> float:
    limits = (ctr.get("resources") or {}).get("limits") or {}
    return sum(quantity_value(v) or 0 for k, v in limits.items() if k.endswith("/gpu"))


def gpus_match_plan(job: Job) -> list[str]:
    world, per_node = job.plan.layout.world, job.plan.inputs.cluster.node.gpus_per_node
    out, total = [], 0.0
    for path, group, ctr in job.containers():
        gpus = _gpus(ctr)
        total += gpus * group.pods
        if gpus and gpus != per_node:
            out.append(f"{path}: {gpus:g} GPUs per pod, but the plan's nodes have gpus_per_node={per_node}")
        if gpus and not group.fixed_size:
            out.append(f"{group.path}: replicas, minReplicas and maxReplicas differ: the plan's layout needs all of them")
        res = ctr.get("resources") or {}
        if (res.get("requests") or {}) != (res.get("limits") or {}):
            out.append(f"{path}.resources: requests differ from limits (the plan prices whole, dedicated nodes)")
    if total != world:
        out.append(f"pods x GPUs per pod = {total:g}, but the plan's layout.world={world}")
    return out


def no_privilege(job: Job) -> list[str]:
    level = job.annotations.get(pods.POD_SECURITY_ANNOTATION, "baseline")
    allowed = {"privileged": None, "baseline": pods.BASELINE_CAPABILITIES,
               "restricted": frozenset({"NET_BIND_SERVICE"})}.get(level, pods.BASELINE_CAPABILITIES)
    out = []
    for group in job.groups:
        spec = group.template.get("spec") or {}
        out += [f"{group.path}.spec.{k}: true shares the host's namespace" for k in ("hostNetwork", "hostPID", "hostIPC")
                if spec.get(k)]
        run_as_non_root = (spec.get("securityContext") or {}).get("runAsNonRoot")
        for i, ctr in enumerate(spec.get("containers") or []):
            path, sc = f"{group.path}.spec.containers[{i}].securityContext", ctr.get("securityContext") or {}
            if sc.get("privileged"):
                out.append(f"{path}.privileged: true: no moeplan container runs privileged")
            if sc.get("allowPrivilegeEscalation", True):
                out.append(f"{path}.allowPrivilegeEscalation: must be false")
            added = set((sc.get("capabilities") or {}).get("add") or [])
            if allowed is not None and added - allowed:
                out.append(f"{path}.capabilities.add: {sorted(added - allowed)} not allowed at Pod Security level "
                           f"{level!r} ({pods.POD_SECURITY_ANNOTATION}); IPC_LOCK needs 'privileged'")
            if level == "restricted" and not (sc.get("runAsNonRoot") or run_as_non_root):
                out.append(f"{path}: runAsNonRoot is required at Pod Security level 'restricted'")
    return out


def _deadlines(doc: dict[str, Any]) -> tuple[list[Any], Any]:
    """(activeDeadlineSeconds values, restarts allowed) of a RayJob or JobSet."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob":
        return [spec.get("activeDeadlineSeconds")], spec.get("backoffLimit", 0)
    jobs = [((rj.get("template") or {}).get("spec") or {}).get("activeDeadlineSeconds")
            for rj in spec.get("replicatedJobs") or []]
    return jobs, (spec.get("failurePolicy") or {}).get("maxRestarts", 0)


def deadlines_within_budget(job: Job) -> list[str]:
    plan = job.plan
    if plan.predictions is None or plan.budget_report is None:
        return ["plan: predictions=null: no predicted wall time to bound the job with"]
    predicted_s = plan.predictions.run.wall_clock_days * DAY_S
    budget, used = plan.budget_report.budget_gpu_hours, plan.budget_report.gpu_hours_total
    deadlines, restarts = _deadlines(job.doc)
    loss = quantity_value(job.annotations.get(pods.RESTART_LOSS_ANNOTATION))
    out = []
    for d in deadlines:
        if not isinstance(d, int) or isinstance(d, bool):
            out.append(f"activeDeadlineSeconds={d!r}: a deadline is required (the plan predicts {predicted_s:.0f} s)")
            continue
        if d + ROUNDING_S <= predicted_s:
            out.append(f"activeDeadlineSeconds={d} is shorter than the predicted wall time {predicted_s:.0f} s")
        if budget is not None and d > predicted_s * budget / used + ROUNDING_S:
            out.append(f"activeDeadlineSeconds={d} s x {plan.layout.world} GPUs = {d * plan.layout.world / 3600:.1f} "
                       f"GPU-hours exceeds the budget of {budget:g}")
        if loss is None:
            out.append(f"{pods.RESTART_LOSS_ANNOTATION}: missing; restarts cannot be checked against the deadline")
        elif isinstance(restarts, int) and predicted_s + restarts * loss > d + ROUNDING_S:
            out.append(f"restarts={restarts} x {loss:g} s lost each + predicted {predicted_s:.0f} s exceed "
                       f"activeDeadlineSeconds={d}")
    return out


def kueue_ready(job: Job) -> list[str]:
    labels = job.doc.get("metadata", {}).get("labels") or {}
    if job.doc.get("kind") != "RayJob" or pods.QUEUE_LABEL not in labels:
        return []
    spec, out = job.doc.get("spec") or {}, []
    cluster = spec.get("rayClusterSpec") or {}
    if spec.get("shutdownAfterJobFinishes") is not True:
        out.append("spec.shutdownAfterJobFinishes: Kueue admits a RayJob only with true")
    if cluster.get("enableInTreeAutoscaling"):
        out.append("spec.rayClusterSpec.enableInTreeAutoscaling: Kueue admits a RayJob only without autoscaling")
    if len(cluster.get("workerGroupSpecs") or []) > 7:
        out.append("spec.rayClusterSpec.workerGroupSpecs: Kueue admits at most 7 worker groups")
    if spec.get("clusterSelector"):
        out.append("spec.clusterSelector: Kueue cannot admit a RayJob on an existing RayCluster")
    return out


def placement(job: Job) -> list[str]:
    out = []
    for group in job.groups:
        tas = [k for k in (group.template.get("metadata") or {}).get("annotations") or {} if k in pods.TAS_ANNOTATIONS]
        if len(tas) > 1:
            out.append(f"{group.path}.metadata.annotations: {tas}: at most one topology annotation per pod template")
    nodes = job.plan.layout.world // job.plan.inputs.cluster.node.gpus_per_node
    if nodes > 1 and job.annotations.get("alpha.jobset.sigs.k8s.io/exclusive-topology") == "kubernetes.io/hostname":
        out.append(f"exclusive-topology kubernetes.io/hostname puts the whole job on one node, but it has {nodes}")
    return out


def memory_and_nics(job: Job) -> list[str]:
    nodes = job.plan.layout.world // job.plan.inputs.cluster.node.gpus_per_node
    out = []
    for group in job.groups:
        spec = group.template.get("spec") or {}
        shm = sum(quantity_value((v.get("emptyDir") or {}).get("sizeLimit", 0)) or 0 for v in spec.get("volumes") or []
                  if (v.get("emptyDir") or {}).get("medium") == "Memory")
        memory = sum(quantity_value(((c.get("resources") or {}).get("limits") or {}).get("memory", 0)) or 0
                     for c in spec.get("containers") or [])
        if shm > memory:
            out.append(f"{group.path}: /dev/shm of {shm:.0f} bytes exceeds the memory limit of {memory:.0f} bytes "
                       "(a memory-backed emptyDir counts toward it: the pod would be evicted)")
    for path, _, ctr in job.containers():
        limits = (ctr.get("resources") or {}).get("limits") or {}
        if nodes > 1 and _gpus(ctr) and not any("/" in k and not k.endswith("/gpu") for k in limits):
            out.append(f"{path}.resources: no RDMA resource, but the job spans {nodes} nodes and the plan prices "
                       "all-to-all at the NIC's rate")
    return out


def names_and_images(job: Job) -> list[str]:
    out = []
    try:
        check_dns_label("metadata.name", str(job.doc.get("metadata", {}).get("name", "")), MAX_NAME_CHARS)
    except ValueError as exc:
        out.append(str(exc))
    for path, _, ctr in job.containers():
        ref = str(ctr.get("image", ""))
        tag = ref.rsplit("/", 1)[-1].partition(":")[2]
        if "@sha256:" not in ref and tag in ("", "latest"):
            out.append(f"{path}.image={ref!r}: name a version tag or a digest, not latest")
    if job.annotations.get(pods.PLAN_SHA_ANNOTATION) != job.plan.inputs_sha256:
        out.append(f"metadata.annotations[{pods.PLAN_SHA_ANNOTATION}] is not the ConfigMap plan's inputs_sha256 "
                   f"{job.plan.inputs_sha256[:12]}...")
    return out


CHECKS: tuple[Callable[[Job], list[str]], ...] = (
    gpus_match_plan, no_privilege, deadlines_within_budget, kueue_ready, placement, memory_and_nics,
    names_and_images)


def policy_findings(doc: dict[str, Any], plan: PlanFile) -> list[str]:
    """Every policy violation of a RayJob or JobSet, checked against ``plan``."""
    job = Job(doc, plan, pod_groups(doc))
    return [line for check in CHECKS for line in check(job)]
