"""Writing a command's files: all of them or none, and strict JSON.

A command renders every file first, then hands them here. ``write_outputs`` is ``write_atomic``
(``simulator/contracts/atomic_write.py``: temporary file, then rename) over several files: each is
written under a hidden name and flushed to disk, and only when all are there do they go into place.
Files for a folder that does not exist yet (a new ``--out``) are written into a hidden folder beside
it, which is then renamed to be that folder under a lock on its parent: its files appear together or not
at all, even if the process is killed. Files for a folder that exists are written into a hidden folder beside it too; under
a lock on the folder and its parent, that one is given the folder's other entries (hard links to its
files, and its subfolders made again, their files hard-linked, at any depth) and replaced whole: the two
folders exchanged in one step (Linux ``renameat2(..., RENAME_EXCHANGE)``, glibc 2.28 or later, through
``ctypes``), or, where that call is missing or refused (an older glibc or kernel, a file system without
it), the old folder renamed aside and the new one renamed in (two renames, each atomic); then the old one
is removed. A reader, or a kill at any point, sees the old files or the new ones, never a mix; a kill
between the two renames leaves no folder at the name and the old one whole beside it
(``.NAME.<pid>.<hex>.old.tmp``: rename it back). The swap gives the folder and its subfolders new inodes
(a shell sitting in it is left in the removed one, and entries made in it by another program during the
swap are lost), so it is used only where it matters and can work: two files or more into the folder,
which is not this process's current folder (nor holds it), is not a mount point, holds no other file
system, at most ``MAX_SWAPPED_ENTRIES`` entries, and only entries this user may hard-link. Elsewhere the
files are renamed one by one under the lock, the first file given last (``plan.json``: what readers
read), so that a kill between two renames can leave a new ``plan.html`` beside the old ``plan.json`` but
never a new plan without its page. Two runs writing the same ``--out`` leave one run's complete set
either way. A failure, or an interrupt, removes what it wrote (folders it made included) and becomes one
``InputError``. The ``check_*`` functions reject an unusable ``--out`` before a command spends time
computing. ``strict_json`` is how every JSON object we print or write is dumped: NaN and infinities are
refused, never written.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from moeplan.orchestrator.errors import InputError

# A folder with more entries than this (at every depth) is not swapped but written file by file: the swap costs
# a hard link and an unlink per entry, 6.3 us + 4.7 us measured on this project's 2-core box (ext4), about
# 1.1 s at the bound, and a folder that big is not a command's output folder (a home, a dataset).
MAX_SWAPPED_ENTRIES = 100_000
# Folders an output path may need made: more is a mistake (a path of 2,000 `d/` ran pathlib's recursive mkdir
# out of stack), and a real layout needs a handful.
MAX_NEW_FOLDERS = 64


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


def _check_writable(path: Path, option: str, is_dir: bool) -> None:
    """A file can be made in the nearest folder that exists of ``path`` (a folder when ``is_dir``, else a file's
    path): the folder itself, or the ancestor its missing folders would be made in; a probe file is made there
    and removed at once. Modes alone do not tell (root ignores them; ``/proc``, ``/sys`` and read-only mounts
    refuse anyway), and a command told to write where it cannot should fail before it computes, not after."""
    folder = next((p for p in ((path,) if is_dir else ()) + tuple(path.parents) if p.is_dir()), Path("."))
    new_folders = len(path.parts) - len(folder.parts) - (0 if is_dir else 1)
    if new_folders > MAX_NEW_FOLDERS:  # each is made by a recursive call (pathlib's mkdir(parents=True))
        raise InputError(f"{option} {str(path)[:200]}: needs {new_folders} new folders; at most {MAX_NEW_FOLDERS} "
                         "are made")
    try:
        fd, name = tempfile.mkstemp(prefix=".moeplan-probe-", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot write in {folder} ({exc.strerror})") from None
    os.close(fd)
    os.unlink(name)


def out_path(text: str | Path) -> Path:
    """The value of an option naming where to write (``parser=`` of every ``--out``, ``--trace``, ``--run-dir``,
    ``--resume``, ``--recalibrate``). typer's own ``Path`` turns ``''`` into ``Path('.')``, the current folder;
    an empty value is refused instead, as an empty ``--model`` is: it is most likely a shell variable that was
    not set (``--out "$DIR"``), and the current folder is one character away (``--out .``). A NUL byte is refused
    here too, as typer's ``Path`` refuses it (no system call takes it)."""
    text = str(text)
    if text == "":
        raise ValueError("'' is an empty path (for the current folder, give .)")
    if "\x00" in text:
        raise ValueError(f"{text!r:.200}: a path cannot hold a NUL byte")
    return Path(text)


def check_out_dir(path: Path, option: str) -> None:
    """``path`` is a directory, or can be made one."""
    st = _stat(path, option)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise InputError(f"{option} {path}: is a file, not a directory")
    blocker = _file_in_the_way(path, option)
    if blocker is not None:
        raise InputError(f"{option} {path}: {blocker} is a file, not a directory")
    _check_writable(path, option, is_dir=True)


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
    _check_writable(path, option, is_dir=False)


def _missing_dirs(folder: Path) -> list[Path]:
    """The folders ``folder.mkdir(parents=True)`` would make, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _hidden(path: Path, tag: str = "") -> Path:
    """A name beside ``path`` that only this writer uses (a file's temporary, a new folder's stand-in, or with
    ``tag="old"`` an old folder renamed aside)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{'.' + tag if tag else ''}.tmp")


def _write_synced(path: Path, text: str) -> None:
    """Write ``text`` to a new file and flush it to disk, so the rename never publishes an empty file."""
    with open(path, "x", encoding="utf-8") as f:  # opened as any new file: the usual permissions
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _renameat2() -> Any:
    """libc's ``renameat2`` (glibc 2.28+), None where this libc has none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()
_AT_FDCWD = -100  # <fcntl.h>: paths relative to the current folder
_RENAME_EXCHANGE = 2  # <linux/fs.h>: swap the two names, atomically
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)  # an old kernel, or a file system without it


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` in one step; False where the system cannot (nothing changed then)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextmanager
def _locked(folders: Iterable[Path], beside: Iterable[Path], held: set[Path]) -> Iterator[None]:
    """Hold an exclusive lock on each folder and on its parent, and on each folder of ``beside`` (where new
    folders are renamed in): their real paths, in one order, so that two writers cannot deadlock; a path in
    ``held`` (locked by this writer already) is skipped, and each one taken is added to it. The parent's lock
    keeps every other writer out while a swap without ``renameat2`` leaves no folder at the name: one that
    would make the folder anew, or rename a new one in there, waits, then finds the swapped-in folder. A lock
    taken on a folder that another writer has meanwhile swapped out is let go and taken on the new one. A
    parent this user may not list is not locked."""
    real = {Path(os.path.realpath(folder)) for folder in folders}
    parents = ({folder.parent for folder in real} | {Path(os.path.realpath(b)) for b in beside}) - real
    with ExitStack() as stack:
        for folder in sorted((real | parents) - held):
            while True:
                if folder not in parents:  # gone where a swap without renameat2 was killed between its renames
                    folder.mkdir(exist_ok=True)
                try:
                    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                except PermissionError:
                    if folder in parents:
                        break
                    raise
                fcntl.flock(fd, fcntl.LOCK_EX)
                locked, now = os.fstat(fd), _stat(folder, "output")
                if now is not None and (locked.st_dev, locked.st_ino) == (now.st_dev, now.st_ino):
                    stack.callback(os.close, fd)
                    held.add(folder)
                    break
                os.close(fd)
        yield


def _swap_stand_in(folder: Path) -> tuple[Path, Path] | None:
    """(the real folder, a new hidden folder beside it) for files going into the existing ``folder``, or None
    where the folder cannot be swapped (see the module's docstring: its files are then written beside their
    targets)."""
    real = Path(os.path.realpath(folder))  # a link to a folder: swap the folder, not the link
    try:
        cwd = Path.cwd()
        if real == cwd or real in cwd.parents or real.parent == real:
            return None
        if os.stat(real).st_dev != os.stat(real.parent).st_dev:  # a mount point: the two cannot be exchanged
            return None
        stand_in = _hidden(real)
        stand_in.mkdir()
    except OSError:  # e.g. a writable folder in a read-only parent
        return None
    return real, stand_in


def _mirrored(real: Path, stand_in: Path, names: set[str]) -> bool:
    """Give ``stand_in`` (which holds ``names``) ``real``'s other entries: hard links to its files (links and
    other non-folders included), its subfolders made again with their modes and filled the same way, at any
    depth. False where that cannot be done whole: more than ``MAX_SWAPPED_ENTRIES`` entries, a subfolder on
    another file system (a mount point), or a link refused (EPERM under protected_hardlinks: another user's
    file; EMLINK). ``real`` is only read."""
    device = os.stat(real).st_dev
    modes = [(stand_in, stat.S_IMODE(os.stat(real).st_mode))]
    todo, count = [(real, stand_in, names)], 0
    try:
        while todo:
            source, target, skip = todo.pop()
            with os.scandir(source) as entries:
                for entry in entries:
                    if entry.name in skip:
                        continue
                    count += 1
                    if count > MAX_SWAPPED_ENTRIES:
                        return False
                    if not entry.is_dir(follow_symlinks=False):
                        os.link(entry.path, target / entry.name, follow_symlinks=False)
                        continue
                    st = entry.stat(follow_symlinks=False)
                    if st.st_dev != device:
                        return False
                    os.mkdir(target / entry.name)
                    modes.append((target / entry.name, stat.S_IMODE(st.st_mode)))
                    todo.append((Path(entry.path), target / entry.name, set()))
    except OSError:
        return False
    for folder, mode in reversed(modes):  # the modes last, innermost first: a read-only folder was filled first
        os.chmod(folder, mode)
    return True


def _swapped(real: Path, stand_in: Path, names: set[str], removals: list[Path]) -> bool:
    """Give ``stand_in`` (which holds ``names``) ``real``'s other entries (``_mirrored``), then put it in
    ``real``'s place whole: exchanged in one step (the old folder is then at ``stand_in``), or without
    ``renameat2`` the old one renamed aside and the new one renamed in (the aside added to ``removals``). False,
    with ``real`` untouched, where the folder cannot be mirrored."""
    if not _mirrored(real, stand_in, names):
        return False
    if _exchange(stand_in, real):
        return True
    aside = _hidden(real, "old")
    os.rename(real, aside)
    try:
        os.rename(stand_in, real)
    except BaseException:
        os.rename(aside, real)  # the old folder back: the caller removes the new one with its temporaries
        raise
    removals.append(aside)
    return True


class _Staging:
    """Where a call's files are written before they go into place: inside a hidden copy of a folder that does
    not exist yet (renamed to it at the end), inside a hidden folder beside an existing one (exchanged with it
    at the end), or beside their targets."""

    def __init__(self, paths: Iterable[Path]) -> None:
        parents = [path.parent for path in paths]
        self.shared = {folder for folder in parents if parents.count(folder) > 1}  # a swap helps only these
        self.folders: dict[Path, Path] = {}  # outermost missing folder -> its hidden stand-in
        self.swaps: dict[Path, tuple[Path, Path] | None] = {}  # existing folder -> (real folder, stand-in)
        self.files: list[tuple[Path, Path]] = []  # (temporary, target) in the order given
        self.asides: list[Path] = []  # old folders renamed aside by a swap without renameat2

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
            if path.parent not in self.swaps:
                self.swaps[path.parent] = _swap_stand_in(path.parent) if path.parent in self.shared else None
            swap = self.swaps[path.parent]
            tmp = swap[1] / path.name if swap is not None else _hidden(path)
        self.files.append((tmp, path))
        return tmp

    def commit(self) -> None:
        """New folders first, one rename each (where another writer made the folder meanwhile, its files go
        in one by one); then, under their locks, each existing folder swapped whole (``_swapped``) or its
        files renamed one by one, the first given last."""
        existing = {t.parent for _, t in self.files if not any(top in t.parents for top in self.folders)}
        held: set[Path] = set()
        with ExitStack() as locks:
            locks.enter_context(_locked(existing, [top.parent for top in self.folders], held))
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
            by_folder: dict[Path, list[tuple[Path, Path]]] = {}
            for tmp, target in pending:
                by_folder.setdefault(target.parent, []).append((tmp, target))
            locks.enter_context(_locked(by_folder, [], held))  # the folders another writer made meanwhile
            for folder, group in reversed(by_folder.items()):  # the first file's folder last
                swap = self.swaps.get(folder)
                if swap is not None and len(group) > 1 and _swapped(*swap, {t.name for _, t in group}, self.asides):
                    continue
                for tmp, target in reversed(group):
                    os.replace(tmp, target)
        self._drop_stand_ins()

    def _drop_stand_ins(self) -> None:
        """Remove the stand-ins: unused, emptied, or (after a swap) the old folder."""
        for stand_in in [*self.folders.values(), *(swap[1] for swap in self.swaps.values() if swap is not None),
                         *self.asides]:
            shutil.rmtree(stand_in, ignore_errors=True)

    def undo(self) -> None:
        """Remove every temporary this call wrote."""
        for tmp, _ in self.files:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
        self._drop_stand_ins()


def write_outputs(files: Mapping[Path, str]) -> None:
    """Write ``{path: text}``: every file, or none of them (``InputError`` naming the path)."""
    staging = _Staging(files)
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
