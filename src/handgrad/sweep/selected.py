"""A sweep's selected member as a standalone checkpoint: ``<log dir>/selected.ckpt``, a HandgradClassifier checkpoint
with the member's weights, its SGD settings, the training split's statistics and the class names, so that
``train.py test --ckpt_path <log dir>/selected.ckpt --data.data_dir D`` evaluates it again."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import torch

from handgrad.core.mlp import MLP
from handgrad.core.optim import HYPERPARAMETERS
from handgrad.train.checkpoints import AtomicCheckpointIO
from handgrad.train.module import HandgradClassifier

SELECTED_CKPT = "selected.ckpt"


def member_mlp(sizes, activation: str, state: dict) -> MLP:
    """An MLP holding one member's weights (their dtype kept)."""
    mlp = MLP(sizes, activation).to(state["fc.1.weight"].dtype)
    mlp.load_state_dict(state)
    return mlp


def selected_checkpoint(mlp, member: dict, activation: str, epoch: int, global_step: int,
                        data_hparams: dict, sweep_info: dict, input_mean: torch.Tensor,
                        input_std: torch.Tensor, class_names: Optional[list] = None) -> dict:
    """A Lightning checkpoint (the keys Lightning writes with ``weights_only=True``) of a
    :class:`HandgradClassifier` holding ``mlp``'s weights (their dtype kept) and ``member``'s SGD hyperparameters,
    so that ``train.py test|validate|predict --ckpt_path`` builds the model from its ``hyper_parameters`` and
    loads these weights. ``handgrad_sweep`` records where it came from (member, metrics, log directory).

    The input contract (:mod:`handgrad.data.normalization`): ``input_mean``, ``input_std``, the training split's statistics
    the sweep's data module normalized with (``datamodule.mean``, ``.std``), and ``class_names`` (default:
    ``data_hparams["classes"]``)."""
    with torch.random.fork_rng(devices=[]):  # building the model draws initial weights: leave the seed's stream alone
        names = class_names if class_names is not None else data_hparams.get("classes")
        model = HandgradClassifier(sizes=list(mlp.n_l), activation=activation, **{h: member[h] for h in HYPERPARAMETERS},
                                   class_names=None if names is None else [str(c) for c in names])
    model.mlp.to(mlp.fc["1"].weight.dtype)
    model.mlp.load_state_dict(mlp.state_dict())
    model.input_mean = torch.as_tensor(input_mean, dtype=torch.float64).detach().cpu().clone()  # float64, whatever
    model.input_std = torch.as_tensor(input_std, dtype=torch.float64).detach().cpu().clone()  # the weights' dtype
    return {
        "epoch": epoch,
        "global_step": global_step,
        "pytorch-lightning_version": L.__version__,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "hparams_name": "kwargs",
        "hyper_parameters": dict(model.hparams),
        "datamodule_hparams_name": "kwargs",
        "datamodule_hyper_parameters": {k: v for k, v in data_hparams.items() if k != "_instantiator"},
        "handgrad_sweep": sweep_info,
    }


def save_selected(log_dir: Path, checkpoint: dict) -> Path:
    """Write the checkpoint to ``log_dir/selected.ckpt`` atomically (as the training checkpoints are written)."""
    path = Path(log_dir) / SELECTED_CKPT
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    return path
