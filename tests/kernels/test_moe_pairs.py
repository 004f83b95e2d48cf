"""Pair plans (``make_pair_plan``: any number of experts per token, as expert parallelism receives them) and
the fused path's kernel options (permute and SwiGLU quantised with the model's amax floor, SwiGLU in FP32),
against their torch references; on the GPU or, tiny, the interpreter (tests/kernels/test_kernels.py)."""

import pytest
import torch

from moeplan.kernels.fp8_quant import dequant_rows, quant_act_1x128_ref
from moeplan.kernels.moe_permute import (
    MoEPermute,
    MoEUnpermute,
    make_dispatch_plan,
    make_pair_plan,
    moe_permute,
    moe_permute_ref,
    moe_unpermute,
    moe_unpermute_ref,
    pair_weight_grad,
    pair_weight_grad_ref,
)
from moeplan.kernels.swiglu import swiglu, swiglu_quant_t, swiglu_ref
from tests.kernels import test_kernels
from tests.kernels.test_kernels import TOL_BF16_OUT, rand, rel_err, same_bits

device, poisoned = test_kernels.device, test_kernels.poisoned


def _pairs(num_tokens: int, num_experts: int, seed: int):
    """0 to 3 pairs per token, shuffled, the last expert unused; with the experts' counts on the host."""
    g = torch.Generator().manual_seed(seed)
    token = torch.arange(num_tokens).repeat_interleave(torch.randint(0, 4, (num_tokens,), generator=g))
    token = token[torch.randperm(token.numel(), generator=g)]
    expert = torch.randint(0, num_experts - 1, (token.numel(),), generator=g)
    return token, expert, torch.bincount(expert, minlength=num_experts).tolist()


def test_pair_plan_layout():
    """Each expert's pairs in its own 128-aligned segment, in pair order; every pair's row names its token."""
    token, expert, counts = _pairs(40, 4, seed=1)
    plan = make_pair_plan(token, expert, 40, counts)
    seg = plan.seg_offsets.tolist()
    assert seg[0] == 0 and all(b % 128 == 0 and b - a >= n for a, b, n in zip(seg, seg[1:], counts))
    assert plan.num_rows == seg[-1] and plan.dest.shape == token.shape
    dest = plan.dest.long()
    assert torch.equal(plan.src_token[dest].long(), token) and torch.equal(plan.m_indices[dest].long(), expert)
    assert (plan.src_token >= 0).sum() == token.numel() and torch.equal(plan.src_token < 0, plan.m_indices < 0)
    for e in range(4):  # stable: an expert's pairs keep their order
        assert torch.equal(dest[expert == e], torch.arange(seg[e], seg[e] + counts[e]))
    by_token = plan.by_token.long()
    assert torch.equal(token[by_token], torch.sort(token, stable=True).values)
    assert torch.equal(plan.pair_ptr[1:].long(), torch.bincount(token, minlength=40).cumsum(0))
    empty = make_pair_plan(token[:0], expert[:0], 3, [0] * 4)
    assert empty.num_rows == 128 and (empty.src_token < 0).all()


def test_pair_plan_refuses_counts_that_are_not_the_pairs():
    token, expert, counts = _pairs(10, 3, seed=2)
    with pytest.raises(ValueError, match="expert_counts sum to"):
        make_pair_plan(token, expert, 10, [counts[0] + 1] + counts[1:])


def test_topk_plan_is_the_pair_plan_of_its_pairs():
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(9)])
    topk = make_dispatch_plan(ids, 5)
    pairs = make_pair_plan(torch.arange(18) // 2, ids.reshape(-1), 9, torch.bincount(ids.reshape(-1), minlength=5))
    for name in ("src_token", "m_indices", "seg_offsets"):
        assert torch.equal(getattr(topk, name), getattr(pairs, name)), name
    assert torch.equal(topk.dest.reshape(-1), pairs.dest)


def test_pair_plan_permute_combine_and_autograd(device):
    """Permute (plain and quantised with a given amax floor) and the weighted combine on ragged pairs;
    autograd of combine(permute(x) * s) against float64."""
    T, H = 12, 136
    token, expert, counts = _pairs(T, 3, seed=4)
    plan = make_pair_plan(token.to(device), expert.to(device), T, counts)
    x = rand(T, H, seed=5, device=device, dtype=torch.bfloat16)
    x_rows = moe_permute_ref(x, plan)
    assert torch.equal(moe_permute(x, plan), x_rows)
    q, s = moe_permute(x, plan, quantize=True, amax_floor=1e-12)
    q_ref, s_ref = quant_act_1x128_ref(x_rows, amax_floor=1e-12)
    assert torch.equal(s, s_ref) and same_bits(q, q_ref)  # padding rows: zeros, scale 1e-12 / 448
    w = rand(token.numel(), seed=6, device=device).abs()
    y = rand(plan.num_rows, H, seed=7, device=device, dtype=torch.bfloat16)
    assert rel_err(moe_unpermute(y, plan, w), moe_unpermute_ref(y, plan, w)) < TOL_BF16_OUT
    ones = torch.ones_like(w)
    assert rel_err(moe_unpermute(y, plan), moe_unpermute_ref(y, plan, ones)) < TOL_BF16_OUT

    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    scale = rand(plan.num_rows, 1, seed=8, device=device, dtype=torch.bfloat16)
    grad = rand(T, H, seed=9, device=device, dtype=torch.bfloat16)
    MoEUnpermute.apply(MoEPermute.apply(xg, plan) * scale, wg, plan).backward(grad)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    moe_unpermute_ref(moe_permute_ref(x64, plan) * scale.double(), plan, w64).backward(grad.double())
    assert rel_err(xg.grad, x64.grad) < TOL_BF16_OUT
    assert rel_err(wg.grad, w64.grad) < 1e-2  # the dot of bf16 rows
    assert not xg.grad[torch.bincount(token, minlength=T).to(device) == 0].any()  # tokens without pairs


@pytest.mark.parametrize("H", [136, 7168])
def test_pair_weight_grad_is_one_fp32_dot_per_pair(device, H):
    """The row-dot kernel against gather-cast-multiply-sum, on a pair plan (padding rows, tokens without pairs)
    and a top-k plan; H not a multiple of the kernel's chunk."""
    T = 12
    token, expert, counts = _pairs(T, 3, seed=10)
    plan = make_pair_plan(token.to(device), expert.to(device), T, counts)
    grad = rand(T, H, seed=11, device=device, dtype=torch.bfloat16)
    y = rand(plan.num_rows, H, seed=12, device=device, dtype=torch.bfloat16)
    got, want = pair_weight_grad(grad, y, plan), pair_weight_grad_ref(grad, y, plan)
    assert got.shape == want.shape == (token.numel(),) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * H ** 0.5)
    ids = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(13))[:2] for _ in range(T)])
    topk = make_dispatch_plan(ids.to(device), 5)
    y = rand(topk.num_rows, H, seed=14, device=device, dtype=torch.bfloat16)
    got, want = pair_weight_grad(grad, y, topk), pair_weight_grad_ref(grad, y, topk)
    assert got.shape == (T, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * H ** 0.5)


def test_swiglu_fp32_output_and_amax_floor(device):
    """The fused backward recomputes the SwiGLU output in FP32 for the Wgrad; the forward quantises with
    the model's amax floor (an all-zero row keeps scale floor / 448)."""
    h = rand(20, 2 * 136, seed=10, device=device, dtype=torch.bfloat16)
    h[3] = 0
    act = swiglu(h, out_dtype=torch.float32)
    assert act.dtype == torch.float32 and rel_err(act, swiglu_ref(h)) < 1e-6
    q, s = swiglu(h, quantize=True, amax_floor=1e-12)
    q_ref, s_ref = quant_act_1x128_ref(swiglu_ref(h).float(), amax_floor=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert rel_err(dequant_rows(q, s), dequant_rows(q_ref, s_ref)) < 1e-3  # rare one-ulp flips
    assert float(s[3, 0]) == pytest.approx(1e-12 / 448)


def test_transposed_quantisation_fused_into_permute_and_swiglu(device):
    """The Wgrad's 128x1 operands made in the pass that makes the values: ``moe_permute(quantize="128x1_t")``
    is ``quant_act_128x1_t`` of the permuted rows, ``swiglu_quant_t`` of the FP32 SwiGLU output, bit for bit."""
    T, H = 12, 136
    token, expert, counts = _pairs(T, 3, seed=11)
    plan = make_pair_plan(token.to(device), expert.to(device), T, counts)
    x = rand(T, H, seed=12, device=device, dtype=torch.bfloat16)
    q, s = moe_permute(x, plan, quantize="128x1_t", amax_floor=1e-12)
    q_ref, s_ref = quant_act_1x128_ref(moe_permute_ref(x, plan).t(), amax_floor=1e-12)  # (H, M_total)
    assert q.shape == (H, plan.num_rows) and torch.equal(s, s_ref) and same_bits(q, q_ref)
    h = rand(plan.num_rows + 5, 2 * 72, seed=13, device=device, dtype=torch.bfloat16, scale=2.0)  # ragged edges
    q, s = swiglu_quant_t(h, amax_floor=1e-12)
    q_ref, s_ref = quant_act_1x128_ref(swiglu(h, out_dtype=torch.float32).t(), amax_floor=1e-12)
    assert q.shape == (72, h.shape[0]) and torch.equal(s, s_ref) and same_bits(q, q_ref)
    with pytest.raises(ValueError, match="quantize="):
        moe_permute(x, plan, quantize="1x128_t")
