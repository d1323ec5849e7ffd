"""Stochastic gradient descent, written here, bit-for-bit equal to ``torch.optim.SGD``.

For each parameter p with gradient g at step t (lr = γ, weight decay = λ, momentum = μ,
dampening = τ):

    g_t = -g_t                          if maximize
    g_t = g_t + λ p_{t-1}               if λ != 0          (L2 weight decay)
    if μ != 0:
        b_t = g_t                       at the first step (no dampening yet)
        b_t = μ b_{t-1} + (1 - τ) g_t   after that
        g_t = g_t + μ b_t               if nesterov
        g_t = b_t                       otherwise
    p_t = p_{t-1} - γ g_t

The same formula is written twice: ``_single_tensor_sgd`` loops over tensors,
``_multi_tensor_sgd`` does each line for all tensors of a device and dtype at once with
``torch._foreach_*`` kernels (fewer kernel launches on a GPU). Both perform the same
floating-point operations in the same order as PyTorch's implementation, which is why the
results are bitwise equal, not just close.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer


def check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov, *,
                          name: Callable[[str], str] = str, error: type[Exception] = ValueError) -> None:
    """Refuse SGD hyperparameters from a config that training cannot use, naming each as ``name(key)`` (e.g.
    ``--model.lr`` or ``members[2]: lr``): lr, momentum and weight decay finite numbers >= 0, dampening in
    [0, 1], nesterov true or false, and nesterov only with momentum > 0 and dampening 0 (as torch.optim.SGD).
    Booleans are not numbers here, and strings are not booleans: ``nesterov: "false"`` is an error."""
    for key, value, high in (("lr", lr, math.inf), ("momentum", momentum, math.inf), ("dampening", dampening, 1),
                             ("weight_decay", weight_decay, math.inf)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and 0 <= value <= high):
            bound = "a finite number >= 0" if high == math.inf else f"a number in [0, {high}]"
            raise error(f"{name(key)} must be {bound}, got {value!r}")
    if not isinstance(nesterov, bool):
        raise error(f"{name('nesterov')} must be true or false, got {nesterov!r}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise error(f"{name('nesterov')} true needs momentum > 0 and dampening 0, got momentum {momentum} and "
                    f"dampening {dampening}")


class SGD(Optimizer):
    """Drop-in replacement for ``torch.optim.SGD`` with the update rule above written out.

    ``foreach=None`` chooses the multi-tensor path when every parameter is on a CUDA device
    (as PyTorch does) and the single-tensor path otherwise.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("handgrad.optim.SGD does not support sparse gradients")
            grads = [p.grad for p in params]
            momentum = group["momentum"]
            bufs = [self.state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.is_cuda for p in params)
            update = _multi_tensor_sgd if foreach else _single_tensor_sgd
            update(
                params,
                grads,
                bufs,
                lr=float(group["lr"]),
                momentum=momentum,
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
            )
            for p, buf in zip(params, bufs):  # first step: the buffers were just created
                self.state[p]["momentum_buffer"] = buf
        return loss


def _single_tensor_sgd(params, grads, bufs, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    """The update rule, one tensor at a time. ``bufs[i]`` is None until the first step creates it."""
    for i, p in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum != 0:
            if bufs[i] is None:
                bufs[i] = g.detach().clone()
            else:
                bufs[i].mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(bufs[i], alpha=momentum) if nesterov else bufs[i]
        p.add_(g, alpha=-lr)


def _multi_tensor_sgd(params, grads, bufs, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    """The same update rule, each line applied to all tensors of one (device, dtype) with a foreach kernel."""
    groups = defaultdict(list)  # foreach kernels need tensors of one device and dtype
    for i, p in enumerate(params):
        groups[(p.device, p.dtype)].append(i)
    for idx in groups.values():
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        if maximize:
            gs = torch._foreach_neg(gs)
        if weight_decay != 0:
            if maximize:  # gs is already a fresh list of tensors: update it in place
                torch._foreach_add_(gs, ps, alpha=weight_decay)
            else:
                gs = torch._foreach_add(gs, ps, alpha=weight_decay)
        if momentum != 0:
            if all(bufs[i] is not None for i in idx):
                bs = [bufs[i] for i in idx]
                torch._foreach_mul_(bs, momentum)
                torch._foreach_add_(bs, gs, alpha=1 - dampening)
            else:  # first step (or a parameter that was frozen until now)
                bs = []
                for j, i in enumerate(idx):
                    if bufs[i] is None:
                        bufs[i] = gs[j].detach().clone()
                    else:
                        bufs[i].mul_(momentum).add_(gs[j], alpha=1 - dampening)
                    bs.append(bufs[i])
            if nesterov:
                if maximize or weight_decay != 0:  # gs are our own temporaries
                    torch._foreach_add_(gs, bs, alpha=momentum)
                else:  # gs are the parameters' .grad: leave them untouched
                    gs = torch._foreach_add(gs, bs, alpha=momentum)
            else:
                gs = bs
        torch._foreach_add_(ps, gs, alpha=-lr)
