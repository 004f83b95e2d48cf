"""BF16 weight gradients priced as the runtime runs them on a GPU, added into FP32 main gradients by cuBLAS, where
the tables timed them so (``GemmPoint.main_grad``: ``moeplan calibrate`` on a GPU): such points price only those
products, and with them the fused experts' Wgrad takes no separate epilogue bytes; tables without them (every
packaged one) price as before."""

from __future__ import annotations

import pytest

from moeplan.simulator.costs.kernels import gemm_s, main_grad_measured
from moeplan.simulator.costs.tables import CostTables, GemmPoint, default_tables
from moeplan.simulator.engine.expert_traffic import padded_rows
from moeplan.simulator.engine.unit_costs import CostContext, _experts, _linears, _main_grad_add_s
from moeplan.simulator.presets.clusters import h100_gpu
from moeplan.simulator.presets.models import tiny_moe

TOKENS = 256
SLOW = 1e14  # FLOP/s of the Wgrad-into-FP32 points: far below every packaged BF16 point


def _with_main_grad(shapes: list[tuple[int, int, int, int]]) -> CostTables:
    base = default_tables("H100-SXM5")
    extra = tuple(GemmPoint(precision="bf16", m=m, n=n, k=k, groups=g, flops_per_s=SLOW, main_grad=True,
                            source="test") for m, n, k, g in shapes)
    return base.model_copy(update={"gemm": base.gemm + extra})


def _ctx(tables: CostTables, fusion: str = "fused", precision: str = "bf16") -> CostContext:
    return CostContext(tables=tables, gpu=h100_gpu(), precision=precision, tokens=TOKENS, seq_len_tokens=TOKENS,
                       compute_frac=1.0, recompute="none", fusion=fusion)


def test_packaged_tables_have_no_main_grad_points_and_refuse_such_a_lookup():
    t = default_tables("H100-SXM5")
    assert not main_grad_measured(t, "bf16") and not main_grad_measured(t, "fp8")
    with pytest.raises(ValueError, match="no bf16 weight-gradient-into-FP32 GEMM entries"):
        gemm_s(t, h100_gpu(), "bf16", 64, 64, 64, main_grad=True)


def test_a_main_grad_point_prices_only_main_grad_products_even_at_its_exact_shape():
    shape = (4096, 7168, 1024, 8)
    t, plain = _with_main_grad([shape]), default_tables("H100-SXM5")
    g = h100_gpu()
    assert main_grad_measured(t, "bf16") and not main_grad_measured(t, "fp8")
    flops = 2.0 * 8 * 4096 * 7168 * 1024
    assert gemm_s(t, g, "bf16", *shape[:3], shape[3], main_grad=True) == pytest.approx(flops / SLOW)
    assert gemm_s(t, g, "bf16", *shape[:3], shape[3]) == gemm_s(plain, g, "bf16", *shape[:3], shape[3])


def test_the_fused_bf16_experts_wgrad_is_the_measured_addmm_with_no_epilogue_bytes_on_top():
    m = tiny_moe()
    h, f, groups = m.hidden_size, m.moe_intermediate_size, m.n_routed_experts
    per = round(padded_rows(TOKENS * m.num_experts_per_tok / groups))  # the fused experts' padded segments
    t = _with_main_grad([(2 * f, h, per, groups), (h, f, per, groups)])
    fwd, dx, dw = _experts(_ctx(t), m, None)
    assert dw == pytest.approx(2.0 * groups * 3 * h * f * per / SLOW)
    # the same forward and Dgrad as without the points; without them the plain Wgrad plus the epilogue's bytes
    plain = default_tables("H100-SXM5")
    pf, pdx, pdw = _experts(_ctx(plain), m, None)
    g = h100_gpu()
    assert (fwd, dx) == (pf, pdx)
    assert pdw == pytest.approx(gemm_s(plain, g, "bf16", 2 * f, h, per, groups) + gemm_s(plain, g, "bf16", h, f, per, groups)
                                + _main_grad_add_s(_ctx(plain), groups * 3 * h * f, in_gemm=True))


@pytest.mark.parametrize(("fusion", "precision"), [("eager", "bf16"), ("fused", "fp8")])
def test_experts_the_runtime_does_not_run_as_a_bf16_addmm_ignore_the_points(fusion, precision):
    m = tiny_moe()
    h, f, groups = m.hidden_size, m.moe_intermediate_size, m.n_routed_experts
    per = round(TOKENS * m.num_experts_per_tok / groups)
    t = _with_main_grad([(2 * f, h, per, groups), (h, f, per, groups)])
    assert _experts(_ctx(t, fusion, precision), m, None) == _experts(_ctx(default_tables("H100-SXM5"), fusion,
                                                                          precision), m, None)


def test_bf16_linears_take_their_wgrad_from_main_grad_points_and_fp8_ones_do_not():
    shapes = [(64, 96), (96, 64)]  # (in, out)
    t = _with_main_grad([(o, i, TOKENS, 1) for i, o in shapes])
    plain = default_tables("H100-SXM5")
    fwd, dx, dw = _linears(_ctx(t), shapes, "bf16")
    assert dw == pytest.approx(sum(2.0 * i * o * TOKENS for i, o in shapes) / SLOW)
    assert (fwd, dx) == _linears(_ctx(plain), shapes, "bf16")[:2]
    assert _linears(_ctx(t, precision="fp8"), shapes, "fp8") == _linears(_ctx(plain, precision="fp8"), shapes, "fp8")
