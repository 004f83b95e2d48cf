"""``moeplan plan --cluster cpu``: the tiny model plans on local processes for every schedule kind, quickly,
priced by the measured cpu tables, with a step time between what the busiest rank must compute and
everything run one after the other; FP8 and a model that does not fit are one line each."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.simulator.contracts.plan_file import parse_plan
from moeplan.simulator.costs.tables import named_tables
from moeplan.simulator.engine.build import SimOptions, compute_bound_s, step_inputs
from moeplan.simulator.schedules.registry import SCHEDULE_KINDS, schedule_kind

runner = CliRunner()
TINY = ["plan", "--model", "tiny-moe", "--cluster", "cpu", "--nodes", "1", "--no-search", "--micro-batch-size", "1",
        "--seq-len", "64"]
TINY_UNITS = 5  # tiny-moe: 4 decoder layers and 1 MTP module


def _plan(tmp_path, *args: str) -> tuple[dict, float]:
    """The plan's JSON summary and the CPU seconds the command took in this process."""
    start = time.process_time()
    res = runner.invoke(app, [*TINY, *args, "--out", str(tmp_path), "--json"], catch_exceptions=False)
    elapsed = time.process_time() - start
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), elapsed


def _serial_s(plan) -> float:
    """Every priced piece of the step one after the other: compute of every stage for every micro-batch,
    the stage-boundary transfers, every rank's DP tail and optimizer (an upper bound without EP)."""
    inputs, lay = plan.inputs, plan.layout
    si = step_inputs(inputs, lay.dp, lay.microbatches, opts=_opts())
    ends = si.ends
    head_s = ends.head_fwd_s + ends.head_dx_s + ends.head_dw_s
    compute = sum(sum(u.fwd_s + u.dx_s + u.dw_s for u in st.units) + (ends.embed_fwd_s if st.has_embedding else 0.0)
                  + (st.heads * head_s if st.has_head else 0.0) for st in si.stages)
    bw = si.links.nvlink_bytes_per_s if si.links.p2p_over_nvlink else si.links.nic_bytes_per_s
    transfers = 2 * (len(si.stages) - 1) * (si.links.latency_s + si.links.p2p_bytes / bw)
    tails = sum(sum(t.dp_sync_s.values()) + t.optimizer_s for t in si.tails)
    return lay.microbatches * (compute + transfers) + tails


def _opts() -> SimOptions:
    return SimOptions(tables=named_tables("cpu", "CPU-process"))


def test_the_issue_command_plans_two_processes(tmp_path):
    summary, cpu_s = _plan(tmp_path, "--pp", "2", "--schedule", "1f1b", "--global-batch", "8")
    assert (summary["cluster"], summary["gpus"], summary["pp"], summary["dp"], summary["ep"]) == ("cpu", 2, 2, 1, 1)
    assert summary["cost_tables"] == "cpu" and summary["memory_fits"] and summary["microbatches"] == 8
    assert cpu_s < 5.0
    plan = parse_plan((tmp_path / "plan.json").read_text())
    assert plan.inputs.cluster.gpu.name == "CPU-process"
    assert compute_bound_s(plan.inputs, 1, 8, _opts()) < summary["step_time_s"] <= _serial_s(plan)


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_every_schedule_kind_plans_on_cpu_processes(tmp_path, kind, pp):
    entry = schedule_kind(kind)
    microbatches = entry.smallest_valid(pp, 2 * pp)
    layers = ["--set", "model.num_hidden_layers=8"] if entry.num_stages(pp) > TINY_UNITS else []  # a stage per unit
    summary, cpu_s = _plan(tmp_path, "--pp", str(pp), "--schedule", kind, "--microbatches", str(microbatches),
                           "--global-batch", str(microbatches), "--set", f"cluster.node.gpus_per_node={pp}", *layers)
    assert (summary["gpus"], summary["pp"], summary["dp"], summary["schedule"]) == (pp, pp, 1, kind)
    assert cpu_s < 5.0, f"{kind} pp={pp} took {cpu_s:.1f} s of CPU"
    plan = parse_plan((tmp_path / "plan.json").read_text())
    assert compute_bound_s(plan.inputs, 1, microbatches, _opts()) < summary["step_time_s"] <= _serial_s(plan)


def test_four_processes_with_expert_parallelism(tmp_path):
    summary, cpu_s = _plan(tmp_path, "--pp", "2", "--ep", "2", "--schedule", "1f1b", "--global-batch", "8",
                           "--set", "cluster.node.gpus_per_node=4")
    assert (summary["gpus"], summary["pp"], summary["dp"], summary["ep"]) == (4, 2, 2, 2) and cpu_s < 5.0
    assert parse_plan((tmp_path / "plan.json").read_text()).inputs.cluster.node.gpus_per_node == 4
    no_ep, _ = _plan(tmp_path / "b", "--pp", "2", "--ep", "1", "--schedule", "1f1b", "--global-batch", "8",
                     "--set", "cluster.node.gpus_per_node=4")
    # the all-to-all between two processes costs more than the expert GEMMs it halves (latency-bound)
    assert summary["step_time_s"] > no_ep["step_time_s"]


@pytest.mark.parametrize(("args", "line"), [
    (["--pp", "2", "--precision", "fp8"], "precision=fp8 is not priced by cost tables 'cpu' (they price bf16)"),
    (["--model", "deepseek-v3", "--precision", "bf16", "--pp", "2", "--global-batch", "3072"],
     "GiB usable on CPU-process"),
])
def test_what_cpu_processes_cannot_run_is_one_line(tmp_path, args, line):
    res = runner.invoke(app, [*TINY, *args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and line in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "o").exists()


def test_presets_lists_the_cpu_cluster():
    res = runner.invoke(app, ["presets"])
    assert res.exit_code == 0 and "CPU-process" in res.output and "│ cpu " in res.output
