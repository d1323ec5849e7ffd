"""Dynamic loss scaling, by hand: what ``torch.amp.GradScaler`` does for float16 training, and equal to it.

float16 keeps about 3 decimal digits and its smallest normal number is 2^-14 ≈ 6.1e-5: many gradients of a batch-mean
loss are smaller and would flush to zero in a float16 backward pass. So the backward pass starts from a scaled
gradient, and the scale is divided out again, in float32, before the step:

    g_S     = S · dL/da^L                      scale: the delta recursion then carries S through every layer
    g_p     = g_S,p · (1/S)                    unscale: each parameter's float32 gradient (1/S rounded once)
    found   = some g_S,p is inf or NaN         the scaled backward pass overflowed
    step    skipped when found                 parameters and momentum buffers keep their values

The scale follows the gradients: lowered after an overflow, raised after I steps without one (n counts them):

    found:            S ← S · backoff,  n ← 0
    n + 1 = I:        S ← S · growth,   n ← 0        (S kept where S · growth is not finite)
    otherwise:        n ← n + 1

(backoff 0.5, growth 2, I = 2000 and S_0 = 2^16 by default, as torch's). S, n and found are tensors: one value, or
one per member of a grid (K,), each member with its own scale.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def unscale_(grads: list[Tensor], scale: Tensor) -> Tensor:
    """g ← g · (1/S) in place for every gradient; returns ``found`` (bool, the shape of ``scale``): whether a gradient
    held inf or NaN before it was unscaled. With S of shape (K,) each gradient has the member axis first."""
    inv = scale.double().reciprocal().float()
    found = torch.zeros(scale.shape, dtype=torch.bool, device=scale.device)
    for g in grads:
        found |= ~torch.isfinite(g).flatten(scale.dim()).all(-1)
        g.mul_(inv.view(inv.shape + (1,) * (g.dim() - inv.dim())))
    return found


def update_scale_(scale: Tensor, tracker: Tensor, found: Tensor, growth_factor: float, backoff_factor: float,
                  growth_interval: int) -> None:
    """S and n in place after a step (the rule in the module docstring), S · factor computed in float64 and rounded
    once to float32."""
    successful = tracker + 1
    grows = ~found & (successful == growth_interval)
    grown = (scale.double() * growth_factor).float()
    lowered = (scale.double() * backoff_factor).float()
    scale.copy_(torch.where(found, lowered, torch.where(grows & torch.isfinite(grown), grown, scale)))
    tracker.copy_(torch.where(found | grows, torch.zeros_like(tracker), successful))


class LossScaler:
    """The rule above behind ``torch.amp.GradScaler``'s methods, so that whatever drives a GradScaler drives this one:
    Lightning's ``MixedPrecision`` plugin calls :meth:`scale` on the loss before ``manual_backward``, and
    :meth:`unscale_`, :meth:`step` and :meth:`update` around every optimizer step; :meth:`state_dict` uses
    GradScaler's keys, so a checkpoint of either loads into the other. The hand-written backward pass takes
    ``scale(dL/da^L)`` instead of a scaled loss."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True):
        if not (growth_factor > 1.0 and 0.0 < backoff_factor < 1.0 and growth_interval >= 1 and init_scale > 0):
            raise ValueError(f"LossScaler needs growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1 and "
                             f"init_scale > 0; got {growth_factor}, {backoff_factor}, {growth_interval}, {init_scale}")
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.enabled = enabled
        self.scale_tensor = torch.full((), float(init_scale), dtype=torch.float32)
        self.tracker = torch.zeros((), dtype=torch.int32)
        self.found: dict[int, Tensor] = {}  # id(optimizer) -> found, between unscale_ and update

    def _on(self, device: torch.device) -> Tensor:
        if self.scale_tensor.device != device:
            self.scale_tensor, self.tracker = self.scale_tensor.to(device), self.tracker.to(device)
        return self.scale_tensor

    def scale(self, outputs: Tensor) -> Tensor:
        """outputs · S (a loss, or g = dL/da^L for the hand-written backward pass)."""
        return outputs * self._on(outputs.device).to(outputs.dtype) if self.enabled else outputs

    def unscale_(self, optimizer) -> None:
        """Unscale the optimizer's gradients in place (once per step) and remember whether one overflowed."""
        if not self.enabled or id(optimizer) in self.found:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else self.scale_tensor.device
        self.found[id(optimizer)] = unscale_(grads, self._on(device))

    def step(self, optimizer, *args, **kwargs):
        """``optimizer.step()`` unless a gradient overflowed (then nothing changes); unscales first if needed."""
        if not self.enabled:
            return optimizer.step(*args, **kwargs)
        self.unscale_(optimizer)
        if bool(self.found[id(optimizer)]):  # (one host read per step, as GradScaler's)
            return None
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale: Optional[float] = None) -> None:
        """Lower or raise S after the step (or set it to ``new_scale``)."""
        if not self.enabled:
            return
        if new_scale is not None:
            self.scale_tensor.fill_(float(new_scale))
        elif self.found:
            found = torch.stack([f.to(self.scale_tensor.device) for f in self.found.values()]).any()
            update_scale_(self.scale_tensor, self.tracker, found, self.growth_factor, self.backoff_factor,
                          self.growth_interval)
        self.found.clear()

    def get_scale(self) -> float:
        return float(self.scale_tensor) if self.enabled else 1.0

    def is_enabled(self) -> bool:
        return self.enabled

    def state_dict(self) -> dict:
        """GradScaler's keys and values."""
        if not self.enabled:
            return {}
        return {"scale": self.get_scale(), "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": int(self.tracker)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.growth_factor, self.backoff_factor = float(state["growth_factor"]), float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self.scale_tensor.fill_(float(state["scale"]))
        self.tracker.fill_(int(state["_growth_tracker"]))
