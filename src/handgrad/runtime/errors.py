"""What can go wrong, in one tree, and the checks that raise it before any work is done.

    HandgradError                 a problem the user can fix: printed as one line `error: ...`, exit code 2
    ├── ConfigError               an option value (names the flag, e.g. --model.lr)
    ├── SetupError                options that do not fit together or the machine (precision, strategy, sizes)
    ├── CheckpointError           a checkpoint that is missing, corrupt, hostile or made for another run
    ├── DataNotFoundError         no data where --data.data_dir points, and none could be fetched
    ├── BadDataError              data that is there but unusable (corrupt image, missing class, ...)
    ├── OutputDirError            a log or checkpoint folder that cannot be written (read-only, disk full)
    ├── NonFiniteLossError        training diverged (NaN/inf loss): exit code 1, the run itself failed
    └── RankLostError             a process of a sweep stopped (killed, out of memory): exit code 1

The command line (:mod:`handgrad.train.cli`) catches :class:`HandgradError` once and exits with ``err.exit_code``.
"""

from __future__ import annotations

import math
from typing import Sequence

SUPPORTED_PRECISIONS = ("32-true", "64-true")
PRECISION_ALIASES = {"32": "32-true", "64": "64-true"}  # the short forms Lightning accepts for the same settings


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


# ----------------------------------------------------------------------------- checks


def check_precision(precision) -> None:
    """The hand-written backward and SGD step run in one dtype: only ``32-true`` and ``64-true`` (or 32, 64).
    The message shows ``precision`` as given (the CLI passes what the user typed: Lightning would report
    ``16-mixed`` on a CPU as ``bf16-mixed``)."""
    if PRECISION_ALIASES.get(str(precision), str(precision)) not in SUPPORTED_PRECISIONS:
        raise SetupError(
            f"--trainer.precision {precision} is not supported: the hand-written backward pass and SGD step run in "
            f"one dtype and have no loss scaling or mixed-precision casts. Use one of {list(SUPPORTED_PRECISIONS)} "
            f"(e.g. --trainer.precision 64-true for exact comparisons)."
        )


def check_sizes_fit_data(sizes: Sequence[int], datamodule) -> None:
    """Raise :class:`SetupError` with the fitting --model.sizes when the data's input size (``dims``, e.g.
    (3, 32, 32)) or number of classes (``class_names``) differ from the network's n_0 or n_L."""
    dims = getattr(datamodule, "dims", None)
    if dims is not None and math.prod(dims) != sizes[0]:
        fit = [math.prod(dims), *sizes[1:]]
        raise SetupError(
            f"the model's input size sizes[0] = {sizes[0]} does not match the data: "
            f"{type(datamodule).__name__} gives {'x'.join(map(str, dims))} = {math.prod(dims)} values per image; "
            f"set --model.sizes '{fit}'"
        )
    names = getattr(datamodule, "class_names", None)
    if names is not None and len(names) != sizes[-1]:
        fit = [*sizes[:-1], len(names)]
        raise SetupError(
            f"the model has {sizes[-1]} outputs (sizes[-1]) but the data has {len(names)} classes "
            f"{list(names)}; set --model.sizes '{fit}' (or change --data.classes)"
        )


def check_strategy(strategy) -> None:
    """The hand-written backward and SGD step need every process to hold all parameters: one device, or data
    parallel (ddp, ddp_spawn); not FSDP, DeepSpeed or model parallel strategies."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, DeepSpeedStrategy):
        raise SetupError(
            f"strategy {type(strategy).__name__} is not supported: the hand-written backward pass and SGD step need "
            f"every process to hold all parameters. Use one device or data parallel training "
            f"(--trainer.strategy ddp or ddp_spawn)."
        )


def check_model_hyperparameters(*, sizes, activation, loss, lr, momentum, dampening, weight_decay, nesterov,
                                backprop, optimizer, log_histograms_every_n_steps, nan_check_every_n_steps) -> None:
    """Raise :class:`ConfigError` naming the flag (``--model.<name>``) for any value
    :class:`handgrad.train.module.HandgradClassifier` cannot train with."""
    from handgrad.core import optim
    from handgrad.core.activations import ACTIVATIONS

    choices = (("activation", activation, tuple(ACTIVATIONS)), ("loss", loss, ("cross_entropy", "mse")),
               ("backprop", backprop, ("handgrad", "autograd")), ("optimizer", optimizer, ("handgrad", "torch")))
    for name, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"--model.{name} must be one of {allowed}, got {value!r}")
    if (isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) < 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)):
        raise ConfigError(f"--model.sizes must list at least two positive layer widths [n_0, ..., n_L] "
                          f"(n_0 = 3072 for CIFAR, n_L = number of classes), got {sizes!r}")
    optim.check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov, name=lambda k: f"--model.{k}",
                                error=ConfigError)
    if not isinstance(log_histograms_every_n_steps, int) or log_histograms_every_n_steps < 0:
        raise ConfigError(f"--model.log_histograms_every_n_steps must be >= 0 (0 = off), "
                          f"got {log_histograms_every_n_steps!r}")
    if nan_check_every_n_steps is not None and (not isinstance(nan_check_every_n_steps, int)
                                                or nan_check_every_n_steps < 1):
        raise ConfigError(f"--model.nan_check_every_n_steps must be >= 1 or null (automatic), "
                          f"got {nan_check_every_n_steps!r}")
