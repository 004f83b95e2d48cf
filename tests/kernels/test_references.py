"""The torch references of kernels/ on their own: closed-form properties, no Triton needed."""

import pytest
import torch

from moeplan.kernels.fp8_quant import (
    FP8_MAX,
    dequant_blocks,
    dequant_rows,
    quant_act_1x128_ref,
    quant_act_128x1_t_ref,
    quant_weight_128x128_ref,
)
from moeplan.kernels.grouped_gemm import grouped_gemm_ref, grouped_wgrad_ref
from moeplan.kernels.moe_permute import make_dispatch_plan, moe_permute_ref, moe_unpermute_ref
from moeplan.kernels.swiglu import swiglu_ref

E4M3_HALF_ULP = 2.0**-4  # 3 mantissa bits: round to nearest is within 2**-4 relative (normals)
E4M3_SUBNORMAL_STEP = 2.0**-9  # smallest E4M3 step, times the tile's scale


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("pow2_scale", [False, True])
@pytest.mark.parametrize("shape", [(3, 128), (5, 300), (130, 1)])
def test_act_quant_ref_error_bound_and_scales(shape, pow2_scale):
    x = torch.randn(*shape, generator=_gen(1)) * 5
    q, s = quant_act_1x128_ref(x, pow2_scale)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    amax = torch.nn.functional.pad(x.abs(), (0, s.shape[1] * 128 - shape[1])).view(shape[0], -1, 128).amax(-1)
    if pow2_scale:
        assert torch.equal(torch.log2(s), torch.log2(s).round())
        assert (s >= amax / FP8_MAX).all() and (s < 2 * amax / FP8_MAX).all()
    else:
        torch.testing.assert_close(s, amax / FP8_MAX, rtol=0, atol=0)
    per_elem_scale = s.repeat_interleave(128, 1)[:, : shape[1]]
    err = (dequant_rows(q, s) - x).abs()
    assert (err <= E4M3_HALF_ULP * x.abs() + E4M3_SUBNORMAL_STEP * per_elem_scale).all()
    assert q.float().abs().max() <= FP8_MAX


def test_transposed_act_quant_tiles_along_rows():
    x = torch.randn(200, 3, generator=_gen(2))
    x[:128, 1] *= 1000  # an outlier block must not leak into the next 128 rows
    q, s = quant_act_128x1_t_ref(x)
    assert q.shape == (3, 200) and s.shape == (3, 2)
    assert s[1, 0] > 100 * s[1, 1]
    torch.testing.assert_close(dequant_rows(q, s), x.t(), rtol=E4M3_HALF_ULP, atol=1e-2)


def test_weight_quant_ref_one_scale_per_block():
    w = torch.randn(2, 130, 260, generator=_gen(3))
    w[1, 129, 259] = 77.0  # the last, partial block of expert 1
    q, s = quant_weight_128x128_ref(w)
    assert s.shape == (2, 2, 3)
    assert s[1, 1, 2] == pytest.approx(77.0 / FP8_MAX)
    err = (dequant_blocks(q, s) - w).abs()
    s_full = s.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :130, :260]
    assert (err <= E4M3_HALF_ULP * w.abs() + E4M3_SUBNORMAL_STEP * s_full).all()


def test_zero_tile_gets_floor_scale_not_nan():
    q, s = quant_act_1x128_ref(torch.zeros(2, 128))
    assert torch.isfinite(s).all() and (s > 0).all() and (q.float() == 0).all()


def test_refs_take_any_tile_floor_and_leading_dims():
    """The references are also the model's float quantisers (model/fp8.py): any tile size, its own
    amax floor, any leading dimensions (each row, or each trailing matrix, on its own)."""
    x = torch.randn(2, 3, 100, generator=_gen(9))
    q, s = quant_act_1x128_ref(x, tile=32, amax_floor=1e-12)
    q2, s2 = quant_act_1x128_ref(x.reshape(6, 100), tile=32)
    assert s.shape == (2, 3, 4) and torch.equal(s.reshape(6, 4), s2) and torch.equal(q.reshape(6, 100).float(), q2.float())
    per_elem_scale = s.repeat_interleave(32, -1)[..., :100]
    assert ((dequant_rows(q, s, tile=32) - x).abs() <= E4M3_HALF_ULP * x.abs() + E4M3_SUBNORMAL_STEP * per_elem_scale).all()
    _, s_zero = quant_act_1x128_ref(torch.zeros(1, 64), amax_floor=1e-12)
    assert s_zero.item() == pytest.approx(1e-12 / FP8_MAX)
    w = torch.randn(2, 2, 40, 70, generator=_gen(10))
    qw, sw = quant_weight_128x128_ref(w, tile=32)
    qw3, sw3 = quant_weight_128x128_ref(w.reshape(4, 40, 70), tile=32)
    assert sw.shape == (2, 2, 2, 3) and torch.equal(sw.reshape(4, 2, 3), sw3) and torch.equal(qw.reshape(4, 40, 70).float(), qw3.float())
    torch.testing.assert_close(dequant_blocks(qw, sw, tile=32), w, rtol=E4M3_HALF_ULP, atol=1e-2)


def test_ref_quantisers_keep_the_input_layout():
    """No copy: a transposed input gives a transposed output, so the kernels' GEMMs, which choose
    their kernel by strides, see the layout the model's quantisers always gave them."""
    x = torch.randn(256, 384, generator=_gen(11))
    assert quant_act_1x128_ref(x.t())[0].stride() == x.t().stride()
    assert quant_weight_128x128_ref(x.t())[0].stride() == x.t().stride()


def _random_topk(T: int, topk: int, E: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(T)])


@pytest.mark.parametrize("T,topk,E", [(1, 1, 1), (37, 2, 5), (64, 4, 16)])
def test_dispatch_plan_invariants(T, topk, E):
    ids = _random_topk(T, topk, E, seed=T)
    plan = make_dispatch_plan(ids, E)
    seg = plan.seg_offsets.long()
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    assert (seg % 128 == 0).all() and seg[0] == 0 and seg[-1] == plan.num_rows
    assert torch.equal(seg[1:] - seg[:-1], (counts + 127) // 128 * 128)
    dest = plan.dest.long()
    assert dest.unique().numel() == T * topk  # every (token, slot) has its own row
    assert torch.equal(plan.src_token[dest].long(), torch.arange(T)[:, None].expand(T, topk))
    assert torch.equal(plan.m_indices[dest].long(), ids)
    assert (plan.src_token < 0).sum() == plan.num_rows - T * topk
    assert torch.equal(plan.src_token < 0, plan.m_indices < 0)
    for e in range(E):  # tokens first, in token order, then padding
        rows = plan.src_token[seg[e]: seg[e + 1]]
        real = rows[: counts[e]]
        assert (rows[counts[e]:] == -1).all() and (real[1:] > real[:-1]).all()


def test_permute_then_unpermute_ref_sums_weights():
    T, topk, E, H = 40, 3, 6, 10
    plan = make_dispatch_plan(_random_topk(T, topk, E, seed=9), E)
    x = torch.randn(T, H, generator=_gen(4), dtype=torch.float64)
    w = torch.rand(T, topk, generator=_gen(5), dtype=torch.float64)
    out = moe_unpermute_ref(moe_permute_ref(x, plan), plan, w)
    torch.testing.assert_close(out, x * w.sum(1, keepdim=True))


def test_grouped_refs_match_per_expert_loops():
    m_indices = torch.tensor([0] * 100 + [-1] * 28 + [2] * 128, dtype=torch.int32)
    offs = torch.tensor([0, 128, 128, 256], dtype=torch.int32)
    a = torch.randn(256, 16, generator=_gen(6), dtype=torch.float64)
    b = torch.randn(3, 8, 16, generator=_gen(7), dtype=torch.float64)
    out = grouped_gemm_ref(a, b, m_indices)
    torch.testing.assert_close(out[:100], a[:100] @ b[0].t())
    assert (out[100:128] == 0).all()
    torch.testing.assert_close(out[128:], a[128:] @ b[2].t())
    dw = grouped_wgrad_ref(out.t(), a.t(), offs)
    assert dw.shape == (3, 8, 16) and (dw[1] == 0).all()


def test_swiglu_ref():
    h = torch.randn(4, 6, generator=_gen(8), dtype=torch.float64)
    gate, up = h[:, :3], h[:, 3:]
    torch.testing.assert_close(swiglu_ref(h), gate / (1 + torch.exp(-gate)) * up)
