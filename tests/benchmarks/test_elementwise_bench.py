"""benchmarks/elementwise_bench.py end to end on the CPU (tiny model): its file loads into the cost tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeplan.simulator.costs.elementwise import end_bytes_per_token, layer_bytes_per_token
from moeplan.simulator.costs.memory_kernels import load_elementwise, memory_kernel_points
from moeplan.simulator.costs.tables import default_tables
from moeplan.simulator.presets.models import tiny_moe

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "elementwise_bench.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("ew")
    res = _run("--device", "cpu", "--small", "--reps", "1", "--out", str(out / "ew.json"), "--md", str(out / "ew.md"))
    assert res.returncode == 0, res.stderr
    return out


def test_the_cpu_smoke_run_writes_a_file_the_tables_load(smoke):
    data = load_elementwise(smoke / "ew.json")
    pts = memory_kernel_points(data, "ew.json")
    measured = {p.kernel for p in pts}
    assert {"rms_norm", "latent_norm", "residual_add", "rope", "router", "embedding", "cross_entropy"} <= measured
    skipped = {r.kernel for r in data.kernels if r.skipped}
    assert {"fp8_cast", "swiglu", "permute", "combine"} <= skipped and not skipped & measured  # Triton, GPU only
    assert all("Triton kernel" in r.skipped for r in data.kernels if r.skipped)
    tables = default_tables("H800-SXM5").model_copy(update={"memory_kernels": pts})
    assert tables.memory_fracs("swiglu") == (tables.memory_frac, tables.memory_frac)
    assert all(0 < tables.memory_fracs(k)[0] <= 1 for k in measured)


def test_its_bytes_are_the_simulators_ideal_bytes(smoke):
    raw = json.loads((smoke / "ew.json").read_text())
    m, tokens = tiny_moe(), raw["tokens"]
    per_token = layer_bytes_per_token(m, True, "fp8", m.num_experts_per_tok) | end_bytes_per_token(m)
    for row in raw["kernels"]:
        if row["fwd"] is not None:
            assert row["fwd"]["bytes"] == pytest.approx(tokens * per_token[row["kernel"]].fwd_bytes)
            assert row["fwd"]["hbm_frac"] == pytest.approx(row["fwd"]["bytes"] / row["fwd"]["s"] / 4.8e12)
        if row["bwd"] is not None:
            assert row["bwd"]["bytes"] == pytest.approx(tokens * per_token[row["kernel"]].bwd_bytes)
    table = (smoke / "ew.md").read_text()
    assert "| rms_norm | torch.nn.functional.rms_norm | table |" in table and "skipped: Triton kernel" in table


def test_on_the_cpu_it_refuses_the_default_paths():
    res = _run("--device", "cpu", "--small")
    assert res.returncode == 2 and "writes no measurement to simulator/costs/data/h200-elementwise.json" in res.stderr
