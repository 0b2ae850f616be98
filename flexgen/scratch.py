"""Scratch folders owned by a live process, and the sweep that removes those of dead ones.

Why: a run that is killed (``kill -9``, power loss, OOM) cannot clean up after itself. Its
KV-cache and activation files on disk, the temporary files of a conversion it was writing, a
quickstart checkpoint it was building, are left behind and fill the disk run after run. The
next run that uses the same folder must remove them, but must never touch the files of a run
that is still alive (several runs may share one offload folder).

How a folder proves that its owner lives: the owner takes an exclusive ``flock`` on a sibling
lock file ``<name>.lock`` *before* it creates ``<name>/``, and holds it until it has removed
the folder. The kernel drops the lock when the process ends, however it ends, so a lock that
can be taken proves the owner is gone; no guessing from process ids (which are reused, and
mean nothing across the machines that share a network folder). :func:`sweep` takes each lock
it can, removes the folder and then the lock file.

The one race, a sweeper unlinking a lock file between an owner's ``open`` and its ``flock``, is
closed by the owner checking, once it holds the lock, that the path still names the file it
locked (and starting again if not).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"

try:
    import fcntl
except ImportError:  # not POSIX: folders are still made and removed, but never swept
    fcntl = None  # type: ignore[assignment]


def _lock(path: Path, create: bool) -> int | None:
    """An fd holding an exclusive lock on ``path``, or None when another process holds it (or it vanished)."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        return None
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The path must still name the file we locked: a sweeper may have unlinked it between
        # our open and our flock (it held the lock then), and a new file may have taken its name.
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)
    except OSError:
        os.close(fd)
        return None
    return fd


class OwnedFolder:
    """A folder ``<parent>/<prefix><pid>-<random>/`` that this process owns until :meth:`release`.

    Made lazily by :attr:`path` (nothing is created until something is written), removed with
    everything in it by :meth:`release`, and by :func:`sweep` in a later process if this one dies.
    """

    def __init__(self, parent: str | os.PathLike, prefix: str = "") -> None:
        self.parent = Path(parent)
        self.prefix = prefix
        self._path: Path | None = None
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        """The folder, created (with its lock held) on first use."""
        if self._path is None:
            self.parent.mkdir(parents=True, exist_ok=True)
            while True:
                name = f"{self.prefix}{os.getpid()}-{uuid.uuid4().hex[:12]}"
                fd = _lock(self.parent / f"{name}{LOCK_SUFFIX}", create=True)
                if fd is not None:
                    break
            folder = self.parent / name
            try:
                folder.mkdir()
            except BaseException:
                self._drop_lock(self.parent / f"{name}{LOCK_SUFFIX}", fd)
                raise
            self._path, self._fd = folder, fd
        return self._path

    @property
    def created(self) -> bool:
        return self._path is not None

    def release(self) -> None:
        """Remove the folder and everything in it, then the lock; safe to call more than once."""
        if self._path is None:
            return
        folder, fd = self._path, self._fd
        self._path = self._fd = None
        shutil.rmtree(folder, ignore_errors=True)
        self._drop_lock(folder.with_name(folder.name + LOCK_SUFFIX), fd)

    def keep(self, name: str) -> Path:
        """Give up ownership of the folder, renaming it to ``<parent>/name`` (for a finished build).

        Raises OSError when ``name`` exists (someone else finished first); the folder is then
        still ours and :meth:`release` removes it.
        """
        folder = self.path
        target = self.parent / name
        os.rename(folder, target)
        self._path = None
        self._drop_lock(folder.with_name(folder.name + LOCK_SUFFIX), self._fd)
        self._fd = None
        return target

    @staticmethod
    def _drop_lock(lock: Path, fd: int | None) -> None:
        try:
            lock.unlink(missing_ok=True)  # while still holding it: no sweeper can be in the middle
        finally:
            if fd is not None:
                os.close(fd)


def sweep(parent: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Remove the folders ``<parent>/<prefix>*`` whose owners are dead; return those removed.

    A folder counts as dead when its lock file can be locked, or when it has no lock file (an
    owner creates its lock before its folder and removes its folder before its lock, so a live
    owner's folder always has one). Lock files left without a folder are removed the same way.
    Errors (a folder that vanished, another sweeper in the way) are skipped: sweeping is a
    courtesy, never a reason for a run to fail.
    """
    parent = Path(parent)
    if fcntl is None:
        return []
    try:
        names = {e.name for e in os.scandir(parent) if e.name.startswith(prefix)}
    except OSError:
        return []
    owners = sorted({n[: -len(LOCK_SUFFIX)] if n.endswith(LOCK_SUFFIX) else n for n in names})
    removed = []
    for name in owners:
        folder, lock_path = parent / name, parent / f"{name}{LOCK_SUFFIX}"
        # The listing is not a snapshot: ask the file system again, lock first.
        fd = None
        if lock_path.exists():
            fd = _lock(lock_path, create=False)
            if fd is None:
                continue  # its owner lives (or another sweeper is on it, or it was just released)
        try:
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
            if fd is not None:
                lock_path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
    if removed:
        log.info("removed %d folder(s) left in %s by run(s) that were killed", len(removed), parent)
    return removed
