"""Smoke run of ``benchmarks/overlap_bench.py`` on CPU: it runs every mode and writes its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_overlap_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "overlap.md"
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "overlap_bench.py"), "--device", "cpu",
                           "--small", "--out", str(out)], check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for row in ("interleaved (T_ovl)", "F then B (T_seq)", "F then B (T_one)", "hidden (A/B)"):
        assert row in text, row
