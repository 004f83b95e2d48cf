"""Killed and concurrent runs (issue 23): SIGTERM during ``plan --search`` exits 143 with one line (Ctrl-C 130,
with its progress drawn on a terminal too) and writes nothing; two runs writing the same ``--out`` leave one
run's complete plan (plan.json with its plan.html)."""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(("signum", "code", "lines"), [
    (signal.SIGTERM, 143, ["moeplan: terminated (SIGTERM); files are written whole or not at all"]),
    (signal.SIGINT, 130, []),  # Ctrl-C: the shell has shown ^C; nothing more
], ids=["sigterm", "ctrl-c"])
def test_a_signal_during_a_search_stops_it_and_writes_nothing(tmp_path, signum, code, lines):
    out = tmp_path / "o"
    proc = _moeplan("plan", "--model", "deepseek-v2-lite", "--cluster", "h200", "--nodes", "2", "--out", str(out))
    deadline = time.monotonic() + 60
    while not _catches_sigterm(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the search (it takes seconds)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stderr.splitlines() == lines
    assert "Traceback" not in stdout and not out.exists() and not list(tmp_path.iterdir())


def test_ctrl_c_stops_a_search_that_draws_its_progress(tmp_path):
    """On a terminal the search draws its progress (rich, with a thread of its own); Ctrl-C stops it all the same:
    exit 130 within seconds, the line taken off the terminal, nothing written."""
    out = tmp_path / "o"
    terminal, stderr = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "moeplan.orchestrator.cli", "plan", "--model", "deepseek-v2-lite",
                             "--cluster", "h200", "--nodes", "2", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    os.close(stderr)
    shown: list[bytes] = []

    def read() -> None:  # the terminal's side, drained so that the child never blocks on it
        with contextlib.suppress(OSError):  # EIO once the child has closed its end
            while chunk := os.read(terminal, 65536):
                shown.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while b"checking layouts" not in b"".join(shown) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    proc.communicate(timeout=60)
    stopped_s = time.monotonic() - sent
    reader.join(timeout=5)
    os.close(terminal)
    assert b"checking layouts" in b"".join(shown)
    assert proc.returncode == 130 and stopped_s < 5, (proc.returncode, stopped_s)
    assert b"Traceback" not in b"".join(shown) and not list(tmp_path.iterdir())


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


@pytest.mark.slow
@pytest.mark.parametrize("fresh", [True, False], ids=["new-out", "existing-out"])
def test_many_pairs_of_runs_on_one_out_each_leave_one_complete_plan(tmp_path, fresh):
    """The long profile of the test above: 12 rounds of two ``plan`` processes started together on one ``--out``
    (new, or holding a previous plan), with different layouts; each round ends with one run's plan.json beside
    its own plan.html, both read back, and nothing else visible."""
    base = ("plan", "--model", "tiny-moe", "--cluster", "h200", "--nodes", "1", "--no-search")
    for round_ in range(12):
        out = tmp_path / f"r{round_}" / "o"
        if not fresh:
            first = _moeplan(*base, "--pp", "1", "--out", str(out))
            assert first.wait(timeout=120) == 0, first.stderr.read()
        runs = [_moeplan(*base, "--pp", pp, "--ep", ep, "--out", str(out)) for pp, ep in (("2", "1"), ("4", "2"))]
        for run in runs:
            _, stderr = run.communicate(timeout=120)
            assert run.returncode == 0, stderr
        plan = read_plan(out)
        assert plan.layout.pp in (2, 4), plan.layout.pp
        assert f"inputs sha256 {plan.inputs_sha256[:16]}" in (out / "plan.html").read_text()
        assert sorted(p.name for p in out.iterdir()) == ["plan.html", "plan.json"]  # no temporary left
        assert not [p for p in out.parent.iterdir() if p.name != "o"], list(out.parent.iterdir())


def test_a_reader_that_goes_away_is_no_error(tmp_path):
    """``moeplan schema | head -c 10``: the pipe closes before moeplan writes; exit 141 as a shell reports a
    writer whose reader left (128 + SIGPIPE), nothing on stderr, no crash log (it was an internal error, exit 3)."""
    proc = _moeplan("schema")
    proc.stdout.close()  # before moeplan has imported what it needs, let alone printed
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 141, stderr
    assert stderr == ""
