"""Backward-for-weights (W) deferred from backward-for-input (I), for zero-bubble pipeline schedules.

How the split works (ZB-H1 / DualPipe style, as in DeepSeek's ``WeightGradStore``):
- every large matmul of the model (``model.linear.Linear`` and the routed-expert grouped matmuls)
  runs through an autograd function that, in backward, always computes the input gradient and,
  when a ``WeightGradStore`` is attached, *queues* the weight-gradient matmul instead of running it;
- so ``loss.backward()`` (or ``torch.autograd.backward(stage_out, grad)``) is the **I** step: it
  produces the gradient for the previous stage and fills the queue; ``store.flush()`` later is the
  **W** step: it runs the queued matmuls and accumulates into ``param.grad``, or in FP32 into
  ``param.main_grad`` where the runtime attached one (``model.runtime.main_grad``);
- small parameters (norm scales, router weights, embedding, attention biases) get their gradients
  in the I step; they are a negligible share of the FLOPs.

The store is an explicit object owned by the caller (one per stage and micro-batch in flight),
attached with ``attach_weight_grad_store(module, store)``; nothing is global.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from moeplan.kernels.fp8_gemm_ws import MAX_SEGMENTS, fp8_gemm_ws, fp8_wgrad_ws, runs_on
from moeplan.kernels.fp8_quant import FP8_DTYPE, TILE


class WeightGradStore:
    """A FIFO of deferred weight-gradient computations."""

    def __init__(self) -> None:
        self._pending: list[Callable[[], None]] = []

    def defer(self, fn: Callable[[], None]) -> None:
        self._pending.append(fn)

    def flush(self) -> int:
        """Run every queued weight-gradient matmul (the W step); returns how many ran."""
        count = len(self._pending)
        with torch.no_grad():  # the W matmuls need no autograd graph
            for fn in self._pending:
                fn()
        self._pending.clear()
        return count

    def __len__(self) -> int:
        return len(self._pending)


@torch.no_grad()
def wgrad_dtype(param: torch.Tensor) -> torch.dtype:
    """What an FP8 weight-gradient GEMM writes for ``param``: its own dtype. The GEMM accumulates in FP32
    and rounds once on the way out, the same number as an FP32 output cast to the parameter's dtype, without
    writing and reading the FP32 copy (14.6 ms of casts in a 248 ms FP8 step on an H100, 2026-12-06);
    micro-batches then sum in the runtime's FP32 main gradients (``model.runtime.main_grad``)."""
    return param.dtype


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """param.main_grad += grad in FP32 where the runtime attached one (``model.runtime.main_grad``), else
    param.grad += grad in the parameter dtype, creating it on first use (what autograd's AccumulateGrad does)."""
    main_grad = getattr(param, "main_grad", None)
    if main_grad is not None:
        main_grad.add_(grad.view_as(main_grad))
        return
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


def weight_grad_now_or_later(
    store: WeightGradStore | None, param: torch.Tensor, weight_grad: Callable[[], torch.Tensor | None]
) -> torch.Tensor | None:
    """What a backward returns for ``param``: ``weight_grad()`` now (no store: fused I+W; autograd needs the
    parameter dtype), or None after queueing it on ``store``, whose flush accumulates it (the W step) as it
    comes (an FP32 Wgrad stays FP32 on its way into ``main_grad``). A ``weight_grad`` that returns None has
    accumulated into ``param.main_grad`` itself (``fused_main_grad_mm``)."""
    if store is None:
        grad = weight_grad()
        return None if grad is None else grad.to(param.dtype)

    def later() -> None:
        grad = weight_grad()
        if grad is not None:
            accumulate_grad(param, grad)

    store.defer(later)
    return None


@functools.cache
def _addmm_out_dtype_works(device: torch.device) -> bool:
    """Whether this torch and device run ``torch.addmm`` on BF16 matrices into an FP32 matrix (``out_dtype``,
    CUDA, torch >= 2.8), checked once per device against the unfused sum on a small case."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a, b = (torch.randn(64, 64, device=device, generator=g).bfloat16() for _ in range(2))
        acc = torch.randn(64, 64, device=device, generator=g)
        want = acc + a.float() @ b.float()
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return bool(torch.allclose(acc, want, rtol=1e-4, atol=1e-3))


def fused_main_grad_mm(param: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """``param.main_grad += a @ b`` inside the GEMM (FP32 accumulation, beta = 1: Megatron's gradient-accumulation
    fusion) when ``param`` has a main gradient and the device can; True when done. Otherwise the caller makes the
    gradient in the parameter's dtype and the main-grad hook adds it: a BF16 write, then a read of it and a read and
    write of the FP32 sum, 12 B a parameter for every micro-batch (~40 ms of a 0.68 s one-GPU V3 stage step)."""
    main_grad = getattr(param, "main_grad", None)
    if main_grad is None or not a.is_cuda or a.dtype != torch.bfloat16 or not _addmm_out_dtype_works(a.device):
        return False
    torch.addmm(main_grad, a, b, out_dtype=torch.float32, out=main_grad)
    return True


def fused_main_grad_grouped_mm(param: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                               bounds: Sequence[int]) -> bool:
    """``param.main_grad[e] += g[rows of e]^T @ x[rows of e]`` for each expert e of a grouped weight (E, N, K),
    one cuBLAS GEMM an expert with FP32 accumulation into the main gradient (beta = 1), the experts' rows given
    on the host by ``bounds`` (E + 1 offsets); True when done, under ``fused_main_grad_mm``'s conditions.
    ``torch._grouped_mm`` has no accumulating form: its BF16 weight gradient cost the main-grad hook 12 B a
    parameter every micro-batch (24 ms of a 0.60 s one-GPU V3 stage step, measured on an H100, 2026-12-06)."""
    main_grad = getattr(param, "main_grad", None)
    if main_grad is None or not g.is_cuda or g.dtype != torch.bfloat16 or not _addmm_out_dtype_works(g.device):
        return False
    for e, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if hi > lo:
            torch.addmm(main_grad[e], g[lo:hi].t(), x[lo:hi], out_dtype=torch.float32, out=main_grad[e])
    return True


def fused_main_grad_fp8(param: torch.Tensor, a_t: torch.Tensor, a_t_scale: torch.Tensor, b_t: torch.Tensor,
                        b_t_scale: torch.Tensor, seg_offsets: torch.Tensor | None = None) -> bool:
    """``param.main_grad += (a_t·s)(b_t·s)^T``, the FP8 weight gradient added into the FP32 main gradient in the
    epilogue of the Gluon GEMM (``kernels.fp8_gemm_ws``: the old values read once, the sum written once), where
    ``param`` has a main gradient and the kernels run on the device; True when done. a_t (N, M) and b_t (K, M) are
    E4M3 in 128x1 tiles along the M tokens (``quant_act_128x1_t``). With ``seg_offsets`` (int32 (E + 1,) on the
    GPU) ``param`` is a grouped weight (E, N, K) and each expert's segment of M makes its own slice
    (``fp8_wgrad_ws``). Otherwise the caller writes the gradient in the parameter's dtype and the main-grad hook
    adds it: 2 B written, then 2 B read and 8 B read and written a parameter, every micro-batch, against 8 B here."""
    main_grad = getattr(param, "main_grad", None)
    if (main_grad is None or not runs_on(a_t.device) or main_grad.dtype != torch.float32
            or not main_grad.is_contiguous() or main_grad.data_ptr() % 16 or (main_grad.shape[-1] * 4) % 16
            or a_t.stride(-1) != 1 or b_t.stride(-1) != 1 or a_t.shape[1] % 16):
        return False
    if seg_offsets is None:
        fp8_gemm_ws(a_t, a_t_scale, b_t, b_t_scale, torch.float32, accumulate_into=main_grad)
    elif a_t.shape[0] % 128 == 0 and seg_offsets.is_cuda:
        fp8_wgrad_ws(a_t, a_t_scale, b_t, b_t_scale, seg_offsets, torch.float32, accumulate_into=main_grad)
    else:
        return False
    return True


# The two routed-expert weights of a layer, and the operands of each one's Wgrad: dW = g^T x over the tokens,
# g the weight's output gradient (a_t: its features by tokens) and x its input (b_t).
EXPERT_WGRADS = {"gate_up": ("gate_up_g", "gate_up_x"), "down": ("down_g", "down_x")}


class ExpertWgradBatch:
    """The routed experts' FP8 weight gradients of ``size`` micro-batches' backwards run as one K-grouped launch a
    weight, so that each expert's FP32 main gradient is read and written once for all of them instead of once a
    micro-batch (``kernels.fp8_gemm_ws.fp8_wgrad_ws`` with one segment table a micro-batch).

    A micro-batch's backward ``reserve``s a slot: the 128x1 FP8 operands of its two Wgrads are written straight
    into its columns of four stash buffers (the quantisers' ``out=``), and its plan's segment bounds, moved to the
    slot's first column, into its row of the tables. When a Wgrad runs (in backward, or in the W step of a split
    backward) it ``commit``s the slot; once ``size`` slots of a weight are committed they run as one launch into
    its main gradient. ``flush()`` runs what is left: the runtime calls it at the end of every step
    (``flush_expert_wgrads``), before the gradients are read; until then they hold only whole batches.

    What it costs: the stash, ``size`` slots of the FP8 operands (3 I + 2 d bytes and 1/32 of that in scales a
    row of the contiguous layout, a layer), from the step's first backward to the flush, against one
    micro-batch's for as long as its backward runs. Where a micro-batch cannot have a slot (its weights have no
    FP32 main gradients, the kernels do not run on the device, or every slot is taken) its Wgrads run alone, as
    without a batch.

    ``wgrad``: the launch, ``fp8_wgrad_ws``'s signature (tests give a reference); None: ``fp8_wgrad_ws`` where it
    runs (``kernels.fp8_gemm_ws.runs_on``)."""

    def __init__(self, size: int, wgrad: Callable[..., torch.Tensor] | None = None) -> None:
        if not 2 <= size <= MAX_SEGMENTS:
            raise ValueError(f"expert_wgrad_batch={size} must be 2..{MAX_SEGMENTS} (segment tables one launch "
                             f"takes, kernels.fp8_gemm_ws.MAX_SEGMENTS); 1 is no batch")
        self.size, self._wgrad = size, wgrad
        self._cap = 0  # rows a slot
        self._stash: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # operand -> (values, scales)
        self._tables: torch.Tensor | None = None  # (size, E + 1) int32
        self._free = list(range(size))
        self._reserved: dict[int, set[str]] = {}  # slot -> weights whose Wgrad has not committed it
        self._committed: dict[str, list[int]] = {name: [] for name in EXPERT_WGRADS}
        self._params: dict[str, torch.Tensor] = {}
        self.launches = 0

    def reserve(self, seg_offsets: torch.Tensor, rows: int, params: dict[str, torch.Tensor]) -> int | None:
        """A slot for a micro-batch of ``rows`` rows in the contiguous layout and segment bounds ``seg_offsets``
        ((E + 1,) int32 on the device), whose weights ``params`` (``EXPERT_WGRADS``' names) will commit it; None
        where it cannot batch (its Wgrads then run alone)."""
        if set(params) != set(EXPERT_WGRADS) or not self._free or not all(_batchable(p, self._wgrad) for p in
                                                                          params.values()):
            return None
        if rows > self._cap or self._tables is None or self._tables.shape[1] != seg_offsets.numel():
            if len(self._free) < self.size:  # slots in use: the stash cannot grow under them
                return None
            self._cap = -(-rows // TILE) * TILE
            self._stash.clear()
            self._tables = torch.empty((self.size, seg_offsets.numel()), dtype=torch.int32, device=seg_offsets.device)
        slot = self._free.pop(0)
        torch.add(seg_offsets, slot * self._cap, out=self._tables[slot])
        self._reserved[slot] = set(EXPERT_WGRADS)
        self._params.update(params)
        return slot

    def out(self, operand: str, slot: int, features: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ``slot``'s columns of ``operand``'s stash: (E4M3 (features, rows), fp32 scales (features,
        ceil(rows/128)), unit stride along the tokens), what a quantiser's ``out=`` takes."""
        values, scales = self._stash.get(operand) or self._allocate(operand, features)
        first = slot * self._cap
        return values[:, first: first + rows], scales[:, first // TILE: first // TILE + -(-rows // TILE)]

    def _allocate(self, operand: str, features: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self._tables.device
        width = self.size * self._cap
        pair = (torch.empty((features, width), dtype=FP8_DTYPE, device=device),
                torch.empty((features, width // TILE), dtype=torch.float32, device=device))
        self._stash[operand] = pair
        return pair

    def commit(self, name: str, slot: int) -> None:
        """Weight ``name``'s Wgrad operands of ``slot`` are written; ``size`` committed slots run as one launch."""
        self._reserved[slot].remove(name)
        self._committed[name].append(slot)
        if len(self._committed[name]) == self.size:
            self._launch(name)

    def flush(self) -> int:
        """Run every committed Wgrad not yet run (fewer than ``size`` micro-batches'); returns the launches."""
        pending = sorted(s for s, names in self._reserved.items() if names)
        if pending:
            raise RuntimeError(f"expert Wgrad slots {pending} were reserved but their Wgrads never ran: flush the "
                               f"WeightGradStore (the W step) before the batch")
        before = self.launches
        for name in EXPERT_WGRADS:
            if self._committed[name]:
                self._launch(name)
        self._stash.clear()  # made again by the next step's first backward: the stash lives within a step
        return self.launches - before

    def _launch(self, name: str) -> None:
        slots, self._committed[name] = self._committed[name], []
        (g, g_scale), (x, x_scale) = (self._stash[o] for o in EXPERT_WGRADS[name])
        tables = self._tables[slots] if slots != list(range(self.size)) else self._tables
        wgrad = self._wgrad or fp8_wgrad_ws
        with torch.no_grad():
            wgrad(g, g_scale, x, x_scale, tables, torch.float32, accumulate_into=self._params[name].main_grad)
        self.launches += 1
        for slot in slots:
            if not self._reserved[slot] and all(slot not in c for c in self._committed.values()):
                del self._reserved[slot]
                self._free.append(slot)
        self._free.sort()


def _batchable(param: torch.Tensor, wgrad: Callable | None) -> bool:
    """Whether ``param``'s expert Wgrads can batch: an FP32 main gradient the launch can add into, on a device the
    kernels run on (any, with a given ``wgrad``)."""
    main_grad = getattr(param, "main_grad", None)
    return (main_grad is not None and main_grad.dtype == torch.float32 and main_grad.is_contiguous()
            and (wgrad is not None or runs_on(param.device)))


def attach_expert_wgrad_batches(module: nn.Module, size: int, wgrad: Callable[..., torch.Tensor] | None = None
                                ) -> int:
    """Give every routed-experts module under ``module`` (those with a ``wgrad_batch`` attribute) its own
    ``ExpertWgradBatch(size)``; ``size`` 1 removes them. Returns how many modules now batch."""
    count = 0
    for sub in module.modules():
        if hasattr(sub, "wgrad_batch"):
            sub.wgrad_batch = ExpertWgradBatch(size, wgrad) if size > 1 else None
            count += size > 1
    return count


def flush_expert_wgrads(module: nn.Module) -> int:
    """Run the batched expert Wgrads still pending under ``module`` (``ExpertWgradBatch.flush``): at the end of a
    step's backward, before the main gradients are reduced or read. Returns the launches."""
    return sum(sub.wgrad_batch.flush() for sub in module.modules() if getattr(sub, "wgrad_batch", None) is not None)


def attach_weight_grad_store(module: nn.Module, store: WeightGradStore | None) -> int:
    """Point every deferrable matmul under ``module`` at ``store`` (None = back to fused I+W).

    Returns the number of modules that now defer.
    """
    count = 0
    for sub in module.modules():
        if hasattr(sub, "weight_grad_store"):
            sub.weight_grad_store = store
            count += 1
    return count
