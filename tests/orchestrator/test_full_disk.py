"""A full disk (issue 23, item 5) while ``check`` writes ``run.html`` and while the runtime writes ``run.json`` or
appends to ``metrics.jsonl``: an ``OSError(ENOSPC)`` injected where the bytes go (half the text written
first, as a disk filling up does), and the previous file must be left byte for byte, no temporary file
left, and the failure one line (``check``: exit 2) or one ``OSError`` naming the file (the runtime).
Also: ``metrics.jsonl`` after a crash mid-line still takes the next step, and any bytes at all are read
as steps or refused with one ``RunReportError``, never another exception.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moeplan.orchestrator import outputs
from moeplan.orchestrator.cli import app
from moeplan.simulator.contracts import atomic_write, run_report
from moeplan.simulator.contracts.run_report import (
    RunReportError,
    StepMetrics,
    append_metrics,
    read_metrics,
    read_run_report,
    write_run_report,
)
from tests.orchestrator.run_dirs import synthetic_run, tiny_plan  # noqa: F401 -- a fixture

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FillingUp:
    """A file object that takes half of what it is given, then raises ENOSPC."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise FULL

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _step(i: int, wall_s: float = 0.5) -> StepMetrics:
    return StepMetrics(step=i, wall_time_s=wall_s, tokens=4096, loss=3.0, lr=1e-3, tokens_per_s_per_gpu=4096 / wall_s / 8)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run(tmp_path, tiny_plan) -> Path:  # noqa: F811
    return synthetic_run(tmp_path / "run", tiny_plan)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_check_on_a_full_disk_keeps_the_previous_report(run, monkeypatch, where):
    (run / "run.html").write_text("<html>previous report</html>\n")
    before = _files(run)
    if where == "write":  # the disk fills while the text goes in
        real = outputs._write_synced
        monkeypatch.setattr(outputs, "_write_synced", lambda path, text: (real(path, text[: len(text) // 2]),
                                                                          (_ for _ in ()).throw(FULL)))
    else:  # the write went to the page cache; the disk says so at fsync
        monkeypatch.setattr(outputs.os, "fsync", lambda fd: (_ for _ in ()).throw(FULL))
    result = CliRunner().invoke(app, ["check", str(run)])
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and result.stderr.splitlines() == [
        f"moeplan: error: {run / 'run.html'}: cannot write (No space left on device)"]
    assert _files(run) == before  # the previous run.html byte for byte, no temporary left


def test_run_report_on_a_full_disk_keeps_the_previous_one(run, monkeypatch):
    before = _files(run)
    report = read_run_report(run)
    real = os.fdopen
    monkeypatch.setattr(atomic_write.os, "fdopen", lambda fd, *a, **k: _FillingUp(real(fd, *a, **k)))
    with pytest.raises(OSError, match=r"run\.json: cannot write the run report \(No space left on device\)") as info:
        write_run_report(run, report.model_copy(update={"status": "failed"}))
    assert info.value.errno == errno.ENOSPC
    assert _files(run) == before
    monkeypatch.undo()
    write_run_report(run, report.model_copy(update={"status": "failed"}))  # space again: the new one lands
    assert read_run_report(run).status == "failed"


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_metrics_on_a_full_disk_keep_the_steps_before(tmp_path, monkeypatch, where):
    path = tmp_path / "metrics.jsonl"
    for i in range(3):
        append_metrics(path, _step(i))
    before = path.read_bytes()
    if where == "write":
        monkeypatch.setattr(run_report, "open", lambda *a, **k: _FillingUp(open(*a, **k)), raising=False)  # noqa: SIM115
    else:
        monkeypatch.setattr(run_report.os, "fsync", lambda fd: (_ for _ in ()).throw(FULL))
    with pytest.raises(OSError, match=r"metrics\.jsonl: cannot append step 3 \(No space left on device\)") as info:
        append_metrics(path, _step(3, wall_s=0.25))
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before  # no torn line for the next append to join
    monkeypatch.undo()
    append_metrics(path, _step(3, wall_s=0.25))
    assert [s.step for s in read_metrics(path)] == [0, 1, 2, 3]


def test_a_line_torn_by_a_crash_is_dropped_before_the_next_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, _step(0))
    append_metrics(path, _step(1))
    whole = path.read_bytes()
    with open(path, "ab") as f:  # the process died mid-line
        f.write(_step(2).model_dump_json().encode()[:17])
    assert [s.step for s in read_metrics(path)] == [0, 1]  # the reader drops it...
    append_metrics(path, _step(2))  # ...and so does the next append, instead of joining it
    assert path.read_bytes().startswith(whole)
    assert [s.step for s in read_metrics(path)] == [0, 1, 2]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.one_of(st.binary(max_size=40), st.sampled_from([
    b'{"step": 0, "wall_time_s": 1e-9, "tokens": 1, "loss": 0, "lr": 0, "tokens_per_s_per_gpu": 1}',
    b"NaN", b"[]", b"{" * 50, b"\xff", b'{"step": 1e999}', b"", _step(5).model_dump_json().encode()])), max_size=5),
       st.booleans())
def test_any_metrics_bytes_are_steps_or_one_error(tmp_path_factory, lines, newline_at_end):
    path = tmp_path_factory.mktemp("m") / "metrics.jsonl"
    path.write_bytes(b"\n".join(lines) + (b"\n" if newline_at_end else b""))
    try:
        steps = read_metrics(path)
    except RunReportError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
    else:
        assert all(isinstance(s, StepMetrics) for s in steps)


def test_the_injection_leaves_half_a_line_without_the_rollback(tmp_path):
    """A test that cannot fail is a defect: the injected full disk does write half of the text, so the
    equalities above hold only because the writers roll back."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"{}\n")
    with pytest.raises(OSError), _FillingUp(open(path, "ab")) as f:
        f.write(b"0123456789\n")
    assert path.read_bytes() == b"{}\n01234"
