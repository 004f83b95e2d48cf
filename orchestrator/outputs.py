"""Writing a command's files: all of them or none, and strict JSON.

A command renders every file first, then hands them here. ``write_outputs`` is ``write_atomic``
(``simulator/contracts/atomic_write.py``: temporary file, then rename) over several files: each is
written under a hidden name and flushed to disk, and only when all are there do they go into place.
Files for a folder that does not exist yet (a new ``--out``) are written into a hidden folder beside
it, which is then renamed to be that folder: its files appear together or not at all, even if the
process is killed. Files for an existing folder are renamed one by one under a lock on the folder,
the first file given last (``plan.json``: what readers read), so that two runs writing the same
``--out`` leave one run's complete set. A failure, or an interrupt, removes what it wrote (folders
it made included) and becomes one ``InputError``. The ``check_*`` functions reject an unusable
``--out`` before a command spends time computing. ``strict_json`` is how every JSON object we print
or write is dumped: NaN and infinities are refused, never written.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
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


def _hidden(path: Path) -> Path:
    """A name beside ``path`` that only this writer uses (a file's temporary, or a new folder's stand-in)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


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


class _Staging:
    """Where a call's files are written before they go into place: beside their targets, or (for a folder
    that does not exist yet) inside a hidden copy of that folder, renamed to it at the end."""

    def __init__(self) -> None:
        self.folders: dict[Path, Path] = {}  # outermost missing folder -> its hidden stand-in
        self.files: list[tuple[Path, Path]] = []  # (temporary, target) in the order given

    def stage(self, path: Path) -> Path:
        """Where ``path``'s text goes now (its folders made)."""
        missing = _missing_dirs(path.parent)
        top = next((f for f in self.folders if f == path.parent or f in path.parents), None)
        if top is None and missing:
            top = missing[0]
            self.folders[top] = _hidden(top)
            self.folders[top].mkdir()  # beside the outermost missing folder: in one that exists
        if top is not None:
            tmp = self.folders[top] / path.relative_to(top)
            tmp.parent.mkdir(parents=True, exist_ok=True)
        else:
            tmp = _hidden(path)
        self.files.append((tmp, path))
        return tmp

    def commit(self) -> None:
        """New folders first, one rename each (where another writer made the folder meanwhile, its files go
        in one by one); then the files into existing folders, under their folders' locks, the first given
        last."""
        renamed = []
        for top, stand_in in self.folders.items():
            try:
                os.rename(stand_in, top)  # refused where the folder now exists and holds something
                renamed.append(top)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        pending = [(tmp, t) for tmp, t in self.files if not any(top in t.parents for top in renamed)]
        for _, target in pending:
            target.parent.mkdir(parents=True, exist_ok=True)
        with _locked([target.parent for _, target in pending]):
            for tmp, target in reversed(pending):
                os.replace(tmp, target)
        self._drop_stand_ins()

    def _drop_stand_ins(self) -> None:
        for stand_in in self.folders.values():
            shutil.rmtree(stand_in, ignore_errors=True)

    def undo(self) -> None:
        """Remove every temporary this call wrote."""
        for tmp, _ in self.files:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
        self._drop_stand_ins()


def write_outputs(files: Mapping[Path, str]) -> None:
    """Write ``{path: text}``: every file, or none of them (``InputError`` naming the path)."""
    staging = _Staging()
    path = None
    try:
        for path, text in files.items():
            check_out_file(path, "output")
            _write_synced(staging.stage(path), text)
        path = None
        staging.commit()
    except BaseException as exc:  # an interrupt too: leave nothing half-written
        staging.undo()
        if isinstance(exc, OSError):
            raise InputError(f"{path or next(iter(files))}: cannot write ({exc.strerror or exc})") from exc
        raise
