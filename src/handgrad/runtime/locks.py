"""Several processes writing into one folder: one writer at a time, temp names that say whose they are, the debris
of dead writers removed.

Two first runs, or the ranks of a sweep on one node, may prepare the same data_dir at once. A writer holds
``data_dir/.handgrad-lock`` (an ``flock``: the kernel releases it when its process ends, however it ends) while it
extracts, downloads or decodes; the others wait for it, then use its result. The lock file holds the writer's PID and
host, for the waiting notice, and is removed on release.

Temp files and folders carry the writer's host and PID in their names, e.g. ``.extract-<host>-<pid>-<random>``. A
kill leaves them behind; the next run removes those of writers on this host that no longer run. Those of a live
writer, of another host (whose processes cannot be seen from here) or without a name of this form are never touched.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from handgrad.runtime.disk import size_text

try:
    import fcntl
except ImportError:  # Windows: no flock, one writer at a time is then up to the user
    fcntl = None

LOCK_NAME = ".handgrad-lock"
HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "localhost"  # no "-": the name's fields split on it
TAGGED = re.compile(r"-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[A-Za-z0-9_]+(\.tmp)?$")  # ...-<host>-<pid>-<random>


def tag() -> str:
    """This writer's part of a temp name: ``<host>-<pid>-`` (the random part follows)."""
    return f"{HOST}-{os.getpid()}-"


def temp_dir(parent: Path, kind: str) -> Path:
    """A new folder ``parent/.<kind>-<host>-<pid>-<random>``."""
    return Path(tempfile.mkdtemp(prefix=f".{kind}-{tag()}", dir=parent))


def remove_dead_writers_files(folder: Path, prefix: str) -> None:
    """Remove the ``<prefix><host>-<pid>-<random>.tmp`` files in ``folder`` whose writer is dead (killed while
    writing: :func:`handgrad.runtime.atomic.atomic_write` names its temporary files so); a live one's stay."""
    for stale in folder.glob(f"{glob.escape(prefix)}*.tmp"):
        if dead_writer(stale.name):
            stale.unlink(missing_ok=True)


def is_running(pid: int) -> bool:
    """Whether process `pid` exists on this host and is not a zombie (killed, not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def dead_writer(name: str) -> bool:
    """Whether `name` is a temp name of a writer on this host that no longer runs."""
    m = TAGGED.search(name)
    return m is not None and m["host"] == HOST and not is_running(int(m["pid"]))


def remove_debris(*folders: Path) -> None:
    """Remove the temp folders (``.extract-*``, ``.download-*``) and files (``*.tmp``) of dead writers in `folders`,
    with one notice saying how much was freed."""
    removed, freed = [], 0
    for folder in folders:
        try:
            entries = [e for e in os.scandir(folder) if (e.name.startswith((".extract-", ".download-"))
                                                         or e.name.endswith(".tmp")) and dead_writer(e.name)]
        except OSError:  # no such folder
            continue
        for e in entries:
            freed += _size(Path(e.path))
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                try:
                    os.unlink(e.path)
                except OSError:
                    pass
            if not os.path.lexists(e.path):
                removed.append(e.name)
    if removed:
        rank_zero_info(f"removed {len(removed)} leftover(s) of interrupted runs ({size_text(freed)}): "
                       f"{', '.join(sorted(removed))}")


def _size(path: Path) -> int:
    """Bytes in a file or folder; what vanishes meanwhile (another run cleaning up too) counts as 0."""
    walked = () if path.is_symlink() else os.walk(path)  # os.walk raises nothing, follows no links
    paths = [path] + [os.path.join(d, n) for d, dirs, files in walked for n in dirs + files]
    total = 0
    for p in paths:
        try:
            total += os.lstat(p).st_size
        except OSError:
            pass
    return total


@contextmanager
def locked(folder: Path):
    """Hold ``folder/.handgrad-lock`` while the block runs, waiting (with one notice) while another process holds
    it. Without the lock where the file cannot be created (a read-only or full folder: nothing is written there)."""
    fd = _acquire(folder / LOCK_NAME)
    try:
        yield
    finally:
        release(folder, fd)  # the file is removed while still held: a waiter then sees another file and retries


class LockHeld(Exception):
    """Another live process holds the lock (:func:`hold`); ``str()`` names it, e.g. 'process 123 on host'."""


def hold(folder: Path) -> int | None:
    """Take ``folder/.handgrad-lock`` without waiting and keep it until :func:`release` (or until the process ends,
    however it ends: the kernel lets go of a dead process's flock, so a lock file left by a killed process is taken
    over). Raise :class:`LockHeld` naming the holder while a live process holds it; None where no lock file can be
    made (read-only folder, a file system without flock)."""
    return _acquire(folder / LOCK_NAME, wait=False)


def release(folder: Path, fd: int | None) -> None:
    """Let go of a lock taken with :func:`hold`, removing its file (while still held: see :func:`locked`)."""
    if fd is None:
        return
    try:
        os.unlink(folder / LOCK_NAME)
    except OSError:
        pass
    os.close(fd)


def _acquire(path: Path, wait: bool = True) -> int | None:
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                holder = _holder(path)
                os.close(fd)
                raise LockHeld(holder) from None
            if not waited:
                rank_zero_info(f"waiting for {_holder(path)}, which is preparing the data in {path.parent}...")
                waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (some network mounts): work without the lock
            os.close(fd)
            return None
        try:  # the holder removes the file before it lets go: then this fd locks a file nobody else sees
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {HOST}\n".encode())
            except OSError:  # a full disk: the notice of a waiter is then vaguer, nothing else changes
                pass
            return fd
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        pid, host = path.read_text().split()
        return f"process {int(pid)} on {host}"
    except (OSError, ValueError):
        return "another process"
