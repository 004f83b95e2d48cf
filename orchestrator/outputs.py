"""Writing a command's files: all of them or none.

A command renders every file first, then hands them here. ``write_outputs`` is ``write_atomic``
(``simulator/contracts/atomic_write.py``: temporary file, then rename) over several files: each is
written beside its target under a hidden name, and only when all are there are they renamed into
place; a failure removes what it wrote (directories it made included) and becomes one ``InputError``.
The ``check_*`` functions reject an unusable ``--out`` before a command spends time computing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path

from moeplan.orchestrator.errors import InputError


def _file_in_the_way(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is not a directory, if any."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def check_out_dir(path: Path, option: str) -> None:
    """``path`` is a directory, or can be made one."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path}: is a file, not a directory")
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise InputError(f"{option} {path}: {blocker} is a file, not a directory")


def check_out_file(path: Path, option: str) -> None:
    """``path`` can be written as a file (its folders made where missing)."""
    if path.is_dir():
        raise InputError(f"{option} {path}: is a directory, not a file")
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise InputError(f"{option} {path}: {blocker} is a file, not a directory")


def _missing_dirs(folder: Path) -> list[Path]:
    """The folders ``folder.mkdir(parents=True)`` would make, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def write_outputs(files: Mapping[Path, str]) -> None:
    """Write ``{path: text}``: every file, or none of them (``InputError`` naming the path)."""
    made: list[Path] = []
    staged: list[tuple[Path, Path]] = []
    path = None
    try:
        for path, text in files.items():
            check_out_file(path, "output")
            missing = _missing_dirs(path.parent)
            path.parent.mkdir(parents=True, exist_ok=True)
            made += missing
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            staged.append((tmp, path))
            tmp.write_text(text)  # opened as any new file: the usual permissions
        for tmp, path in staged:
            os.replace(tmp, path)
    except (OSError, InputError) as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for folder in reversed(made):
            with suppress(OSError):
                folder.rmdir()
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: cannot write ({exc.strerror})") from exc
