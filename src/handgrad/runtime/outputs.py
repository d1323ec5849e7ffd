"""Where a run writes (logs, checkpoints): checked before anything is trained or written."""

from __future__ import annotations

import tempfile
from pathlib import Path

from handgrad.runtime.errors import OutputDirError


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
