"""Smoke run of ``benchmarks/overlap_bench.py`` on CPU: it runs every mode and writes its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("pairs", [1, 3])
def test_overlap_bench_runs_on_cpu(tmp_path, pairs):
    out = tmp_path / "overlap.md"
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "overlap_bench.py"), "--device", "cpu",
                           "--small", "--pairs", str(pairs), "--out", str(out)], check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    window = f"Window: {pairs} consecutive F&B pair{'s' if pairs > 1 else ''} "
    for row in (f"--pairs {pairs}", window, "interleaved (T_ovl)", "F then B (T_seq)", "F then B (T_one)",
                "hidden (A/B)", "a gain of"):
        assert row in text, row


@pytest.mark.parametrize(("flag", "value", "says"), [("--pairs", "0", "--pairs=0 must be at least 1"),
                                                     ("--copy-sms", "-1", "--copy-sms=-1 must be at least 0")])
def test_overlap_bench_refuses_bad_counts(tmp_path, flag, value, says):
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "overlap_bench.py"), "--device", "cpu",
                           "--small", flag, value, "--out", str(tmp_path / "o.md")], check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "o.md").exists()
