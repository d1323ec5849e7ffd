"""How a command ends: a user error as one line ``error: ...`` and its exit code, never a traceback; and the Lightning
notices that say nothing about this project's runs, silenced by their text."""

from __future__ import annotations

import logging
import shlex
import sys
import threading
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from handgrad.runtime import run_folders
from handgrad.runtime.disk import disk_full_error, is_disk_full
from handgrad.runtime.errors import HandgradError


def command_line(words: list[str], drop: tuple[str, ...] = ()) -> str:
    """The command the user ran, with ``words`` after the program (options named in ``drop`` and their values left
    out), as a line to paste: ``python train.py ...`` (or ``python -m handgrad ...``)."""
    program = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else "train.py"
    if program.endswith("__main__.py"):  # `python -m handgrad`; or handgrad called in another program's process
        program = "-m handgrad" if Path(program).parent.name == "handgrad" else "train.py"
    prefix = ["python", *program.split(" ", 1)] if program == "-m handgrad" else ["python", program]
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in drop:
            skip = True
        elif not word.startswith(tuple(f"{d}=" for d in drop)):
            kept.append(word)
    return shlex.join(prefix + kept)


@contextmanager
def exit_on_user_error():
    """A :class:`HandgradError` (bad option, missing data, unusable checkpoint, diverged run) ends the program with
    one line ``error: ...`` on stderr and the error's exit code (2; 1 for a diverged run), without a traceback."""
    hook = threading.excepthook
    threading.excepthook = partial(quiet_disk_full_in_threads, hook)
    try:
        yield
    except HandgradError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:  # noqa: BLE001 (a full disk, whatever wrapped its OSError: Lightning's loggers do)
        if not is_disk_full(err):
            raise
        where = Path(err.filename).parent if getattr(err, "filename", None) else run_folders.last_claimed
        err = disk_full_error(where, "writing the run's logs (TensorBoard events, config.yaml, hparams.yaml)")
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    finally:
        threading.excepthook = hook


def quiet_disk_full_in_threads(hook, args) -> None:
    """TensorBoard writes its event files in a thread: when the disk is full, the thread dies with a traceback and
    the next write in the main thread raises the same OSError, which becomes the one `error:` line. Other
    exceptions in threads go to ``hook`` (printed as usual)."""
    if not is_disk_full(args.exc_value):
        hook(args)


# Lightning notices that say nothing about this project's runs, silenced by their text (the only handle Python's
# warnings and logging filters give; tests/test_cli.py checks that each text is still in Lightning's (or torch's)
# source, so that a filter which no longer matches anything is noticed):
QUIET_WARNINGS = (
    # checkpoints written every N steps under manual optimization hold the state after the step: what resuming
    # needs (tests/test_faults.py resumes from them bitwise)
    "Using ModelCheckpoint with manual optimization and every_n_train_steps",
    # validate/test/predict load a checkpoint from another run folder than their own: intended
    "The dirpath has changed from",
    # torch deprecates a pytree call that Lightning 2.6 makes on every batch; nothing a user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # predict's writers take each row's index from the batch itself (TensorBatches has no sampler indices)
    "Couldn't infer the batch indices fetched from your dataloader",
)
QUIET_LOG_LINES = ("Tip: For seamless cloud",)  # adverts for cloud services


def quiet_lightning_notices() -> None:
    for text in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=text)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not any(text in str(record.msg) for text in QUIET_LOG_LINES))
