"""A memory-bound class's fixed seconds a call (``MemoryKernelPoint.fwd_fixed_s`` / ``bwd_fixed_s``): the affine
price t = fixed_s + bytes / (HBM x frac), files and points without it pricing exactly as before, and a model with
few routed experts paying the router's fixed cost in every MoE layer."""

from __future__ import annotations

import json

import pytest

from moeplan.simulator.costs.elementwise import layer_bytes_per_token
from moeplan.simulator.costs.kernels import memory_s
from moeplan.simulator.costs.memory_kernels import MemoryKernelPoint, load_elementwise, memory_kernel_points
from moeplan.simulator.costs.tables import CostTables, default_tables
from moeplan.simulator.engine.unit_costs import CostContext, unit_costs
from moeplan.simulator.presets.clusters import h800_gpu
from moeplan.simulator.presets.models import deepseek_v3, tiny_moe
from moeplan.simulator.spec.model import ModelSpec

GPU = h800_gpu()


def _tables(*points: MemoryKernelPoint) -> CostTables:
    return default_tables("H800-SXM5").model_copy(update={"memory_kernels": points})


def test_the_price_is_the_fixed_seconds_plus_the_bytes_at_the_fraction_at_any_size():
    t = _tables(MemoryKernelPoint(kernel="router", fwd_frac=0.5, bwd_frac=0.25, fwd_fixed_s=20e-6, bwd_fixed_s=30e-6,
                                  source="s"))
    bw = GPU.hbm_bytes_per_s
    for nbytes in (1e6, 4e6):
        assert memory_s(t, GPU, nbytes, "router") == pytest.approx(20e-6 + nbytes / (0.5 * bw), rel=1e-12)
        assert memory_s(t, GPU, nbytes, "router", backward=True) == pytest.approx(30e-6 + nbytes / (0.25 * bw), rel=1e-12)
    # slope from the two sizes is the bandwidth term alone; the fixed term is paid once a call
    assert memory_s(t, GPU, 4e6, "router") - memory_s(t, GPU, 1e6, "router") == pytest.approx(3e6 / (0.5 * bw))
    assert memory_s(t, GPU, 1e6, "router", calls=3) == pytest.approx(3 * 20e-6 + 1e6 / (0.5 * bw))
    assert memory_s(t, GPU, 1e6, "router", calls=0) == pytest.approx(1e6 / (0.5 * bw))
    assert memory_s(t, GPU, 0.0, "router") == 0.0  # no bytes, no call (a class with one pass only)


def test_an_unset_backward_takes_the_forwards_fixed_seconds_and_a_stand_in_gives_its_own():
    t = _tables(MemoryKernelPoint(kernel="fp8_cast", fwd_frac=0.3, fwd_fixed_s=7e-6, source="s"))
    assert t.memory_fixed_s("fp8_cast") == (7e-6, 7e-6)
    assert t.memory_fixed_s("expert_cast") == (7e-6, 7e-6)  # elementwise.STAND_INS: the same quantisers
    assert t.memory_fixed_s("swiglu") == (0.0, 0.0)  # no point: the copy bandwidth, no fixed term
    zero_bwd = _tables(MemoryKernelPoint(kernel="swiglu", fwd_frac=0.3, fwd_fixed_s=7e-6, bwd_fixed_s=0.0, source="s"))
    assert zero_bwd.memory_fixed_s("swiglu") == (7e-6, 0.0)


def test_a_point_without_fixed_seconds_prices_exactly_as_the_fraction_alone():
    t = _tables(MemoryKernelPoint(kernel="swiglu", fwd_frac=0.4, bwd_frac=0.2, source="s"))
    bw = GPU.hbm_bytes_per_s
    assert t.memory_fixed_s("swiglu") == (0.0, 0.0)
    assert memory_s(t, GPU, 1e9, "swiglu") == 1e9 / (bw * 0.4)  # bit for bit
    assert memory_s(t, GPU, 1e9, "swiglu", backward=True) == 1e9 / (bw * 0.2)
    assert memory_s(t, GPU, 3e8, "rope") == 3e8 / (bw * t.memory_frac)


def test_negative_fixed_seconds_are_refused():
    with pytest.raises(ValueError, match="fwd_fixed_s"):
        MemoryKernelPoint(kernel="router", fwd_frac=0.5, fwd_fixed_s=-1e-6, source="s")


def _pass(frac: float, **fit) -> dict:
    return {"bytes": 1e6, "s": 1e6 / (frac * 4.8e12), "bytes_per_s": frac * 4.8e12, "hbm_frac": frac} | fit


def _file(tmp_path, rows) -> str:
    path = tmp_path / "ew.json"
    path.write_text(json.dumps({"command": "c", "date": "d", "device": "NVIDIA H200", "tokens": 4096, "kernels": [
        {"kernel": k, "implementation": "i", "in_table": True, "shape": "s", "fwd": f, "bwd": b, "skipped": None}
        for k, f, b in rows]}))
    return str(path)


def test_an_old_file_loads_with_no_fixed_seconds_and_a_new_one_carries_them(tmp_path):
    old = memory_kernel_points(load_elementwise(_file(tmp_path, [("router", _pass(0.012), _pass(0.02))])), "ew.json")
    assert [(p.fwd_fixed_s, p.bwd_fixed_s) for p in old] == [(None, None)]
    assert _tables(*old).memory_fixed_s("router") == (0.0, 0.0)
    fit = {"small_bytes": 2.5e5, "small_s": 1e-5, "intercept_s": -1e-6, "fixed_clamped": True}
    rows = [("router", _pass(0.012, fixed_s=30e-6, **fit), _pass(0.02, fixed_s=40e-6)),
            ("expert_cast", None, _pass(0.3, fixed_s=5e-6))]
    new = memory_kernel_points(load_elementwise(_file(tmp_path, rows)), "ew.json")
    assert [(p.kernel, p.fwd_frac, p.fwd_fixed_s, p.bwd_fixed_s) for p in new] == [
        ("router", 0.012, 30e-6, 40e-6), ("expert_cast", 0.3, 5e-6, 5e-6)]  # backward only: its backward's
    with pytest.raises(ValueError, match=r"^ew.json: kernels.0.fwd.fixed_s: Input should be greater than or equal"):
        load_elementwise(_file(tmp_path, [("router", _pass(0.012, fixed_s=-1e-6), None)]))


def _ctx(tables: CostTables, fusion: str = "eager") -> CostContext:
    return CostContext(tables=tables, gpu=GPU, precision="fp8", tokens=4096, seq_len_tokens=4096, compute_frac=1.0,
                       recompute="none", fusion=fusion)


def _with_experts(m: ModelSpec, experts: int) -> ModelSpec:
    return ModelSpec.model_validate(m.model_dump() | {"n_routed_experts": experts})


@pytest.mark.parametrize(("model", "fusion", "kernel"), [
    (lambda: _with_experts(deepseek_v3(), 32), "eager", "router"),
    (deepseek_v3, "eager", "router"),
    (tiny_moe, "fused", "fused_router"),
])
def test_every_moe_layer_pays_the_routers_fixed_seconds_whatever_its_experts(model, fusion, kernel):
    m = model()
    bare = _tables(MemoryKernelPoint(kernel=kernel, fwd_frac=0.012, bwd_frac=0.02, source="s"))
    fixed = _tables(MemoryKernelPoint(kernel=kernel, fwd_frac=0.012, bwd_frac=0.02, fwd_fixed_s=150e-6,
                                      bwd_fixed_s=90e-6, source="s"))
    a, b = unit_costs(_ctx(bare, fusion), m, True, None), unit_costs(_ctx(fixed, fusion), m, True, None)
    assert b.fwd_s - a.fwd_s == pytest.approx(150e-6) and b.dx_s - a.dx_s == pytest.approx(90e-6)
    assert b.dw_s == a.dw_s
    dense_a, dense_b = unit_costs(_ctx(bare, fusion), m, False, None), unit_costs(_ctx(fixed, fusion), m, False, None)
    assert dense_b.fwd_s == dense_a.fwd_s  # a dense layer has no router


def test_with_a_fixed_term_32_experts_no_longer_cost_a_fifth_of_256s_router_time():
    v3, few = deepseek_v3(), _with_experts(deepseek_v3(), 32)

    def router_fwd_s(t: CostTables, m: ModelSpec) -> float:
        nbytes = 4096 * layer_bytes_per_token(m, True, "fp8", m.num_experts_per_tok)["router"].fwd_bytes
        return memory_s(t, GPU, nbytes, "router")

    by_bytes = _tables(MemoryKernelPoint(kernel="router", fwd_frac=0.012, source="s"))
    assert router_fwd_s(by_bytes, few) / router_fwd_s(by_bytes, v3) < 0.2  # its top-k indices aside, an eighth
    affine = _tables(MemoryKernelPoint(kernel="router", fwd_frac=0.1, fwd_fixed_s=200e-6, source="s"))
    assert router_fwd_s(affine, few) / router_fwd_s(affine, v3) > 0.85
