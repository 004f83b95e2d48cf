"""``moeplan calibrate`` times the BF16 weight gradients as a GPU run runs them, added into FP32 main gradients by
cuBLAS (``model.weight_grad.fused_main_grad_mm``; ``fused_main_grad_grouped_mm`` for the fused experts), and
writes them as ``GemmPoint.main_grad`` points; the plain products it still times as before. Until 2026-12-07 the
fused experts' Wgrad was timed as ``torch._grouped_mm`` writing BF16, a kernel their backward does not run."""

from __future__ import annotations

import pytest
import torch

from moeplan.orchestrator.calibration import compute
from moeplan.orchestrator.calibration.measure import Measured, Setup, measurements
from moeplan.orchestrator.calibration.shapes import plan_shapes
from moeplan.orchestrator.calibration.tables_out import CalibrationError, calibrated_tables, machine_record
from moeplan.simulator.engine.expert_traffic import padded_rows
from moeplan.simulator.presets.clusters import h100_gpu
from moeplan.simulator.presets.models import tiny_moe
from tests.orchestrator.test_calibrate_bounds import _v3_stage_plan

WGRAD = " Wgrad into FP32 main gradients"


def _setup(plan, device: str, dtype: torch.dtype) -> Setup:
    return Setup(spec=plan.inputs.model, device=torch.device(device), dtype=dtype, reps=3, threads=1,
                 backend="nccl" if device == "cuda" else "gloo", label="[CAL] test",
                 optimizer=plan.inputs.training.optimizer)


@pytest.mark.parametrize("fusion", ["eager", "fused"])
def test_the_plans_wgrads_are_every_linears_and_the_fused_experts_and_are_timed_so_only_on_a_gpu_in_bf16(
        tmp_path, fusion):
    plan = _v3_stage_plan(tmp_path, "--set", f"training.kernels.fusion={fusion}")
    m, tokens = plan.inputs.model, 4096
    shapes = plan_shapes(plan.inputs, plan.layout.dp, 2)
    dense = set(compute.linear_wgrads(m, tokens))
    h, f = m.hidden_size, m.moe_intermediate_size
    per = round(padded_rows(tokens * m.num_experts_per_tok / m.n_routed_experts))  # the fused experts' segments
    experts = {(2 * f, h, per, m.n_routed_experts), (h, f, per, m.n_routed_experts)}
    assert set(shapes.wgrads) == (dense | experts if fusion == "fused" else dense)
    assert len(dense) == 11 and set(shapes.wgrads) <= set(shapes.gemms)
    items = measurements(shapes, _setup(plan, "cuda", torch.bfloat16), 1.0)  # nothing runs: no GPU needed
    named = [i.what.removeprefix("GEMM ") for i in items if i.kind == "gemm"]
    into = {w.removesuffix(WGRAD) for w in named if w.endswith(WGRAD)}
    assert into == {f"{g}x{mm}x{n}x{k}" for mm, n, k, g in shapes.wgrads}
    assert len(named) == len(shapes.gemms) and not into & set(named)  # each shape timed once, as the runtime runs it
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.float32)):
        items = measurements(shapes, _setup(plan, device, dtype), 1.0)
        assert not [i for i in items if i.what.endswith(WGRAD)]


def test_where_the_runtime_has_no_addmm_into_fp32_the_timing_says_so():
    with pytest.raises(RuntimeError, match="no BF16 addmm into FP32 on cpu .*added by the main-grad hook"):
        compute.wgrad_main_grad_s(32, 16, 8, 2, 1, torch.device("cpu"))


def _measured(*gemm: dict) -> Measured:
    m = Measured(gemm=list(gemm))
    m.attention = [{"seq": 64, "flops": 1e9, "fwd_s": 1e-2, "fwd_bwd_s": 4e-2}]
    m.copy = [{"bytes": 2**20, "bytes_per_s": 1e10}]
    m.links = {2: {"rows": [("send_recv", 1024, 1e-4), ("send_recv", 2**20, 1e-3)], "rss_bytes": 2**30}}
    return m


def test_a_wgrad_row_becomes_a_main_grad_point_named_as_such_and_cannot_stand_alone():
    setup = Setup(spec=tiny_moe(), device=torch.device("cpu"), dtype=torch.float32, reps=1, threads=1,
                  backend="gloo", label="[CAL] test")
    plain = compute._gemm_row(64, 32, 16, 1, 1e-5)
    into = compute._gemm_row(32, 16, 64, 4, 2e-5) | {"main_grad": True}
    m = _measured(plain, into)
    tables = calibrated_tables("t", m, setup, h100_gpu(), machine_record(m, setup, h100_gpu(), "test", ""))
    points = {(p.m, p.n, p.k, p.groups): p for p in tables.gemm}
    assert not points[(64, 32, 16, 1)].main_grad and "float32 mm 1x64x32x16, 10.0 us" in points[(64, 32, 16, 1)].source
    p = points[(32, 16, 64, 4)]
    assert p.main_grad and p.flops_per_s == pytest.approx(2 * 4 * 32 * 16 * 64 / 2e-5)
    assert "Wgrad into FP32 main gradients (an addmm an expert) 4x32x16x64, 20.0 us" in p.source
    alone = _measured(into)
    with pytest.raises(CalibrationError, match="measured no GEMM"):
        calibrated_tables("t", alone, setup, h100_gpu(), machine_record(alone, setup, h100_gpu(), "test", ""))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("groups", [1, 4])
def test_on_a_gpu_the_wgrad_into_fp32_is_the_runtimes_sum_and_has_a_time(groups):
    from moeplan.model.weight_grad import fused_main_grad_grouped_mm, fused_main_grad_mm
    dev = torch.device("cuda")
    g = torch.randn(groups * 256, 384, device=dev).bfloat16()
    x = torch.randn(groups * 256, 512, device=dev).bfloat16()
    param = torch.empty(0, device=dev)
    param.main_grad = torch.ones((384, 512) if groups == 1 else (groups, 384, 512), device=dev)
    done = (fused_main_grad_mm(param, g.t(), x) if groups == 1
            else fused_main_grad_grouped_mm(param, g, x, [e * 256 for e in range(groups + 1)]))
    want = torch.stack([g[e * 256:(e + 1) * 256].float().t() @ x[e * 256:(e + 1) * 256].float()
                        for e in range(groups)]).view_as(param.main_grad) + 1
    assert done and torch.allclose(param.main_grad, want, rtol=1e-3, atol=1e-2)
    assert 0 < compute.wgrad_main_grad_s(384, 512, 256, groups, 3, dev) < 0.1
