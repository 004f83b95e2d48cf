"""``write_outputs`` killed at every step (issue 23, item 2: "plan.json and plan.html appear together or not at
all"): a forked writer dies (``os._exit``, no cleanup runs, as under SIGKILL) at its k-th write, rename,
replace or folder exchange, for every k. A new folder then holds both files or does not exist; an existing
folder holds the old pair or the new pair, never a mix, and keeps its other files (where ``renameat2`` cannot
exchange folders: whole files, the old pair, the new pair, or the new page beside the old plan, never a new
plan.json without its page); only hidden temporaries (``.*.tmp``) are left besides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moeplan.orchestrator import outputs


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
            outputs._exchange = dying(outputs._exchange)
            outputs.write_outputs(files)
            os._exit(0)
        except BaseException:  # noqa: BLE001 -- the child must never return into pytest
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 9), code
    return code == 9


def _visible(folder: Path) -> dict[str, str]:
    return ({p.name: p.read_text() for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()}
            if folder.exists() else {})


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


OLD = {"plan.json": "old plan", "plan.html": "old page", "notes.txt": "the user's"}
NEW = {"plan.json": "new plan", "plan.html": "new page", "notes.txt": "the user's"}


def _killed_in_existing_folders(tmp_path: Path) -> set[tuple]:
    """Kill a writer of an existing folder (holding a file of the user's too) at each step; the outcomes seen."""
    outcomes = set()
    for k in range(1, 12):
        out = tmp_path / f"k{k}"
        out.mkdir()
        for name, text in OLD.items():
            (out / name).write_text(text)
        died = _killed_at(k, {out / "plan.json": "new plan", out / "plan.html": "new page"})
        outcomes.add(tuple(sorted(_visible(out).items())))
        _hidden_only(tmp_path, {f"k{i}" for i in range(1, 12)} | set(OLD))
        if not died:
            return outcomes
    pytest.fail("the writer never finished: more steps than expected")


@pytest.mark.skipif(outputs._RENAMEAT2 is None, reason="this libc has no renameat2")
def test_an_existing_folder_holds_the_old_pair_or_the_new_one_never_a_mix(tmp_path):
    outcomes = _killed_in_existing_folders(tmp_path)
    # both reached: the kills did land before and after the exchange
    assert outcomes == {tuple(sorted(OLD.items())), tuple(sorted(NEW.items()))}, outcomes


def test_without_renameat2_an_existing_folder_never_holds_a_new_plan_without_its_page(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_RENAMEAT2", None)
    outcomes = _killed_in_existing_folders(tmp_path)
    mixed = dict(OLD, **{"plan.html": "new page"})
    assert outcomes == {tuple(sorted(d.items())) for d in (OLD, mixed, NEW)}, outcomes


def _swap_inode_changes(out: Path) -> bool:
    before = out.stat().st_ino
    outputs.write_outputs({out / "plan.json": "new plan", out / "plan.html": "new page"})
    assert _visible(out) == NEW
    return out.stat().st_ino != before


@pytest.mark.skipif(outputs._RENAMEAT2 is None, reason="this libc has no renameat2")
def test_the_swap_keeps_the_folders_other_files_mode_and_leaves_nothing_beside(tmp_path):
    out = tmp_path / "out"
    out.mkdir(mode=0o750)
    for name, text in OLD.items():
        (out / name).write_text(text)
    assert _swap_inode_changes(out)  # swapped whole
    assert out.stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder removed


@pytest.mark.parametrize("case", ["subfolder", "single file", "current folder"])
def test_where_a_swap_would_lose_something_the_files_are_renamed_in_place(tmp_path, monkeypatch, case):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in OLD.items():
        (out / name).write_text(text)
    if case == "subfolder":  # cannot be hard-linked into the new folder
        (out / "traces").mkdir()
    if case == "current folder":  # the process (or a shell) would be left in the removed one
        monkeypatch.chdir(out)
    if case == "single file":
        before = out.stat().st_ino
        outputs.write_outputs({out / "plan.json": "new plan"})
        assert out.stat().st_ino == before and (out / "plan.json").read_text() == "new plan"
    else:
        assert not _swap_inode_changes(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
