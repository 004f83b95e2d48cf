"""Time of one kernel or transfer from its FLOPs or bytes and the efficiency tables.

GEMMs take the throughput of the nearest table point of the same precision (distance in log2 of
rows per group, N, K and group count), so a shape between two measured ones borrows the closer
one's efficiency; never more than the GPU's peak. A weight gradient the runtime adds into its FP32 main gradient
inside the GEMM (``main_grad``) takes the nearest point timed that way, where the tables have such points
(``main_grad_measured``: ``moeplan calibrate`` on a GPU); other products never take them. ``compute_frac`` is the share of SMs left to
compute (DeepSeek-V3 reserves 20 of 132 for communication, TR §3.2.2): a GEMM on fewer SMs runs in
more waves of output tiles, and slower by the HBM interference the tables measured
(``costs.beside_comm``; 0 until measured), not at the linear SM share. Attention keeps the linear
share (its tiles, heads x query blocks, outnumber the SMs many times over, where the two agree).
"""

from __future__ import annotations

import math

from moeplan.simulator.costs.beside_comm import beside_comm_factor
from moeplan.simulator.costs.tables import CostTables, GemmPoint, Precision
from moeplan.simulator.spec.hardware import GpuSpec


def peak_flops_per_s(gpu: GpuSpec, precision: Precision) -> float:
    return gpu.fp8_flops_per_s if precision == "fp8" else gpu.bf16_flops_per_s


def _distance(p: GemmPoint, m: int, n: int, k: int, groups: int) -> float:
    return (
        abs(math.log2(p.m / m)) + abs(math.log2(p.n / n)) + abs(math.log2(p.k / k))
        + abs(math.log2(p.groups / groups))
    )


_NEAREST: dict[int, tuple[CostTables, dict]] = {}  # id(tables) -> (the tables, shape -> nearest point)


def main_grad_measured(tables: CostTables, precision: Precision) -> bool:
    """Whether ``tables`` time ``precision`` weight gradients added into FP32 main gradients by the GEMM."""
    return any(p.main_grad and p.precision == precision for p in tables.gemm)


def _nearest(tables: CostTables, precision: Precision, m: int, n: int, k: int, groups: int,
             main_grad: bool = False) -> GemmPoint:
    """Memoised per tables object by identity: hashing a CostTables (every GEMM point) on each call
    cost a layout search more than the lookups it saved. The entry keeps the tables alive, so
    their id is not reused while it is cached."""
    entry = _NEAREST.get(id(tables))
    if entry is None:
        if len(_NEAREST) >= 64:
            _NEAREST.clear()
        entry = _NEAREST[id(tables)] = (tables, {})
    cache = entry[1]
    key = (precision, m, n, k, groups, main_grad)
    point = cache.get(key)
    if point is None:
        same = [p for p in tables.gemm if p.precision == precision and p.main_grad == main_grad]
        if not same:
            what = " weight-gradient-into-FP32" if main_grad else ""
            raise ValueError(f"cost tables {tables.name!r} have no {precision}{what} GEMM entries")
        point = cache[key] = min(same, key=lambda p: _distance(p, m, n, k, groups))
    return point


def gemm_efficiency(tables: CostTables, gpu: GpuSpec, precision: Precision, m: int, n: int, k: int, groups: int = 1,
                    main_grad: bool = False) -> float:
    """Fraction of the precision's peak that the nearest measured shape reached."""
    if min(m, n, k, groups) <= 0:
        return 1.0
    point = _nearest(tables, precision, m, n, k, groups, main_grad)
    return min(1.0, point.flops_per_s / peak_flops_per_s(gpu, precision))


def gemm_s(
    tables: CostTables, gpu: GpuSpec, precision: Precision, m: int, n: int, k: int,
    groups: int = 1, compute_frac: float = 1.0, main_grad: bool = False,
) -> float:
    """Seconds for ``groups`` products of (m x k) @ (k x n), on all SMs or on ``compute_frac`` of them
    beside communication (wave quantisation and measured interference, ``costs.beside_comm``); ``main_grad``:
    each added into an FP32 main gradient by the GEMM, at the points timed so (the caller checks
    ``main_grad_measured``)."""
    if min(m, n, k, groups) <= 0:
        return 0.0
    flops = 2.0 * groups * m * n * k
    eff = gemm_efficiency(tables, gpu, precision, m, n, k, groups, main_grad)
    full_s = flops / (peak_flops_per_s(gpu, precision) * eff)
    if compute_frac >= 1.0:
        return full_s
    if tables.gemm_sm_share == "linear":
        return full_s / compute_frac
    sms_left = max(1, round(compute_frac * gpu.sm_count))
    return full_s * beside_comm_factor(tables.compute_beside_comm, m, n, groups, gpu.sm_count, sms_left)


def attention_s(tables: CostTables, gpu: GpuSpec, fwd_flops: float, backward: bool, compute_frac: float = 1.0,
                seq_len: int = 4096) -> float:
    """Causal attention core (BF16) over ``seq_len`` keys: forward, or backward alone (fwd+bwd less fwd)."""
    peak = gpu.bf16_flops_per_s * compute_frac
    fwd_frac, fwd_bwd_frac = tables.attention_fracs(seq_len)
    fwd_s = fwd_flops / (peak * fwd_frac)
    if not backward:
        return fwd_s
    # never faster than its 2x-forward FLOPs at peak
    return max(3.0 * fwd_flops / (peak * fwd_bwd_frac) - fwd_s, 2.0 * fwd_flops / peak)


def memory_s(tables: CostTables, gpu: GpuSpec, nbytes: float, kernel: str | None = None, backward: bool = False,
             calls: float = 1.0) -> float:
    """``calls`` calls of a memory-bound kernel class ``kernel`` (``simulator.costs.elementwise``; None = unclassed)
    moving ``nbytes`` (their ideal bytes) through HBM: the class's forward or backward fixed seconds a call
    (``CostTables.memory_price``; 0 unless measured) plus the bytes at its fraction of the datasheet. A call is
    what the class's measurement timed (``orchestrator.calibration.memory_cases``): one layer's kernels of the
    class on one micro-batch; ``calls=0`` prices bytes alone (work inside another kernel, e.g. a GEMM's
    epilogue). No bytes, no call: 0."""
    if nbytes <= 0:
        return 0.0
    fracs, fixed_s = tables.memory_price(kernel)
    i = 1 if backward else 0
    return calls * fixed_s[i] + nbytes / (gpu.hbm_bytes_per_s * fracs[i])


def transfer_s(tables: CostTables, nbytes: float, bytes_per_s: float) -> float:
    """A point-to-point transfer or one collective step: latency plus bytes over bandwidth."""
    if nbytes <= 0:
        return 0.0
    return tables.collective_latency_s + nbytes / bytes_per_s


def ring_s(tables: CostTables, nbytes: float, group: int, bytes_per_s: float) -> float:
    """Reduce-scatter or all-gather of ``nbytes`` (the full buffer) over a ring of ``group`` GPUs."""
    if group <= 1 or nbytes <= 0:
        return 0.0
    return tables.collective_latency_s + (group - 1) / group * nbytes / bytes_per_s
