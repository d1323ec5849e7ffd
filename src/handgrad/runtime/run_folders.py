"""A run's folder (lightning_logs/version_N) belongs to one process at a time, and is checked before it is written.

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
import tempfile
from pathlib import Path
from typing import Optional, Union

from handgrad.runtime import locks
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


def next_version(root: Path) -> int:
    """1 + the highest N of the ``version_N`` folders in ``root`` (0 when there is none), as Lightning numbers runs."""
    try:
        found = [int(d.name[8:]) for d in root.iterdir() if d.is_dir() and d.name[8:].isdigit()
                 and d.name.startswith("version_")]
    except OSError:
        return 0
    return max(found, default=-1) + 1


IN_USE = ("that run is still training, or another resume of it is; nothing was run. Wait until it ends, or resume "
          "from a copy of the checkpoint placed outside {folder} to continue in a new run folder.")


def claim(root: Path, version: Optional[Union[int, str]], in_use: str = IN_USE) -> tuple[Union[int, str], Optional[int]]:
    """(version, lock fd) of this process's run folder under ``root``: a new ``version_N`` reserved atomically
    when ``version`` is None, else the given one (``N`` or a folder name), locked in both cases. Raise
    :class:`OutputDirError` while another live process holds it, saying what to do (``in_use``, a format string
    of ``folder``)."""
    if version is None:
        version = reserve(root, next_version(root))
    folder = (root / (version if isinstance(version, str) else f"version_{version}")).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    if folder in HELD.values():  # this process holds it already (an earlier logger of the same run)
        return version, None
    try:
        fd = locks.hold(folder)
    except locks.LockHeld as holder:
        raise OutputDirError(f"the run folder {folder} is in use by {holder}: "
                             f"{in_use.format(folder=folder)}") from None
    if fd is not None:
        HELD[fd] = folder
    global last_claimed
    last_claimed = folder
    return version, fd


def release(fd: Optional[int]) -> None:
    """Let go of a run folder taken with :func:`claim` (its lock file is removed)."""
    if fd in HELD:
        locks.release(HELD.pop(fd), fd)


# ----------------------------------------------------------------------------- checked before anything is written


def output_dirs(trainer) -> dict:
    """The folders the trainer's loggers and checkpoint callbacks write to, each with the option that moves it."""
    dirs = {}
    for logger in trainer.loggers:
        # (a RunLogger makes and locks its version folder when log_dir is first read: only after these checks)
        d = logger.planned_log_dir() if hasattr(logger, "planned_log_dir") else getattr(logger, "log_dir", None)
        dirs[d or logger.save_dir] = "--trainer.logger.init_args.save_dir DIR"
    if not trainer.loggers:
        dirs[trainer.default_root_dir] = "--trainer.default_root_dir DIR"
    for cb in trainer.checkpoint_callbacks:
        if cb.dirpath:
            dirs[cb.dirpath] = "--checkpoint.dirpath DIR / --last_checkpoint.dirpath DIR"
    return dirs


def check_output_dirs(trainer) -> None:
    """Refuse to start when a log or checkpoint folder cannot be written (read-only, or a file in the way), before
    anything is trained or written: probe the nearest existing folder of each with a temporary file."""
    for d, option in output_dirs(trainer).items():
        if d is None or "://" in str(d):  # remote storage: nothing to probe here
            continue
        existing = Path(d).absolute()
        while not existing.exists():
            existing = existing.parent
        try:
            if not existing.is_dir():
                raise NotADirectoryError(20, "Not a directory")
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            raise OutputDirError(f"cannot write to {d} ({err.strerror}: {existing}); nothing was run. Make it "
                                 f"writable, or write elsewhere: run from a writable folder or set {option}.") from None


last_claimed: Optional[Path] = None  # the run folder this process writes (for messages)
HELD: dict[int, Path] = {}  # lock fd -> run folder, of the run folders this process holds
atexit.register(lambda: [release(fd) for fd in list(HELD)])  # the kernel would let go too; this removes the files
