"""benchmarks/cpu_tables.py end to end (``--quick``): it writes cost-table files that load, carry their machine
and links, and plan the tiny model as a calibration; the link fit recovers a known line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.simulator.costs.tables import CPU_TABLE_FILES, CostTables

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "cpu_tables.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu")
    args = ["--quick", "--out-dir", str(out), "--md", str(out / "cpu.md")]
    res = subprocess.run([sys.executable, "-P", str(BENCH), *args], check=False, capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.mark.parametrize("name", list(CPU_TABLE_FILES))
def test_the_quick_run_writes_cost_tables_that_load(quick, name):
    t = CostTables.from_file(quick / CPU_TABLE_FILES[name])
    assert t.name == name and t.precisions == ("bf16",) and t.machine is not None
    assert t.machine.threads_per_process == 1 and "--quick" in t.machine.command
    assert max(p.flops_per_s for p in t.gemm) <= t.machine.peak_flops_per_s
    assert {(f.collective, f.processes) for f in t.links} == {
        (c, 2) for c in ("send_recv", "all_to_all", "all_reduce", "reduce_scatter", "all_gather",
                         # the runtime's blocking batches and the norm's one all-reduce (issue 21, calibrate)
                         "post_send", "post_recv", "post_both", "all_reduce_once")}
    assert all(p.source.startswith(f"[CPU] cpu_tables.py {t.machine.date}:") for p in t.gemm)
    page = (quick / "cpu.md").read_text()
    assert "## gloo links" in page and t.machine.cpu in page


def test_the_quick_tables_plan_the_tiny_model_as_a_calibration(quick, tmp_path):
    res = CliRunner().invoke(app, ["plan", "--model", "tiny-moe", "--cluster", "cpu", "--nodes", "1", "--no-search",
                                   "--pp", "2", "--micro-batch-size", "1", "--seq-len", "64", "--global-batch", "8",
                                   "--calibration", str(quick / CPU_TABLE_FILES["cpu"]), "--out", str(tmp_path),
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["cost_tables"] == "cpu" and json.loads(res.stdout)["step_time_s"] > 0


def test_the_link_fit_recovers_a_line_and_counts_bytes_per_collective():
    from moeplan.orchestrator.calibration.links import fit
    latency, bw = 50e-6, 2e9
    points = [(b, latency + b / 2 / bw) for b in (1024, 65536, 2**22)]  # all_gather of 2: half the buffer moves
    got = fit("all_gather", 2, points)
    assert got == pytest.approx((latency, bw), rel=1e-6)
    assert fit("send_recv", 2, [(1024, 1e-4), (2048, 0.5e-4)]) == pytest.approx((0.5e-4, 1e18))  # falling: latency only
