"""Killed and concurrent runs (issue 23): SIGTERM during ``plan --search`` exits 143 with one line and writes
nothing; two runs writing the same ``--out`` leave one run's complete plan (plan.json with its plan.html)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from moeplan.simulator.contracts.plan_file import read_plan


def _moeplan(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moeplan.orchestrator.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has installed a SIGTERM handler yet (/proc's caught-signal mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def test_sigterm_during_a_search_exits_143_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "o"
    proc = _moeplan("plan", "--model", "deepseek-v2-lite", "--cluster", "h200", "--nodes", "2", "--out", str(out))
    deadline = time.monotonic() + 60
    while not _catches_sigterm(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the search (it takes seconds)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stderr.splitlines() == ["moeplan: terminated (SIGTERM); files are written whole or not at all"]
    assert "Traceback" not in stdout and not out.exists()


def test_two_runs_writing_one_out_leave_one_complete_plan(tmp_path):
    out = tmp_path / "o"
    base = ("plan", "--model", "tiny-moe", "--cluster", "h200", "--nodes", "1", "--no-search", "--out", str(out))
    runs = [_moeplan(*base, "--pp", pp) for pp in ("1", "2", "4", "2")]
    for run in runs:
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr
    plan = read_plan(out)
    assert f"inputs sha256 {plan.inputs_sha256[:16]}" in (out / "plan.html").read_text()  # the page of that plan
    assert sorted(p.name for p in out.iterdir()) == ["plan.html", "plan.json"]
