"""Pod building blocks shared by the RayJob and JobSet builders: resources, /dev/shm, environment,
security context, volumes and labels. Pure functions of the plan and the target, returning plain dicts.

Sizes: a GPU pod asks for the node's GPUs (``cluster.node.gpus_per_node``), ``cpu_per_gpu`` CPUs and
``memory_per_gpu_bytes`` per GPU, requests equal to limits (Guaranteed QoS, so neither is overcommitted),
and the RDMA resource when the job spans nodes. ``/dev/shm`` is a memory-backed ``emptyDir`` of Ray's
object store (``OBJECT_STORE_FRAC`` of the pod's memory, capped at ``OBJECT_STORE_MAX_BYTES``, both Ray's
own defaults, set explicitly so the sum is known) plus ``NCCL_SHM_BYTES_PER_GPU`` per GPU for NCCL's
shared-memory transport and proxy buffers (the container default of 64 MiB makes NCCL fail in
``posix_fallocate``: NVIDIA/nccl#290, #342, #525). It counts toward the pod's memory limit.

Security: every container runs without privilege, privilege escalation or host namespaces, with all
capabilities dropped. Pods with an RDMA NIC add exactly one capability, ``IPC_LOCK``, and run as uid 0:
ibverbs pins (locks) the buffers NCCL registers with the NIC, beyond the default memlock limit, and
Kubernetes gives an added capability to root processes only (there are no ambient capabilities for a
non-root user, kubernetes/kubernetes#56374). IPC_LOCK is outside the Baseline Pod Security Standard, so
such a namespace must enforce ``privileged``. Every other pod runs as uid 1000, ``runAsNonRoot``.
"""

from __future__ import annotations

from typing import Any

from moeplan.manifests.limits import JobLimits
from moeplan.manifests.target import GiB, K8sTarget, gpu_nodes, image, job_name, plan_name
from moeplan.simulator.contracts.plan_file import PlanFile

PLAN_DIR = "/plan"
PLAN_KEY = "plan.json"
LAUNCH = ["moeplan", "launch", f"{PLAN_DIR}/{PLAN_KEY}", "--address", "auto"]
OBJECT_STORE_FRAC = 0.3  # ray._private.ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION
OBJECT_STORE_MAX_BYTES = 200 * 10**9  # ray's DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES
NCCL_SHM_BYTES_PER_GPU = GiB
NCCL_BUFFSIZE_BYTES = 4 * 2**20  # NCCL's default, pinned so the shared-memory allowance above holds
HEAD_CPUS = 8  # the Ray head schedules no work (num-cpus 0): GCS, dashboard, the driver of `moeplan launch`
HEAD_MEMORY_BYTES = 32 * GiB
NON_ROOT_UID = 1000  # the `ray` user of Ray's images
IPC_LOCK_WHY = ("IPC_LOCK: ibverbs pins the buffers NCCL registers with the RDMA NIC beyond the default memlock "
                "limit; Kubernetes grants added capabilities to uid 0 only, so RDMA pods run as root, unprivileged, "
                "with every other capability dropped (needs a namespace enforcing the privileged Pod Security level)")
BASELINE_CAPABILITIES = frozenset({"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                                   "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"})
# Label and annotation keys
PLAN_SHA_LABEL = "moeplan.dev/inputs-sha256"  # label values hold at most 63 characters: the first 16 hex here
PLAN_SHA_ANNOTATION = "moeplan.dev/inputs-sha256"  # the full 64 hex
PLAN_NAME_LABEL = "moeplan.dev/plan"
JOB_LABEL = "moeplan.dev/job"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
TAS_REQUIRED = "kueue.x-k8s.io/podset-required-topology"
TAS_PREFERRED = "kueue.x-k8s.io/podset-preferred-topology"
TAS_ANNOTATIONS = (TAS_REQUIRED, TAS_PREFERRED, "kueue.x-k8s.io/podset-unconstrained-topology")
POD_SECURITY_ANNOTATION = "moeplan.dev/pod-security"
RESTART_LOSS_ANNOTATION = "moeplan.dev/restart-loss-s"
CAPABILITIES_ANNOTATION = "moeplan.dev/capabilities"


def rdma(plan: PlanFile, target: K8sTarget) -> bool:
    """Whether GPU pods get the RDMA NIC: when the job spans nodes and the target names the resource."""
    return gpu_nodes(plan) > 1 and target.rdma_resource is not None


def gpu_memory_bytes(plan: PlanFile, target: K8sTarget) -> int:
    return target.memory_per_gpu_bytes * plan.inputs.cluster.node.gpus_per_node


def object_store_bytes(memory_bytes: int) -> int:
    """Ray's object store: its default share of the pod's memory, capped, rounded down to whole MiB."""
    return min(int(OBJECT_STORE_FRAC * memory_bytes), OBJECT_STORE_MAX_BYTES) // 2**20 * 2**20


def shm_bytes(memory_bytes: int, gpus: int) -> int:
    """/dev/shm: the object store plus NCCL's allowance per GPU."""
    return object_store_bytes(memory_bytes) + NCCL_SHM_BYTES_PER_GPU * gpus


def quantity(num_bytes: int) -> str:
    """Bytes as a Kubernetes quantity, in Gi or Mi where whole."""
    for unit, size in (("Gi", GiB), ("Mi", 2**20)):
        if num_bytes % size == 0:
            return f"{num_bytes // size}{unit}"
    return str(num_bytes)


def gpu_resources(plan: PlanFile, target: K8sTarget) -> dict[str, Any]:
    """A GPU pod's requests and limits (equal)."""
    gpus = plan.inputs.cluster.node.gpus_per_node
    amounts = {"cpu": str(target.cpu_per_gpu * gpus), "memory": quantity(gpu_memory_bytes(plan, target)),
               target.gpu_resource: str(gpus)}
    if rdma(plan, target):
        amounts[target.rdma_resource] = str(target.rdma_per_pod)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def head_resources() -> dict[str, Any]:
    amounts = {"cpu": str(HEAD_CPUS), "memory": quantity(HEAD_MEMORY_BYTES)}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def environment(plan: PlanFile, target: K8sTarget) -> list[dict[str, str]]:
    """NCCL and Ray settings from the plan and the target, sorted by name."""
    env = {"MOEPLAN_PLAN": f"{PLAN_DIR}/{PLAN_KEY}", "MOEPLAN_INPUTS_SHA256": plan.inputs_sha256,
           "MOEPLAN_WORLD_SIZE": str(plan.layout.world), "MOEPLAN_NODES": str(gpu_nodes(plan)),
           "MOEPLAN_GPUS_PER_NODE": str(plan.inputs.cluster.node.gpus_per_node),
           "NCCL_BUFFSIZE": str(NCCL_BUFFSIZE_BYTES), "NCCL_DEBUG": "WARN",
           # one node: NVLink only; several without an RDMA resource: sockets, and the plan's NIC rate is wrong
           "NCCL_IB_DISABLE": "0" if rdma(plan, target) else "1",
           "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_V2_ENABLED": "1"}
    if target.nccl_ib_hca:
        env["NCCL_IB_HCA"] = target.nccl_ib_hca
    if target.nccl_socket_ifname:
        env["NCCL_SOCKET_IFNAME"] = target.nccl_socket_ifname
    return [{"name": k, "value": v} for k, v in sorted(env.items())]


def security(root_for_rdma: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod securityContext, container securityContext)."""
    uid = 0 if root_for_rdma else NON_ROOT_UID
    pod = {"runAsUser": uid, "runAsGroup": uid, "runAsNonRoot": not root_for_rdma,
           "seccompProfile": {"type": "RuntimeDefault"}}
    caps: dict[str, Any] = {"drop": ["ALL"]}
    if root_for_rdma:
        caps["add"] = ["IPC_LOCK"]
    return pod, {"privileged": False, "allowPrivilegeEscalation": False, "capabilities": caps}


def volumes(config_map: str, shm: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, container mounts): the plan's ConfigMap at /plan, read-only, and /dev/shm."""
    vols = [{"name": "plan", "configMap": {"name": config_map, "items": [{"key": PLAN_KEY, "path": PLAN_KEY}]}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": quantity(shm)}}]
    mounts = [{"name": "plan", "mountPath": PLAN_DIR, "readOnly": True}, {"name": "dshm", "mountPath": "/dev/shm"}]
    return vols, mounts


def labels(plan: PlanFile, name: str, target: K8sTarget | None = None) -> dict[str, str]:
    """Labels of every object (and the queue label where asked): the plan's hash and name, the job."""
    out = {"app.kubernetes.io/name": "moeplan", "app.kubernetes.io/managed-by": "moeplan",
           PLAN_SHA_LABEL: plan.inputs_sha256[:16], PLAN_NAME_LABEL: plan_name(plan), JOB_LABEL: name}
    if target is not None and target.queue:
        out[QUEUE_LABEL] = target.queue
    return out


def tas_annotations(target: K8sTarget) -> dict[str, str]:
    """Kueue's topology-aware-scheduling annotation for a GPU pod template, when the target asks."""
    if target.topology_required:
        return {TAS_REQUIRED: target.topology_required}
    if target.topology_preferred:
        return {TAS_PREFERRED: target.topology_preferred}
    return {}


def pod_spec(target: K8sTarget, container: dict[str, Any], vols: list[dict[str, Any]], root_for_rdma: bool,
             restart_policy: str | None = None) -> dict[str, Any]:
    """A pod spec around one container."""
    pod_security, container_security = security(root_for_rdma)
    spec: dict[str, Any] = {"containers": [{**container, "securityContext": container_security}],
                            "securityContext": pod_security, "volumes": vols, "enableServiceLinks": False}
    if target.service_account:
        spec["serviceAccountName"] = target.service_account
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    return spec


def container(plan: PlanFile, target: K8sTarget, name: str, resources: dict[str, Any],
              mounts: list[dict[str, Any]], command: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "image": image(plan, target), "imagePullPolicy": "IfNotPresent",
                           "env": environment(plan, target), "resources": resources, "volumeMounts": mounts}
    if command is not None:
        out["command"] = command
    return out


def metadata(plan: PlanFile, target: K8sTarget, limits: JobLimits, top: bool) -> dict[str, Any]:
    """The job's metadata (``top``) or a pod template's: labels, and the annotations policy checks read."""
    name = job_name(plan, target)
    out: dict[str, Any] = {"labels": labels(plan, name, target if top else None)}
    if top:
        out |= {"name": name, "namespace": target.namespace}
        out["annotations"] = {PLAN_SHA_ANNOTATION: plan.inputs_sha256,
                              POD_SECURITY_ANNOTATION: target.pod_security,
                              RESTART_LOSS_ANNOTATION: f"{limits.restart_loss_s:g}"}
        if rdma(plan, target):
            out["annotations"][CAPABILITIES_ANNOTATION] = IPC_LOCK_WHY
    return out
