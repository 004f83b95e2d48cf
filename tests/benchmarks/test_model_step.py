"""benchmarks/model_step.py end to end on the CPU (tiny model), its kernel classifier, and its adapters to the
simulator (classes that add up to the engine's unit costs, stage FLOPs that add up to the accounting's)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeplan.simulator.accounting.flops import forward_flops
from moeplan.simulator.costs.tables import default_tables
from moeplan.simulator.engine.unit_costs import CostContext, unit_costs

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "model_step.py"
_spec = importlib.util.spec_from_file_location("model_step_cases", BENCH.with_name("model_step_cases.py"))
cases = sys.modules["model_step_cases"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(cases)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("model_step")
    res = subprocess.run([sys.executable, "-P", str(BENCH), "--small", "--device", "cpu", "--rounds", "1",
                          "--out", str(out / "ms.md"), "--json", str(out / "ms.json")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads((out / "ms.json").read_text()), (out / "ms.md").read_text()


def test_the_cpu_smoke_run_times_profiles_and_prices_both_workloads(smoke):
    result, text = smoke
    assert [(w["name"], w["layers"]) for w in result["workloads"]] == [("A", [1, 5]), ("B", [0, 5])]
    for w in result["workloads"]:
        bf16, bf16_fused, *fp8 = w["configs"]
        for c in (bf16, bf16_fused):  # on CPU the fused configuration runs the eager functions
            assert c["skipped"] is None and c["timing"]["n"] == 1 and c["timing"]["median_s"] > 0
        assert all("needs a CUDA GPU" in c["skipped"] for c in fp8)  # the kernels' Triton GEMMs
        prof = bf16["profile"]
        assert prof["spans"] == 4  # every routed-experts module marked
        classes = prof["classes"]
        # the experts' matmuls are grouped in both passes (forward: the range; backward: sequence numbers)
        assert classes["grouped_gemm"]["fwd_s"] > 0 and classes["grouped_gemm"]["bwd_s"] > 0
        assert classes["gemm"]["fwd_s"] > 0 and classes["memory_bound"]["bwd_s"] > 0
        assert sum(c["fwd_s"] + c["bwd_s"] for c in classes.values()) == pytest.approx(prof["kernel_s"])
        assert prof["busy_s"] + prof["idle_s"] == pytest.approx(prof["wall_s"])
        assert all(p["fwd_s"] > 0 and p["bwd_s"] > 0 for c in w["configs"] for p in c["predicted_s"].values())
        assert bf16["memory"]["load_max_over_mean"] and bf16["memory"]["peak_bytes"] is None
    assert w["forward_flops_per_token"]["dense_mlp"] > 0  # B holds the dense layer
    assert "## Workload A: 4 MoE layers 1..4" in text and "| fp8 fwd | skipped: fp8_kernel='kernels'" in text
    assert "| **step** (median of the timed steps) |" in text


@pytest.mark.parametrize("name, region, expected", [
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_cublas", "", "gemm"),
    ("_fp8_gemm_ws_kernel", "", "gemm"),
    ("_fp8_gemm_ws_kernel", "experts", "grouped_gemm"),
    ("kernel", "", "gemm"),  # kernels/fp8_gemm.py's autotuned Triton GEMM
    ("kernel", "experts", "grouped_gemm"),
    (("void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm9x<cutlass::gemm::kernel::GemmUniversal"
      "<cutlass::gemm::GroupProblemShape<cute::tuple<int, int, int> >, cute::tuple<long, long, long> > > >"), "",
     "grouped_gemm"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "", "attention"),
    ("fmha_cutlassB_bf16_aligned_128x64_k128_sm80", "", "attention"),
    ("flash_fwd_kernel", "", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0", "", "attention"),
    ("aten::bmm", "attention", "attention"),
    ("ncclDevKernel_AllToAll_RING_LL", "", "communication"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16> >", "",
     "memory_bound"),
    ("_quant_rows_kernel", "experts", "memory_bound"),
    ("_permute_kernel", "experts", "memory_bound"),
    ("Memcpy DtoD (Device -> Device)", "", "memory_bound"),
    ("aten::mm", "", "gemm"),
    ("aten::bmm", "experts", "grouped_gemm"),
    ("aten::_grouped_mm", "", "grouped_gemm"),
    ("aten::index_add_", "experts", "memory_bound"),
])
def test_kernel_class(name, region, expected):
    assert cases.kernel_class(name, region) == expected


def test_union_counts_overlaps_once_and_only_inside_the_windows():
    intervals = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (9.0, 12.0)]
    assert cases.union_s(intervals, [(0.0, 10.0)]) == pytest.approx(3.0 + 1.0 + 1.0)
    assert cases.union_s(intervals, [(1.5, 5.5), (11.0, 20.0)]) == pytest.approx(1.5 + 0.5 + 1.0)
    assert cases.union_s([], [(0.0, 1.0)]) == 0.0


def _engine_s(w, precision, gpu, tables, part):
    ctx = CostContext(tables=tables, gpu=gpu, precision=precision, tokens=w.tokens, seq_len_tokens=w.tokens,
                      compute_frac=1.0, recompute="none")
    units = [unit_costs(ctx, w.spec, moe=w.spec.is_moe_layer(i), traffic=None) for i in w.layers]
    return sum(u.fwd_s if part == "fwd" else u.dx_s + u.dw_s for u in units)


@pytest.mark.parametrize("config", cases.CONFIGS, ids=lambda c: c.name)
def test_predicted_classes_add_up_to_the_engines_unit_costs(config):
    gpu = cases.gpu_preset("NVIDIA H200")
    tables = default_tables(gpu.name)
    for w in cases.workloads(small=False):
        pred = cases.predicted_classes(w, config, gpu, tables)
        assert all(p["fwd_s"] > 0 and p["bwd_s"] > 0 for p in pred.values())
        for part, precision in (("fwd", config.fwd_precision), ("bwd", config.bwd_precision)):
            assert sum(p[f"{part}_s"] for p in pred.values()) == pytest.approx(
                _engine_s(w, precision, gpu, tables, part))
    assert (config.fwd_precision, config.bwd_precision) == {
        "bf16": ("bf16", "bf16"), "bf16 fused": ("bf16", "bf16"), "fp8 fwd": ("fp8", "bf16"),
        "fp8 fwd+bwd": ("fp8", "fp8"), "fp8 fwd+bwd fused": ("fp8", "fp8")}[config.name]


def test_stage_flops_are_the_accountings_layers():
    a, b = cases.workloads(small=False)
    assert (a.first_layer, a.end_layer, b.first_layer, b.end_layer) == (3, 7, 0, 5)
    assert a.spec.n_routed_experts == b.spec.n_routed_experts == 32 and a.tokens == 4096
    fa, fb = cases.stage_flops(a), cases.stage_flops(b)
    whole = forward_flops(b.spec, b.tokens)  # B's stage is every layer of its spec
    assert sum(fb.values()) == pytest.approx(whole.total - whole.head - whole.mtp)
    assert fa["dense_mlp"] == 0 and fb["dense_mlp"] == pytest.approx(2 * 3 * 7168 * 18432)
    for key in ("routed_experts", "shared_experts", "gates"):  # the same four MoE layers
        assert fa[key] == pytest.approx(fb[key]) and fa[key] > 0
    assert fb["attention_core"] == pytest.approx(fa["attention_core"] * 5 / 4)
