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


def _plan(tmp_path, name: str, *args: str) -> tuple[dict, str]:
    out = tmp_path / name
    result = CliRunner().invoke(app, [*ARGS, "--out", str(out), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "plan.json").read_text()), result.output


def test_a_searched_fp8_plan_takes_the_expert_wgrad_batch_the_cost_model_chooses(tmp_path):
    """tiny-moe has no published layout, so its layout is searched (pp, ep and the schedule fixed here); in FP8 the
    planner then simulates every expert Wgrad batch size on it and keeps the fastest that fits
    (``simulator.planning.wgrad_batch``), which the plan file records and a note explains. A size the user set is
    kept, and BF16 has nothing to choose."""
    from moeplan.simulator.contracts.plan_file import PlanFile
    from moeplan.simulator.planning.wgrad_batch import choose_wgrad_batch, with_wgrad_batch

    fp8, said = _plan(tmp_path, "fp8", "--precision", "fp8")
    chosen = fp8["inputs"]["training"]["kernels"]["expert_wgrad_batch"]
    inputs = PlanFile.model_validate(fp8).inputs
    assert choose_wgrad_batch(with_wgrad_batch(inputs, 1)).chosen == chosen
    assert f"expert_wgrad_batch={chosen} chosen for the searched layout" in said
    kept, said = _plan(tmp_path, "kept", "--precision", "fp8", "--set", "training.kernels.expert_wgrad_batch=2")
    assert kept["inputs"]["training"]["kernels"]["expert_wgrad_batch"] == 2 and "chosen for the searched" not in said
    bf16, said = _plan(tmp_path, "bf16")
    assert bf16["inputs"]["training"]["kernels"]["expert_wgrad_batch"] == 1 and "chosen for the searched" not in said


def test_what_sets_the_expert_wgrad_batch():
    from moeplan.orchestrator.inputs import _sets_wgrad_batch

    assert _sets_wgrad_batch(["training", "kernels", "expert_wgrad_batch"], 2)
    assert _sets_wgrad_batch(["training", "kernels"], {"expert_wgrad_batch": 1, "fusion": "fused"})
    assert _sets_wgrad_batch(["training"], {"kernels": {"expert_wgrad_batch": 3}})
    assert not _sets_wgrad_batch(["training", "kernels"], {"fusion": "fused"})
    assert not _sets_wgrad_batch(["training"], {"kernels": "eager"})
    assert not _sets_wgrad_batch(["training", "kernels", "fusion"], "fused")
    assert not _sets_wgrad_batch(["parallel", "pp"], 2)
