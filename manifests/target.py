"""Where a plan runs on Kubernetes: the choices a plan does not make (``K8sTarget``), and the names derived.

Everything else in a manifest comes from the plan file (``docs/design/kubernetes.md`` lists each field's
source). The defaults are stated once here; the CLI's options override them and never restate them.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moeplan.simulator.contracts.plan_file import PlanFile

GiB = 2**30
MAX_NAME_CHARS = 40  # KubeRay and JobSet derive pod and service names (<= 63 chars) from the job's name
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_RESOURCE = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_KEY = _RESOURCE  # a qualified name, optionally with a DNS prefix: the same shape


class ManifestError(ValueError):
    """A plan or a target that cannot become a manifest; the message names the field and the value."""


def check_dns_label(field: str, value: str, max_chars: int = 63) -> str:
    """``value`` if it is an RFC 1035 label of at most ``max_chars`` (what Kubernetes names must be)."""
    if len(value) > max_chars or not _DNS_LABEL.fullmatch(value):
        raise ValueError(f"{field}={value!r} must be at most {max_chars} lowercase letters, digits and '-', "
                         "starting with a letter and ending with a letter or digit")
    return value


class K8sTarget(BaseModel):
    """The cluster-side choices; ``None`` where a feature is not used."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(None, description="Job name; default moeplan-<model>-<first 8 hex of inputs_sha256>.")
    namespace: str = "default"
    image: str | None = Field(None, description="Container image with moeplan and Ray; default moeplan:<version>.")
    queue: str | None = Field(None, description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name).")
    service_account: str | None = None
    gpu_resource: str = "nvidia.com/gpu"
    rdma_resource: str | None = Field("rdma/rdma_shared_device_a",
                                      description="Extended resource of the RDMA NIC (NVIDIA network operator's "
                                      "shared device plugin default); None: no RDMA (one node only).")
    rdma_per_pod: int = Field(1, ge=1, le=64)
    cpu_per_gpu: int = Field(12, ge=1, le=1024)
    memory_per_gpu_bytes: int = Field(96 * GiB, ge=GiB, le=2**50)
    topology_required: str | None = Field(None, description="Kueue TAS: podset-required-topology level label.")
    topology_preferred: str | None = Field(None, description="Kueue TAS: podset-preferred-topology level label.")
    exclusive_topology: str = Field("topology.kubernetes.io/zone",
                                    description="JobSet exclusive placement: a node label whose domains hold a "
                                    "whole job (a block or rack label where the cluster has one).")
    pod_security: Literal["privileged", "baseline", "restricted"] = Field(
        "privileged", description="The namespace's enforced Pod Security Standard (IPC_LOCK needs privileged).")
    checkpoint_interval_s: float = Field(3600.0, gt=0, le=1e7, description="Work a restart loses at most: the runtime's checkpoint interval.")
    restart_overhead_s: float = Field(900.0, ge=0, le=1e7, description="What a restart costs besides lost work: "
                                      "rescheduling, image pull, NCCL set-up, checkpoint load.")
    deadline_slack_frac: float = Field(0.10, ge=0, le=10, description="Deadline slack when the plan has no budget.")
    nccl_ib_hca: str | None = None
    nccl_socket_ifname: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else check_dns_label("name", value, MAX_NAME_CHARS)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return check_dns_label("namespace", value)

    @field_validator("queue", "service_account")
    @classmethod
    def _dns_subdomain(cls, value: str | None, info) -> str | None:
        if value is not None and (len(value) > 253 or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", value)):
            raise ValueError(f"{info.field_name}={value!r} must be lowercase letters, digits, '-' and '.'")
        return value

    @field_validator("gpu_resource", "rdma_resource", "topology_required", "topology_preferred", "exclusive_topology")
    @classmethod
    def _qualified(cls, value: str | None, info) -> str | None:
        if value is not None and (len(value) > 316 or not _LABEL_KEY.fullmatch(value)):
            raise ValueError(f"{info.field_name}={value!r} is not a Kubernetes resource or label name "
                             "(e.g. rdma/ib or kubernetes.io/hostname)")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c.isspace() for c in value) or len(value) > 1024):
            raise ValueError(f"image={value!r} must be a non-empty image reference without spaces")
        return value


def plan_name(plan: PlanFile) -> str:
    """The plan's name: ``<model>-<first 8 hex of the inputs' sha256>``, a DNS label."""
    slug = re.sub(r"[^a-z0-9]+", "-", plan.inputs.model.name.lower()).strip("-")
    slug = slug[: MAX_NAME_CHARS - len("moeplan--") - 8].strip("-") or "model"
    return f"{slug}-{plan.inputs_sha256[:8]}"


def job_name(plan: PlanFile, target: K8sTarget) -> str:
    """The job's name: the target's, else ``moeplan-<plan name>``."""
    return target.name if target.name is not None else f"moeplan-{plan_name(plan)}"


def image(plan: PlanFile, target: K8sTarget) -> str:
    """The container image: the target's, else ``moeplan:<the version that wrote the plan>``."""
    return target.image or f"moeplan:{plan.moeplan_version}"


def gpu_nodes(plan: PlanFile) -> int:
    """Pods with GPUs: one per node of the plan's layout (``layout.world / gpus_per_node``)."""
    gpus = plan.inputs.cluster.node.gpus_per_node
    if plan.layout.world % gpus:
        raise ManifestError(f"layout.world={plan.layout.world} is not a whole number of {gpus}-GPU nodes")
    return plan.layout.world // gpus
