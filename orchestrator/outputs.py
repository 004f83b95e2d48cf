"""Writing a command's files: all of them or none, and strict JSON.

A command renders every file first, then hands them here. ``write_outputs`` is ``write_atomic``
(``simulator/contracts/atomic_write.py``: temporary file, then rename) over several files: each is
written beside its target under a hidden name and flushed to disk, and only when all are there are
they renamed into place, under a lock on each target folder, so that two runs writing the same
``--out`` leave one run's complete set. A failure, or an interrupt, removes what it wrote (folders
it made included) and becomes one ``InputError``. The ``check_*`` functions reject an unusable
``--out`` before a command spends time computing. ``strict_json`` is how every JSON object we print
or write is dumped: NaN and infinities are refused, never written.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from moeplan.orchestrator.errors import InputError


def strict_json(value: Any, indent: int | None = 2) -> str:
    """``value`` as JSON; ``ValueError`` (a bug, not bad input) if it holds NaN or an infinity."""
    return json.dumps(value, indent=indent, allow_nan=False)


def _stat(path: Path, option: str) -> os.stat_result | None:
    """``path``'s status (links followed), None when nothing is there; ``InputError`` for a name the
    system refuses (too long, a loop of links, no permission to look)."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot use ({exc.strerror})") from None


def _file_in_the_way(path: Path, option: str) -> Path | None:
    """The first existing ancestor of ``path`` that is not a directory, if any."""
    for parent in reversed(path.parents):
        st = _stat(parent, option)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            return parent
    return None


def check_out_dir(path: Path, option: str) -> None:
    """``path`` is a directory, or can be made one."""
    st = _stat(path, option)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise InputError(f"{option} {path}: is a file, not a directory")
    blocker = _file_in_the_way(path, option)
    if blocker is not None:
        raise InputError(f"{option} {path}: {blocker} is a file, not a directory")


def check_out_file(path: Path, option: str) -> None:
    """``path`` can be written as a regular file (its folders made where missing)."""
    st = _stat(path, option)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise InputError(f"{option} {path}: is a directory, not a file")
    if st is not None and not stat.S_ISREG(st.st_mode):  # renaming over /dev/null would replace the device
        raise InputError(f"{option} {path}: is not a regular file (a device, pipe or socket)")
    blocker = _file_in_the_way(path, option)
    if blocker is not None:
        raise InputError(f"{option} {path}: {blocker} is a file, not a directory")


def _missing_dirs(folder: Path) -> list[Path]:
    """The folders ``folder.mkdir(parents=True)`` would make, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _write_synced(path: Path, text: str) -> None:
    """Write ``text`` to a new file and flush it to disk, so the rename never publishes an empty file."""
    with open(path, "x", encoding="utf-8") as f:  # opened as any new file: the usual permissions
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def _locked(folders: list[Path]) -> Iterator[None]:
    """Hold an exclusive lock on each folder (in one order, so two writers cannot deadlock)."""
    with ExitStack() as stack:
        for folder in sorted(set(folders)):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            stack.callback(os.close, fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield


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
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # this writer's own
            staged.append((tmp, path))
            _write_synced(tmp, text)
        with _locked([target.parent for _, target in staged]):
            for tmp, path in staged:
                os.replace(tmp, path)
    except BaseException as exc:  # an interrupt too: leave nothing half-written
        for tmp, _ in staged:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
        for folder in reversed(made):
            with suppress(OSError):
                folder.rmdir()
        if isinstance(exc, OSError):
            raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
        raise
