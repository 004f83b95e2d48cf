"""The CLI in-process (typer's CliRunner): output, files, and bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from tests.simulator.spec.test_spec import V3_CONFIG_JSON

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_plan_deepseek_v3_on_2048_h800(tmp_path):
    res = run("plan", "--model", "deepseek-v3", "--cluster", "h800", "--nodes", "256", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert "671,026,404,352 (671.03B)" in res.output
    assert "37,552,282,624 (37.55B)" in res.output
    assert "PP16 (dualpipe, 16 stages) x EP64 x DP128, ZeRO-1" in res.output
    assert (tmp_path / "plan.json").is_file()
    shown = json.loads(run("show", str(tmp_path), "--json").output)
    assert shown["params_total"] == 671_026_404_352 and shown["pp"] == 16 and shown["memory_fits"] is True
    assert shown["flops_per_token"] == pytest.approx(260.65e9, rel=1e-4)


def test_plan_from_a_config_json_reports_ignored_keys(tmp_path):
    cfg = tmp_path / "DeepSeek-V3" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(V3_CONFIG_JSON))
    res = run("plan", "--model", str(cfg), "--cluster", "h200", "--nodes", "64", "--no-search", "--pp", "16",
              "--ep", "32", "--schedule", "dualpipe", "--recompute", "full", "--out", str(tmp_path / "o"))
    # full recompute: in BF16 (a config.json's default) with eager kernels, selective keeps 142 GiB of activations
    assert res.exit_code == 0, res.output
    assert "quantization_config" in res.output and "671,026,404,352" in res.output


def test_set_overrides_reach_the_plan(tmp_path):
    res = run("plan", "--set", "parallel.pp=8", "--set", "training.precision=bf16", "--set", "parallel.recompute=full",
              "--out", str(tmp_path), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["pp"] == 8 and out["dp"] == 256 and out["precision"] == "bf16"


def test_dense_model_gets_a_fitting_default_layout(tmp_path):
    out = json.loads(run("plan", "--model", "deepseek-67b", "--cluster", "h100", "--nodes", "4", "--global-batch", "256",
                         "--out", str(tmp_path), "--json").output)
    assert out["ep"] == 1 and out["memory_fits"] is True and out["params_total"] == out["params_activated"]


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--model", "nope"], "--model 'nope': unknown preset"),
     (["--cluster", "tpu"], "--cluster 'tpu': unknown preset"),
     (["--nodes", "0"], "--nodes 0: must be a positive"),
     (["--nodes", "-3"], "--nodes -3: must be a positive"),
     (["--set", "parallel.ppp=3"], "'parallel.ppp' does not exist"),
     (["--set", "pp"], "expected KEY=VALUE"),
     (["--set", "parallel.ep=48"], "ep=48 does not divide n_routed_experts=256"),
     (["--set", "parallel.pp=3"], "pp=3 does not divide"),
     (["--set", "training.precision=fp4"], "training.precision"),
     (["--set", "parallel.micro_batch_size=7"], "global_batch_seqs=15360 is not a multiple"),
     (["--model", "missing.json"], "--model missing.json: no such file"),
     (["--model", "deepseek-67b", "--nodes", "1"], "no layout of deepseek-67b fits 8 x H800-SXM5"),
     (["--calibration", "/dev/null"], "--calibration /dev/null: malformed JSON"),
     (["--cost-tables", "cutlass"],
      "--cost-tables 'cutlass': unknown (choose default, hopper-cutlass36-2024, hopper-bf16-fa2-2023, cpu, cpu-bf16)"),
     (["--cost-tables", "hopper-cutlass36-2024", "--calibration", "cal.json"],
      "--calibration cal.json and --cost-tables hopper-cutlass36-2024: give one cost-table source, not both"),
     (["--tokens", "lots"], "--tokens 'lots': expected a number"),
     (["--cp", "3"], "cp=3 does not divide the 128 GPUs of a pipeline stage"),
     (["--cp", "0"], "parallel.cp: Input should be greater than 0 (got 0)"),
     (["--cp", "256"], "cp=256 does not divide the 128 GPUs of a pipeline stage"),
     (["--cp", "16", "--seq-len", "4104"], "cp=16 must split seq_len_tokens=4104 into 2 x cp = 32 equal chunks"),
     (["--search", "--cp", "3"], "cp=3 does not divide the cluster's 2048 GPUs")],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, message):
    out = tmp_path / "out"
    res = runner.invoke(app, ["plan", *args, "--out", str(out)])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], res.output
    assert not out.exists()


def test_named_cost_tables_reach_the_plan(tmp_path):
    args = ["plan", "--model", "deepseek-v2-lite", "--cluster", "h800", "--nodes", "2", "--precision", "fp8", "--no-search",
            "--pp", "2", "--ep", "8", "--schedule", "dualpipe", "--seq-len", "1024", "--global-batch", "64", "--json"]
    default = json.loads(run(*args, "--out", str(tmp_path / "a")).output)
    named = json.loads(run(*args, "--cost-tables", "default", "--out", str(tmp_path / "b")).output)
    res = run(*args[:-1], "--cost-tables", "hopper-cutlass36-2024", "--out", str(tmp_path / "c"))
    assert res.exit_code == 0, res.output
    assert "cost tables hopper-cutlass36-2024" in " ".join(res.output.split())  # the summary table's title
    cutlass = json.loads(run("show", str(tmp_path / "c"), "--json").output)
    assert default["cost_tables"] == named["cost_tables"] == "hopper-deepgemm-default"
    assert named["step_time_s"] == default["step_time_s"]
    assert cutlass["cost_tables"] == "hopper-cutlass36-2024" and cutlass["step_time_s"] > default["step_time_s"]


def test_calibration_files_with_and_without_memory_kernel_classes(tmp_path):
    from moeplan.simulator.costs.tables import default_tables

    args = ["plan", "--model", "deepseek-v2-lite", "--cluster", "h800", "--nodes", "2", "--no-search", "--pp", "2",
            "--ep", "8", "--schedule", "dualpipe", "--seq-len", "1024", "--global-batch", "64", "--json"]
    data = default_tables("H800-SXM5").model_dump(mode="json")
    del data["memory_kernels"]  # a calibration file from before the per-class table
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = json.loads(run(*args, "--calibration", str(tmp_path / "old.json"), "--out", str(tmp_path / "a")).output)
    slow = data | {"memory_kernels": [{"kernel": "swiglu", "fwd_frac": 0.05, "source": "test"}]}
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    slower = json.loads(run(*args, "--calibration", str(tmp_path / "slow.json"), "--out", str(tmp_path / "b")).output)
    assert slower["step_time_s"] > old["step_time_s"]
    bad = data | {"memory_kernels": [{"kernel": "swiglu", "fwd_frac": 2.0, "source": "test"}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    res = runner.invoke(app, [*args, "--calibration", str(tmp_path / "bad.json"), "--out", str(tmp_path / "c")])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert f"--calibration {tmp_path / 'bad.json'}: memory_kernels.0.fwd_frac: Input should be less than or equal to 1" in lines[0]


def test_plan_with_context_parallelism(tmp_path):
    res = run("plan", "--cp", "2", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert "x EP64 x DP64 x CP2, ZeRO-1" in res.output and "CP32 DP4, 1 x 120 (chosen)" in res.output
    assert "x DP64 x CP2, dualpipe" in (tmp_path / "plan.html").read_text()
    out = json.loads(run("show", str(tmp_path), "--json").output)
    assert (out["pp"], out["dp"], out["cp"], out["ep"]) == (16, 64, 2, 64) and out["memory_fits"] is True
    assert [p["layout_source"] for p in out["phases"]] == ["main", "chosen", "chosen"]
    assert out["phases"][0]["cp"] == 2 and all(p["cp"] >= 2 for p in out["phases"])


def test_bad_config_json(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text("{\"hidden_size\": 7168")
    res = runner.invoke(app, ["plan", "--model", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "malformed JSON" in res.output
    cfg.write_text(json.dumps({k: v for k, v in V3_CONFIG_JSON.items() if k != "hidden_size"}))
    res = runner.invoke(app, ["plan", "--model", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "hidden_size: Field required" in res.output
    assert not (tmp_path / "o").exists()


def test_show_refuses_a_bad_plan(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({"schema_version": 99}))
    res = runner.invoke(app, ["show", str(tmp_path)])
    assert res.exit_code == 2 and "schema_version=99 is not supported" in res.output


def test_schema_and_presets():
    schema = json.loads(run("schema").output)
    assert schema["title"] == "PlanFile" and "schema_version" in schema["properties"]
    res = run("presets")
    assert res.exit_code == 0 and "deepseek-v2-lite" in res.output and "H800-SXM5" in res.output


@pytest.mark.parametrize(("args", "message"), [(["plan", "--pp", "abc"], "Invalid value for '--pp'"),
                                               (["plan", "--bogus"], "No such option: --bogus")])
def test_usage_errors_are_one_line_from_the_console_entry_point(tmp_path, args, message):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "moeplan.orchestrator.cli", *args, "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "o").exists()


def _load_file(path, layers, counts):
    path.write_text(json.dumps({"schema_version": 1, "model": "tiny-moe", "n_routed_experts": 16,
                                "num_experts_per_tok": 4, "window_tokens": 4096,
                                "layers": [{"layer": i, "tokens_per_expert": counts} for i in layers]}))
    return path


def test_recorded_expert_load_slows_the_plan_and_shapes_the_placement(tmp_path):
    base = ["plan", "--model", "tiny-moe", "--cluster", "h200", "--nodes", "1", "--no-search", "--pp", "2", "--ep", "4",
            "--schedule", "dualpipe", "--seq-len", "256", "--global-batch", "32", "--json"]
    uniform = json.loads(run(*base, "--out", str(tmp_path / "u")).output)
    hot = [4000] + [10] * 15  # one expert takes almost every token
    load = _load_file(tmp_path / "load.json", [1, 2, 3, 4], hot)
    skewed = json.loads(run(*base, "--load", str(load), "--out", str(tmp_path / "s")).output)
    assert skewed["step_time_s"] > uniform["step_time_s"]
    from moeplan.simulator.contracts.plan_file import read_plan

    plan = read_plan(tmp_path / "s")
    assert plan.placement.layer_ids == [1, 2, 3, 4] and len(plan.placement.phy2log) == 4


@pytest.mark.parametrize(("layers", "message"), [([0], "layer=0 is not an MoE layer"), ([1, 1], "appears twice")])
def test_bad_load_file_is_one_line(tmp_path, layers, message):
    load = _load_file(tmp_path / "load.json", layers, [1] * 16)
    res = runner.invoke(app, ["plan", "--model", "tiny-moe", "--cluster", "h200", "--load", str(load),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
