"""The NaN/inf guard: no update, validation or checkpoint ever follows a non-finite training loss.

The flag lives on the loss's device and records the first bad step, so reading it (a host sync on an accelerator)
can be rare: every step on a CPU, every ``nan_check_every_n_steps`` (default 50) on an accelerator, and always
before a validation or a checkpoint.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from handgrad.runtime.errors import NonFiniteLossError


class FiniteLossGuard:
    """Mixed into a LightningModule with ``hparams.nan_check_every_n_steps``: :meth:`check_finite` after each
    loss, :meth:`raise_if_nonfinite` wherever a bad step must not go further."""

    _bad_step: Optional[Tensor] = None  # on device: first step with a non-finite loss, -1 if none

    def reset_guard(self) -> None:
        self._bad_step = None

    def check_finite(self, loss: Tensor) -> None:
        """Record the first step whose loss is NaN or inf (on the loss's device, no sync) and raise
        :class:`NonFiniteLossError` when the flag is read."""
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        first = self._bad_step
        self._bad_step = torch.where(~torch.isfinite(loss) & (first < 0), first.new_full((), self.global_step), first)
        every = self.hparams.nan_check_every_n_steps or (1 if loss.device.type == "cpu" else 50)
        if self.global_step % every == 0:
            self.raise_if_nonfinite()

    def raise_if_nonfinite(self) -> None:
        if self._bad_step is not None and (step := int(self._bad_step)) >= 0:
            raise NonFiniteLossError(
                f"the training loss became NaN or infinite at step {step} (global step, counting optimizer "
                f"steps from 0; noticed in epoch {self.current_epoch}); training stopped. Lower --model.lr, check the "
                f"inputs for NaN/inf, or train in float64 with --trainer.precision 64-true."
            )
