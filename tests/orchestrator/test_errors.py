"""One error path for every command: ``moeplan: error: ...`` on stderr, one line, exit code 2, nothing
written; a bug is one line naming a log of its traceback, exit code 3. And ``write_outputs``: all files
or none."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.orchestrator.errors import InputError
from moeplan.orchestrator.outputs import write_outputs

TINY_PLAN = ["plan", "--model", "tiny-moe", "--cluster", "h200", "--nodes", "1", "--no-search"]
SCHEDULE = ["schedule", "--kind", "1f1b", "--pp", "2", "--microbatches", "4"]
PLACEMENT = ["placement", "--model", "tiny-moe", "--cluster", "h800", "--nodes", "2", "--tokens-per-gpu", "128"]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` and its bytes (hidden temporaries included)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeplan: error: "), res.stderr
    return lines[0].removeprefix("moeplan: error: ")


# (arguments with {d} for the test's folder, files made first, the one line expected)
CASES = {
    "plan --out is a file": (
        [*TINY_PLAN, "--out", "{d}/taken"], {"taken": "mine\n"}, "--out {d}/taken: is a file, not a directory"),
    "plan --out under a file": (
        [*TINY_PLAN, "--out", "{d}/taken/o"], {"taken": "mine\n"}, "--out {d}/taken/o: {d}/taken is a file, not a directory"),
    "plan --trace is a folder": (
        [*TINY_PLAN, "--out", "{d}/o", "--trace", "{d}"], {}, "--trace {d}: is a directory, not a file"),
    "plan --trace under a file": (
        [*TINY_PLAN, "--out", "{d}/o", "--trace", "{d}/taken/t.json"], {"taken": "mine\n"},
        "--trace {d}/taken/t.json: {d}/taken is a file, not a directory"),
    "plan malformed --set": (
        [*TINY_PLAN, "--out", "{d}/o", "--set", "parallel.pp"], {}, "--set 'parallel.pp': expected KEY=VALUE"),
    "plan unknown --set key": (
        [*TINY_PLAN, "--out", "{d}/o", "--set", "parallel.pq=2"], {}, "--set parallel.pq: 'parallel.pq' does not exist"),
    "plan --set a bad value": (
        [*TINY_PLAN, "--out", "{d}/o", "--set", "parallel.recompute=some"], {},
        "invalid setting: parallel.recompute: Input should be 'none', 'selective' or 'full' (got 'some')"),
    "plan --load missing": (
        [*TINY_PLAN, "--out", "{d}/o", "--load", "{d}/none.json"], {}, "--load {d}/none.json: cannot read (No such file"),
    "plan --model a folder": (
        [*TINY_PLAN[:2], "{d}/cfg.json", *TINY_PLAN[3:], "--out", "{d}/o"], {"cfg.json/x": ""},
        "--model {d}/cfg.json: no such file"),
    "show a missing plan": (["show", "{d}/nowhere"], {}, "{d}/nowhere: cannot read (No such file or directory)"),
    "show a malformed plan": (["show", "{d}"], {"plan.json": "{"}, "{d}/plan.json"),
    "schedule --out a folder": ([*SCHEDULE, "--out", "{d}/x.csv"], {"x.csv/y": ""}, "--out {d}/x.csv: is a directory"),
    "schedule bad duration": ([*SCHEDULE, "--b-s", "0"], {}, "b_s: Input should be greater than 0 (got 0.0)"),
    "placement --out is a file": (
        [*PLACEMENT, "--out", "{d}/taken"], {"taken": "mine\n"}, "--out {d}/taken: is a file, not a directory"),
    "placement --current malformed": (
        [*PLACEMENT, "--out", "{d}/o", "--current", "{d}/cur.json"], {"cur.json": "[1, 2"},
        "--current {d}/cur.json: malformed JSON"),
    "placement --current not a placement": (
        [*PLACEMENT, "--out", "{d}/o", "--current", "{d}/cur.json"], {"cur.json": "{}"},
        "--current {d}/cur.json: policy: Field required"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, case):
    args, files, message = CASES[case]
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = _tree(tmp_path)
    res = CliRunner().invoke(app, [a.format(d=tmp_path) for a in args])
    assert message.format(d=tmp_path) in _one_error_line(res)
    assert _tree(tmp_path) == before
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == sorted(
        {*files, *(Path(n).parent.as_posix() for n in files if "/" in n)})


def test_a_bug_is_one_line_exit_3_and_its_traceback_in_a_log(monkeypatch, tmp_path):
    """Only our error types are bad input; a plain ValueError (or anything else) is a bug: one line naming
    a log file that holds the traceback, exit code 3, no traceback on the terminal."""
    from moeplan.orchestrator import cli

    def broken(path):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "read_plan", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    res = CliRunner().invoke(app, ["show", str(tmp_path)])
    assert res.exit_code == 3 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("moeplan: internal error (a bug; please report it): ValueError: an internal invariant broke")
    log = Path(re.search(r"traceback in (\S+)\)$", lines[0]).group(1))
    assert log.parent == tmp_path and log.name.startswith("moeplan-crash-")
    assert "Traceback (most recent call last)" in log.read_text() and "an internal invariant broke" in log.read_text()


def test_usage_errors_are_one_line_too():
    for args, message in ((["plan", "--pp", "x"], "Invalid value for '--pp'"), (["nope"], "No such command 'nope'"),
                          (["plan", "--bogus"], "No such option: --bogus"),
                          (["schedule", "--kind", "1f1b", "--pp", "2"], "Missing option '--microbatches'")):
        res = CliRunner().invoke(app, args)
        assert message in _one_error_line(res), res.stderr


def test_a_bare_moeplan_prints_the_help():
    res = CliRunner().invoke(app, [])
    assert res.exit_code == 0 and "Usage" in res.stdout and res.stderr == ""


def test_write_outputs_writes_all_files(tmp_path):
    files = {tmp_path / "a" / "b" / "one.json": "1", tmp_path / "two.txt": "2"}
    write_outputs(files)
    assert _tree(tmp_path) == {"a/b/one.json": b"1", "two.txt": b"2"}


def test_write_outputs_writes_none_when_one_cannot_be_written(tmp_path):
    (tmp_path / "old.txt").write_text("old")
    (tmp_path / "blocker").write_text("a file")
    files = {tmp_path / "old.txt": "new", tmp_path / "new" / "deep" / "x.json": json.dumps({}),
             tmp_path / "blocker" / "y.json": "{}"}
    with pytest.raises(InputError, match=r"blocker is a file, not a directory"):
        write_outputs(files)
    assert _tree(tmp_path) == {"old.txt": b"old", "blocker": b"a file"}
    assert not (tmp_path / "new").exists()  # the folders it made went too


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk full", "interrupted"])
def test_write_outputs_leaves_nothing_when_a_write_fails(tmp_path, monkeypatch, failure):
    """A disk that fills up (or a Ctrl-C) while the second file is written: the first one's temporary goes,
    the old files stay as they were, and the folders made for the new ones go."""
    from moeplan.orchestrator import outputs

    (tmp_path / "plan.json").write_text("old")
    real, calls = outputs._write_synced, []

    def fails_second(path, text):
        calls.append(path)
        if len(calls) == 2:
            raise failure
        real(path, text)

    monkeypatch.setattr(outputs, "_write_synced", fails_second)
    files = {tmp_path / "plan.json": "new", tmp_path / "deep" / "plan.html": "<html>"}
    with pytest.raises(InputError if isinstance(failure, OSError) else KeyboardInterrupt) as info:
        write_outputs(files)
    if isinstance(failure, OSError):
        assert str(info.value) == f"{tmp_path / 'deep' / 'plan.html'}: cannot write (No space left on device)"
    assert _tree(tmp_path) == {"plan.json": b"old"}


def test_write_outputs_refuses_to_replace_a_device(tmp_path):
    with pytest.raises(InputError, match="output /dev/null: is not a regular file"):
        write_outputs({tmp_path / "a.json": "{}", Path("/dev/null"): "x"})
    assert _tree(tmp_path) == {}


def test_strict_json_refuses_nan():
    from moeplan.orchestrator.outputs import strict_json

    assert strict_json({"a": 1.5}) == '{\n  "a": 1.5\n}'
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="not JSON compliant"):
            strict_json({"a": [bad]})


def test_concurrent_write_outputs_leave_one_writers_files(tmp_path, monkeypatch):
    """Two writers of one folder: the renames of one finish before the other's begin (a lock on the folder),
    so the files left belong together. Writer A is slow between its renames: unlocked, B's pair would land
    in between and leave B's plan.json beside A's plan.html."""
    import threading

    from moeplan.orchestrator import outputs

    real_replace = os.replace

    def slow_for_a(src, dst):
        real_replace(src, dst)
        if threading.current_thread().name == "A":
            time.sleep(0.2)

    monkeypatch.setattr(outputs.os, "replace", slow_for_a)
    files = {name: {tmp_path / "plan.json": name, tmp_path / "plan.html": name} for name in "AB"}
    a = threading.Thread(target=write_outputs, args=(files["A"],), name="A")
    b = threading.Thread(target=write_outputs, args=(files["B"],), name="B")
    a.start()
    time.sleep(0.05)  # A holds the lock, between its two renames
    b.start()
    a.join()
    b.join()
    assert _tree(tmp_path) == {"plan.html": b"B", "plan.json": b"B"}


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """A read-only folder (as root, simulated): one line naming the file, exit 2, nothing left."""
    from moeplan.orchestrator import outputs

    def refuse(path, text):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(outputs, "_write_synced", refuse)
    res = CliRunner().invoke(app, [*SCHEDULE, "--out", str(tmp_path / "ro" / "s.csv")])
    assert _one_error_line(res) == f"{tmp_path / 'ro' / 's.csv'}: cannot write (Permission denied)"
    assert list(tmp_path.iterdir()) == []


def test_a_bad_search_workers_variable_is_one_line_and_nothing_written(tmp_path, monkeypatch):
    """``MOEPLAN_SEARCH_WORKERS`` (``planning.search.search_workers``) is read when ``plan`` searches."""
    monkeypatch.setenv("MOEPLAN_SEARCH_WORKERS", "two")
    args = [*TINY_PLAN[:-1], "--search", "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, args)
    assert "MOEPLAN_SEARCH_WORKERS='two': must be a positive integer" in _one_error_line(res)
    assert not any(tmp_path.iterdir())
