"""What training every member of a sweep gives the report: their histories, failures, and each member's weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")  # history[name][row][member]
STEPS = ("train_step", "val_epoch", "val_step")  # when each row of the history was recorded


@dataclass
class SweepOutcome:
    """The members' epoch metrics, ``history[name][row][k]`` (NaN where member k has no value), when each row was
    recorded (``steps``), each member's failure epoch (-1: none), and the last global step. Subclasses say where a
    member's weights are: :meth:`weights`; and whether a member's test can reuse its trainer: :meth:`test`."""

    history: dict
    steps: dict
    failed_epoch: list
    global_step: int

    def weights(self, k: int, best_epoch: bool) -> dict[str, Tensor]:
        """Member k's MLP state dict: its last weights, or those of its best validation (``best_epoch``)."""
        raise NotImplementedError

    def test(self, k: int, best_epoch: bool) -> Optional[dict]:
        """Member k's test loss and accuracy when its own trainer can give them, else None (the report tests its
        weights)."""
        return None
