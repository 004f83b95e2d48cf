"""benchmarks/quant_both_bench.py on the CPU: its byte count, and a tiny run in the Triton interpreter that writes
the page and the rows, every candidate bit-exact against the two single quantisers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "quant_both_bench.py"
spec = importlib.util.spec_from_file_location("quant_both_bench", BENCH)
quant_both_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quant_both_bench)


def test_ideal_bytes_read_once_and_write_both_tilings():
    # bf16 read, two e4m3 copies, one fp32 scale per 128 along each tiling (ceil: 200 rows are 2 row tiles)
    assert quant_both_bench.ideal_bytes(200, 384, 2) == 200 * 384 * (2 + 2) + 4 * (200 * 3 + 384 * 2)
    assert quant_both_bench.ideal_bytes(34560, 7168, 2) == 34560 * 7168 * 4 + 4 * (34560 * 56 + 7168 * 270)


def test_interpreter_run_writes_the_page_with_every_candidate_bit_exact(tmp_path):
    out = tmp_path / "qb.md"
    env = os.environ | {"TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-P", str(BENCH), "--device", "cpu", "--small", "--reps", "1", "--out",
                          str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    whats = [r["what"] for r in rows]
    assert whats[0].startswith("one-read kernel") and whats[-1].startswith("quant_act_1x128 + quant_act_128x1_t")
    assert len(rows) >= 3 and all(r["bit_exact"] for r in rows) and all(r["s"] > 0 for r in rows)
    assert "| 200×384 |" in out.read_text()


def test_refuses_a_cpu_run_without_the_interpreter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-P", str(BENCH), "--device", "cpu", "--out", str(tmp_path / "x.md")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False)
    assert res.returncode != 0 and "TRITON_INTERPRET=1" in res.stderr and not (tmp_path / "x.md").exists()
