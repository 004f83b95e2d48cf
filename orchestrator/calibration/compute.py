"""Compute and memory measurements of one process, for ``moeplan calibrate`` and benchmarks/cpu_tables.py.

Everything runs in the calling process on ``device`` (the CPU by default, at ``torch.set_num_threads`` as the
caller set it: the runtime's ranks run one thread each; or a CUDA GPU, timed by CUDA events). A time is the median of ``reps`` wall-clock calls after ``warmup``
(``timing.median_s``).

- GEMMs: every shape the simulator prices for a model (``gemm_shapes``: the linears of
  ``engine.unit_costs`` in their forward, input-gradient and weight-gradient forms at each token count,
  and the routed experts' grouped products at each expert-parallel size), ``torch.mm`` for dense ones
  and, for grouped ones, what the model's experts run on a CPU (``model/experts.py``'s "auto" takes
  ``torch._grouped_mm`` on CUDA only): the padded ``bmm`` of ``model.grouped_mm.reference_grouped_mm``,
  here with equal rows per group (no padding); plus a square ``PEAK_N``-sized GEMM for the peak.
- Attention: causal ``F.scaled_dot_product_attention`` with the model's head dims at each sequence
  length (one sequence), forward and forward + backward, FLOPs as ``attention_core_flops``.
- Memory: ``Tensor.copy_`` of 16 KiB to 64 MiB buffers (bytes read + written).
- Optimizer: torch's AdamW over one flat FP32 shard of half the model's parameters (MTP included: a
  rank's share at pp 2, as the runtime's ZeRO-1 steps its master shard), at the simulator's ideal bytes
  (``engine.build.OPTIMIZER_BYTES_PER_PARAM`` per parameter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeplan.model.grouped_mm import reference_grouped_mm
from moeplan.orchestrator.calibration.timing import median_s
from moeplan.simulator.accounting.flops import attention_core_flops
from moeplan.simulator.accounting.params import param_counts
from moeplan.simulator.costs.elementwise import OPTIMIZER
from moeplan.simulator.engine.build import OPTIMIZER_BYTES_PER_PARAM
from moeplan.simulator.engine.unit_costs import attention_shapes
from moeplan.simulator.spec.model import ModelSpec

CPU = torch.device("cpu")
PEAK_N = 512
COPY_SIZES = tuple(2**p for p in range(14, 27, 2))  # 16 KiB .. 64 MiB


def _linears(m: ModelSpec) -> list[tuple[int, int]]:
    """Every dense linear ``(in, out)`` the simulator prices (``engine.unit_costs``)."""
    attn, up = attention_shapes(m)
    h, shared = m.hidden_size, m.moe_intermediate_size * m.n_shared_experts
    out = attn + up + [(2 * h, h), (h, 2 * m.intermediate_size), (m.intermediate_size, h), (h, m.vocab_size)]
    if m.is_moe:
        out += [(h, m.n_routed_experts)] + ([(h, 2 * shared), (shared, h)] if shared else [])
    return out


def gemm_shapes(m: ModelSpec, tokens: list[int], eps: list[int]) -> list[tuple[int, int, int, int]]:
    """(m, n, k, groups) of every GEMM the simulator prices for ``m`` at these token counts and EP sizes."""
    shapes = set()
    for t in tokens:
        for i, o in _linears(m):
            shapes |= {(t, o, i, 1), (t, i, o, 1), (o, i, t, 1)}  # forward, input and weight gradient
        if not m.is_moe:
            continue
        h, f = m.hidden_size, m.moe_intermediate_size
        for ep in eps:
            groups = m.n_routed_experts // ep
            uniform = max(1, round(t * m.num_experts_per_tok / m.n_routed_experts))
            for per in sorted({uniform, 2 * uniform}):  # uniform routing, and a busiest expert at twice it
                shapes |= {(per, 2 * f, h, groups), (per, h, f, groups), (per, h, 2 * f, groups),
                           (per, f, h, groups), (2 * f, h, per, groups), (h, f, per, groups)}
    return sorted(shapes)


def gemm_s(m: int, n: int, k: int, groups: int, dtype: torch.dtype, reps: int, device: torch.device = CPU) -> float:
    """Median seconds of ``groups`` products (m x k)(k x n) in ``dtype`` (grouped: ``torch._grouped_mm`` on
    CUDA, the padded ``bmm`` reference elsewhere, as ``model/experts.py``'s "auto" chooses)."""
    gen = torch.Generator().manual_seed(0)
    if groups == 1:
        a, b = (torch.randn(m, k, generator=gen).to(device, dtype), torch.randn(k, n, generator=gen).to(device, dtype))
        return median_s(lambda: torch.mm(a, b), device, reps)
    a = torch.randn(groups * m, k, generator=gen).to(device, dtype)
    b = torch.randn(groups, k, n, generator=gen).to(device, dtype)
    offs = (torch.arange(1, groups + 1, dtype=torch.int32) * m).to(device)
    grouped = torch._grouped_mm if device.type == "cuda" and hasattr(torch, "_grouped_mm") else reference_grouped_mm
    return median_s(lambda: grouped(a, b, offs=offs), device, reps)


def gemm_rows(shapes: list[tuple[int, int, int, int]], dtype: torch.dtype, reps: int,
              device: torch.device = CPU) -> list[dict]:
    rows = []
    for m, n, k, g in shapes:
        s = gemm_s(m, n, k, g, dtype, reps, device)
        rows.append({"m": m, "n": n, "k": k, "groups": g, "s": s, "flops_per_s": 2.0 * g * m * n * k / s})
    return rows


def peak_gemm_row(dtype: torch.dtype, reps: int) -> dict:
    """A square ``PEAK_N`` GEMM: the throughput a large product reaches on one thread."""
    return gemm_rows([(PEAK_N, PEAK_N, PEAK_N, 1)], dtype, reps)[0]


def attention_rows(m: ModelSpec, seqs: list[int], dtype: torch.dtype, reps: int,
                   device: torch.device = CPU) -> list[dict]:
    """Causal SDPA over one sequence of each length: seconds and FLOPs (forward; forward + backward as 3x)."""
    heads, dq, dv = m.num_attention_heads, m.qk_head_dim, m.v_head_dim if m.is_mla else m.gqa_head_dim
    gen = torch.Generator().manual_seed(0)
    rows = []
    for seq in seqs:
        q, k = (torch.randn(1, heads, seq, dq, generator=gen).to(device, dtype).requires_grad_() for _ in range(2))
        v = torch.randn(1, heads, seq, dv, generator=gen).to(device, dtype).requires_grad_()
        grad = torch.randn(1, heads, seq, dv, generator=gen).to(device, dtype)

        def fwd(q=q, k=k, v=v) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwd_bwd(q=q, k=k, v=v, grad=grad) -> None:
            torch.autograd.backward(fwd(q, k, v), grad)
            q.grad = k.grad = v.grad = None

        with torch.no_grad():
            fwd_s = median_s(fwd, device, reps)
        flops = attention_core_flops(m, seq) * seq
        rows.append({"seq": seq, "flops": flops, "fwd_s": fwd_s, "fwd_bwd_s": median_s(fwd_bwd, device, reps)})
    return rows


def copy_rows(reps: int, sizes: tuple[int, ...] = COPY_SIZES, device: torch.device = CPU) -> list[dict]:
    """``dst.copy_(src)`` of each size: bytes read + written per second."""
    rows = []
    for size in sizes:
        src, dst = torch.ones(size // 4, device=device), torch.empty(size // 4, device=device)
        s = median_s(lambda src=src, dst=dst: dst.copy_(src), device, reps)
        rows.append({"bytes": size, "s": s, "bytes_per_s": 2.0 * size / s})
    return rows


def optimizer_row(m: ModelSpec, reps: int, peak_bytes_per_s: float) -> dict:
    """The optimizer class as an ``elementwise_bench`` row: AdamW over one flat FP32 shard (see above)."""
    c = param_counts(m)
    params = c.total_with_mtp // 2
    shard = torch.zeros(params, requires_grad=True)
    shard.grad = torch.randn(params, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([shard], lr=1e-4)
    s, nbytes = median_s(opt.step, CPU, reps), OPTIMIZER_BYTES_PER_PARAM * params
    return {"kernel": OPTIMIZER, "implementation": "torch.optim.AdamW over one flat FP32 shard", "in_table": True,
            "shape": f"{params:,} parameters", "skipped": None, "bwd": None,
            "fwd": {"bytes": nbytes, "s": s, "bytes_per_s": nbytes / s, "hbm_frac": nbytes / s / peak_bytes_per_s}}
