"""``training.kernels`` through the CLI: a bad value is one line naming the field, a good one is recorded in
the plan file and moves the prediction (the fused loss is cheaper than the FP32 one)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from moeplan.orchestrator.cli import app

ARGS = ["plan", "--model", "tiny-moe", "--cluster", "h200", "--nodes", "1", "--pp", "2", "--ep", "4",
        "--schedule", "dualpipev", "--tokens", "1T"]


def test_a_bad_kernel_setting_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(app, [*ARGS, "--out", str(tmp_path), "--set", "training.kernels.fusion=fast"])
    assert result.exit_code == 2
    assert "training.kernels.fusion" in result.output and "'fast'" in result.output
    assert not (tmp_path / "plan.json").exists()


def test_the_plan_records_the_kernels_it_priced(tmp_path):
    def plan(*sets: str) -> dict:
        out = tmp_path / "-".join(sets or ("default",))
        args = [*ARGS, "--out", str(out)] + [a for s in sets for a in ("--set", s)]
        result = CliRunner().invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads((out / "plan.json").read_text())

    default, fused = plan(), plan("training.kernels.loss=fused", "training.kernels.fusion=fused")
    assert default["inputs"]["training"]["kernels"] == {"fusion": "eager", "loss": "fp32", "expert_wgrad_batch": 1}
    assert fused["inputs"]["training"]["kernels"] == {"fusion": "fused", "loss": "fused", "expert_wgrad_batch": 1}
    assert fused["predictions"]["step"]["step_time_s"] < default["predictions"]["step"]["step_time_s"]
