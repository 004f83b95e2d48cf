"""Cluster presets: H800, H100 and H200 nodes of 8 GPUs, and ``cpu`` (local processes). Every number names its source.

Sources:
- [H100-DS] NVIDIA H100 Tensor Core GPU datasheet (SXM5): 132 SMs, 80 GB HBM3 at 3.35 TB/s,
  BF16 989.4 and FP8 1978.9 dense TFLOPS (the datasheet's figures are with sparsity, 2x these),
  NVLink 900 GB/s (both directions summed).
- [H800] The H800 SXM5 is the export variant of the H100 SXM5 with the same SMs, memory and tensor
  cores; its NVLink is cut to 400 GB/s (both directions). DeepSeek-V3 TR §3.1 and DeepEP measure
  about 160 GB/s achievable NVLink and 50 GB/s InfiniBand (CX7 400 Gb/s) per GPU
  (``shared/reference/deepseek-v3.md`` §2, §11.1). H800 peak FLOPS are not in DeepSeek's sources;
  they equal the H100 SXM5's (reference §13).
- [H200-DS] NVIDIA H200 datasheet (SXM): 141 GB HBM3e at 4.8 TB/s, same tensor cores as H100 SXM,
  NVLink 900 GB/s. [H200-M] ``shared/reference/h200-anchors.json``, measured on the lent H200:
  NVML total memory 140.40 GiB, 18 NVLinks up, 317 GB/s point-to-point at 256 MiB.
- [CX7] NVIDIA ConnectX-7 400 Gb/s per GPU (DGX H100/H200 reference design): 50 GB/s per direction.
- [CTX] Memory reserved for the CUDA context, NCCL/DeepEP buffers and allocator slack: an assumption
  (2 GiB) until the calibration capability measures it; set ``node.memory_reserved_bytes`` to override.
- [CPU-M] ``simulator/costs/data/cpu-fp32.json`` (the ``cpu`` cost tables, written by
  ``benchmarks/cpu_tables.py``; ``docs/results/cpu-tables.md``): its ``machine`` (peaks, RAM, cores, a
  process's resident memory) and ``links`` (gloo collectives between local processes, one torch thread
  each). The ``cpu`` preset reads them when called, so a re-measured file re-describes the machine.

The ``cpu`` cluster: one "GPU" is one process of the runtime on one CPU core (``torch.set_num_threads(1)``,
gloo over 127.0.0.1); a "node" is the machine. What each ``GpuSpec``/``NodeSpec`` field means there:

- ``sm_count``: the threads a process computes on (1). The simulator uses it only to scale compute by
  the SMs left after ``comm_sms``, which the cpu tables set to 0 (gloo communicates on its own threads).
- ``hbm_bytes``: the machine's RAM over its cores (one process per core); ``memory_reserved_bytes``:
  the measured resident memory of a process that has imported torch and joined a gloo group.
- ``hbm_bytes_per_s``: the fastest copy measured; ``bf16_flops_per_s``: the fastest GEMM measured in
  FP32 or BF16 (the peaks the tables' attention and memory fractions are of, and MFU's denominator).
- ``fp8_flops_per_s``: no FP8 runs on a CPU (the cpu tables price none, so an fp8 plan is refused);
  the field must hold a rate, so it repeats the GEMM peak.
- ``gpus_per_node``: processes per machine, by default its logical CPUs (``--set
  cluster.node.gpus_per_node=4`` runs more, sharing the cores); ``nvlink_bytes_per_s`` the measured gloo
  send/recv bandwidth between two local processes; ``nvlink_spec_bytes_per_s`` the fastest copy (a local
  transfer is at most a memory copy); ``nic_bytes_per_s`` the same loopback figure: several cpu nodes
  are not measured, so ``--nodes`` > 1 prices the network between machines as the local loopback.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from moeplan.simulator.spec.hardware import ClusterSpec, GpuSpec, NodeSpec
from moeplan.simulator.spec.json_input import read_json_file

GB = 1e9
GiB = 2**30
TFLOPS = 1e12

_HOPPER_SM_COUNT = 132  # [H100-DS]
_HOPPER_BF16_FLOPS_PER_S = 989.4 * TFLOPS  # [H100-DS] dense
_HOPPER_FP8_FLOPS_PER_S = 1978.9 * TFLOPS  # [H100-DS] dense
_RESERVED_BYTES = 2 * GiB  # [CTX]


def h800_gpu() -> GpuSpec:
    return GpuSpec(
        name="H800-SXM5",
        sm_count=_HOPPER_SM_COUNT,
        hbm_bytes=80 * GiB,  # [H100-DS] 80 GB = 5 HBM3 stacks of 16 GiB
        hbm_bytes_per_s=3.35e12,  # [H100-DS]
        bf16_flops_per_s=_HOPPER_BF16_FLOPS_PER_S,  # [H800]
        fp8_flops_per_s=_HOPPER_FP8_FLOPS_PER_S,  # [H800]
    )


def h100_gpu() -> GpuSpec:
    return h800_gpu().model_copy(update={"name": "H100-SXM5"})  # [H100-DS], same fields as validated above


def h200_gpu() -> GpuSpec:
    return GpuSpec(
        name="H200-SXM",
        sm_count=_HOPPER_SM_COUNT,  # [H200-DS]
        hbm_bytes=int(140.4013671875 * GiB),  # [H200-M] NVML total
        hbm_bytes_per_s=4.8e12,  # [H200-DS]
        bf16_flops_per_s=_HOPPER_BF16_FLOPS_PER_S,  # [H200-DS]
        fp8_flops_per_s=_HOPPER_FP8_FLOPS_PER_S,  # [H200-DS]
    )


# What torch.cuda.get_device_name says of each preset's GPU ("NVIDIA H100 80GB HBM3", "NVIDIA H800", "NVIDIA
# H200"): a part of the name -> the preset. The H100's PCIe and NVL boards have other memory and SM counts
# ([H100-DS]: 2.0 and 3.9 TB/s, 114 and 132 SMs) and are none of the presets.
DEVICE_NAME_PARTS = {"H100": h100_gpu, "H800": h800_gpu, "H200": h200_gpu}
_OTHER_BOARDS = ("PCIE", "NVL")


def gpu_for_device(device_name: str | None) -> GpuSpec | None:
    """The cluster preset's GPU for a CUDA device name, None for a device the presets do not describe."""
    name = (device_name or "").upper()
    if any(board in name for board in _OTHER_BOARDS):
        return None
    return next((make() for part, make in DEVICE_NAME_PARTS.items() if part in name), None)


def h800(nodes: int = 256) -> ClusterSpec:
    """DeepSeek-V3's training cluster: 256 nodes x 8 H800 (TR §3.1)."""
    node = NodeSpec(
        gpus_per_node=8,
        nvlink_bytes_per_s=160 * GB,  # [H800] achievable, TR §3.2.2 / DeepEP
        nvlink_spec_bytes_per_s=400 * GB,  # [H800]
        nic_bytes_per_s=50 * GB,  # [H800] IB CX7 400 Gb/s, TR / DeepEP
        memory_reserved_bytes=_RESERVED_BYTES,  # [CTX]
    )
    return ClusterSpec(name="h800", gpu=h800_gpu(), node=node, nodes=nodes)


def h100(nodes: int = 1) -> ClusterSpec:
    node = NodeSpec(
        gpus_per_node=8,
        # No DeepSeek measurement on H100; the lent H200 (same NVLink 4 fabric) measured 317 GB/s p2p [H200-M].
        nvlink_bytes_per_s=317 * GB,
        nvlink_spec_bytes_per_s=900 * GB,  # [H100-DS]
        nic_bytes_per_s=50 * GB,  # [CX7]
        memory_reserved_bytes=_RESERVED_BYTES,  # [CTX]
    )
    return ClusterSpec(name="h100", gpu=h100_gpu(), node=node, nodes=nodes)


def h200(nodes: int = 1) -> ClusterSpec:
    node = NodeSpec(
        gpus_per_node=8,
        nvlink_bytes_per_s=317 * GB,  # [H200-M] p2p at 256 MiB
        nvlink_spec_bytes_per_s=900 * GB,  # [H200-DS]
        nic_bytes_per_s=50 * GB,  # [CX7]
        memory_reserved_bytes=_RESERVED_BYTES,  # [CTX]
    )
    return ClusterSpec(name="h200", gpu=h200_gpu(), node=node, nodes=nodes)


CPU_MEASUREMENT_FILE = "costs/data/cpu-fp32.json"


@lru_cache(maxsize=1)
def cpu_measurement() -> dict:
    """[CPU-M]: the cpu cost-table file as JSON (its ``machine`` and ``links`` describe the machine)."""
    return read_json_file(Path(str(files("moeplan.simulator").joinpath(CPU_MEASUREMENT_FILE))))


def _link_bytes_per_s(collective: str, processes: int) -> float:
    return next(f["bytes_per_s"] for f in cpu_measurement()["links"]
                if f["collective"] == collective and f["processes"] == processes)


def cpu_process() -> GpuSpec:
    """One runtime process on one core, as the simulator's "GPU" (field meanings in the module docstring)."""
    mc = cpu_measurement()["machine"]
    return GpuSpec(
        name="CPU-process",  # the cost tables' default_tables picks the cpu tables by this prefix
        sm_count=mc["threads_per_process"],  # [CPU-M]
        hbm_bytes=mc["memory_bytes"] // mc["cores"],  # [CPU-M] RAM over cores
        hbm_bytes_per_s=mc["memory_bytes_per_s"],  # [CPU-M] fastest copy
        bf16_flops_per_s=mc["peak_flops_per_s"],  # [CPU-M] fastest GEMM, FP32 or BF16
        fp8_flops_per_s=mc["peak_flops_per_s"],  # not used: FP8 is refused on cpu
    )


def cpu(nodes: int = 1) -> ClusterSpec:
    """Local processes over gloo, one per core: the runtime's rehearsal on any machine (issue 18)."""
    mc = cpu_measurement()["machine"]
    loopback = _link_bytes_per_s("send_recv", 2)  # [CPU-M] gloo send/recv, 2 processes
    node = NodeSpec(
        gpus_per_node=mc["cores"],  # [CPU-M] one process per logical CPU
        nvlink_bytes_per_s=loopback,
        nvlink_spec_bytes_per_s=max(loopback, mc["memory_bytes_per_s"]),  # [CPU-M] at most a memory copy
        nic_bytes_per_s=loopback,  # [CPU-M] loopback: between machines not measured
        memory_reserved_bytes=mc["process_rss_bytes"],  # [CPU-M] torch + gloo resident memory
    )
    return ClusterSpec(name="cpu", gpu=cpu_process(), node=node, nodes=nodes)


CLUSTER_PRESETS: dict[str, Callable[[int], ClusterSpec]] = {"h800": h800, "h100": h100, "h200": h200, "cpu": cpu}
