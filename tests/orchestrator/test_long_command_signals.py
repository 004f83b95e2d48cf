"""SIGTERM and Ctrl-C during the long commands (issue 23, item 5): ``moeplan launch`` of the tiny cpu plan
and ``moeplan calibrate``, each a process of its own, signalled mid-work.

``launch``: the signal comes after the first checkpoint is committed. The command must exit 143 (SIGTERM)
or 130 (SIGINT) within seconds with one line, every process it started (Ray's GCS, raylet, workers, the
rank actors) gone, ``metrics.jsonl`` readable with consecutive steps, ``checkpoints/latest`` naming a
complete checkpoint, and (slow variant) ``--resume`` continuing from it with the very losses the
interrupted run had recorded (the data is keyed by step, so a resumed step repeats its loss exactly).
``calibrate``: SIGTERM or Ctrl-C comes while the collectives are measured by spawned processes; the command
must exit 143 (one line) or 130 (quiet), its processes gone and nothing written, its progress lines showing
the measurement under way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeplan.model.runtime.checkpoint import META_NAME, latest_checkpoint
from moeplan.orchestrator.calibration.progress import LINE as PROGRESS
from moeplan.orchestrator.cli import app
from moeplan.simulator.contracts.run_report import read_metrics, read_run_report

EXIT_S = 15.0  # from the signal to the command's exit, Ray's shutdown included
# what stderr holds: Ctrl-C exits 130 quietly, as a shell's commands do (the terminal shows ^C)
LINES = {signal.SIGTERM: ["moeplan: terminated (SIGTERM); files are written whole or not at all"], signal.SIGINT: []}
PLAN = ["plan", "--model", "tiny-moe", "--cluster", "cpu", "--nodes", "1", "--no-search", "--micro-batch-size", "1",
        "--pp", "2", "--schedule", "1f1b", "--global-batch", "4", "--microbatches", "4",
        "--set", "cluster.node.gpus_per_node=2", "--set", "training.optimizer.moment_bytes=4"]


def _moeplan(*args: str) -> subprocess.Popen:
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-P", "-m", "moeplan.orchestrator.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _parents() -> dict[int, tuple[int, str]]:
    """Every process's (parent pid, state) from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(entry.name)] = (int(fields[1]), fields[0])
    return out


def descendants(pid: int) -> set[int]:
    table, found, grew = _parents(), {pid}, True
    while grew:
        more = {p for p, (parent, _) in table.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found - {pid}


def _living(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie is gone: nothing left but its exit status)."""
    table = _parents()
    return {p for p in pids if p in table and table[p][1] != "Z"}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:  # ended meanwhile
        return ""


def _wait_for(condition, timeout_s: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"ended before {what}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.05)


def _signal_and_wait(proc: subprocess.Popen, signum: int) -> tuple[set[int], str, float]:
    """Send ``signum``; (the processes it had started, its stderr, seconds to exit)."""
    started = descendants(proc.pid)
    sent = time.monotonic()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    return started, stderr, time.monotonic() - sent


def _all_gone(started: set[int]) -> None:
    deadline = time.monotonic() + 5
    while _living(started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _living(started), f"processes left running: {sorted(_living(started))}"


def _interrupted_launch(tmp_path: Path, signum: int) -> Path:
    """Launch the tiny cpu plan, signal it after its first checkpoint, check how it ended; its run dir."""
    result = CliRunner().invoke(app, [*PLAN, "--out", str(tmp_path / "plan")])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    proc = _moeplan("launch", str(tmp_path / "plan" / "plan.json"), "--steps", "500", "--checkpoint-every", "1",
                    "--run-dir", str(run))
    _wait_for(lambda: (run / "checkpoints" / "latest").is_file(), 120, proc, "first checkpoint")
    started, stderr, seconds = _signal_and_wait(proc, signum)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert stderr.splitlines() == LINES[signum]
    assert seconds < EXIT_S, f"{seconds:.1f} s to exit"
    assert len(started) >= 4, f"Ray and its workers were running: {started}"
    _all_gone(started)
    steps = read_metrics(run)
    assert [m.step for m in steps] == list(range(len(steps)))
    latest = latest_checkpoint(run)
    assert 1 <= latest.steps_done <= len(steps) < 500
    assert (Path(latest.path) / ".metadata").is_file() and (Path(latest.path) / META_NAME).is_file()
    return run


@pytest.mark.ray
def test_sigterm_during_launch_exits_143_and_keeps_the_checkpoint_and_metrics(tmp_path):
    _interrupted_launch(tmp_path, signal.SIGTERM)


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_during_launch_exits_130_and_resume_repeats_its_losses(tmp_path):
    run = _interrupted_launch(tmp_path, signal.SIGINT)
    before = read_metrics(run)
    at = latest_checkpoint(run).steps_done
    steps = max(len(before), at) + 1
    resumed = subprocess.run([sys.executable, "-P", "-m", "moeplan.orchestrator.cli", "launch", "--resume", str(run),
                              "--steps", str(steps), "--json"], capture_output=True, text=True, timeout=300,
                             env=os.environ | {"RAY_AUTH_MODE": "disabled"}, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = read_run_report(run)
    assert [m.step for m in report.steps] == list(range(steps))
    assert [m.loss for m in report.steps[:len(before)]] == [m.loss for m in before]
    assert [r.at_step for r in report.restarts] == [at]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_signal_while_calibrate_measures_links_exits_128_plus_it_and_writes_nothing(tmp_path, signum):
    result = CliRunner().invoke(app, [*PLAN, "--out", str(tmp_path / "plan")])
    assert result.exit_code == 0, result.output
    before = sorted(tmp_path.rglob("*"))
    proc = _moeplan("calibrate", "--plan", str(tmp_path / "plan" / "plan.json"), "--out", str(tmp_path / "cal.json"),
                    "--reps", "1")

    def measuring_links() -> bool:  # torch.multiprocessing's spawned ranks (not multiprocessing's tracker)
        return any("spawn_main" in _cmdline(p) for p in _living(descendants(proc.pid)))
    # the links come after the rank passes, which a CPU calibrate times as the runtime runs them (98 s on an idle
    # 2-core machine at this plan's 4096 tokens, more under a test run's load)
    _wait_for(measuring_links, 360, proc, "link measurement")
    started, stderr, seconds = _signal_and_wait(proc, signum)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    progress = [x for x in stderr.splitlines() if PROGRESS.match(x)]  # calibrate shows where it was when stopped
    assert [x for x in stderr.splitlines() if not PROGRESS.match(x)] == LINES[signum]
    # the measurement under way spawned the processes: the ranks' passes (a process a rank), the collectives, or the
    # all-reduce pair beside a GEMM
    assert progress[-1].endswith(" ...") and any(what in progress[-1] for what in (
        " links: ", " beside: ", " host: each pipeline rank's passes")), progress
    assert seconds < EXIT_S, f"{seconds:.1f} s to exit"
    _all_gone(started)
    assert sorted(tmp_path.rglob("*")) == before
