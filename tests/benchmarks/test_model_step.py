"""benchmarks/model_step.py end to end on the CPU (tiny model), one and two micro-batches a step, its step of K
micro-batches (weights quantised once, gradients accumulating), its kernel classifier, and its adapters to the
simulator (classes that add up to the engine's unit costs, stage FLOPs that add up to the accounting's)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from moeplan.simulator.accounting.flops import forward_flops
from moeplan.simulator.costs.tables import default_tables
from moeplan.simulator.engine.unit_costs import CostContext, unit_costs

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "model_step.py"
_spec = importlib.util.spec_from_file_location("model_step_cases", BENCH.with_name("model_step_cases.py"))
cases = sys.modules["model_step_cases"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(cases)


def _smoke_run(out: Path, *extra: str) -> tuple[dict, str]:
    res = subprocess.run([sys.executable, "-P", str(BENCH), "--small", "--device", "cpu", "--rounds", "1",
                          "--out", str(out / "ms.md"), "--json", str(out / "ms.json"), *extra],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads((out / "ms.json").read_text()), (out / "ms.md").read_text()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return _smoke_run(tmp_path_factory.mktemp("model_step"))


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
        top = prof["top_kernels"]
        assert top and all(a["s"] >= b["s"] for a, b in zip(top, top[1:]))
        assert sum(k["s"] for k in top) <= prof["kernel_s"] * (1 + 1e-9)
        assert all(p["fwd_s"] > 0 and p["bwd_s"] > 0 for c in w["configs"] for p in c["predicted_s"].values())
        assert bf16["memory"]["load_max_over_mean"] and bf16["memory"]["peak_bytes"] is None
    assert w["forward_flops_per_token"]["dense_mlp"] > 0  # B holds the dense layer
    assert "## Workload A: 4 MoE layers 1..4" in text and "| fp8 fwd | skipped: fp8_kernel='kernels'" in text
    assert "| **micro-batch** (median of the timed steps) |" in text and "Largest kernels per micro-batch" in text
    assert result["meta"]["protocol"]["microbatches"] == 1 and "A step (K = 1) is 1 micro-batch of" in text
    # the kernels' settings that change the FP8 step's kernels are stated with the figures
    assert "SwiGLU's backward quantised as it is computed (`swiglu.BACKWARD_BOTH`)" in text
    assert "output gradients cast as the attention's backward glue is read (`attention.GLUE_IN_CAST`): on" in text
    assert "256-row Wgrad tiles: dense on (`fp8_gemm_ws.TALL_DENSE`), the experts' from 2 segment tables" in text
    # the host that launched the kernels (a CPU run issues no CUDA ops: no launch time)
    host = result["meta"]["host"]
    assert host["cpus"] >= 1 and "launch_us" not in host and f"; host {host['cpu']} ({host['cpus']} CPUs)," in text


def test_two_microbatches_a_step_are_timed_profiled_and_stated_per_microbatch(tmp_path):
    result, text = _smoke_run(tmp_path, "--workloads", "A", "--microbatches", "2", "--wgrad-old-values", "tma",
                              "--mla-glue-cast", "off", "--configs", "bf16,bf16 @mla-glue-cast=on")
    configs = result["workloads"][0]["configs"]
    assert [(c["name"], c["switches"]) for c in configs] == [("bf16", {}), ("bf16 @mla-glue-cast=on",
                                                                            {"mla-glue-cast": "on"})]
    assert configs[1]["predicted_s"] == configs[0]["predicted_s"] and len(configs[1]["times_s"]) == 1
    assert "| bf16 @mla-glue-cast=on |" in text and "with that module switch set for its own steps alone" in text
    assert result["meta"]["wgrad_old_values"] == "tma" and "old main-gradient values: `tma`" in text
    assert result["meta"]["mla_glue_in_cast"] is False and "(`attention.GLUE_IN_CAST`): off" in text
    protocol = result["meta"]["protocol"]
    assert protocol["microbatches"] == 2 and protocol["step"] == cases.step_protocol(2)
    assert "weights quantised once per 2 micro-batches, as after one optimizer step" in protocol["step"]
    assert f"A step (K = 2) is {protocol['step']}" in text
    assert "1/K of a step's FP8 weight quantisation in the memory-bound forward" in text
    (w,) = result["workloads"]
    bf16 = w["configs"][0]
    assert bf16["timing"]["n"] == 1 and bf16["profile"]["microbatches"] == 2
    assert bf16["profile"]["spans"] == 4  # the 8 experts' forwards of the step, per micro-batch


@pytest.fixture(scope="module")
def ms():
    """benchmarks/model_step.py as a module, in this process (it loads its own model_step_cases: put back after)."""
    spec = importlib.util.spec_from_file_location("model_step", BENCH)
    module = sys.modules["model_step"] = importlib.util.module_from_spec(spec)  # its dataclass looks it up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["model_step"]
    sys.modules["model_step_cases"] = cases


@pytest.fixture(scope="module")
def tiny(ms):
    """The small workload A's stage in FP32 on the CPU, its input x and output gradient g."""
    from moeplan.model import ModelOptions, StageSpec, build_rank

    w = cases.workloads(small=True)[0]
    stage = build_rank(w.spec, [StageSpec(w.first_layer, w.end_layer, False, False)],
                       ModelOptions(dtype=torch.float32))[0]
    stage.init_weights(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((1, w.tokens, w.spec.hidden_size), generator=gen).requires_grad_()
    return stage, x, torch.randn(x.shape, generator=gen)


def test_a_step_clears_the_weight_cache_once_and_times_per_microbatch(ms, tiny, monkeypatch):
    stage, x, g = tiny
    calls = []
    monkeypatch.setattr(ms, "clear_fp8_weight_cache", lambda: calls.append("clear"))
    handle = stage.register_forward_hook(lambda *_: calls.append("forward"))
    clock = iter([0.0, 1.0, 10.0, 13.0])  # two steps: 1 s and 3 s
    monkeypatch.setattr(ms, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    try:
        times_s = ms.timed_steps(ms.Runner(cases.CONFIGS[0], stage), x, g, torch.device("cpu"), 2, 2)
    finally:
        handle.remove()
    assert calls == ["clear", "forward", "forward"] * 2
    assert times_s == [0.5, 1.5]  # per micro-batch
    assert x.grad is None and all(p.grad is None for p in stage.parameters())


def test_microbatches_accumulate_their_gradients(ms, tiny):
    stage, x, g = tiny
    grads = []
    for k in (1, 2):
        ms.accumulate(stage, x, g, k)
        grads.append({n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None} | {"x": x.grad})
        stage.zero_grad(set_to_none=True)
        x.grad = None
    one, two = grads
    assert len(one) > 10 and one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], 2 * one[name], msg=name)


def test_main_gradients_are_attached_for_the_timed_steps_only_and_fill_in_fp32(ms, tiny):
    """``--main-grads`` (the default): FP32 main gradients, as the runtime attaches them, hold the micro-batches'
    sum during the timed steps, nothing is left in ``.grad``, and the stage is back to plain gradients after."""
    stage, x, g = tiny
    ms.accumulate(stage, x, g, 2)
    want = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
    stage.zero_grad(set_to_none=True)
    x.grad = None
    seen = {}
    with ms.main_grads(stage, True):
        ms.train_step(stage, x, g, 2)
        seen = {n: p.main_grad.clone() for n, p in stage.named_parameters()}
        assert all(p.grad is None for p in stage.parameters())
    assert not any(hasattr(p, "main_grad") for p in stage.parameters())
    assert want.keys() <= seen.keys() and len(want) > 10
    for name, grad in want.items():
        assert seen[name].dtype == torch.float32
        torch.testing.assert_close(seen[name], grad, msg=name)
    with ms.main_grads(stage, False):
        assert not any(hasattr(p, "main_grad") for p in stage.parameters())


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


def test_top_kernels_sum_each_name_region_and_pass_per_step():
    records = [("kernel", 1.0, "", "fwd"), ("kernel", 2.0, "", "fwd"), ("kernel", 0.5, "experts", "fwd"),
               ("nvjet_x", 4.0, "", "bwd"), ("tiny", 0.1, "", "bwd")]
    top = cases.top_kernels(records, 2, n=3)
    assert [(k["name"], k["region"], k["phase"]) for k in top] == [("nvjet_x", "", "bwd"), ("kernel", "", "fwd"),
                                                                      ("kernel", "experts", "fwd")]
    assert [k["s"] for k in top] == [2.0, 1.5, 0.25] and [k["calls"] for k in top] == [0.5, 1.0, 0.5]
    assert [k["class"] for k in top] == ["gemm", "gemm", "grouped_gemm"]


def test_union_counts_overlaps_once_and_only_inside_the_windows():
    intervals = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (9.0, 12.0)]
    assert cases.union_s(intervals, [(0.0, 10.0)]) == pytest.approx(3.0 + 1.0 + 1.0)
    assert cases.union_s(intervals, [(1.5, 5.5), (11.0, 20.0)]) == pytest.approx(1.5 + 0.5 + 1.0)
    assert cases.union_s([], [(0.0, 1.0)]) == 0.0


def _engine_s(w, precision, gpu, tables, part, fusion, wgrad_batch=1):
    ctx = CostContext(tables=tables, gpu=gpu, precision=precision, tokens=w.tokens, seq_len_tokens=w.tokens,
                      compute_frac=1.0, recompute="none", fusion=fusion, expert_wgrad_batch=wgrad_batch)
    units = [unit_costs(ctx, w.spec, moe=w.spec.is_moe_layer(i), traffic=None) for i in w.layers]
    return sum(u.fwd_s if part == "fwd" else u.dx_s + u.dw_s for u in units)


@pytest.mark.parametrize("config", cases.CONFIGS, ids=lambda c: c.name)
def test_predicted_classes_add_up_to_the_engines_unit_costs(config):
    gpu = cases.gpu_preset("NVIDIA H200")
    tables = default_tables(gpu.name)
    for w in cases.workloads(small=False):
        pred = cases.predicted_classes(w, config, gpu, tables)
        assert all(p["fwd_s"] > 0 and p["bwd_s"] > 0 for p in pred.values())
        quant = cases.weight_quant_s(w, config, gpu, tables)
        assert (quant > 0) == (config.fwd_precision == "fp8")
        for part, precision in (("fwd", config.fwd_precision), ("bwd", config.bwd_precision)):
            assert sum(p[f"{part}_s"] for p in pred.values()) == pytest.approx(
                _engine_s(w, precision, gpu, tables, part, config.fusion, config.wgrad_batch)
                + (quant if part == "fwd" else 0.0))
        four = cases.predicted_classes(w, config, gpu, tables, microbatches=4)  # a step's quantisation over 4
        assert four["memory_bound"]["fwd_s"] == pytest.approx(pred["memory_bound"]["fwd_s"] - 0.75 * quant)
    assert config.fusion == ("fused" if "fused" in config.name else "eager")
    assert (config.fwd_precision, config.bwd_precision) == {
        "bf16": ("bf16", "bf16"), "bf16 fused": ("bf16", "bf16"), "fp8 fwd": ("fp8", "bf16"),
        "fp8 fwd+bwd": ("fp8", "fp8"), "fp8 fwd+bwd fused": ("fp8", "fp8"),
        "fp8 fwd+bwd fused wgrad-batch 2": ("fp8", "fp8"), "fp8 fwd+bwd fused wgrad-batch 4": ("fp8", "fp8")}[config.name]
    assert config.wgrad_batch == (int(config.name.rsplit(" ", 1)[1]) if "wgrad-batch" in config.name else 1)


def test_fp8_weight_params_are_the_accountings_less_norms_router_and_gates():
    from moeplan.simulator.accounting.layout import Stage
    from moeplan.simulator.accounting.memory import rank_params

    for w in cases.workloads(small=False):
        s = w.spec
        total = rank_params(s, [Stage(0, tuple(w.layers), False, False)], ep=1)
        moe = sum(s.is_moe_layer(i) for i in w.layers)
        router = moe * s.hidden_size * s.n_routed_experts
        fp8 = cases.fp8_weight_params(s, w.layers)
        assert 0 < total.dense + total.expert - router - fp8 < 0.001 * fp8  # the norms' weights and gate biases


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


def test_configs_picks_the_configurations_run(ms):
    w = cases.workloads(small=True)[0]
    runners = ms.build_runners(w, torch.device("cpu"), {"bf16", "fp8 fwd"})
    assert [r.config.name for r in runners] == ["bf16", "fp8 fwd"]
    assert [r.config.name for r in ms.build_runners(w, torch.device("cpu"))] == [c.name for c in cases.CONFIGS]


def test_an_arm_runs_its_configurations_stage_with_its_switches_set_for_its_steps_alone(ms, monkeypatch):
    """``"NAME @switch=value"``: NAME's stage itself (no second copy), the switch set while the arm's steps run and
    the module's own value back after; NAME's runner keeps the module's value."""
    from moeplan.model import attention

    w = cases.workloads(small=True)[0]
    runners = ms.build_runners(w, torch.device("cpu"), ["bf16", "bf16 @mla-glue-cast=off @fp8-cast=two "
                                                                "@paired-linears=on"])
    base, arm = runners
    assert arm.config.name.startswith("bf16 @mla-glue-cast=off") and arm.config.options == base.config.options
    assert arm.stage is base.stage and arm.switches == {"mla-glue-cast": "off", "fp8-cast": "two",
                                                        "paired-linears": "on"}
    seen = []

    def state():
        return attention.GLUE_IN_CAST, ms.fp8_quant.ONE_READ, ms.linear.PAIRED
    monkeypatch.setattr(ms, "train_step", lambda *_: seen.append(state()))
    before = state()
    assert before == (True, "gluon", False)
    x = torch.zeros(1)
    for r in runners:
        ms.timed_steps(r, x, x, torch.device("cpu"), 1, 1)
    assert seen == [before, (False, False, True)] and state() == before
    with pytest.raises(RuntimeError), ms.switched(arm):  # restored however the steps end
        raise RuntimeError
    assert state() == before


@pytest.mark.parametrize(("configs", "message"), [
    ("bf16 @mla-glue-cast=maybe", "mla-glue-cast='maybe': not one of on, off"),
    ("bf16 @old-values=tma", "'old-values=tma': not switch=value with a switch of mla-glue-cast"),
    ("bf16 @mla-glue-cast", "'mla-glue-cast': not switch=value"),
    ("bf17 @mla-glue-cast=on", "--configs bf17: not one of"),
])
def test_a_bad_arm_is_refused_in_one_line_naming_it(tmp_path, configs, message):
    res = subprocess.run([sys.executable, "-P", str(BENCH), "--small", "--device", "cpu", "--configs", configs,
                          "--out", str(tmp_path / "ms.md")], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         check=False)
    assert res.returncode == 2 and message in res.stderr and not (tmp_path / "ms.md").exists()


def test_reprice_keeps_the_measurements_and_predicts_again(smoke, tmp_path):
    result, _ = smoke
    stale = json.loads(json.dumps(result))
    for w in stale["workloads"]:
        for c in w["configs"]:
            c["predicted_s"] = {k: {"fwd_s": 1.0, "bwd_s": 1.0} for k in c["predicted_s"]}
    # a --trace run's idle summary (benchmarks/gpu_gaps.py) reaches the page, per micro-batch
    stale["workloads"][0]["configs"][0]["profile"]["gaps"] = {
        "windows": 1, "wall_us": 9e3, "busy_us": 7e3, "idle_us": 2e3, "min_gap_us": 2.0, "idle_by_size_us": {},
        "idle_by_op_us": [{"op": "LinearFn [moeplan::step]", "us": 1.5e3, "gaps": 30}],
        "blocking_host_calls_us": [{"call": "cudaEventSynchronize in moeplan::experts", "us": 4e3, "calls": 4}]}
    stale["meta"]["host"]["launch_us"] = 7.25  # a GPU run's: how fast its host issues a small CUDA op
    # a --host-issue run's host time per pass (model_step.host_issue), beside the profiled kernels'
    stale["workloads"][0]["configs"][0]["host_issue"] = {"hold_s": 0.3, "fwd_s": 0.012, "bwd_s": 0.031,
                                                         "late_passes": 1, "fwd_max_s": 0.02, "bwd_max_s": 0.04}
    src = tmp_path / "old.json"
    src.write_text(json.dumps(stale))
    res = subprocess.run([sys.executable, "-P", str(BENCH), "--reprice", str(src), "--out", str(tmp_path / "new.md")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    new = json.loads((tmp_path / "new.json").read_text())
    page = (tmp_path / "new.md").read_text()
    assert "repriced" in new["meta"] and "(`--reprice`), the measurements as run" in page
    assert "CPUs, 7.2 us to issue a small CUDA op)" in page
    k = stale["workloads"][0]["configs"][0]["profile"]["microbatches"]
    assert (f"launched the kernel after each gap (`gpu_gaps`, profiled): {2 / k:.2f} ms; largest: LinearFn "
            f"[moeplan::step] {1.5 / k:.2f} ms ({30 / k:g} gaps)") in page
    assert f"cudaEventSynchronize in moeplan::experts {4 / k:.2f} ms (×{4 / k:g})" in page
    assert ("Host issue per micro-batch, the GPU held busy (0.3 s sleep kernel before each): forward 12.00 ms "
            "(profiled kernels ") in page and "1 micro-batch(es) outlasted the hold: their figures are a floor." in page
    for w_old, w_new in zip(result["workloads"], new["workloads"]):
        for c_old, c_new in zip(w_old["configs"], w_new["configs"]):
            no_gaps = [{k: v for k, v in (c.get("profile") or {}).items() if k != "gaps"} for c in (c_new, c_old)]
            assert c_new.get("timing") == c_old.get("timing") and no_gaps[0] == no_gaps[1]
            for cls, parts in c_old["predicted_s"].items():
                assert c_new["predicted_s"][cls] == pytest.approx(parts)


def test_the_predicted_stash_is_the_accountings_for_the_configs_wgrad_batch_and_shown_beside_the_peak():
    """Workload A at S = 4 in FP8: the stash of ``expert_wgrad_stash_bytes`` for its 4 MoE layers (4,096 tokens, top-8,
    32 experts' worst-case padding, 21,120 bytes a row: the +11.6 GiB the 13:28 UTC reading of
    docs/results/model-step.md gives); none in BF16 or without a batch. The memory table prints it."""
    a = cases.workloads(small=False)[0]
    by_name = {c.name: c for c in cases.CONFIGS}
    four, one, bf16 = (by_name[n] for n in ("fp8 fwd+bwd fused wgrad-batch 4", "fp8 fwd+bwd fused", "bf16 fused"))
    rows = 4096 * 8 + 32 * 127
    assert cases.predicted_memory(a, four)["stash_bytes"] == 4 * 4 * rows * (3 * 2048 + 2 * 7168) * (1 + 4 / 128)
    assert cases.predicted_memory(a, four)["stash_bytes"] / 2**30 == pytest.approx(11.59, abs=0.01)
    assert cases.predicted_memory(a, one)["stash_bytes"] == cases.predicted_memory(a, bf16)["stash_bytes"] == 0
    row = cases._memory_row({"name": four.name, "predicted_memory": cases.predicted_memory(a, four),
                             "memory": {"weight_bytes": 1, "step_peak_bytes": 2**30, "peak_bytes": 2**31}})
    assert "| 11.59 |" in row and cases._MEMORY_HEAD.splitlines()[0].count("|") == row.count("|") == 8
