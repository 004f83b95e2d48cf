"""``.ci/gpu``, the GPU tests' runner for a lent machine, on this CPU: one log with a summary line per file, a failing
file failing the run, and files past the budget reported, not silently dropped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *args: str) -> tuple[int, list[str]]:
    env = os.environ | {"OUT": str(tmp_path), "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / ".ci/gpu"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    log = (tmp_path / "gpu-tests.log").read_text().splitlines()
    return res.returncode, log[log.index("--- summary (rc seconds file)") + 1:]


def test_each_file_gets_a_summary_line_and_a_failing_file_fails_the_run(tmp_path):
    rc, summary = _run(tmp_path, "120", "tests/model/test_gpu.py", "tests/no_such_test.py")
    assert rc == 1 and len(summary) == 2
    assert summary[0].startswith("0 ") and summary[0].endswith(" tests/model/test_gpu.py")  # skipped whole: no GPU
    assert summary[1].startswith("4 ") and summary[1].endswith(" tests/no_such_test.py")  # pytest: no such file


def test_files_past_the_budget_are_listed_as_skipped(tmp_path):
    rc, summary = _run(tmp_path, "5", "tests/model/test_gpu.py")
    assert rc == 1 and summary == ["skipped - tests/model/test_gpu.py"]


def test_a_bad_budget_is_one_line_and_runs_nothing(tmp_path):
    env = os.environ | {"OUT": str(tmp_path), "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / ".ci/gpu"), "ten"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "BUDGET_S='ten'" in res.stderr
    assert not (tmp_path / "gpu-tests.log").exists()
