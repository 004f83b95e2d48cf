"""The routed experts' FP8 Wgrads of several micro-batches run as one launch (``model.weight_grad.ExpertWgradBatch``):
each micro-batch's 128x1 operands written into its slot of a stash, one segment table a slot, the batch launched
when full and the rest by ``flush_expert_wgrads``. Against each micro-batch's Wgrad run alone: the same sums up to
FP32 summation order. On the CPU (the interpreter) with a reference launch in FP32; on a Hopper GPU with
``fp8_wgrad_ws`` itself."""

from __future__ import annotations

import itertools

import pytest
import torch

from moeplan.kernels.fp8_quant import dequant_rows
from moeplan.model.fp8 import kernel_ops
from moeplan.model.weight_grad import (
    ExpertWgradBatch,
    WeightGradStore,
    attach_expert_wgrad_batches,
    flush_expert_wgrads,
)
from tests.kernels import test_kernels
from tests.kernels.test_kernels import ON_GPU, rand, rel_err
from tests.model.test_fp8_experts import _experts, _ragged_pairs

device, poisoned = test_kernels.device, test_kernels.poisoned
SHAPE = (32, 7168, 2048, 4096) if ON_GPU else (4, 128, 128, 24)  # experts, d, I, tokens


def reference_wgrad(a_t, a_scale, b_t, b_scale, tables, out_dtype, accumulate_into):
    """``fp8_wgrad_ws`` with ``accumulate_into`` in FP32 on dequantised operands: for each table and expert e,
    C[e] += a_t[:, seg] b_t[:, seg]^T."""
    a, b = dequant_rows(a_t, a_scale).double(), dequant_rows(b_t, b_scale).double()
    for table in tables.view(-1, tables.shape[-1]).tolist():
        for e, (lo, hi) in enumerate(itertools.pairwise(table)):
            accumulate_into[e] += (a[:, lo:hi] @ b[:, lo:hi].t()).float()
    return accumulate_into


def _micro_batches(count: int, device: str):
    pairs = _ragged_pairs(SHAPE[3], SHAPE[0], device)
    x = [rand(SHAPE[3], SHAPE[1], seed=50 + i, device=device, dtype=torch.bfloat16) for i in range(count)]
    dy = [rand(SHAPE[3], SHAPE[1], seed=60 + i, device=device, dtype=torch.bfloat16) for i in range(count)]
    return pairs, x, dy


def _backward(experts, pairs, x0, dy, store=None):
    token_of_pair, expert_of_pair, weight0 = pairs
    x = x0.clone().requires_grad_(True)
    experts.weight_grad_store = store
    out, _ = experts.forward_pairs(x, token_of_pair, expert_of_pair, weight0.clone().requires_grad_(True))
    out.backward(dy)
    return x.grad


def _with_main_grads(experts):
    for p in (experts.gate_up_proj, experts.down_proj):
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    return experts


def _alone(count: int, device: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Each micro-batch's Wgrads run alone: their sums (FP32) and the input gradients."""
    E, d, inter, _ = SHAPE
    experts = _experts(kernel_ops(), True, E, d, inter, device)
    pairs, xs, dys = _micro_batches(count, device)
    sums = [torch.zeros(p.shape, device=device) for p in (experts.gate_up_proj, experts.down_proj)]
    grads = []
    if ON_GPU:  # the runtime's way: into FP32 main gradients in the GEMM's epilogue
        _with_main_grads(experts)
    for x, dy in zip(xs, dys):
        grads.append(_backward(experts, pairs, x, dy))
        if not ON_GPU:
            for total, p in zip(sums, (experts.gate_up_proj, experts.down_proj)):
                total += p.grad.float()
                p.grad = None
    if ON_GPU:
        sums = [experts.gate_up_proj.main_grad, experts.down_proj.main_grad]
    return *sums, grads


@pytest.mark.parametrize("size, count", [(2, 3), (3, 3), (4, 2)])
@pytest.mark.parametrize("deferred", [False, True], ids=["fused-IW", "W-step"])
def test_batched_expert_wgrads_sum_what_each_micro_batch_gives(device, size, count, deferred):
    """``count`` micro-batches through a batch of ``size``: nothing reaches ``.grad``; the main gradients hold the
    whole batches after the backwards and everything after ``flush_expert_wgrads``, equal to the micro-batches'
    Wgrads run alone; the input gradients are the same bits (the batch changes only where the Wgrads' operands
    go); the slots come back free."""
    E, d, inter, _ = SHAPE
    want_gate_up, want_down, want_dx = _alone(count, device)
    experts = _with_main_grads(_experts(kernel_ops(), True, E, d, inter, device))
    assert attach_expert_wgrad_batches(experts, size, None if ON_GPU else reference_wgrad) == 1
    batch = experts.wgrad_batch
    pairs, xs, dys = _micro_batches(count, device)
    for i, (x, dy) in enumerate(zip(xs, dys)):
        store = WeightGradStore() if deferred else None
        dx = _backward(experts, pairs, x, dy, store)
        if store is not None:
            assert store.flush() == 2
        assert torch.equal(dx, want_dx[i]) and experts.gate_up_proj.grad is None and experts.down_proj.grad is None
    full = count // size
    assert batch.launches == 2 * full
    if full == 0:
        assert not experts.gate_up_proj.main_grad.any()  # nothing runs before the batch is full or flushed
    assert flush_expert_wgrads(experts) == (2 if count % size else 0)
    assert sorted(batch._free) == list(range(size)) and not batch._reserved
    tol = 1e-5 if ON_GPU else 1e-2  # the CPU's unbatched sums are of BF16 gradients
    assert rel_err(experts.gate_up_proj.main_grad, want_gate_up) < tol
    assert rel_err(experts.down_proj.main_grad, want_down) < tol
    assert flush_expert_wgrads(experts) == 0


def test_a_micro_batch_without_main_gradients_runs_alone_and_a_skipped_w_step_is_refused(device):
    """No FP32 main gradients: no slot, the Wgrads return gradients as without a batch. A W step never run: the
    flush names the slot instead of launching with missing operands."""
    E, d, inter, _ = SHAPE
    experts = _experts(kernel_ops(), True, E, d, inter, device)
    attach_expert_wgrad_batches(experts, 2, None if ON_GPU else reference_wgrad)
    pairs, xs, dys = _micro_batches(1, device)
    _backward(experts, pairs, xs[0], dys[0])
    assert experts.gate_up_proj.grad is not None and experts.wgrad_batch.launches == 0
    _with_main_grads(experts)
    experts.gate_up_proj.grad = experts.down_proj.grad = None
    _backward(experts, pairs, xs[0], dys[0], WeightGradStore())  # its W step never flushed
    with pytest.raises(RuntimeError, match=r"slots \[0\] were reserved"):
        flush_expert_wgrads(experts)


def test_batch_sizes_outside_the_segment_tables_are_refused():
    for size in (1, 5):
        with pytest.raises(ValueError, match=f"expert_wgrad_batch={size} must be 2..4"):
            ExpertWgradBatch(size)


def test_the_plans_batch_bound_is_the_kernels():
    from moeplan.kernels.fp8_gemm_ws import MAX_SEGMENTS
    from moeplan.simulator.spec.training import MAX_EXPERT_WGRAD_BATCH

    assert MAX_EXPERT_WGRAD_BATCH == MAX_SEGMENTS
