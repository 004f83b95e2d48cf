"""Kernel efficiency tables: measured or published throughputs, each entry with its source.

A ``CostTables`` holds, for one GPU type, GEMM throughput points by precision and shape (dense and
grouped), attention throughput, achievable memory bandwidth and collective latency. The defaults
below come from published tables and the repo's measurement file; ``named_tables`` gives the others by
name (``NAMED_TABLES``); ``CostTables.from_file`` loads a calibration file with the same schema (the
calibration capability writes it by measuring).

Sources:
- [DG] DeepGEMM README, 2025-02-25 (``shared/reference/deepseek-v3.md`` §11.4): FP8 1x128/128x128
  block-scaled GEMM on H800 SXM5, dense (M = 64, 128, 4096) and grouped (contiguous and masked layouts).
  Each row also gives DeepGEMM's speedup over "DeepSeek's internal CUTLASS-3.6 kernel", so that kernel's
  throughput at the same shape is TFLOPS / speedup: the ``hopper-cutlass36-2024`` tables, the FP8 GEMMs
  DeepSeek had when it trained V3 in 2024 (DeepGEMM came out in 2025). Published, not fitted.
- [A] ``simulator/costs/data/h200-anchors.json``: stock PyTorch 2.11 on one H200 (copied from
  ``shared/reference/h200-anchors.json``): BF16 ``torch.matmul``, FP8 block-scaled ``torch._scaled_mm``,
  BF16 ``torch._grouped_mm`` (32 experts; N x K not recorded, taken as V3's 4096 x 7168), SDPA causal
  attention (head dims 192/128), device copy bandwidth, NCCL all-to-all and all-reduce on 4 GPUs.
  Hopper SXM parts share SMs, clocks and tensor cores, so the H200's compute-bound figures stand for the
  H100 and H800 too; memory-bound figures scale with each part's HBM bandwidth (see ``memory_frac``).
- [K] ``simulator/costs/data/h200-kernels.json`` (``benchmarks/kernels_bench.py --json``): on one H200,
  FP8 block-scaled GEMMs at DeepSeek-V3's shapes (forward, input- and weight-gradient forms of six
  linears, M = 4096 tokens; grouped 4 x 8192 and 8 x 4096 rows), each the faster of our Triton kernel
  and ``torch._scaled_mm`` (what ``kernels.fp8_gemm``'s auto dispatch runs), and BF16 ``torch.matmul``
  / ``torch._grouped_mm`` at the same shapes (grouped with their real N x K). Where [K] and [A] measure
  the same shape, [K] is used.
- [AT] ``simulator/costs/data/h200-attention.json`` (``benchmarks/attention_bench.py``): causal SDPA
  with V3's head dims (192/128) on one H200, 1K to 128K tokens, FLOPs counted exactly as
  ``attention_core_flops`` and forward + backward as 3x forward. It replaces [A]'s two attention
  figures, whose FLOP convention is not recorded: [AT]'s forward at 4K reproduces [A]'s (592 vs 591
  TFLOPS), but its forward + backward is 381 TFLOPS at 3x where [A] says 440, which is what 381
  becomes at 3.5x (backward counted as 2.5 forwards). Read at 3x, [A] overstated the backward's speed.
- [EW] ``simulator/costs/data/h100-elementwise.json`` and ``h200-elementwise.json``
  (``benchmarks/elementwise_bench.py``), when the package has them: each memory-bound kernel class of a
  V3 layer (``simulator.costs.elementwise``) timed at 4096 tokens, forward and backward, and the FP8 weights'
  once-a-step quantisation over one MoE layer's weights (``elementwise.WEIGHT_QUANT``), as a fraction of
  that GPU's datasheet HBM bandwidth at the class's ideal bytes; one H100 SXM5 (HBM3, 3.35 TB/s) for the
  H100 and H800 tables (the H800 has the H100's memory system), one H200 (HBM3e, 4.8 TB/s) for the H200's
  and any other GPU's (``memory_kernels.elementwise_file``); a file written since 2026-12-07 also fits each
  per-token class's fixed seconds a call over a second size (``memory_kernels`` module docstring; the packaged
  files predate it, so they price bytes alone). Like [A]'s copy bandwidth (``memory_frac``,
  the fallback for a class a file does not measure), a fraction of the datasheet, so each Hopper part
  applies it to its own HBM bandwidth.
- [FA] Shah et al. 2024, *FlashAttention-3* (arXiv:2407.08608), Fig. 5 and 6: FlashAttention-2 (Dao 2023,
  arXiv:2307.08691) on one H100 80GB SXM5, BF16, head dim 128 (the paper's nearest to MLA's 192/128),
  batch x length = 16K tokens, 512 to 16K tokens: the forward with the causal mask, and the backward
  (published without the mask only, so it is the unmasked one), both in the papers' FLOP convention
  (causal = half the square, backward = 2.5 forwards) that ``attention_core_flops`` shares. The
  attention of a 2023-24 H100 run, before FlashAttention-3 and cuDNN's fused attention.
- [MAMF] S. Bekman, *Machine Learning Engineering*, "Maximum Achievable Matmul FLOPS comparison table"
  (``compute/accelerator/README.md``): H100 SXM BF16 ``torch.matmul`` at its best shape (6144 x 17920 x
  2816), 792.1 TFLOPS with CUDA 12.1 (2024). Every [A]/[K] BF16 point is below it (the best, 775 TFLOPS at
  8192^3), so [A]/[K]'s cuBLAS is not faster than 2024's: the BF16 GEMMs of ``hopper-bf16-fa2-2023``.
  Its grouped points are still ``torch._grouped_mm`` (2025); no 2023-24 grouped BF16 measurement was found.
- [CPU] ``simulator/costs/data/cpu-fp32.json`` and ``cpu-bf16.json`` (``benchmarks/cpu_tables.py``): the
  ``cpu`` cluster's tables, whole cost-table files measured on one machine (one thread per process), each
  entry naming its measurement; they price the plan's ``bf16`` precision in FP32 (``cpu``, the default)
  or in BF16 (``cpu-bf16``) and price no FP8 (``precisions``). Their ``cross_entropy`` point (the loss before
  2026-12-06, commit 36bd188, which the runtime no longer runs) was dropped: the loss is priced at its bytes
  (``engine.unit_costs.loss_s``); the [EW] file keeps its row of that loss out of the table for the same reason.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.simulator.costs.elementwise import STAND_INS
from moeplan.simulator.costs.beside_comm import BesidePoint
from moeplan.simulator.costs.host import HostCosts
from moeplan.simulator.costs.machine import LinkFit, Machine
from moeplan.simulator.costs.measured_ops import MeasuredOp
from moeplan.simulator.costs.memory_kernels import MemoryKernelPoint, packaged_memory_kernels
from moeplan.simulator.presets.clusters import h200_gpu
from moeplan.simulator.spec.hardware import is_cpu_name
from moeplan.simulator.spec.json_input import read_json_file
from moeplan.simulator.spec.numbers import Float, Int

Precision = Literal["bf16", "fp8"]
TFLOPS = 1e12


class GemmPoint(BaseModel):
    """Throughput of one GEMM shape: ``groups`` independent (m x k) @ (k x n) products."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: Precision
    m: Int = Field(..., gt=0, description="Rows per group.")
    n: Int = Field(..., gt=0)
    k: Int = Field(..., gt=0)
    groups: Int = Field(1, gt=0)
    flops_per_s: Float = Field(..., ge=1)
    main_grad: bool = Field(False, description="A weight gradient added into an FP32 main gradient by the GEMM "
                            "itself (beta = 1: the old values read, the sum written), timed as the runtime runs it "
                            "on a GPU (``model.weight_grad.fused_main_grad_mm``, ``fused_main_grad_grouped_mm``); "
                            "such points price only such products (``costs.kernels.gemm_s``'s ``main_grad``).")
    source: str


class AttentionPoint(BaseModel):
    """Causal attention efficiency at one sequence length, as fractions of the dense BF16 peak."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seq_len: Int = Field(..., gt=0)
    fwd_frac: Float = Field(..., gt=0, le=1)
    fwd_bwd_frac: Float = Field(..., gt=0, le=1, description="Forward + backward, counted as 3x forward FLOPs.")


class CostTables(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    gemm: tuple[GemmPoint, ...] = Field(..., min_length=1)
    attention_fwd_frac: Float = Field(..., gt=0, le=1, description="Causal attention forward, of the BF16 peak.")
    attention_fwd_bwd_frac: Float = Field(..., gt=0, le=1, description="Forward + backward (3x forward FLOPs).")
    attention_by_seq: tuple[AttentionPoint, ...] = Field(
        (), description="Efficiency by sequence length (interpolated in log2 of the length, held flat past the "
                        "ends); empty = the two fractions above at every length.")
    attention_source: str
    memory_frac: Float = Field(..., gt=0, le=1, description="Achievable / datasheet HBM bandwidth: the fraction "
                                                            "of every memory-bound kernel class not in memory_kernels.")
    memory_source: str
    memory_kernels: tuple[MemoryKernelPoint, ...] = Field(
        (), description="Per kernel class (simulator.costs.elementwise); empty = memory_frac for all.")
    collective_latency_s: Float = Field(..., ge=0, le=3600, description="Fixed cost of one collective or transfer.")
    collective_source: str
    comm_sms: Int = Field(20, ge=0, description="SMs reserved for expert all-to-all kernels (TR §3.2.2); fewer "
                           "than the GPU's sm_count (checked where the tables meet a GPU: ``comm_sms_error``).")
    precisions: tuple[Precision, ...] = Field(("bf16", "fp8"), min_length=1, description="The precisions the "
                                              "tables price (GEMM points of each); a step of another is refused "
                                              "(``precision_error``). BF16 always: the router and head run in it.")
    machine: Machine | None = Field(None, description="What measured the tables (cpu tables); None = see sources.")
    links: tuple[LinkFit, ...] = Field((), description="Measured collectives (cpu tables); the engine prices "
                                       "transfers with the cluster's link rates and ``collective_latency_s``.")
    host: HostCosts | None = Field(None, description="Host seconds per framework op and ops per priced piece "
                                   "(``costs.host``); None = not measured, no host term.")
    measured_ops: tuple[MeasuredOp, ...] = Field((), description="Sub-operations measured in a run at its shape "
                                                 "(``costs.measured_ops``): each replaces its own op's price.")
    gemm_sm_share: Literal["waves", "linear"] = Field(
        "waves", description="A GEMM on the SMs left beside communication: in waves of output tiles "
                             "(``costs.beside_comm``), or at the linear SM share (the model before issue 21, for "
                             "sensitivity studies).")
    compute_beside_comm: tuple[BesidePoint, ...] = Field(
        (), description="GEMMs timed alone and beside a communication kernel (``costs.beside_comm``): the HBM "
                        "interference beyond wave quantisation. Empty = not measured: no interference priced.")

    @model_validator(mode="after")
    def _one_point_per_kernel(self) -> CostTables:
        kernels = [p.kernel for p in self.memory_kernels]
        dup = next((k for k in kernels if kernels.count(k) > 1), None)
        if dup is not None:
            raise ValueError(f"memory_kernels: kernel={dup!r} appears {kernels.count(dup)} times")
        if "bf16" not in self.precisions:
            raise ValueError(f"precisions={list(self.precisions)} must include bf16 (the router and head run in it)")
        missing = [p for p in get_args(Precision) if p in self.precisions and all(g.precision != p for g in self.gemm)]
        if missing:  # a step prices GEMMs of each (BF16 ones in an FP8 run too)
            raise ValueError(f"gemm: has no {missing[0]} point; the tables need GEMM throughput for "
                             f"{' and '.join(self.precisions)}")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> CostTables:
        """A calibration file: bounded, strict JSON (``spec.json_input``; its errors are ``ValueError``
        naming the file), validated as ``CostTables`` (pydantic's ``ValidationError``)."""
        return cls.model_validate(read_json_file(path))

    def comm_sms_error(self, sm_count: int) -> str | None:
        """Why ``comm_sms`` cannot be reserved on a GPU of ``sm_count`` SMs (compute needs at least one)."""
        if self.comm_sms >= sm_count:
            return f"comm_sms={self.comm_sms} must leave compute at least one of the GPU's sm_count={sm_count} SMs"
        return None

    def precision_error(self, precision: str) -> str | None:
        """Why a step in ``precision`` cannot be priced with these tables (they measured no such GEMMs)."""
        if precision not in self.precisions:
            return (f"precision={precision} is not priced by cost tables {self.name!r} "
                    f"(they price {', '.join(self.precisions)})")
        return None

    def memory_price(self, kernel: str | None) -> tuple[tuple[float, float], tuple[float, float]]:
        """((forward, backward) HBM fraction, (forward, backward) fixed seconds a call) of a memory-bound kernel
        class (``memory_kernels`` module docstring); if unmeasured, its stand-in's (``elementwise.STAND_INS``: the
        same kernels measured as another class), else ``memory_frac`` and no fixed term."""
        point = next((p for p in self.memory_kernels if p.kernel == kernel), None) or \
            next((p for p in self.memory_kernels if p.kernel == STAND_INS.get(kernel)), None)
        if point is None:
            return (self.memory_frac, self.memory_frac), (0.0, 0.0)
        fwd_fixed_s = point.fwd_fixed_s or 0.0
        return ((point.fwd_frac, point.bwd_frac if point.bwd_frac is not None else point.fwd_frac),
                (fwd_fixed_s, point.bwd_fixed_s if point.bwd_fixed_s is not None else fwd_fixed_s))

    def memory_fracs(self, kernel: str | None) -> tuple[float, float]:
        """(forward, backward) HBM fraction of a memory-bound kernel class (``memory_price``)."""
        return self.memory_price(kernel)[0]

    def memory_fixed_s(self, kernel: str | None) -> tuple[float, float]:
        """(forward, backward) seconds one call of a memory-bound kernel class costs beside its bytes
        (``memory_price``); 0 where its point has none."""
        return self.memory_price(kernel)[1]

    def attention_fracs(self, seq_len: int) -> tuple[float, float]:
        """(forward, forward + backward) efficiency of causal attention over ``seq_len`` keys."""
        pts = sorted(self.attention_by_seq, key=lambda p: p.seq_len)
        if not pts:
            return self.attention_fwd_frac, self.attention_fwd_bwd_frac
        if seq_len <= pts[0].seq_len:
            return pts[0].fwd_frac, pts[0].fwd_bwd_frac
        for lo, hi in zip(pts, pts[1:]):
            if seq_len <= hi.seq_len:
                t = (math.log2(seq_len) - math.log2(lo.seq_len)) / (math.log2(hi.seq_len) - math.log2(lo.seq_len))
                return (lo.fwd_frac + t * (hi.fwd_frac - lo.fwd_frac),
                        lo.fwd_bwd_frac + t * (hi.fwd_bwd_frac - lo.fwd_bwd_frac))
        return pts[-1].fwd_frac, pts[-1].fwd_bwd_frac


@lru_cache(maxsize=1)
def attention_measurements() -> dict:
    """[AT]: causal SDPA by sequence length on the H200 (benchmarks/attention_bench.py)."""
    return json.loads(files("moeplan.simulator.costs").joinpath("data/h200-attention.json").read_text())


def _attention_points(bf16_peak_flops_per_s: float) -> tuple[AttentionPoint, ...]:
    return tuple(AttentionPoint(seq_len=r["seq"], fwd_frac=r["fwd_TFLOPs"] * TFLOPS / bf16_peak_flops_per_s,
                                fwd_bwd_frac=r["fwd_bwd_TFLOPs_3x"] * TFLOPS / bf16_peak_flops_per_s)
                 for r in attention_measurements()["rows"])


@lru_cache(maxsize=1)
def anchors() -> dict[str, float]:
    """The H200 measurement file shipped with the package."""
    return json.loads(files("moeplan.simulator.costs").joinpath("data/h200-anchors.json").read_text())


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


@lru_cache(maxsize=1)
def kernel_measurements() -> dict:
    """[K]: our kernels and torch's on V3 shapes, one H200 (benchmarks/kernels_bench.py --json)."""
    return json.loads(files("moeplan.simulator.costs").joinpath("data/h200-kernels.json").read_text())


def _measured_bf16_points() -> list[GemmPoint]:
    data, src = kernel_measurements(), "[K] h200-kernels.json"
    pts = [GemmPoint(precision="bf16", m=r["M"], n=r["N"], k=r["K"], flops_per_s=r["forward"]["bf16_matmul"]["tflops"] * TFLOPS,
                     source=f"{src} torch.matmul {r['M']}x{r['N']}x{r['K']}")
           for r in data["dense"] if "tflops" in r["forward"]["bf16_matmul"]]
    pts += [GemmPoint(precision="bf16", m=g["m_per_group"], n=g["N"], k=g["K"], groups=g["groups"],
                      flops_per_s=g["grouped_mm_bf16"]["tflops"] * TFLOPS,
                      source=f"{src} torch._grouped_mm {g['groups']}x{g['m_per_group']} {g['N']}x{g['K']}")
            for g in data["grouped"] if "tflops" in g["grouped_mm_bf16"]]
    return pts


# The dense FP8 backends kernels.fp8_gemm's auto dispatch chooses among, by their kernels_bench
# names: our Triton kernel, our Gluon kernel (measured since 2026-12-01) and block-scaled _scaled_mm
DISPATCHED = ("ours", "gluon", "scaled_mm")


def _measured_fp8_points() -> list[GemmPoint]:
    data, src = kernel_measurements(), "[K] h200-kernels.json"
    by_shape: dict[tuple[int, int, int], list[tuple[str, float]]] = {}
    for r in data["dense"]:
        M, N, K = r["M"], r["N"], r["K"]
        # forward y = x W^T: (M x K)(K x N); dgrad dy W: (M x N)(N x K); wgrad dy^T x: (N x M)(M x K)
        for kind, shape in (("forward", (M, N, K)), ("dgrad", (M, K, N)), ("wgrad", (N, K, M))):
            runs = [v["tflops"] for name, v in r[kind].items() if name in DISPATCHED and "tflops" in v]
            if runs:
                by_shape.setdefault(shape, []).append((f"{kind} of {N}x{K}", max(runs)))
    # A square linear's dgrad and wgrad share a shape (e.g. 4096 x 7168 x 4096) but not a speed (wgrad
    # has 1x128 scales on both operands and FP32 out); the simulator looks both up by shape and runs
    # them on equal FLOPs, so the point is their mean.
    pts = [GemmPoint(precision="fp8", m=m, n=n, k=k, flops_per_s=sum(t for _, t in runs) / len(runs) * TFLOPS,
                     source=f"{src} {' / '.join(w for w, _ in runs)}: fastest of ours (Triton, Gluon) and _scaled_mm"
                            + (" (mean)" if len(runs) > 1 else ""))
           for (m, n, k), runs in by_shape.items()]
    for g in data["grouped"]:
        if "tflops" in g["auto_fp8"]:
            pts.append(GemmPoint(precision="fp8", m=g["m_per_group"], n=g["N"], k=g["K"], groups=g["groups"],
                                 flops_per_s=g["auto_fp8"]["tflops"] * TFLOPS,
                                 source=f"{src} grouped {g['groups']}x{g['m_per_group']} {g['N']}x{g['K']} (auto dispatch)"))
    return pts


def _merge(*point_lists: list[GemmPoint]) -> list[GemmPoint]:
    """One point per (precision, shape, groups); a later list's point replaces an earlier one's."""
    merged: dict[tuple, GemmPoint] = {}
    for pts in point_lists:
        for p in pts:
            merged[(p.precision, p.m, p.n, p.k, p.groups)] = p
    return list(merged.values())


def _torch_fp8_points() -> list[GemmPoint]:
    a = anchors()
    out = []
    for key in ("8192x8192x8192", "4096x7168x2048", "4096x2048x7168"):
        m, n, k = (int(x) for x in key.split("x"))
        out.append(GemmPoint(precision="fp8", m=m, n=n, k=k,
                             flops_per_s=a[f"fp8_block1x128_128x128_{key}_TFLOPs"] * TFLOPS,
                             source=f"[A] h200-anchors.json fp8_block1x128_128x128_{key} (torch._scaled_mm)"))
    return out


# [DG] dense rows: (M, N, K, TFLOPS, speedup over DeepSeek's internal CUTLASS-3.6 kernel)
_DEEPGEMM_DENSE = (
    (64, 2112, 7168, 206, 2.7), (64, 24576, 1536, 289, 1.7), (64, 32768, 512, 219, 1.8),
    (64, 7168, 16384, 336, 1.4), (64, 4096, 7168, 287, 1.4), (64, 7168, 2048, 295, 1.7),
    (128, 2112, 7168, 352, 2.4), (128, 24576, 1536, 535, 1.6), (128, 32768, 512, 358, 1.5),
    (128, 7168, 16384, 645, 1.4), (128, 4096, 7168, 533, 2.0), (128, 7168, 2048, 510, 1.7),
    (4096, 2112, 7168, 1058, 1.1), (4096, 24576, 1536, 990, 1.0), (4096, 32768, 512, 590, 1.0),
    (4096, 7168, 16384, 1358, 1.2), (4096, 4096, 7168, 1304, 1.1), (4096, 7168, 2048, 1025, 1.1),
)
# [DG] grouped rows: (groups, M per group, N, K, TFLOPS, speedup); contiguous then masked layout
_DEEPGEMM_GROUPED = (
    (4, 8192, 4096, 7168, 1297, 1.2), (4, 8192, 7168, 2048, 1099, 1.2), (8, 4096, 4096, 7168, 1288, 1.2),
    (8, 4096, 7168, 2048, 1093, 1.1), (1, 1024, 4096, 7168, 1233, 1.2), (1, 1024, 7168, 2048, 925, 1.2),
    (2, 512, 4096, 7168, 1040, 1.2), (2, 512, 7168, 2048, 916, 1.2), (4, 256, 4096, 7168, 932, 1.1),
    (4, 256, 7168, 2048, 815, 1.2),
)
Fp8Kernels = Literal["deepgemm", "cutlass36"]


def _deepgemm_points(kernels: Fp8Kernels) -> list[GemmPoint]:
    """[DG]'s shapes at DeepGEMM's throughput, or at the kernel it replaced (DeepGEMM's over its speedup)."""
    src = "[DG] DeepGEMM README 2025-02-25, H800"
    if kernels == "cutlass36":
        src += ": DeepSeek's internal CUTLASS-3.6 kernel (TFLOPS / published speedup)"

    def rate(tflops: float, speedup: float) -> float:
        return tflops / speedup * TFLOPS if kernels == "cutlass36" else tflops * TFLOPS

    pts = [GemmPoint(precision="fp8", m=m, n=n, k=k, flops_per_s=rate(t, x), source=f"{src} dense {m}x{n}x{k}")
           for m, n, k, t, x in _DEEPGEMM_DENSE]
    pts += [GemmPoint(precision="fp8", m=m, n=n, k=k, groups=g, flops_per_s=rate(t, x),
                      source=f"{src} grouped {g}x{m} {n}x{k}") for g, m, n, k, t, x in _DEEPGEMM_GROUPED]
    return pts


def _common(name: str, gemm: list[GemmPoint], bf16_peak_flops_per_s: float, gpu_name: str,
            precisions: tuple[Precision, ...] = ("bf16", "fp8")) -> CostTables:
    """Tables with everything but the GEMMs shared by the Hopper parts; [EW] the file of ``gpu_name``."""
    a = anchors()
    attention = _attention_points(bf16_peak_flops_per_s)
    at_4k = next(p for p in attention if p.seq_len == 4096)
    # NCCL all-to-all on 4 H200 ([A]): t = S (n-1)/n / busbw at 8 MiB and 256 MiB per rank; the
    # straight line through both has intercept ~117 us: the fixed cost of one collective.
    n = a["gpus"]
    t8 = 8 * 2**20 * (n - 1) / n / (a["a2a_8MiB_per_rank_GBps_busbw"] * 1e9)
    t256 = 256 * 2**20 * (n - 1) / n / (a["a2a_256MiB_per_rank_GBps_busbw"] * 1e9)
    latency = t8 - (t256 - t8) / (256 - 8) * 8
    return CostTables(
        name=name,
        gemm=tuple(gemm),
        attention_fwd_frac=at_4k.fwd_frac,
        attention_fwd_bwd_frac=at_4k.fwd_bwd_frac,
        attention_by_seq=attention,
        attention_source="[AT] h200-attention.json: causal SDPA d192/v128 at 1K-128K tokens (fwd+bwd as 3x fwd)",
        memory_frac=a["copy_TBps"] * 1e12 / h200_gpu().hbm_bytes_per_s,  # [A] copy bandwidth over the H200 datasheet
        memory_source="[A] copy_TBps over the H200 datasheet 4.8 TB/s",
        memory_kernels=packaged_memory_kernels(gpu_name),
        collective_latency_s=latency,
        collective_source="[A] a2a busbw at 8 and 256 MiB per rank, 4 GPUs: line intercept",
        precisions=precisions,
    )


_BF16_PEAK_FLOPS_PER_S = 989.4 * TFLOPS  # H100/H200 datasheet dense BF16, as in simulator/presets/clusters.py


def _hopper(name: str, fp8: list[GemmPoint], gpu_name: str) -> CostTables:
    """Hopper tables with the given FP8 points; BF16 from [A] and [K] (shared by every Hopper part), [EW]
    the file of ``gpu_name``."""
    return _common(name, _merge(_anchor_points(), _measured_bf16_points()) + fp8, _BF16_PEAK_FLOPS_PER_S, gpu_name)


@lru_cache(maxsize=None)
def default_tables(gpu_name: str) -> CostTables:
    """Default tables for a GPU name from the cluster presets (H800, H100, H200 variants).

    H800/H100: FP8 from DeepGEMM (DeepSeek's own kernels, measured on the H800); BF16 from [A] and [K];
    memory-bound classes from the H100's [EW] file.
    H200: FP8 from our kernels' auto dispatch on the H200 ([K], then [A]); BF16 from [A] and [K];
    memory-bound classes from the H200's [EW] file.
    CPU (the ``cpu`` cluster preset's processes): [CPU], FP32.
    """
    if is_cpu_name(gpu_name):
        return cpu_tables("cpu")
    if gpu_name.upper().startswith("H200"):
        return _hopper("h200-default", _merge(_torch_fp8_points(), _measured_fp8_points()), gpu_name)
    return _hopper("hopper-deepgemm-default", _deepgemm_points("deepgemm"), gpu_name)


# Named tables besides each GPU's default: name -> what its FP8 points are
NAMED_TABLES = {
    "default": "the GPU's default tables (DeepGEMM on H800/H100, our measurements on H200, cpu on the cpu cluster)",
    "hopper-cutlass36-2024": "the FP8 kernels DeepSeek trained V3 with in 2024: [DG]'s shapes at DeepGEMM's "
                             "TFLOPS over its published speedup on DeepSeek's internal CUTLASS-3.6 kernel",
    "hopper-bf16-fa2-2023": "a 2023-24 BF16 Hopper run: FlashAttention-2 attention (FA3 paper's H100 figures), "
                            "cuBLAS BF16 GEMMs (our measurements, below 2024's measured H100 ceiling), no FP8",
    "cpu": "the cpu cluster's processes, measured (benchmarks/cpu_tables.py): FP32 GEMMs, attention and "
           "activations, gloo links; no FP8",
    "cpu-bf16": "as cpu, with BF16 GEMMs, attention and activations",
}
CPU_TABLE_FILES = {"cpu": "data/cpu-fp32.json", "cpu-bf16": "data/cpu-bf16.json"}


@lru_cache(maxsize=None)
def cpu_tables(name: str) -> CostTables:
    """[CPU]: the packaged measurement file of the cpu tables called ``name`` (a key of ``CPU_TABLE_FILES``)."""
    return CostTables.from_file(Path(str(files("moeplan.simulator.costs").joinpath(CPU_TABLE_FILES[name]))))


def plan_named_tables(name: str, gpu_name: str) -> CostTables | None:
    """The tables a plan names (``predictions.cost_tables``): the GPU's default tables under their own name (e.g.
    "h200-default"), another ``NAMED_TABLES`` entry, or None where the name has nothing to load (a calibration
    file's tables)."""
    default = default_tables(gpu_name)
    if name == default.name:
        return default
    try:
        return named_tables(name, gpu_name)
    except ValueError:
        return None


def named_tables(name: str, gpu_name: str) -> CostTables:
    """The tables called ``name`` (a key of ``NAMED_TABLES``) for a GPU of the cluster presets."""
    if name == "default":
        return default_tables(gpu_name)
    if name == "hopper-cutlass36-2024":
        return _hopper(name, _deepgemm_points("cutlass36"), gpu_name)
    if name == "hopper-bf16-fa2-2023":
        from moeplan.simulator.costs.era_tables import hopper_bf16_fa2  # it builds on this module's sources

        return hopper_bf16_fa2(gpu_name)
    if name in CPU_TABLE_FILES:
        return cpu_tables(name)
    raise ValueError(f"cost tables {name!r}: unknown (known: {', '.join(NAMED_TABLES)})")
