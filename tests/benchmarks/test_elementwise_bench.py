"""benchmarks/elementwise_bench.py end to end on the CPU (tiny model): its file loads into the cost tables."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeplan.simulator.costs.elementwise import EAGER_CLASSES, end_bytes_per_token, layer_bytes_per_token
from moeplan.simulator.costs.memory_kernels import (
    ELEMENTWISE_FILES,
    elementwise_file,
    load_elementwise,
    memory_kernel_points,
)
from moeplan.simulator.costs.tables import default_tables
from moeplan.simulator.presets.models import tiny_moe

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "elementwise_bench.py"
_spec = importlib.util.spec_from_file_location("elementwise_bench", BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


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
    assert all(p.fwd_fixed_s is not None for p in pts)  # every measured class is per token here: fitted
    assert all(0 < tables.memory_fracs(k)[0] <= 1 for k in measured)


def test_its_bytes_are_the_simulators_ideal_bytes(smoke):
    raw = json.loads((smoke / "ew.json").read_text())
    m, tokens = tiny_moe(), raw["tokens"]
    per_token = layer_bytes_per_token(m, True, "fp8", m.num_experts_per_tok) | end_bytes_per_token(m)
    per_token |= {cls: per_token[k] for k, cls in EAGER_CLASSES.items() if k in per_token}  # op by op: the same bytes
    for row in raw["kernels"]:
        if row["fwd"] is not None:
            assert row["fwd"]["bytes"] == pytest.approx(tokens * per_token[row["kernel"]].fwd_bytes)
        if row["bwd"] is not None:
            assert row["bwd"]["bytes"] == pytest.approx(tokens * per_token[row["kernel"]].bwd_bytes)
        for p in (row["fwd"], row["bwd"]):  # the second size's bytes too; the fit gives back the main point (H200's)
            if p is not None:
                assert p["small_bytes"] == pytest.approx(p["bytes"] * raw["small_tokens"] / tokens) and p["fixed_s"] >= 0
                assert p["fixed_s"] + p["bytes"] / (p["hbm_frac"] * 4.8e12) == pytest.approx(p["s"])
                assert p["fixed_clamped"] == (p["fixed_s"] != p["intercept_s"])
    assert raw["hbm_source"] == ("simulator.presets.clusters.gpu_for_device (H200-SXM datasheet): 'cpu' is none of "
                                 "the presets' GPUs, the H200's taken")
    table = (smoke / "ew.md").read_text()
    assert "| rms_norm | torch.nn.functional.rms_norm | table |" in table and "skipped: Triton kernel" in table
    assert "fwd us at ¼ | fwd fixed us | fwd HBM" in table and f"timed again at {raw['small_tokens']} tokens" in table


@pytest.mark.parametrize("out", [(), ("--out", "simulator/costs/data/h100-elementwise.json", "--md", "/tmp/ew.md")])
def test_on_the_cpu_it_refuses_the_packaged_paths(out):
    res = _run("--device", "cpu", "--small", *out)
    assert res.returncode == 2 and ("writes no measurement to simulator/costs/data/h100-elementwise.json, "
                                    "simulator/costs/data/h200-elementwise.json or docs/results/elementwise.md"
                                    in res.stderr), res.stderr


@pytest.mark.parametrize(("device_name", "preset", "hbm_bytes_per_s", "memory_system"), [
    ("NVIDIA H100 80GB HBM3", "H100-SXM5", 3.35e12, "h100"),
    ("NVIDIA H800", "H800-SXM5", 3.35e12, "h100"),  # the H100's HBM3
    ("NVIDIA H200", "H200-SXM", 4.8e12, "h200"),
])
def test_it_takes_the_preset_of_the_gpu_it_runs_on(device_name, preset, hbm_bytes_per_s, memory_system):
    gpu, source = bench.gpu_preset_for(device_name)
    assert gpu.name == preset and gpu.hbm_bytes_per_s == hbm_bytes_per_s
    assert source == f"simulator.presets.clusters.gpu_for_device ({preset} datasheet)"
    assert elementwise_file(gpu.name) == ELEMENTWISE_FILES[memory_system]  # its default --out


@pytest.mark.parametrize("device_name", ["cpu", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 PCIe"])
def test_elsewhere_it_takes_the_h200s_and_says_so(device_name):
    gpu, source = bench.gpu_preset_for(device_name)
    assert gpu.hbm_bytes_per_s == 4.8e12 and elementwise_file(gpu.name) == ELEMENTWISE_FILES["h200"]
    assert source.startswith("simulator.presets.clusters.gpu_for_device (H200-SXM ")
    assert "none of the presets'" in source


@pytest.mark.parametrize("memory_system", sorted(ELEMENTWISE_FILES))
def test_the_packaged_files_bytes_are_what_the_simulator_counts_now(memory_system):
    """Refitting a packaged file with today's byte model changes nothing: a change to the bytes the simulator
    counts must come with ``--refit`` of the files (their seconds as measured), or the tables' fractions price
    other bytes than they were measured at."""
    raw = json.loads((ROOT / "simulator" / "costs" / ELEMENTWISE_FILES[memory_system]).read_text())
    again = bench.refit(raw, "test")
    for before, after in zip(raw["kernels"], again["kernels"], strict=True):
        for key in ("fwd", "bwd"):
            if before[key] is not None:
                assert after[key].keys() == before[key].keys(), before["kernel"]
                for name, value in before[key].items():
                    same = after[key][name] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value)
                    assert same, (before["kernel"], before["implementation"], key, name)
        assert after["shape"] == before["shape"]
    assert again["refit"] == [*raw.get("refit", []), "test"]


def test_counted_padded_the_experts_layout_kernels_fit_a_line_within_the_datasheet():
    """The H100 file's permutation and the experts' casts, timed at 4096 and 1024 tokens (128 and 32 rows an
    expert, padded to 128 by the layout: 1.48x and 4x the routed rows): counted as routed rows, the 1024-token
    point cost nearly the 4096-token one and the fit clamped its fixed seconds; counted padded, both lie on a line
    within the datasheet."""
    data = load_elementwise(ROOT / "simulator" / "costs" / ELEMENTWISE_FILES["h100"])
    rows = {r.kernel: r for r in data.kernels if r.in_table and r.kernel in ("permute", "expert_cast")}
    assert rows["permute"].fwd.fixed_clamped is False and rows["expert_cast"].bwd.fixed_clamped is False
    assert rows["permute"].fwd.fixed_s < 5e-6  # a copy's fixed cost: microseconds, not the clamped 110 us


def test_refit_takes_a_file_and_a_reason_and_keeps_the_seconds(tmp_path):
    res = _run("--refit", str(ROOT / "simulator" / "costs" / ELEMENTWISE_FILES["h200"]), "--out", str(tmp_path / "a"))
    assert res.returncode == 2 and "--refit needs --why" in res.stderr
    for bad, text in (("missing.json", None), ("not-json.json", "{"), ("other.json", '{"model": "gpt"}')):
        if text is not None:
            (tmp_path / bad).write_text(text)
        res = _run("--refit", str(tmp_path / bad), "--out", str(tmp_path / "b.json"), "--why", "a test")
        assert res.returncode == 2 and f"--refit {tmp_path / bad}: not a file of this benchmark" in res.stderr
        errors = [line for line in res.stderr.splitlines() if "error:" in line]  # argparse's usage, then one line
        assert len(errors) == 1 and res.stderr.strip().endswith(errors[0]) and not (tmp_path / "b.json").exists()
    res = _run("--refit", str(ROOT / "simulator" / "costs" / ELEMENTWISE_FILES["h200"]), "--out",
               str(tmp_path / "a.json"), "--why", "a test")
    assert res.returncode == 0, res.stderr
    before = json.loads((ROOT / "simulator" / "costs" / ELEMENTWISE_FILES["h200"]).read_text())
    after = json.loads((tmp_path / "a.json").read_text())
    assert [r.get("fwd") and r["fwd"]["s"] for r in after["kernels"]] == [r.get("fwd") and r["fwd"]["s"]
                                                                          for r in before["kernels"]]
    assert after["refit"][-1].endswith(": a test")
