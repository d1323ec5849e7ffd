"""What a model needs from the trainer and the data, checked and prepared once for both LightningModules
(:class:`handgrad.train.module.HandgradClassifier` and the sweep's :class:`handgrad.sweep.module.GridClassifier`):

    precision   one Lightning supports here (:data:`PRECISIONS`), checked as the user typed it
    float64     the module widened before Lightning restores a checkpoint into it
    sizes       n_0 = the data's values per image, n_L = its number of classes
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from handgrad.runtime.errors import SetupError

PRECISIONS = ("32-true", "64-true")
ALIASES = {"32": "32-true", "64": "64-true"}  # the short forms Lightning accepts for the same settings


def check_precision(precision) -> None:
    """Refuse a precision the hand-written backward and SGD step do not run in. The message shows ``precision`` as
    given (the CLI passes what the user typed)."""
    if ALIASES.get(str(precision), str(precision)) not in PRECISIONS:
        raise SetupError(
            f"--trainer.precision {precision} is not supported: the hand-written backward pass and SGD step run in "
            f"one dtype and have no loss scaling or mixed-precision casts. Use one of {list(PRECISIONS)} "
            f"(e.g. --trainer.precision 64-true for exact comparisons).")


def check_sizes_fit_data(sizes: Sequence[int], datamodule) -> None:
    """Raise :class:`SetupError` with the fitting --model.sizes when the data's input size (``dims``, e.g.
    (3, 32, 32)) or number of classes (``class_names``) differ from the network's n_0 or n_L."""
    dims = getattr(datamodule, "dims", None)
    if dims is not None and math.prod(dims) != sizes[0]:
        fit = [math.prod(dims), *sizes[1:]]
        raise SetupError(f"the model's input size sizes[0] = {sizes[0]} does not match the data: "
                         f"{type(datamodule).__name__} gives {'x'.join(map(str, dims))} = {math.prod(dims)} values per "
                         f"image; set --model.sizes '{fit}'")
    names = getattr(datamodule, "class_names", None)
    if names is not None and len(names) != sizes[-1]:
        fit = [*sizes[:-1], len(names)]
        raise SetupError(f"the model has {sizes[-1]} outputs (sizes[-1]) but the data has {len(names)} classes "
                         f"{list(names)}; set --model.sizes '{fit}' (or change --data.classes)")


def preflight(trainer, datamodule, sizes: Sequence[int]) -> None:
    """The precision and the sizes against the data: checked before anything is written (the CLI calls it before the
    trainer runs) and again when the trainer sets the model up."""
    check_precision(trainer.precision)
    check_sizes_fit_data(sizes, datamodule)


def setup_model(module, sizes: Sequence[int]) -> None:
    """From a LightningModule's ``setup``: :func:`preflight` against the trainer's data, then float64.

    Lightning restores checkpoint weights before its precision plugin converts the module: without the widening
    here, a float64 checkpoint would be copied into float32 parameters (rounded) and only then widened again."""
    trainer = module.trainer
    preflight(trainer, getattr(trainer, "datamodule", None), sizes)
    if trainer.precision == "64-true":
        module.to(torch.float64)
