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

The same formula is written twice: ``single_tensor_sgd`` loops over tensors,
``multi_tensor_sgd`` does each line for all tensors of a device and dtype at once with
``torch._foreach_*`` kernels. Both perform the same floating-point operations in the same order
as PyTorch's implementation, which is why the results are bitwise equal, not just close.

With ``differentiable=True`` the step runs with autograd on: p_t is a function of p_{t-1}, g_t,
b_{t-1} and of γ and λ when they are tensors that require grad, and ``backward()`` through it
gives their derivatives. Sparse gradients go through the same lines (torch's sparse ops).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer


HYPERPARAMETERS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")  # γ, μ, τ, λ, ν of the formula


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


FUSED_REFUSED = ("handgrad.core.optim.SGD does not implement fused=True: torch's fused kernel is not the hand-written "
                 "step. Use foreach=True (the same formula on all tensors of a device at once) or leave fused unset")


class SGD(Optimizer):
    """Drop-in replacement for ``torch.optim.SGD`` with the update rule above written out.

    The same arguments, defaults, argument checks and ``param_groups`` keys as ``torch.optim.SGD``, so a state
    dict of either loads into the other. ``foreach=None`` chooses the multi-tensor path when every parameter is
    on a CUDA device (as PyTorch does) and the single-tensor path otherwise. ``differentiable=True`` lets
    autograd record the step; ``lr`` and ``weight_decay`` may then be tensors that require grad.
    ``fused=True`` is refused with ``NotImplementedError`` (use ``foreach=True``).
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
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
            differentiable=differentiable,
            fused=fused,
        )
        super().__init__(params, defaults)
        if any(group["fused"] for group in self.param_groups):
            raise NotImplementedError(FUSED_REFUSED)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def step(self, closure=None):
        """Perform one update of every parameter that has a gradient; returns ``closure()`` if given.
        Autograd records the update only with ``differentiable=True``."""
        loss = None
        with torch.set_grad_enabled(self.defaults.get("differentiable", False)):  # (absent in old pickles)
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        if group["fused"]:  # e.g. from a torch.optim.SGD(fused=True) state dict
            raise NotImplementedError(FUSED_REFUSED)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        momentum = group["momentum"]
        bufs = [self.state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        lr, weight_decay = _hyperparameter(group["lr"]), _hyperparameter(group["weight_decay"])
        foreach = group["foreach"]
        if foreach is None:
            foreach = not group["differentiable"] and all(p.is_cuda for p in params)
        if isinstance(lr, Tensor) or isinstance(weight_decay, Tensor):
            foreach = False  # a hyperparameter that requires grad: the foreach kernels take numbers only
        update = multi_tensor_sgd if foreach else single_tensor_sgd
        update(
            params,
            [p.grad for p in params],
            bufs,
            lr=lr,
            momentum=momentum,
            dampening=group["dampening"],
            weight_decay=weight_decay,
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        for p, buf in zip(params, bufs):  # first step: the buffers were just created
            self.state[p]["momentum_buffer"] = buf


def _hyperparameter(value):
    """A hyperparameter as the number the kernels take (a one-element tensor gives its value, as in torch), or
    the tensor itself (squeezed to a scalar) when it requires grad: autograd then follows it."""
    if isinstance(value, Tensor):
        return value.squeeze() if value.requires_grad else value.item()
    return value


def _axpy(y: Tensor, a, x: Tensor, *, inplace: bool = False) -> Tensor:
    """y + a x, into y when ``inplace``. ``a`` is a number, or a tensor that requires grad: then autograd keeps
    a copy of x for da, since x (a parameter or a momentum buffer) changes in place later."""
    if isinstance(a, Tensor):
        return y.addcmul_(x.clone(), a) if inplace else y.addcmul(x.clone(), a)
    return y.add_(x, alpha=a) if inplace else y.add(x, alpha=a)


def single_tensor_sgd(params, grads, bufs, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    """The update rule, one tensor at a time. ``bufs[i]`` is None until the first step creates it."""
    for i, p in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        if weight_decay != 0:
            g = _axpy(g, weight_decay, p)  # g + λ p
        if momentum != 0:
            if bufs[i] is None:
                bufs[i] = torch.clone(g)  # b_1 = g
            else:
                bufs[i].mul_(momentum).add_(g, alpha=1 - dampening)  # b = μ b + (1 - τ) g
            g = g.add(bufs[i], alpha=momentum) if nesterov else bufs[i]
        _axpy(p, -lr, g, inplace=True)  # p - γ g


def multi_tensor_sgd(params, grads, bufs, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
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
                        bufs[i] = torch.clone(gs[j])
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
        if any(g.is_sparse for g in gs):  # the foreach kernels take dense tensors only (as in torch)
            for p, g in zip(ps, gs):
                p.add_(g, alpha=-lr)
        else:
            torch._foreach_add_(ps, gs, alpha=-lr)
