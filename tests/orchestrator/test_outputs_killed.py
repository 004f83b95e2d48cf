"""``write_outputs`` killed at every step (issue 23, item 2: "plan.json and plan.html appear together or not at
all"): a forked writer dies (``os._exit``, no cleanup runs, as under SIGKILL) or is interrupted (an exception
its cleanup sees) at its k-th write, rename, replace or folder exchange, and with subfolders at its k-th hard
link, folder made or mode set, for every k. A new folder then holds both files or does not exist; an existing
folder, subfolders at any depth included, holds the old tree or the new one, never a mix (where ``renameat2``
cannot exchange folders, a kill between the two renames leaves no folder and the old tree whole beside it);
only hidden temporaries (``.*.tmp``) are left besides, and none after an interrupt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moeplan.orchestrator import outputs


class _Interrupted(BaseException):
    """Raised at the k-th step, as a KeyboardInterrupt would be: the writer's cleanup runs."""


def _killed_at(k: int, files: dict[Path, str], tree_steps: bool = False, interrupt: bool = False) -> bool:
    """Run ``write_outputs(files)`` in a child that exits (or, with ``interrupt``, raises) at its k-th step;
    whether it got that far. ``tree_steps``: hard links, folders made and modes set count as steps too."""
    pid = os.fork()
    if pid == 0:  # the child: count the steps, die at the k-th
        try:
            count = [0]

            def dying(fn):
                def step(*args, **kwargs):
                    count[0] += 1
                    if count[0] == k:
                        if interrupt:
                            raise _Interrupted
                        os._exit(9)
                    return fn(*args, **kwargs)
                return step

            outputs._write_synced = dying(outputs._write_synced)
            outputs.os.rename = dying(os.rename)
            outputs.os.replace = dying(os.replace)
            outputs._exchange = dying(outputs._exchange)
            if tree_steps:
                outputs.os.link, outputs.os.mkdir, outputs.os.chmod = map(dying, (os.link, os.mkdir, os.chmod))
            outputs.write_outputs(files)
            os._exit(0)
        except _Interrupted:
            os._exit(9)
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


def test_without_renameat2_an_existing_folder_holds_the_old_pair_or_the_new_one_or_is_aside_whole(
        tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_RENAMEAT2", None)
    outcomes = _killed_in_existing_folders(tmp_path)
    # the old folder renamed aside, the kill before the new one came in: no folder at the name
    assert outcomes == {tuple(sorted(d.items())) for d in (OLD, NEW, {})}, outcomes
    asides = list(tmp_path.glob(".k*.old.tmp"))
    assert len(asides) == 1 and _visible(asides[0]) == OLD, asides


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


@pytest.mark.parametrize("case", ["single file", "current folder", "too many entries"])
def test_where_a_swap_would_lose_something_the_files_are_renamed_in_place(tmp_path, monkeypatch, case):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in OLD.items():
        (out / name).write_text(text)
    if case == "current folder":  # the process (or a shell) would be left in the removed one
        (out / "traces").mkdir()
        monkeypatch.chdir(out / "traces")
    if case == "too many entries":  # notes.txt is one entry too many: a folder this big is not an output folder
        monkeypatch.setattr(outputs, "MAX_SWAPPED_ENTRIES", 0)
    if case == "single file":
        before = out.stat().st_ino
        outputs.write_outputs({out / "plan.json": "new plan"})
        assert out.stat().st_ino == before and (out / "plan.json").read_text() == "new plan"
    else:
        assert not _swap_inode_changes(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# A run-like folder: the pair, a file of the user's, subfolders two deep (one empty, one of mode 0o750), a link.
OLD_TREE = {"plan.json": "old plan", "plan.html": "old page", "notes.txt": "the user's", "traces/": 0o750,
            "traces/rank0.json": "trace 0", "traces/deep/": 0o755, "traces/deep/rank1.json": "trace 1",
            "empty/": 0o700, "latest": "-> notes.txt"}
NEW_TREE = dict(OLD_TREE, **{"plan.json": "new plan", "plan.html": "new page"})


def _make_tree(out: Path) -> None:
    out.mkdir()
    for name, value in OLD_TREE.items():
        if name.endswith("/"):
            (out / name).mkdir()
            (out / name).chmod(value)
        elif value.startswith("-> "):
            (out / name).symlink_to(value[3:])
        else:
            (out / name).write_text(value)


def _tree(out: Path) -> dict[str, object]:
    """Every entry under ``out`` but the hidden temporaries: folders by mode, links by target, files by text."""
    seen: dict[str, object] = {}
    for p in sorted(out.rglob("*")) if out.exists() else []:
        rel = p.relative_to(out).as_posix()
        if any(part.startswith(".") and part.endswith(".tmp") for part in rel.split("/")):
            continue
        if p.is_symlink():
            seen[rel] = f"-> {os.readlink(p)}"
        elif p.is_dir():
            seen[rel + "/"] = p.stat().st_mode & 0o777
        else:
            seen[rel] = p.read_text()
    return seen


def _killed_with_subfolders(tmp_path: Path, interrupt: bool) -> list[dict[str, object]]:
    """Kill (or interrupt) a writer of an existing folder holding subfolders at each step; the trees seen,
    the last one the finished writer's."""
    outcomes = []
    for k in range(1, 40):
        out = tmp_path / f"k{k}"
        _make_tree(out)
        died = _killed_at(k, {out / "plan.json": "new plan", out / "plan.html": "new page"}, True, interrupt)
        outcomes.append(_tree(out))
        left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        if interrupt:  # the cleanup ran: nothing hidden left, beside the folder or in it
            assert not left and not [p for p in out.rglob(".*")], (k, left)
        assert all(p.endswith(".tmp") for p in left), left
        if not died:
            return outcomes
    pytest.fail("the writer never finished: more steps than expected")


@pytest.mark.skipif(outputs._RENAMEAT2 is None, reason="this libc has no renameat2")
@pytest.mark.parametrize("interrupt", [False, True], ids=["killed", "interrupted"])
def test_a_folder_with_subfolders_is_swapped_whole_the_old_tree_or_the_new_one(tmp_path, interrupt):
    outcomes = _killed_with_subfolders(tmp_path, interrupt)
    assert all(seen in (OLD_TREE, NEW_TREE) for seen in outcomes), [s for s in outcomes if s not in (OLD_TREE,
                                                                                                    NEW_TREE)]
    assert outcomes[-1] == NEW_TREE and OLD_TREE in outcomes  # kills landed before the exchange too
    assert len(outcomes) > 10  # the links, folders and modes were steps: the kills landed among them


@pytest.mark.parametrize("interrupt", [False, True], ids=["killed", "interrupted"])
def test_without_renameat2_a_folder_with_subfolders_is_renamed_aside_then_in_never_file_by_file(
        tmp_path, monkeypatch, interrupt):
    monkeypatch.setattr(outputs, "_RENAMEAT2", None)
    outcomes = _killed_with_subfolders(tmp_path, interrupt)
    allowed = (OLD_TREE, NEW_TREE) if interrupt else (OLD_TREE, NEW_TREE, {})  # an interrupt puts the old one back
    assert all(seen in allowed for seen in outcomes), [s for s in outcomes if s not in allowed]
    assert outcomes[-1] == NEW_TREE and OLD_TREE in outcomes
    if not interrupt:  # killed between the two renames: no folder, the old tree whole beside it
        asides = list(tmp_path.glob(".k*.old.tmp"))
        assert {} in outcomes and len(asides) == 1 and _tree(asides[0]) == OLD_TREE, asides


def test_a_swapped_tree_keeps_its_files_modes_and_links_and_leaves_nothing_beside(tmp_path):
    out = tmp_path / "out"
    _make_tree(out)
    before = {p: (out / p).stat().st_ino for p in ("notes.txt", "traces/deep/rank1.json")}
    outputs.write_outputs({out / "plan.json": "new plan", out / "plan.html": "new page"})
    assert _tree(out) == NEW_TREE
    assert {p: (out / p).stat().st_ino for p in before} == before  # the same files, linked: nothing copied
    assert (out / "notes.txt").stat().st_nlink == 1  # the old tree's links removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("case", ["link refused", "too many entries"])
def test_a_tree_that_cannot_be_mirrored_is_left_in_place_and_its_files_renamed_in(tmp_path, monkeypatch, case):
    out = tmp_path / "out"
    _make_tree(out)
    if case == "link refused":  # protected_hardlinks: a file of another user's

        def refused(*args, **kwargs):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(outputs.os, "link", refused)
    else:
        monkeypatch.setattr(outputs, "MAX_SWAPPED_ENTRIES", len(OLD_TREE) - 3)  # the pair is not counted: one over
    before = out.stat().st_ino
    outputs.write_outputs({out / "plan.json": "new plan", out / "plan.html": "new page"})
    assert _tree(out) == NEW_TREE and out.stat().st_ino == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_without_renameat2_a_second_writer_waits_while_the_folder_is_aside(tmp_path, monkeypatch):
    """Writer A is slow between its two renames (no folder at the name). Writer B must not make an empty folder
    there and fill it (A's second rename would then fail, the user's files left aside): the parent's lock holds
    it back, and B then swaps the tree A put in."""
    import threading
    import time

    monkeypatch.setattr(outputs, "_RENAMEAT2", None)
    real_rename, aside_seen = os.rename, []

    def slow_for_a(src, dst):
        real_rename(src, dst)
        if threading.current_thread().name == "A" and str(dst).endswith(".old.tmp"):
            aside_seen.append(dst)
            time.sleep(0.3)

    monkeypatch.setattr(outputs.os, "rename", slow_for_a)
    out = tmp_path / "out"
    _make_tree(out)
    errors = []

    def write(name):
        try:
            outputs.write_outputs({out / "plan.json": f"{name} plan", out / "plan.html": f"{name} page"})
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    a = threading.Thread(target=write, args=("A",), name="A")
    b = threading.Thread(target=write, args=("B",), name="B")
    a.start()
    deadline = time.monotonic() + 5
    while not aside_seen and time.monotonic() < deadline:  # A's folder is aside: no folder at the name now
        time.sleep(0.005)
    b.start()
    a.join()
    b.join()
    assert aside_seen and not errors, errors
    assert _tree(out) == dict(OLD_TREE, **{"plan.json": "B plan", "plan.html": "B page"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
