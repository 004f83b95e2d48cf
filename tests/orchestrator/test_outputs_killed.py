"""``write_outputs`` killed at every step (issue 23, item 2: "plan.json and plan.html appear together or not at
all"): a forked writer dies (``os._exit``, no cleanup runs, as under SIGKILL) at its k-th write, rename or
replace, for every k. A new folder then holds both files or does not exist; an existing folder holds whole
files, the old pair, the new pair, or (killed between the two renames) the new page beside the old plan, never a
new plan.json without its page; only hidden temporaries (``.*.tmp``) are left besides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moeplan.orchestrator import outputs

STEPS = ("_write_synced", "rename", "replace")


def _killed_at(k: int, files: dict[Path, str]) -> bool:
    """Run ``write_outputs(files)`` in a child that exits at its k-th step; whether it got that far."""
    pid = os.fork()
    if pid == 0:  # the child: count the steps, die at the k-th
        try:
            count = [0]

            def dying(fn):
                def step(*args):
                    count[0] += 1
                    if count[0] == k:
                        os._exit(9)
                    return fn(*args)
                return step

            outputs._write_synced = dying(outputs._write_synced)
            outputs.os.rename = dying(os.rename)
            outputs.os.replace = dying(os.replace)
            outputs.write_outputs(files)
            os._exit(0)
        except BaseException:  # noqa: BLE001 -- the child must never return into pytest
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 9), code
    return code == 9


def _visible(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir() if not p.name.startswith(".")} if folder.exists() else {}


def _hidden_only(root: Path, allowed: set[str]) -> None:
    stray = [p for p in root.rglob("*") if p.name not in allowed and not any(
        part.startswith(".") and part.endswith(".tmp") for part in p.relative_to(root).parts)]
    assert not [p for p in stray if p.is_file()], stray


def test_a_new_folder_appears_whole_or_not_at_all(tmp_path):
    for k in range(1, 10):
        root = tmp_path / f"k{k}"
        root.mkdir()
        out = root / "out" / "deeper"
        died = _killed_at(k, {out / "plan.json": "new plan", out / "plan.html": "new page"})
        seen = _visible(out)
        assert seen in ({}, {"plan.json": "new plan", "plan.html": "new page"}), (k, seen)
        _hidden_only(root, {"out", "deeper", "plan.json", "plan.html"})
        if not died:
            assert seen and k > 3, k  # two writes and one rename: the kill came after the last step
            break
    else:
        pytest.fail("the writer never finished: more steps than expected")


def test_an_existing_folder_never_holds_a_new_plan_without_its_page(tmp_path):
    outcomes = set()
    for k in range(1, 10):
        out = tmp_path / f"k{k}"
        out.mkdir()
        (out / "plan.json").write_text("old plan")
        (out / "plan.html").write_text("old page")
        died = _killed_at(k, {out / "plan.json": "new plan", out / "plan.html": "new page"})
        seen = _visible(out)
        assert seen in ({"plan.json": "old plan", "plan.html": "old page"},
                        {"plan.json": "old plan", "plan.html": "new page"},
                        {"plan.json": "new plan", "plan.html": "new page"}), (k, seen)
        outcomes.add(tuple(sorted(seen.items())))
        _hidden_only(out, {"plan.json", "plan.html"})
        if not died:
            break
    assert len(outcomes) == 3  # every outcome above was reached: the kills did land between the steps
