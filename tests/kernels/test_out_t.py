"""The transposed 128x1 quantisers writing into the caller's buffers (``out`` / ``out_t``): a micro-batch's columns
of a stash several micro-batches wide, as ``model.weight_grad.ExpertWgradBatch`` lays them out for one K-grouped
Wgrad. The same bits as the quantiser's own output, and nothing outside the given columns written. On the GPU, or
tiny through the Triton interpreter (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from moeplan.kernels import fp8_quant
from moeplan.kernels import moe_permute as mp
from moeplan.kernels.fp8_quant import FP8_DTYPE, TILE, quant_act_128x1_t, quant_act_both
from moeplan.kernels.moe_permute import make_pair_plan, moe_permute, moe_permute_quant_both
from moeplan.kernels.swiglu import swiglu_quant_t
from tests.kernels import test_kernels
from tests.kernels.test_kernels import ON_GPU, rand, same_bits

device, poisoned = test_kernels.device, test_kernels.poisoned
SLOTS, SLOT = 3, 1  # a stash 3 micro-batches wide, written at the second


def _stash(rows: int, cols: int, device: str, mn_major: bool) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(values (cols, SLOTS * rows_pad), scales, the view of slot SLOT): values filled with a sentinel byte, scales
    with -1; the scales' view MN-major (unit stride along cols) or row-major (unit stride along the token blocks)."""
    pad = -(-rows // TILE) * TILE
    values = torch.full((cols, SLOTS * pad), 0x5A, dtype=torch.uint8, device=device).view(FP8_DTYPE)
    blocks = SLOTS * pad // TILE
    scales = torch.full((blocks, cols) if mn_major else (cols, blocks), -1.0, device=device)
    first = SLOT * pad
    q = values[:, first: first + rows]
    s = (scales.t() if mn_major else scales)[:, first // TILE: first // TILE + -(-rows // TILE)]
    return values, (scales.t() if mn_major else scales), (q, s)


def _check(got, want, values, scales, rows: int) -> None:
    (q, s), (q_want, s_want) = got, want
    assert same_bits(q, q_want) and torch.equal(s, s_want)
    pad = -(-rows // TILE) * TILE
    first, blocks = SLOT * pad, -(-rows // TILE)
    outside = torch.ones(values.shape[1], dtype=torch.bool)
    outside[first: first + rows] = False
    assert (values.view(torch.uint8)[:, outside.to(values.device)] == 0x5A).all()
    outside = torch.ones(scales.shape[1], dtype=torch.bool)
    outside[first // TILE: first // TILE + blocks] = False
    assert (scales[:, outside.to(scales.device)] == -1).all()


@pytest.mark.parametrize("rows, cols", [(256, 136), (130, 257)] + ([(4096, 7168)] if ON_GPU else []))
@pytest.mark.parametrize("mn_major", [True, False], ids=["mn-major", "row-major"])
@pytest.mark.parametrize("one_read", [True, False, "gluon"], ids=["one-read", "two-reads", "gluon"])
def test_quant_act_both_and_128x1_t_into_a_stash(device, monkeypatch, rows, cols, mn_major, one_read):
    monkeypatch.setattr(fp8_quant, "ONE_READ", one_read)
    x = rand(rows, cols, seed=rows + cols, device=device, dtype=torch.bfloat16, scale=3.0)
    want = quant_act_128x1_t(x, amax_floor=1e-12)
    values, scales, out = _stash(rows, cols, device, mn_major)
    rows_fp8, got = quant_act_both(x, amax_floor=1e-12, out_t=out)
    _check(got, want, values, scales, rows)
    assert got[0].data_ptr() == out[0].data_ptr() and same_bits(rows_fp8[0], quant_act_both(x, amax_floor=1e-12)[0][0])
    values, scales, out = _stash(rows, cols, device, mn_major)
    _check(quant_act_128x1_t(x, amax_floor=1e-12, out=out), want, values, scales, rows)


def test_permute_and_swiglu_into_a_stash(device):
    """``moe_permute(quantize="128x1_t", out=)``, ``swiglu_quant_t(out=)`` and ``moe_permute_quant_both(out_t=)``
    (the Gluon gather on a Hopper GPU) write their own bits into a slot; the first two want row-major scales."""
    T, H = 40, 136
    g = torch.Generator().manual_seed(3)
    token = torch.arange(T).repeat_interleave(torch.randint(1, 3, (T,), generator=g))
    expert = torch.randint(0, 3, (token.numel(),), generator=g)
    plan = make_pair_plan(token.to(device), expert.to(device), T, torch.bincount(expert, minlength=3).tolist())
    x = rand(T, H, seed=4, device=device, dtype=torch.bfloat16)
    rows = plan.num_rows
    values, scales, out = _stash(rows, H, device, mn_major=False)
    _check(moe_permute(x, plan, quantize="128x1_t", amax_floor=1e-12, out=out),
           moe_permute(x, plan, quantize="128x1_t", amax_floor=1e-12), values, scales, rows)
    h = rand(rows, 2 * 72, seed=5, device=device, dtype=torch.bfloat16, scale=2.0)
    values, scales, out = _stash(rows, 72, device, mn_major=False)
    _check(swiglu_quant_t(h, amax_floor=1e-12, out=out), swiglu_quant_t(h, amax_floor=1e-12), values, scales, rows)
    weights = rand(rows, seed=6, device=device).abs()
    for gather in (False, True):
        mp.PERMUTE_BOTH, before = gather, mp.PERMUTE_BOTH
        try:
            values, scales, out = _stash(rows, H, device, mn_major=True)
            got = moe_permute_quant_both(x, plan, row_weights=weights, amax_floor=1e-12, out_t=out)[1]
            _check(got, moe_permute_quant_both(x, plan, row_weights=weights, amax_floor=1e-12)[1], values, scales, rows)
        finally:
            mp.PERMUTE_BOTH = before


def test_a_wrong_buffer_is_refused_by_name(device):
    x = rand(128, 128, seed=7, device=device, dtype=torch.bfloat16)
    wide = torch.empty((128, 512), dtype=FP8_DTYPE, device=device)
    with pytest.raises(ValueError, match="out must be"):
        quant_act_128x1_t(x, out=(wide[:, :256], torch.empty((128, 1), device=device)))  # values 256 wide
    with pytest.raises(ValueError, match="out must be"):
        quant_act_both(x, out_t=(wide[:, :128], torch.empty((128, 1), dtype=torch.float16, device=device)))
    h = rand(256, 256, seed=8, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unit stride along its rows"):  # MN-major scales where row-major is wanted
        swiglu_quant_t(h, out=(wide[:, :256], torch.empty((2, 128), device=device).t()))
    with pytest.raises(ValueError, match="out is for quantize='128x1_t'"):
        plan = make_pair_plan(torch.arange(4, device=device), torch.zeros(4, dtype=torch.long, device=device), 4, [4])
        moe_permute(x[:4], plan, quantize=True, out=(wide, wide))
