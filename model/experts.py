"""Routed experts: permute tokens by expert, two grouped matmuls, weight, un-permute.

Weights use the fused layout of transformers 5.x (``gate_up_proj`` (E, 2I, d) with the gate rows
first, ``down_proj`` (E, d, I)), i.e. per expert the ``nn.Linear`` orientation (out, in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeplan.kernels.moe_permute import make_pair_plan
from moeplan.kernels.fp8_gemm_ws import runs_on as gluon_runs_on
from moeplan.model.fp8 import Fp8Ops
from moeplan.model.fused_experts import FusedExpertsFn
from moeplan.model.fused import Fusable
from moeplan.model.grouped_linear import GroupedLinearFn
from moeplan.model.grouped_mm import grouped_mm_supported
from moeplan.model.weight_grad import ExpertWgradBatch, WeightGradStore


class PendingCounts:
    """Pairs per expert (E,) int64 on the device, and, where the FP8 paths need them on the host, a copy on its way
    there: a non-blocking copy into pinned memory and an event after it, issued when the routing is known, so the
    host waits only for the router's kernels, not for work launched after them (``MoE.forward`` launches the
    shared expert in between, which the GPU runs while the host waits and then launches the routed experts)."""

    def __init__(self, counts: torch.Tensor, to_host: bool) -> None:
        self.counts = counts
        self._host: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        if to_host and counts.is_cuda:
            self._host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            self._host.copy_(counts, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def host(self) -> list[int]:
        """The counts on the host: the layer's one planned wait (for the copy's event; on a CPU, none)."""
        if self._ready is None:
            return self.counts.tolist()
        self._ready.synchronize()
        return self._host.tolist()


class GroupedExperts(Fusable, nn.Module):
    """E SwiGLU experts of width I executed as grouped GEMMs over expert-sorted tokens.

    ``backend``: "grouped_mm" (``torch._grouped_mm``), "reference" (padded bmm), "fp8" (quantised
    operands through ``fp8``, an ``Fp8Ops``; ``fp8_backward`` runs the backward in FP8 too; FP8 ops with
    a contiguous-layout grouped GEMM, the kernels', run the fused path of ``model.fused_experts``), "auto"
    (grouped_mm for CUDA tensors when supported for the dtype/widths, reference otherwise).
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        inter_dim: int,
        dtype: torch.dtype,
        backend: str = "auto",
        fp8: Fp8Ops | None = None,
        fp8_backward: bool = False,
    ) -> None:
        super().__init__()
        # "auto" decides per call: torch._grouped_mm on CUDA; its CPU fallback is ~10x slower than
        # the padded bmm at test sizes, so CPU tensors take the reference path.
        self.grouped_mm_ok = grouped_mm_supported(dtype, dim, inter_dim, 2 * inter_dim)
        if backend == "grouped_mm" and not self.grouped_mm_ok:
            raise ValueError(f"expert_backend='grouped_mm' unsupported for dtype={dtype} dim={dim} "
                             f"moe_intermediate_size={inter_dim} (needs torch._grouped_mm and 16-byte rows)")
        if backend == "fp8" and fp8 is None:
            raise ValueError("expert_backend='fp8' needs FP8 ops (ModelOptions.fp8_kernel)")
        self.backend = backend
        self.num_experts = num_experts
        self.fp8 = fp8 if backend == "fp8" else None
        self.fp8_backward = fp8_backward  # False: high-precision (straight-through) backward
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter_dim, dim, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, inter_dim, dtype=dtype))
        self.weight_grad_store: WeightGradStore | None = None
        self.wgrad_batch: ExpertWgradBatch | None = None  # ``attach_expert_wgrad_batches``: FP8 Wgrads batched
        self.host_counts: bool | None = None  # None: by the device (``counts_on_host``)

    def fused_bf16(self, x: torch.Tensor) -> bool:
        """Whether the float experts run ``model.fused_experts``'s BF16 path: ``fuse`` is on (``fuse_memory_bound``)
        and ``x`` is on a GPU (as the other fused modules, ``model.fused.run``; on the CPU, tests call
        ``FusedExpertsFn`` itself under Triton's interpreter)."""
        return self.fuse and self.fp8 is None and self.backend != "reference" and x.is_cuda

    def _linear(self, a: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor,
                host_counts: list[int] | None) -> torch.Tensor:
        use_torch = self.backend == "grouped_mm" or (self.backend == "auto" and a.is_cuda and self.grouped_mm_ok)
        return GroupedLinearFn.apply(a, weight, offs, use_torch, self.weight_grad_store, self.fp8, self.fp8_backward,
                                     host_counts)

    def counts_on_host(self, device: torch.device) -> bool:
        """Whether the FP8 paths need the pairs per expert on the host (one wait a layer for the router's kernels).

        Not where the fused FP8 path runs the Gluon kernels (a Hopper GPU): its grouped GEMMs read each tile's
        expert (``m_indices``) and its weight gradients the segment bounds on the GPU, so the plan takes the
        worst-case padded size (``kernels.moe_permute.worst_case_rows``: E·127 rows more at most) and the host
        never waits for the GPU: it keeps launching ahead. Elsewhere the counts size the buffers exactly and let
        cuBLAS run per expert. ``host_counts`` (True / False) overrides the choice; None decides by the device."""
        if self.fp8 is None:
            return False
        if self.host_counts is not None:
            return self.host_counts
        return self.fp8.grouped_contiguous is None or not gluon_runs_on(device)

    def count(self, expert_of_pair: torch.Tensor) -> PendingCounts:
        """Pairs per expert, started towards the host where the FP8 paths will need them (``PendingCounts``)."""
        # (E,) pairs per expert; not torch.bincount, whose CUDA kernel reads the largest index on the host
        counts = expert_of_pair.new_zeros(self.num_experts).scatter_add_(
            0, expert_of_pair, torch.ones_like(expert_of_pair))
        return PendingCounts(counts, to_host=self.counts_on_host(expert_of_pair.device))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                pending: PendingCounts | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, d); indices, weights: (N, k); ``pending``: ``count(indices.reshape(-1))`` if already issued.
        Returns (out (N, d), tokens per expert (E,) int64)."""
        num_tokens, top_k = indices.shape
        token_of_pair = torch.arange(num_tokens * top_k, device=indices.device) // top_k  # (N*k,) pair j = token j // k
        return self.forward_pairs(x, token_of_pair, indices.reshape(-1), weights.reshape(-1), pending)

    def forward_pairs(self, x: torch.Tensor, token_of_pair: torch.Tensor, expert_of_pair: torch.Tensor,
                      weight_of_pair: torch.Tensor, pending: PendingCounts | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Any number of (row, expert, weight) pairs: x (N, d); the others (P,). Returns (out (N, d): each row's
        weighted sum over its pairs, pairs per expert (E,) int64). Expert parallelism calls it with the rows a
        GPU received, whose pair counts differ from row to row. ``pending``: ``count(expert_of_pair)``, issued
        earlier by the caller (else here)."""
        pending = pending if pending is not None else self.count(expert_of_pair)
        counts = pending.counts
        # The FP8 paths pad each expert's rows to 128 (contiguous layout). Where they need the row counts on
        # the host (``counts_on_host``), one planned host wait here gives them, so the six grouped GEMMs of the
        # layer never wait for the GPU; elsewhere the plan takes the worst-case padded size, and nothing waits.
        host_counts = pending.host() if self.counts_on_host(x.device) else None
        use_torch = x.is_cuda and self.grouped_mm_ok
        if self.fp8 is not None and self.fp8.grouped_contiguous is not None and expert_of_pair.numel():
            plan = make_pair_plan(token_of_pair, expert_of_pair, x.shape[0],
                                  host_counts if host_counts is not None else self.num_experts)
            out = FusedExpertsFn.apply(x, weight_of_pair, self.gate_up_proj, self.down_proj, plan, self.fp8,
                                       self.fp8_backward, self.weight_grad_store, host_counts, use_torch,
                                       self.wgrad_batch)
            return out, counts
        if self.fused_bf16(x) and expert_of_pair.numel():  # our kernels around the grouped GEMMs, no host sync
            plan = make_pair_plan(token_of_pair, expert_of_pair, x.shape[0], self.num_experts, align=1)
            out = FusedExpertsFn.apply(x, weight_of_pair, self.gate_up_proj, self.down_proj, plan, None, False,
                                       self.weight_grad_store, None, use_torch)
            return out, counts
        order = torch.argsort(expert_of_pair, stable=True)  # pairs sorted by expert
        offs = counts.cumsum(0).to(torch.int32)
        token_of = token_of_pair[order]  # (P,) source row of each sorted pair
        # FP8 rounds where the fused path does (model.fused_experts): the down projection quantises the FP32
        # SwiGLU product, its output is rounded to x's dtype, and pairs are summed in FP32 (their outputs
        # forward, a row's gradients backward).
        fp8 = self.fp8 is not None
        rows = (x.float() if fp8 else x)[token_of].to(x.dtype)  # (P, d) permuted copy
        gate, up = self._linear(rows, self.gate_up_proj, offs, host_counts).chunk(2, dim=-1)  # (P, I) each
        act = F.silu(gate.float()) * up.float() if fp8 else F.silu(gate) * up
        out_rows = self._linear(act, self.down_proj, offs, host_counts).to(x.dtype)  # (P, d)
        out = WeightedCombineFn.apply(out_rows, weight_of_pair[order], token_of, x.shape[0], fp8)  # un-permute
        return out.to(x.dtype), counts


class WeightedCombineFn(torch.autograd.Function):
    """Each row's weighted sum over its pairs: ``out[t] = sum over pairs p of t: rows[p] * w[p]``, the product in
    FP32, each pair rounded to the rows' dtype before the sum (BF16 sums, as the model always has) or summed in
    FP32 (``fp32_sum``, the FP8 path's rounding). Backward keeps only the rows in their own dtype, the weights
    and the pair order: autograd through ``rows.float() * w`` and ``index_add`` kept the FP32 product input and
    the weighted rows too (3x the rows' bytes; 1.4 GB a MoE layer at V3's width and 4,096 tokens); the
    gradients are the same ops in the same order."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, token_of: torch.Tensor, num_rows: int,
                fp32_sum: bool) -> torch.Tensor:
        weighted = rows.float() * weight[:, None]
        weighted = weighted if fp32_sum else weighted.to(rows.dtype)
        ctx.save_for_backward(rows, weight, token_of)
        return weighted.new_zeros(num_rows, rows.shape[-1]).index_add_(0, token_of, weighted)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, weight, token_of = ctx.saved_tensors
        grad = grad_out.index_select(0, token_of).float()  # (P, d): each pair's row of its token's gradient
        grad_rows = (grad * weight[:, None]).to(rows.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad * rows.float()).sum(1).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_rows, grad_weight, None, None, None


def benchmark(num_tokens: int = 4096, dim: int = 7168, inter: int = 2048, num_experts: int = 32, top_k: int = 8,
              fp8_backward: bool = True) -> dict[str, float]:
    """ms of one forward and backward of the routed experts on CUDA (V3's shapes by default; median of
    ``triton.testing.do_bench``): "fused" (this module), "unfused" (the same FP8 ops without the
    contiguous-layout GEMM: eager gather, separate quantisers, eager SwiGLU, scatter) and "bf16"
    (``torch._grouped_mm``); each also forward alone."""
    from dataclasses import replace

    from moeplan.kernels.triton_compat import triton
    from moeplan.model.fp8 import kernel_ops

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(num_tokens, dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    indices = torch.rand(num_tokens, num_experts, device="cuda", generator=g).topk(top_k, dim=-1).indices
    weights = torch.rand(num_tokens, top_k, device="cuda", generator=g).requires_grad_(True)
    dy = torch.randn(num_tokens, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    variants = {"fused": ("fp8", kernel_ops()), "unfused": ("fp8", replace(kernel_ops(), grouped_contiguous=None)),
                "bf16": ("grouped_mm", None)}
    results = {}
    for name, (backend, ops) in variants.items():
        experts = GroupedExperts(num_experts, dim, inter, torch.bfloat16, backend=backend, fp8=ops,
                                 fp8_backward=fp8_backward).cuda()
        with torch.no_grad():
            experts.gate_up_proj.normal_(0.0, dim ** -0.5, generator=g)
            experts.down_proj.normal_(0.0, inter ** -0.5, generator=g)

        def step(experts=experts) -> None:
            experts(x, indices, weights)[0].backward(dy)

        def forward(experts=experts) -> None:
            with torch.no_grad():
                experts(x, indices, weights)

        results[f"{name}_fwd_bwd_ms"] = triton.testing.do_bench(step, return_mode="median")
        results[f"{name}_fwd_ms"] = triton.testing.do_bench(forward, return_mode="median")
    return results
