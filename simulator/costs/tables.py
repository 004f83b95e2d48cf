"""Kernel efficiency tables: measured or published throughputs, each entry with its source.

A ``CostTables`` holds, for one GPU type, GEMM throughput points by precision and shape (dense and
grouped), attention throughput, achievable memory bandwidth and collective latency. The defaults
below come from published tables and the repo's measurement file; ``CostTables.from_file`` loads a
calibration file with the same schema (the calibration capability writes it by measuring).

Sources:
- [DG] DeepGEMM README, 2025-02-25 (``shared/reference/deepseek-v3.md`` §11.4): FP8 1x128/128x128
  block-scaled GEMM on H800 SXM5, dense (M = 64, 128, 4096) and grouped (contiguous and masked layouts).
- [A] ``simulator/costs/data/h200-anchors.json``: stock PyTorch 2.11 on one H200 (copied from
  ``shared/reference/h200-anchors.json``): BF16 ``torch.matmul``, FP8 block-scaled ``torch._scaled_mm``,
  BF16 ``torch._grouped_mm`` (32 experts; N x K not recorded, taken as V3's 4096 x 7168), SDPA causal
  attention (head dims 192/128), device copy bandwidth, NCCL all-to-all and all-reduce on 4 GPUs.
  Hopper SXM parts share SMs, clocks and tensor cores, so the H200's compute-bound figures stand for the
  H100 and H800 too; memory-bound figures scale with each part's HBM bandwidth (see ``memory_frac``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Precision = Literal["bf16", "fp8"]
TFLOPS = 1e12


class GemmPoint(BaseModel):
    """Throughput of one GEMM shape: ``groups`` independent (m x k) @ (k x n) products."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: Precision
    m: int = Field(..., gt=0, description="Rows per group.")
    n: int = Field(..., gt=0)
    k: int = Field(..., gt=0)
    groups: int = Field(1, gt=0)
    flops_per_s: float = Field(..., gt=0)
    source: str


class CostTables(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    gemm: tuple[GemmPoint, ...] = Field(..., min_length=1)
    attention_fwd_frac: float = Field(..., gt=0, le=1, description="Causal attention forward, of the BF16 peak.")
    attention_fwd_bwd_frac: float = Field(..., gt=0, le=1, description="Forward + backward (3x forward FLOPs).")
    attention_source: str
    memory_frac: float = Field(..., gt=0, le=1, description="Achievable / datasheet HBM bandwidth.")
    memory_source: str
    collective_latency_s: float = Field(..., ge=0, description="Fixed cost of one collective or transfer.")
    collective_source: str
    comm_sms: int = Field(20, ge=0, description="SMs reserved for expert all-to-all kernels (TR §3.2.2).")

    @classmethod
    def from_file(cls, path: str | Path) -> CostTables:
        return cls.model_validate_json(Path(path).read_text())


@lru_cache(maxsize=1)
def anchors() -> dict[str, float]:
    """The H200 measurement file shipped with the package."""
    return json.loads(files("simulator.costs").joinpath("data/h200-anchors.json").read_text())


def _anchor_points() -> list[GemmPoint]:
    a = anchors()
    src = "[A] h200-anchors.json"
    pts = []
    for (m, n, k) in ((8192, 8192, 8192), (4096, 7168, 2048), (4096, 2048, 7168), (4096, 4096, 7168)):
        key = f"{m}x{n}x{k}" if (m, n, k) != (8192, 8192, 8192) else "8192x8192x8192"
        if f"bf16_gemm_{key}_TFLOPs" in a:
            pts.append(GemmPoint(precision="bf16", m=m, n=n, k=k, flops_per_s=a[f"bf16_gemm_{key}_TFLOPs"] * TFLOPS,
                                 source=f"{src} bf16_gemm_{key}"))
    for tok in (128, 512, 1024):
        pts.append(GemmPoint(precision="bf16", m=tok, n=4096, k=7168, groups=32,
                             flops_per_s=a[f"bf16_grouped_mm_E32_tok{tok}_TFLOPs"] * TFLOPS,
                             source=f"{src} bf16_grouped_mm_E32_tok{tok} (N x K assumed 4096 x 7168)"))
    return pts


def _torch_fp8_points() -> list[GemmPoint]:
    a = anchors()
    out = []
    for key in ("8192x8192x8192", "4096x7168x2048", "4096x2048x7168"):
        m, n, k = (int(x) for x in key.split("x"))
        out.append(GemmPoint(precision="fp8", m=m, n=n, k=k,
                             flops_per_s=a[f"fp8_block1x128_128x128_{key}_TFLOPs"] * TFLOPS,
                             source=f"[A] h200-anchors.json fp8_block1x128_128x128_{key} (torch._scaled_mm)"))
    return out


# [DG] dense rows: (M, N, K, TFLOPS)
_DEEPGEMM_DENSE = (
    (64, 2112, 7168, 206), (64, 24576, 1536, 289), (64, 32768, 512, 219), (64, 7168, 16384, 336),
    (64, 4096, 7168, 287), (64, 7168, 2048, 295), (128, 2112, 7168, 352), (128, 24576, 1536, 535),
    (128, 32768, 512, 358), (128, 7168, 16384, 645), (128, 4096, 7168, 533), (128, 7168, 2048, 510),
    (4096, 2112, 7168, 1058), (4096, 24576, 1536, 990), (4096, 32768, 512, 590), (4096, 7168, 16384, 1358),
    (4096, 4096, 7168, 1304), (4096, 7168, 2048, 1025),
)
# [DG] grouped rows: (groups, M per group, N, K, TFLOPS); contiguous then masked layout
_DEEPGEMM_GROUPED = (
    (4, 8192, 4096, 7168, 1297), (4, 8192, 7168, 2048, 1099), (8, 4096, 4096, 7168, 1288),
    (8, 4096, 7168, 2048, 1093), (1, 1024, 4096, 7168, 1233), (1, 1024, 7168, 2048, 925),
    (2, 512, 4096, 7168, 1040), (2, 512, 7168, 2048, 916), (4, 256, 4096, 7168, 932), (4, 256, 7168, 2048, 815),
)


def _deepgemm_points() -> list[GemmPoint]:
    src = "[DG] DeepGEMM README 2025-02-25, H800"
    pts = [GemmPoint(precision="fp8", m=m, n=n, k=k, flops_per_s=t * TFLOPS, source=f"{src} dense {m}x{n}x{k}")
           for m, n, k, t in _DEEPGEMM_DENSE]
    pts += [GemmPoint(precision="fp8", m=m, n=n, k=k, groups=g, flops_per_s=t * TFLOPS,
                      source=f"{src} grouped {g}x{m} {n}x{k}") for g, m, n, k, t in _DEEPGEMM_GROUPED]
    return pts


def _common(name: str, gemm: list[GemmPoint], bf16_peak_flops_per_s: float) -> CostTables:
    a = anchors()
    fwd = a["sdpa_fwd_causal_d192v128_TFLOPs"] * TFLOPS / bf16_peak_flops_per_s
    fwd_bwd = a["sdpa_fwdbwd_causal_d192v128_TFLOPs"] * TFLOPS / bf16_peak_flops_per_s
    # NCCL all-to-all on 4 H200 ([A]): t = S (n-1)/n / busbw at 8 MiB and 256 MiB per rank; the
    # straight line through both has intercept ~117 us: the fixed cost of one collective.
    n = a["gpus"]
    t8 = 8 * 2**20 * (n - 1) / n / (a["a2a_8MiB_per_rank_GBps_busbw"] * 1e9)
    t256 = 256 * 2**20 * (n - 1) / n / (a["a2a_256MiB_per_rank_GBps_busbw"] * 1e9)
    latency = t8 - (t256 - t8) / (256 - 8) * 8
    return CostTables(
        name=name,
        gemm=tuple(gemm),
        attention_fwd_frac=fwd,
        attention_fwd_bwd_frac=fwd_bwd,
        attention_source="[A] sdpa_fwd_causal_d192v128 and sdpa_fwdbwd_causal_d192v128 (FLOPs taken as 1x / 3x forward)",
        memory_frac=a["copy_TBps"] * 1e12 / 4.8e12,  # [A] copy bandwidth over the H200's 4.8 TB/s datasheet figure
        memory_source="[A] copy_TBps over the H200 datasheet 4.8 TB/s",
        collective_latency_s=latency,
        collective_source="[A] a2a busbw at 8 and 256 MiB per rank, 4 GPUs: line intercept",
    )


def default_tables(gpu_name: str) -> CostTables:
    """Default tables for a GPU name from the cluster presets (H800, H100, H200 variants).

    H800/H100: FP8 from DeepGEMM (DeepSeek's own kernels, measured on the H800); BF16 from [A].
    H200: FP8 from torch's block-scaled ``_scaled_mm`` on the H200 ([A]); BF16 from [A].
    """
    bf16_peak = 989.4 * TFLOPS  # H100/H200 datasheet dense BF16, as in simulator/presets/clusters.py
    if gpu_name.upper().startswith("H200"):
        return _common("h200-default", _anchor_points() + _torch_fp8_points(), bf16_peak)
    return _common("hopper-deepgemm-default", _anchor_points() + _deepgemm_points(), bf16_peak)
