"""Every plan ``moeplan plan`` writes, ``moeplan show`` reads back and ``moeplan schema`` describes (a JSON Schema
validation; issue 23): for every model preset (the large ones in the slow run) and for random small layouts, with
the same summary either way."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from tests.orchestrator.test_fuzz import plan_schema_errors

runner = CliRunner()

PRESETS = [
    pytest.param(["--model", "tiny-moe", "--cluster", "h200", "--nodes", "1"], id="tiny-moe"),
    pytest.param(["--model", "tiny-dense", "--cluster", "h200", "--nodes", "1"], id="tiny-dense"),
    pytest.param(["--model", "deepseek-v3", "--cluster", "h800", "--nodes", "256"], id="deepseek-v3",
                 marks=pytest.mark.slow),
    pytest.param(["--model", "deepseek-v2", "--cluster", "h800", "--nodes", "32"], id="deepseek-v2",
                 marks=pytest.mark.slow),
    pytest.param(["--model", "deepseek-v2-lite", "--cluster", "h200", "--nodes", "2"], id="deepseek-v2-lite",
                 marks=pytest.mark.slow),
    pytest.param(["--model", "deepseek-67b", "--cluster", "h100", "--nodes", "4", "--global-batch", "256"],
                 id="deepseek-67b", marks=pytest.mark.slow),
]


def _plan_then_show(args: list[str], out) -> tuple[int, str]:
    """``plan ARGS --json``, then ``show --json`` of what it wrote: (plan's exit code, plan's stderr)."""
    made = runner.invoke(app, ["plan", *args, "--out", str(out), "--json"])
    if made.exit_code != 0:
        return made.exit_code, made.stderr
    shown = runner.invoke(app, ["show", str(out), "--json"])
    assert shown.exit_code == 0, f"show cannot read back the plan of {args}: {shown.stderr}"
    plan_schema_errors(out / "plan.json")  # and `moeplan schema` describes it
    assert json.loads(shown.stdout) == json.loads(made.stdout)
    return 0, made.stderr


@pytest.mark.parametrize("args", PRESETS)
def test_every_preset_plan_reads_back(tmp_path, args):
    code, stderr = _plan_then_show(args, tmp_path)
    assert code == 0, stderr


@st.composite
def small_layouts(draw: st.DrawFn) -> list[str]:
    """``plan`` arguments of a layout that runs: tiny models on one or two H200 nodes, every schedule kind."""
    model = draw(st.sampled_from(["tiny-moe", "tiny-dense"]))
    nodes, schedule = draw(st.integers(1, 2)), draw(st.sampled_from(["1f1b", "interleaved", "zb1p", "dualpipe",
                                                                     "dualpipev"]))
    moe = model == "tiny-moe"  # 4 layers + an MTP module; tiny-dense 2 layers, so 2 stages at most
    two_chunks = schedule in ("interleaved", "dualpipev")  # 2 stages per rank
    pp = 2 if schedule == "dualpipe" else 1 if two_chunks and not moe else draw(st.sampled_from([1, 2]))
    dp, mbs = 8 * nodes // pp, draw(st.integers(1, 2))
    ep = draw(st.sampled_from([e for e in (1, 2, 4, 8, 16) if dp % e == 0])) if moe else 1
    seq, recompute = draw(st.sampled_from([256, 512, 1024])), draw(st.sampled_from(["none", "selective", "full"]))
    batch = dp * mbs * draw(st.sampled_from([4, 8]))  # micro-batches every kind runs at pp <= 2
    extra = ["--zipf", draw(st.sampled_from(["0", "0.5", "1.5"]))] if moe and draw(st.booleans()) else []
    # even, so that an EP group over two nodes places them evenly (hierarchical EPLB)
    extra += ["--redundant-experts", str(draw(st.sampled_from([0, 2, 4])))] if moe and ep > 1 else []
    return ["--model", model, "--cluster", "h200", "--nodes", str(nodes), "--no-search", "--pp", str(pp),
            "--ep", str(ep), "--schedule", schedule, "--micro-batch-size", str(mbs), "--seq-len", str(seq),
            "--global-batch", str(batch), "--recompute", recompute, *extra]


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(args=small_layouts())
def test_random_small_layouts_read_back(tmp_path_factory, args):
    code, stderr = _plan_then_show(args, tmp_path_factory.mktemp("plan"))
    assert code == 0, f"{args}: {stderr}"
