"""A run's folder (lightning_logs/version_N) belongs to one process at a time.

Lightning's TensorBoardLogger picks version N = 1 + the highest version_* it finds, and makes the folder only when it
first writes: runs started together in one folder pick the same N and mix their event files, checkpoints and
config.yaml. :func:`claim` instead makes the folder with ``mkdir``, which succeeds for exactly one process, and tries
the next number while it exists; then it locks the folder (``version_N/.handgrad-lock``, holding the PID, see
:mod:`handgrad.runtime.locks`). A resumed run writes into its checkpoint's own folder: while another live process
(the run itself, or another resume of it) holds that folder, it is refused with one ``error:`` line; the lock of a
killed process is taken over.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path
from typing import Optional, Union

from handgrad.runtime import locks as folder_lock
from handgrad.runtime.errors import OutputDirError


def reserve(root: Path, first: int) -> int:
    """The first N >= ``first`` whose folder ``root/version_N`` this call created (``mkdir`` fails with EEXIST for
    every other process that tries the same N, which then tries N + 1)."""
    root.mkdir(parents=True, exist_ok=True)
    n = first
    while True:
        try:
            os.mkdir(root / f"version_{n}")
            return n
        except FileExistsError:
            n += 1


def claim(root: Path, version: Optional[Union[int, str]], next_version) -> tuple[Union[int, str], Optional[int]]:
    """(version, lock fd) of this process's run folder under ``root``: a new ``version_N`` reserved atomically
    when ``version`` is None (``next_version()`` is where to start looking), else the given one (``N`` or a
    folder name), locked in both cases. Raise :class:`OutputDirError` while another live process holds it."""
    if version is None:
        version = reserve(root, next_version())
    folder = (root / (version if isinstance(version, str) else f"version_{version}")).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    if folder in HELD.values():  # this process holds it already (an earlier logger of the same run)
        return version, None
    try:
        fd = folder_lock.hold(folder)
    except folder_lock.LockHeld as holder:
        raise OutputDirError(
            f"the run folder {folder} is in use by {holder} (that run is still training, or another resume of it "
            f"is); nothing was run. Wait until it ends, or resume from a copy of the checkpoint placed outside "
            f"{folder} to continue in a new run folder.") from None
    if fd is not None:
        HELD[fd] = folder
    global last_claimed
    last_claimed = folder
    return version, fd


def release(fd: Optional[int]) -> None:
    """Let go of a run folder taken with :func:`claim` (its lock file is removed)."""
    if fd in HELD:
        folder_lock.release(HELD.pop(fd), fd)


last_claimed: Optional[Path] = None  # the run folder this process writes (for messages)
HELD: dict[int, Path] = {}  # lock fd -> run folder, of the run folders this process holds
atexit.register(lambda: [release(fd) for fd in list(HELD)])  # the kernel would let go too; this removes the files
