"""What can go wrong, in one tree: every error a user can fix is a :class:`HandgradError`.

    HandgradError                 a problem the user can fix: printed as one line `error: ...`, exit code 2
    ├── ConfigError               an option value (names the flag, e.g. --model.lr)
    ├── SetupError                options that do not fit together or the machine (precision, strategy, sizes)
    ├── CheckpointError           a checkpoint that is missing, corrupt, hostile or made for another run
    ├── DataNotFoundError         no data where --data.data_dir points, and none could be fetched
    ├── BadDataError              data that is there but unusable (corrupt image, missing class, ...)
    ├── OutputDirError            a log or checkpoint folder that cannot be written (read-only, disk full)
    ├── NonFiniteLossError        training diverged (NaN/inf loss): exit code 1, the run itself failed
    └── RankLostError             a process of a sweep stopped (killed, out of memory): exit code 1

The command line catches :class:`HandgradError` once (:func:`handgrad.runtime.exits.exit_on_user_error`) and exits
with ``err.exit_code``.
"""

from __future__ import annotations


class HandgradError(Exception):
    """A problem the user can fix; the message says how. ``train.py`` prints it as one ``error:`` line."""

    exit_code = 2


class ConfigError(HandgradError, ValueError):
    """An option value is invalid (negative, NaN, wrong choice); the message names the command-line flag."""


class SetupError(HandgradError, ValueError):
    """The trainer or the data do not fit the model (precision, strategy, number of classes)."""


class CheckpointError(HandgradError, ValueError):
    """A checkpoint cannot be used: missing, truncated, corrupt or hostile, or made for another model or run."""


class DataNotFoundError(HandgradError, RuntimeError):
    """No CIFAR-10 data in data_dir and none could be extracted or downloaded."""


class BadDataError(HandgradError, ValueError):
    """The data on disk is there but unusable: corrupt, wrong image size, missing class folder, ..."""


class OutputDirError(HandgradError, RuntimeError):
    """The log or checkpoint folder cannot be written."""


class NonFiniteLossError(HandgradError, RuntimeError):
    """The training loss became NaN or infinite; the message names the step. Exit code 1: the run failed."""

    exit_code = 1


class RankLostError(HandgradError, RuntimeError):
    """Another process of a multi-process sweep stopped; the message names it and says how to resume. Exit code 1."""

    exit_code = 1
