"""benchmarks/quant_speed.py on the CPU: its cases, byte counts, argument checks and report, and a tiny run in
the Triton interpreter (the emulated path only: the interpreter has no hardware cast)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "quant_speed.py"
spec = importlib.util.spec_from_file_location("quant_speed", BENCH)
quant_speed = sys.modules["quant_speed"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(quant_speed)


def test_cases_cover_every_quantiser_at_every_v3_shape_first_shapes_first():
    cases = quant_speed.cases(small=False)
    assert len(cases) == len(set(cases)) == 2 * 2 + 2 * 4
    assert [name for name, _ in cases[:4]] == list(quant_speed.QUANTISERS)  # each variant compiles early
    weights = {shape for name, shape in cases if name == "weight_128x128+t"}
    assert weights == {(7168, 2048), (2048, 7168), (7168, 18432), (16, 4096, 7168)}
    assert {shape for name, shape in cases if name == "act_128x1_t"} == {(4096, 7168), (32768, 2048)}


def test_traffic_bytes_closed_forms():
    M, K = 4096, 7168
    # bf16 in, fp8 out, one fp32 scale per 128 elements
    assert quant_speed.traffic_bytes("act_1x128", (M, K), 2) == 3 * M * K + 4 * M * K // 128
    assert quant_speed.traffic_bytes("act_128x1_t", (200, 384), 2) == 3 * 200 * 384 + 4 * 384 * 2  # ceil(200/128)
    E, N = 16, 4096
    both = quant_speed.traffic_bytes("weight_128x128+t", (E, N, K), 4)
    assert both == (4 + 2) * E * N * K + 4 * E * (N // 128) * (K // 128)
    assert both - quant_speed.traffic_bytes("weight_128x128", (E, N, K), 4) == E * N * K  # the transposed copy


def test_mismatches_counts_differing_bytes():
    a = (torch.zeros(4, dtype=torch.float8_e4m3fn), torch.ones(2))
    b = (torch.tensor([0, 1, 0, 2], dtype=torch.uint8).view(torch.float8_e4m3fn), torch.tensor([1.0, -1.0]))
    assert quant_speed.mismatches(a, a) == 0
    assert quant_speed.mismatches(a, b) == 2 + 1  # two fp8 codes, one sign byte of a float


@pytest.mark.parametrize("argv, message", [
    (["--out", "x.md", "--reps", "0"], "--reps=0"),
    (["--out", "x.md", "--jobs", "-1"], "--jobs=-1"),
    (["--device", "cpu"], "--out"),
])
def test_bad_arguments_get_one_line_naming_the_field(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        quant_speed.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_report_rows_both_paths_a_mismatch_and_a_skip():
    meta = {"command": "python -P benchmarks/quant_speed.py --out r.md", "device": "NVIDIA H100 80GB HBM3",
            "date": "2026-12-06 09:00 UTC", "torch": "2.11", "triton": "3.6.0", "dtype": "bf16",
            "hbm_bytes_per_s": 3.35e12, "hbm_source": "H100-SXM5 preset", "hardware": "probe passed"}
    nbytes = quant_speed.traffic_bytes("act_1x128", (4096, 7168), 2)

    def path(s):
        return {"s": s, "bytes_per_s": nbytes / s, "hbm_frac": nbytes / s / 3.35e12}

    rows = [
        {"quantiser": "act_1x128", "shape": [4096, 7168], "bytes": nbytes, "emulated": path(60e-6),
         "hardware": path(40e-6), "mismatches": 0, "skipped": None},
        {"quantiser": "act_128x1_t", "shape": [4096, 7168], "bytes": nbytes, "emulated": path(80e-6),
         "hardware": path(50e-6), "mismatches": 7, "skipped": None},
        {"quantiser": "weight_128x128", "shape": [16, 4096, 7168], "bytes": 1e9, "skipped": "budget, 46 s > 45 s"},
    ]
    text = quant_speed.render(meta, rows)
    gbps = nbytes / 40e-6 / 1e9
    assert f"| act_1x128 | 4096×7168 | {nbytes / 1e6:,.1f} | 60.0 | {nbytes / 60e-6 / 1e9:,.1f} |" in text
    assert f"| 40.0 | {gbps:,.1f} | {gbps * 1e9 / 3.35e12:.1%} | 1.50× | yes |" in text
    assert "| 1.60× | NO (7 bytes differ) |" in text
    assert "| weight_128x128 | 16×4096×7168 | 1,000.0 | skipped: budget, 46 s > 45 s |" in text
    assert "HBM peak 3.35 TB/s (H100-SXM5 preset). Hardware cast: probe passed." in text
    header, rule = text.splitlines()[4:6]
    assert header.count("|") == rule.count("|") == 12
    assert all(line.count("|") == 12 for line in text.splitlines()[6:]), text


def test_cpu_smoke_run_writes_the_table(tmp_path, capsys):
    out = tmp_path / "q.md"
    rows = quant_speed.main(["--device", "cpu", "--small", "--jobs", "0", "--budget-s", "1e6", "--out", str(out)])
    assert [(r["quantiser"], tuple(r["shape"])) for r in rows] == quant_speed.cases(small=True)
    assert all(r["skipped"] is None and r["hardware"] is None and r["emulated"]["s"] > 0 for r in rows)
    assert all(r["emulated"]["hbm_frac"] is None for r in rows)  # no HBM peak on the CPU
    text = out.read_text()
    assert "Hardware cast: unavailable: no hardware cast on the CPU / Triton interpreter." in text
    assert len([line for line in text.splitlines() if line.startswith("| weight_128x128")]) == 4
    assert f"wrote {out}" in capsys.readouterr().out
    assert math.isclose(rows[0]["bytes"], 3 * 200 * 384 + 4 * 200 * 3)


def test_past_the_budget_every_shape_is_listed_as_skipped(tmp_path):
    out = tmp_path / "q.md"
    rows = quant_speed.main(["--device", "cpu", "--small", "--jobs", "0", "--budget-s", "1e-9", "--out", str(out)])
    assert rows and all(r["skipped"].startswith("budget") for r in rows)
    assert out.read_text().count("| skipped: budget") == len(quant_speed.cases(small=True))


@pytest.mark.parametrize("chosen, path, says", [(1, "hardware", "the path the probe chose"),
                                                (2, "hardware_f16", "(the fp32 cvt failed it)"),
                                                (0, "hardware", "FAILED the probe")])
def test_the_hardware_column_times_the_probes_choice(monkeypatch, chosen, path, says):
    monkeypatch.setattr(quant_speed, "cast_for_device", lambda device: chosen)
    hw, text = quant_speed.hardware_path(torch.device("cuda"), None)
    assert hw == path and says in text
    assert quant_speed.hardware_path(torch.device("cpu"), "no GPU") == (None, "unavailable: no GPU")


def test_a_shape_that_fails_is_listed_and_the_others_still_run(tmp_path, monkeypatch):
    real = quant_speed.measure

    def measure(quantiser, shape, *args):
        if quantiser == "act_128x1_t":
            raise torch.OutOfMemoryError("")  # an empty message too
        return real(quantiser, shape, *args)

    monkeypatch.setattr(quant_speed, "measure", measure)
    rows = quant_speed.main(["--device", "cpu", "--small", "--jobs", "0", "--budget-s", "1e6", "--out",
                             str(tmp_path / "q.md")])
    assert [r["skipped"] for r in rows if r["quantiser"] == "act_128x1_t"] == ["failed, OutOfMemoryError: "]
    assert all(r["emulated"] for r in rows if r["quantiser"] != "act_128x1_t")


def test_precompile_shapes_have_every_cases_kernel_specialisation():
    """The worker processes compile what the timed shapes need, or the main process compiles again."""
    for name, shape in quant_speed.cases(small=False):
        tiles = quant_speed.QUANTISERS[name].tiles
        have = {quant_speed.specialisation(tiles, s) for s in quant_speed.PRECOMPILE_SHAPES[tiles]}
        assert quant_speed.specialisation(tiles, shape) in have, (name, shape)
    # the patterns differ where it matters: 2048 = 16 blocks of 128 makes a scale stride a multiple of 16
    assert quant_speed.specialisation("blocks", (7168, 2048)) != quant_speed.specialisation("blocks", (2048, 7168))
