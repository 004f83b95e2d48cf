"""The routed experts' fused BF16 path (``model.fused_experts`` with no FP8 ops: our permute, SwiGLU and combine
kernels around the grouped GEMMs) against the op-by-op BF16 path of ``model.experts``, forward and backward.

The two round differently only where the fused path is more exact: it sums each token's pairs in FP32 and
rounds once, where the op-by-op path rounds every weighted pair to BF16 and sums in BF16. Tiny shapes on the
interpreter (the fused function called itself: on the CPU ``GroupedExperts`` keeps the op-by-op path); V3's
expert shapes on a GPU, through ``GroupedExperts`` with ``fuse`` on.
"""

from __future__ import annotations

import pytest
import torch

from moeplan.kernels.moe_permute import make_pair_plan
from moeplan.model.experts import GroupedExperts
from moeplan.model.fused_experts import FusedExpertsFn
from moeplan.model.weight_grad import WeightGradStore
from tests.kernels import test_kernels
from tests.kernels.test_kernels import ON_GPU, rand, rel_err
from tests.model.test_fp8_experts import layer_without_host_sync

device, poisoned = test_kernels.device, test_kernels.poisoned

# Measured on the interpreter: <= 4.2e-3 (the op-by-op path's BF16 sums); a misplaced rounding or a wrong row is O(1).
TOL = 1e-2


def _experts(num_experts: int, dim: int, inter: int, device: str, fuse: bool) -> GroupedExperts:
    experts = GroupedExperts(num_experts, dim, inter, torch.bfloat16).to(device)
    experts.fuse = fuse
    with torch.no_grad():
        experts.gate_up_proj.copy_(rand(num_experts, 2 * inter, dim, seed=41, device=device, scale=dim ** -0.5))
        experts.down_proj.copy_(rand(num_experts, dim, inter, seed=42, device=device, scale=inter ** -0.5))
    return experts


def _pairs(num_tokens: int, device: str):
    """0 to 3 pairs per row, in no particular order, expert 1 of 4 unused (as expert parallelism receives them)."""
    g = torch.Generator().manual_seed(43)
    per_row = torch.randint(0, 4, (num_tokens,), generator=g)
    token = torch.arange(num_tokens).repeat_interleave(per_row)
    token = token[torch.randperm(token.numel(), generator=g)]
    expert = torch.tensor([0, 2, 3])[torch.randint(0, 3, (token.numel(),), generator=g)]
    return token.to(device), expert.to(device), torch.rand(token.numel(), generator=g).to(device)


def _run(experts: GroupedExperts, x0, pairs, dy, fused_directly: bool, store: WeightGradStore | None = None):
    token, expert, weight0 = pairs
    x, weight = x0.clone().requires_grad_(True), weight0.clone().requires_grad_(True)
    experts.weight_grad_store = store
    if fused_directly:
        plan = make_pair_plan(token, expert, x.shape[0], experts.num_experts, align=1)
        out = FusedExpertsFn.apply(x, weight, experts.gate_up_proj, experts.down_proj, plan, None, False, store,
                                   None, x.is_cuda)
    else:
        out, _ = experts.forward_pairs(x, token, expert, weight)
    out.backward(dy)
    if store is not None:
        assert experts.gate_up_proj.grad is None and store.flush() == 2  # both Wgrads were deferred
    return out.grad_fn, (out, x.grad, weight.grad, experts.gate_up_proj.grad, experts.down_proj.grad)


@pytest.mark.parametrize("deferred", [False, True])
def test_fused_bf16_experts_equal_the_op_by_op_path(device, deferred):
    E, d, inter, n = (4, 64, 32, 24) if not ON_GPU else (32, 7168, 2048, 4096)
    pairs = _pairs(n, device)
    x0 = rand(n, d, seed=44, device=device, dtype=torch.bfloat16)
    dy = rand(n, d, seed=45, device=device, dtype=torch.bfloat16)
    fn, fused = _run(_experts(E, d, inter, device, fuse=True), x0, pairs, dy, fused_directly=not ON_GPU,
                     store=WeightGradStore() if deferred else None)
    assert type(fn).__name__ == "FusedExpertsFnBackward"
    _, ref = _run(_experts(E, d, inter, device, fuse=False), x0, pairs, dy, fused_directly=False)
    for name, got, want in zip(("out", "dx", "dweight", "dgate_up", "ddown"), fused, ref):
        assert rel_err(got, want) < TOL, name
    rows_without_pairs = torch.bincount(pairs[0], minlength=n) == 0
    assert rows_without_pairs.any() and not fused[0][rows_without_pairs].any()
    assert not fused[3][1].any() and not fused[4][1].any()  # the unused expert gets a zero gradient


def test_a_plan_without_host_counts_needs_no_padding() -> None:
    token = torch.tensor([0, 1, 1, 2])
    expert = torch.tensor([2, 0, 2, 0])
    plan = make_pair_plan(token, expert, 3, 3, align=1)
    assert plan.seg_offsets.tolist() == [0, 2, 2, 4] and plan.num_rows == 4
    assert sorted(plan.src_token.tolist()) == [0, 1, 1, 2]  # every row a pair, none padding
    # padded to 128 without the counts: the worst case's rows (4 pairs + 3 x 127, in whole tiles), each
    # segment padded where it starts, the rows after the last one padding too
    plan = make_pair_plan(token, expert, 3, 3)
    assert plan.num_rows == 384 and plan.seg_offsets.tolist() == [0, 128, 128, 256]
    assert plan.m_indices[:2].tolist() == [0, 0] and plan.m_indices[128:130].tolist() == [2, 2]
    assert (plan.m_indices[256:] == -1).all() and (plan.src_token[256:] == -1).all()


def test_worst_case_rows_bound_every_padded_layout_and_reach_it() -> None:
    from moeplan.kernels.moe_permute import worst_case_rows

    g = torch.Generator().manual_seed(5)
    for align in (1, 2, 128):
        for _ in range(50):
            experts = int(torch.randint(1, 40, (1,), generator=g))
            counts = torch.randint(0, 300, (experts,), generator=g)
            padded = int(((counts + align - 1) // align * align).sum())
            assert max(padded, align) <= worst_case_rows(int(counts.sum()), experts, align)
        # reached: every expert one row past a whole tile
        assert worst_case_rows(7 * (align + 1), 7, align) == 7 * 2 * align
    assert worst_case_rows(0, 32, 128) == 31 * 128 and worst_case_rows(0, 1, 128) == 128


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("main_grads", [False, True])
def test_fused_bf16_experts_never_wait_for_the_gpu(main_grads):
    """At V3's expert shapes the whole layer, forward and backward, runs under ``set_sync_debug_mode("error")``,
    also when the weight gradients accumulate expert by expert into FP32 main gradients (their bounds reach the
    host by a copy the forward starts)."""
    E, d, inter, n, k = 32, 7168, 2048, 4096, 8
    experts = _experts(E, d, inter, "cuda", fuse=True)
    if main_grads:
        for p in (experts.gate_up_proj, experts.down_proj):
            p.main_grad = torch.zeros(p.shape, device="cuda")
    x = layer_without_host_sync(experts, n, d, k, seed=46)
    grad = experts.down_proj.main_grad if main_grads else experts.down_proj.grad
    assert torch.isfinite(x.grad).all() and torch.isfinite(grad).all() and grad.any()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("deferred", [False, True])
def test_weight_gradients_accumulate_into_fp32_main_gradients(deferred):
    """With the runtime's FP32 main gradients, each expert's weight gradient is added into them by its GEMM
    (``fused_main_grad_grouped_mm``), micro-batch after micro-batch: the sum of the op-by-op path's gradients,
    and no BF16 ``.grad`` left behind (deferred to the W step too)."""
    E, d, inter, n = 4, 1024, 512, 2048
    fused, ref = _experts(E, d, inter, "cuda", fuse=True), _experts(E, d, inter, "cuda", fuse=False)
    for p in (fused.gate_up_proj, fused.down_proj):
        p.main_grad = torch.zeros(p.shape, device="cuda")
    pairs = _pairs(n, "cuda")
    want = [torch.zeros(p.shape, device="cuda") for p in (ref.gate_up_proj, ref.down_proj)]
    for mb in range(2):
        x0 = rand(n, d, seed=60 + mb, device="cuda", dtype=torch.bfloat16)
        dy = rand(n, d, seed=70 + mb, device="cuda", dtype=torch.bfloat16)
        _, got = _run(fused, x0, pairs, dy, fused_directly=False, store=WeightGradStore() if deferred else None)
        assert got[3] is None and got[4] is None  # nothing through autograd's .grad
        _, r = _run(ref, x0, pairs, dy, fused_directly=False)
        for w, g in zip(want, r[3:]):
            w += g.float()
        ref.zero_grad(set_to_none=True)
    for name, w, p in zip(("gate_up", "down"), want, (fused.gate_up_proj, fused.down_proj)):
        assert rel_err(p.main_grad, w) < TOL, name
    assert not fused.gate_up_proj.main_grad[1].any()  # the unused expert's stays zero
