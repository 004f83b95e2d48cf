"""The executor-overhead benchmark runs end to end on CPU (gloo world of one) and writes its page."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_writes_both_ways_and_the_ratio(tmp_path):
    out = tmp_path / "eo.md"
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "executor_overhead.py"), "--small",
                           "--device", "cpu", "--warmup", "1", "--rounds", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={"MASTER_PORT": "0", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["times_s"]["plain"]) == len(data["times_s"]["executor"]) == 2
    assert data["overhead_frac"] == data["executor_s"] / data["plain_s"] - 1
    assert "Overhead" in out.read_text()
