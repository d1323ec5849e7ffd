"""A full disk, said as such: where, while doing what, how much is free, and how the user goes on.

A command registers how it is resumed (:func:`set_resume_advice`): the error then names the exact command that
continues the work (``fit --ckpt_path <last good checkpoint>``, a sweep rerun into its own log folder), not a
generic hint.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Callable, Optional

from handgrad.runtime.errors import OutputDirError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(err: Optional[BaseException]) -> bool:
    """Whether ``err`` comes from a full disk (or quota): an OSError ENOSPC/EDQUOT in it or in what it was raised
    while handling, e.g. torch.save's ``RuntimeError: [enforce fail at inline_container.cc] . unexpected pos``,
    raised while the file object's OSError(ENOSPC) is handled."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def free_bytes(folder: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def size_text(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def disk_full(folder: Path, doing: str, needed: Optional[int] = None) -> str:
    """'the disk holding <folder> is full (No space left on device) while <doing>: X free, about Y needed'."""
    free = free_bytes(folder)
    have = f"{size_text(free)} free" if free is not None else "no space left"
    need = f", about {size_text(needed)} needed" if needed else ""
    return f"the disk holding {folder} is full (No space left on device) while {doing}: {have}{need}"


def newest_checkpoint(folder: Optional[Path]) -> Optional[Path]:
    """The newest ``*.ckpt`` under ``folder`` (every one is whole: they are written atomically), or None."""
    saved = sorted(Path(folder).rglob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder and Path(folder).is_dir() \
        else []
    return saved[-1] if saved else None


def checkpoint_advice(last: Optional[Path]) -> str:
    if last is None:
        return "no checkpoint of this run was written; free some space and start again"
    return f"the last good checkpoint is {last} (the checkpoints on disk are intact); free some space, then resume " \
           f"with --ckpt_path {last}"


def _fit_advice(folder: Optional[Path]) -> str:
    """Without a registered command: the newest checkpoint under ``folder``."""
    return checkpoint_advice(newest_checkpoint(folder))


_resume_advice: Callable[[Optional[Path]], str] = _fit_advice


def set_resume_advice(advice: Optional[Callable[[Optional[Path]], str]]) -> None:
    """How the running command is resumed after a full disk: ``advice(folder)`` -> the sentence (None: the default,
    the newest checkpoint under the folder)."""
    global _resume_advice
    _resume_advice = advice or _fit_advice


def disk_full_error(folder: Optional[Path], doing: str) -> OutputDirError:
    """One error line: what was being written where, the space, and how to go on (:func:`set_resume_advice`)."""
    full = disk_full(Path(folder), doing) if folder is not None else \
        f"the disk is full (No space left on device) while {doing}"
    return OutputDirError(f"{full}; {_resume_advice(folder)} (or write elsewhere with --trainer.default_root_dir DIR).")
