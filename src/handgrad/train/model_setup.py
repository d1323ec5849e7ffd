"""What a model needs from the trainer and the data, checked and prepared once for both LightningModules
(:class:`handgrad.train.module.HandgradClassifier` and the sweep's :class:`handgrad.sweep.module.GridClassifier`):

    precision   one of :data:`PRECISIONS`, checked as the user typed it; how each runs: docs/mixed_precision.md
    float64     the module widened before Lightning restores a checkpoint into it
    mixed       the network's products in bfloat16 or float16 (``compute_dtype``) on its float32 master weights;
                with 16-mixed, the loss scaler written by hand (:class:`handgrad.core.loss_scale.LossScaler`)
    sizes       n_0 = the data's values per image, n_L = its number of classes
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from handgrad.core.loss_scale import LossScaler
from handgrad.runtime.errors import SetupError

PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}  # Lightning's short forms
MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # the products' dtype; the weights stay float32


def check_precision(precision) -> None:
    """Refuse a precision the hand-written backward and SGD step do not implement (Lightning's transformer-engine
    ones: they replace nn.Linear layers, which this network does not use), naming those it does. The message shows
    ``precision`` as given (the CLI passes what the user typed)."""
    if ALIASES.get(str(precision), str(precision)) not in PRECISIONS:
        raise SetupError(f"--trainer.precision {precision} is not supported by the hand-written backward pass and SGD "
                         f"step; use one of {list(PRECISIONS)} (bf16-mixed: the matrix products in bfloat16, the "
                         f"weights and the SGD step in float32)")


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


def setup_model(module, network, sizes: Sequence[int]) -> None:
    """From a LightningModule's ``setup``: :func:`preflight` against the trainer's data, then the dtypes.

    64-true: Lightning restores checkpoint weights before its precision plugin converts the module; without the
    widening here, a float64 checkpoint would be copied into float32 parameters (rounded) and only then widened.
    bf16-mixed, 16-mixed: ``network.compute_dtype`` (the forward and backward products); everything else stays."""
    trainer = module.trainer
    preflight(trainer, getattr(trainer, "datamodule", None), sizes)
    precision = str(trainer.precision)
    if precision == "64-true":
        module.to(torch.float64)
    network.compute_dtype = MIXED.get(precision)


def scaler_settings(scaler) -> dict:
    """A GradScaler's (or LossScaler's) settings and state, from its public getters: LossScaler's arguments."""
    state = scaler.state_dict()
    return {"init_scale": state.get("scale", scaler.get_scale()), "growth_factor": state.get("growth_factor", 2.0),
            "backoff_factor": state.get("backoff_factor", 0.5), "growth_interval": state.get("growth_interval", 2000)}


def hand_loss_scaler(trainer) -> Optional[LossScaler]:
    """16-mixed: Lightning's MixedPrecision plugin holds a ``torch.amp.GradScaler`` (its ``scaler``, the documented
    constructor argument, which the plugin calls around every step); it is replaced by the hand-written
    :class:`LossScaler` with the same settings. None without a scaler (bf16, 32, 64); a LossScaler given to the
    plugin is kept."""
    plugin = trainer.precision_plugin
    scaler = getattr(plugin, "scaler", None)
    if scaler is None or isinstance(scaler, LossScaler):
        return scaler
    plugin.scaler = LossScaler(**scaler_settings(scaler), enabled=scaler.is_enabled())
    return plugin.scaler
