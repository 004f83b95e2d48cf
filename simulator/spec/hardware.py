"""Hardware and cluster specs. Every preset number names its source in ``simulator/presets/clusters.py``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.simulator.spec.numbers import Float, Int

# Bounds far above any machine: a GPU rate of at most 1e18 per second, memories of at most 1 PiB,
# and rates of at least 1 per second (a rate near zero would make every time overflow to infinity).
MAX_RATE = 1e18
MAX_BYTES = 2**50
MAX_NODES = 2**16


class GpuSpec(BaseModel):
    """One accelerator: compute, memory, and the peak rates MFU is measured against."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    sm_count: Int = Field(..., gt=0, le=2**16)
    hbm_bytes: Int = Field(..., gt=0, le=MAX_BYTES)
    hbm_bytes_per_s: Float = Field(..., ge=1, le=MAX_RATE)
    bf16_flops_per_s: Float = Field(..., ge=1, le=MAX_RATE, description="Dense (no sparsity) BF16 tensor-core peak.")
    fp8_flops_per_s: Float = Field(..., ge=1, le=MAX_RATE, description="Dense (no sparsity) FP8 tensor-core peak.")

    @property
    def is_cpu(self) -> bool:
        """The ``cpu`` cluster preset's processes standing in for GPUs (``presets.clusters.cpu_process``)."""
        return is_cpu_name(self.name)


def is_cpu_name(gpu_name: str) -> bool:
    """Whether a GPU name is the ``cpu`` cluster's (the cost tables, the runtime and the engine's one test)."""
    return gpu_name.upper().startswith("CPU")


class NodeSpec(BaseModel):
    """One server: GPUs joined by NVLink/NVSwitch, one NIC per GPU."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpus_per_node: Int = Field(..., gt=0, le=2**10)
    nvlink_bytes_per_s: Float = Field(..., ge=1, le=MAX_RATE, description="Achievable per-GPU, one direction.")
    nvlink_spec_bytes_per_s: Float = Field(..., ge=1, le=MAX_RATE, description="Datasheet per-GPU, both directions summed.")
    nic_bytes_per_s: Float = Field(..., ge=1, le=MAX_RATE, description="Scale-out (IB/RoCE) per GPU, one direction.")
    memory_reserved_bytes: Int = Field(
        0, ge=0, le=MAX_BYTES, description="HBM not available to the framework (CUDA context, comm buffers)."
    )

    @model_validator(mode="after")
    def _achievable_below_spec(self) -> NodeSpec:
        if self.nvlink_bytes_per_s > self.nvlink_spec_bytes_per_s:
            raise ValueError(
                f"nvlink_bytes_per_s={self.nvlink_bytes_per_s:g} exceeds nvlink_spec_bytes_per_s="
                f"{self.nvlink_spec_bytes_per_s:g}"
            )
        return self


class ClusterSpec(BaseModel):
    """A homogeneous cluster: ``nodes`` identical nodes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    gpu: GpuSpec
    node: NodeSpec
    nodes: Int = Field(..., gt=0, le=MAX_NODES)

    @model_validator(mode="after")
    def _memory_left(self) -> ClusterSpec:
        if self.node.memory_reserved_bytes >= self.gpu.hbm_bytes:
            raise ValueError(f"node.memory_reserved_bytes={self.node.memory_reserved_bytes} leaves none of "
                             f"gpu.hbm_bytes={self.gpu.hbm_bytes}")
        return self

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.node.gpus_per_node

    @property
    def usable_hbm_bytes(self) -> int:
        return self.gpu.hbm_bytes - self.node.memory_reserved_bytes
