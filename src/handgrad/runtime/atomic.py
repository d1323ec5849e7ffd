"""Files that are whole or absent: every file handgrad keeps is written by :func:`atomic_write`.

Checkpoints (``*.ckpt``, a sweep's ``selected.ckpt``), the decoded-image cache, a sweep's ``plan.json`` and its chunks:

    1. write into a temporary file beside the target, named after its writer (``.<name>-<host>-<pid>-<random>.tmp``,
       :func:`handgrad.runtime.locks.tag`), flush and fsync it;
    2. ``os.replace`` it onto the target (atomic on POSIX and Windows: a reader sees the old file or the new one);
    3. fsync the folder, so that the rename itself survives a power cut.

A kill at any moment leaves the target as it was, and at most a temporary file, which the next write of the same
target removes once its writer is dead (a live writer's is left alone). A full disk raises the one-line
:class:`handgrad.runtime.errors.OutputDirError` of :func:`handgrad.runtime.disk.disk_full_error`.

:func:`sha256_of` lets a file that vouches for another (a sweep chunk's JSON for its weights) record its checksum.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from handgrad.runtime import disk, locks


def atomic_write(path, write: Callable[[BinaryIO], object], what: str = "") -> Path:
    """``write(f)`` into a temporary file beside ``path``, then replace ``path`` by it (see the module docstring).
    The file gets the mode a plain ``open()`` would give it; ``what`` names it in a disk-full error ("checkpoint")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    locks.remove_dead_writers_files(path.parent, f".{path.name}-")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-{locks.tag()}", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if disk.is_disk_full(err):
            raise disk.disk_full_error(path.parent, f"writing {what + ' ' if what else ''}{path.name}") from None
        raise
    _fsync_dir(path.parent)
    return path


def write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode())


def sha256_of(path) -> str:
    """The file's sha256 (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(d: Path) -> None:
    """Make the rename durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
