"""Each expert's segment of the contiguous layout is padded to 128 rows (``kernels.moe_permute``): the engine
prices the grouped GEMMs and the layout's memory-bound kernels over the expected padded rows
(``expert_traffic.padded_rows``), the op-by-op BF16 experts over the routed rows (they do not pad)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moeplan.kernels.moe_permute import make_dispatch_plan
from moeplan.simulator.costs.elementwise import layer_bytes_per_token
from moeplan.simulator.costs.tables import default_tables
from moeplan.simulator.engine.expert_traffic import SEGMENT_ALIGN, padded_rows
from moeplan.simulator.engine.unit_costs import CostContext, _experts, expert_segment_rows, padded_rows_per_token
from moeplan.simulator.presets.clusters import h100_gpu
from moeplan.simulator.presets.models import deepseek_v3, tiny_moe


def test_padded_rows_hand_computed():
    assert SEGMENT_ALIGN == 128 and padded_rows(0.0) == 0.0
    # half a row on average: an expert gets a segment (128 rows) unless no row reached it (e^-0.5)
    assert padded_rows(0.5) == pytest.approx((1 - math.exp(-0.5)) * 128, rel=1e-9)
    assert padded_rows(32) == pytest.approx(128, rel=1e-9)  # one segment, all but surely (P(0) = e^-32)
    assert padded_rows(1e6) == pytest.approx(1e6 + 63.5, abs=0.05)  # many tiles: the residue is uniform
    assert padded_rows(128) == pytest.approx(189.0, abs=0.1)  # 128 +- 11 rows: half the experts take two tiles


@pytest.mark.parametrize(("experts", "tokens", "k"), [(256, 4096, 8), (32, 4096, 8), (64, 512, 6)])
def test_padded_rows_is_what_the_runtimes_layout_makes_of_uniform_routing(experts, tokens, k):
    """The padded rows of many uniform routings (``kernels.moe_permute.make_dispatch_plan``, the runtime's layout)
    against the expectation: within 1%."""
    import torch
    gen = torch.Generator().manual_seed(0)
    made = [make_dispatch_plan(torch.rand(tokens, experts, generator=gen).topk(k, dim=-1).indices, experts).num_rows
            for _ in range(20)]
    assert np.mean(made) / experts == pytest.approx(padded_rows(tokens * k / experts), rel=0.01)


def _ctx(precision: str, fusion: str, tokens: int = 4096) -> CostContext:
    return CostContext(tables=default_tables("H100-SXM5"), gpu=h100_gpu(), precision=precision, tokens=tokens,
                       seq_len_tokens=tokens, compute_frac=1.0, recompute="none", fusion=fusion)


@pytest.mark.parametrize(("precision", "fusion", "pads"), [("fp8", "eager", True), ("bf16", "fused", True),
                                                           ("bf16", "eager", False)])
def test_the_contiguous_layout_pads_and_the_op_by_op_experts_do_not(precision, fusion, pads):
    m, ctx = tiny_moe(), _ctx(precision, fusion, 256)
    per = 256 * m.num_experts_per_tok / m.n_routed_experts
    want = padded_rows(per) if pads else per
    assert expert_segment_rows(ctx, m, None) == pytest.approx(want)
    got = padded_rows_per_token(ctx, m, None)
    assert got == (pytest.approx(m.n_routed_experts * want / 256) if pads else None)


def test_padding_moves_the_experts_gemms_and_the_layouts_bytes_by_the_padded_rows():
    m, ctx = deepseek_v3(), _ctx("fp8", "fused")
    k = m.num_experts_per_tok
    ratio = padded_rows(4096 * k / m.n_routed_experts) / (4096 * k / m.n_routed_experts)
    assert ratio == pytest.approx(1.4765, abs=1e-3)  # 128 rows an expert
    plain = layer_bytes_per_token(m, True, "fp8", k, "fused")
    padded = layer_bytes_per_token(m, True, "fp8", k, "fused", padded_rows_per_token=k * ratio)
    assert padded["expert_cast"].bwd_bytes == pytest.approx(plain["expert_cast"].bwd_bytes * ratio)
    assert padded["combine"] == plain["combine"] and padded["permute"].bwd_bytes == plain["permute"].bwd_bytes
    h, f = m.hidden_size, m.moe_intermediate_size
    assert padded["permute"].fwd_bytes - plain["permute"].fwd_bytes == pytest.approx(2 * h * k * (ratio - 1))
    assert padded["swiglu"].fwd_bytes - plain["swiglu"].fwd_bytes == pytest.approx(
        plain["swiglu"].fwd_bytes / (f * (k + m.n_shared_experts)) * f * k * (ratio - 1))
    fwd, _, _ = _experts(ctx, m, None)
    eager = _experts(_ctx("bf16", "eager"), m, None)[0]
    fused = _experts(_ctx("bf16", "fused"), m, None)[0]
    assert fwd > 0 and fused > eager  # the same BF16 GEMMs over padded rows
