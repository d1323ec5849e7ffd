"""Course-style models, a backprop and an SGD for tests/test_verify.py, each right or wrong on purpose. `verify` loads
them by path, as a student would load their own file: --verify.model tests/course_models.py:CourseNet."""

from __future__ import annotations

import torch
from torch import nn


class CourseNet(nn.Module):
    """Written the way the course writes it: tanh in every layer, dicts a, z, df, dL_dw, dL_db keyed by l."""

    def __init__(self, sizes):
        super().__init__()
        self.n_l, self.L = sizes, len(sizes) - 1
        self.fc = nn.ModuleDict({str(l): nn.Linear(sizes[l - 1], sizes[l]) for l in range(1, self.L + 1)})
        self.f = {l: torch.tanh for l in range(1, self.L + 1)}
        self.df = {l: (lambda z: 1 - torch.tanh(z) ** 2) for l in range(1, self.L + 1)}
        self.a, self.z, self.dL_dw, self.dL_db = {}, {}, {}, {}

    def forward(self, x):
        self.a[0] = x
        for l in range(1, self.L + 1):
            self.z[l] = self.fc[str(l)](self.a[l - 1])
            self.a[l] = self.f[l](self.z[l])
        return self.a[self.L]


class WrongTanhNet(CourseNet):
    """CourseNet with the derivative of tanh in layer 2 written as 1 - tanh (it is 1 - tanh^2)."""

    def __init__(self, sizes):
        super().__init__(sizes)
        self.df[2] = lambda z: 1 - torch.tanh(z)


class NoGradNet(nn.Module):
    """A model without dL_dw / dL_db: not course-style."""

    def __init__(self, sizes):
        super().__init__()
        self.L = len(sizes) - 1
        self.fc = nn.ModuleDict({str(l): nn.Linear(sizes[l - 1], sizes[l]) for l in range(1, self.L + 1)})
        self.a, self.z, self.df = {}, {}, {}


def backprop_without_bias(model, y_true, y_pred):
    """The course's delta recursion for L = Σ (y_pred − y_true)^2 that forgets dL/db."""
    delta = 2 * (y_pred - y_true) * model.df[model.L](model.z[model.L])
    for l in range(model.L, 0, -1):
        model.dL_dw[l] = delta.T @ model.a[l - 1]
        if l > 1:
            delta = (delta @ model.fc[str(l)].weight) * model.df[l - 1](model.z[l - 1])


class MomentumWithoutDampening(torch.optim.Optimizer):
    """SGD whose momentum step is b = μ b + g: it ignores the dampening τ (torch: b = μ b + (1 − τ) g)."""

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, foreach=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                if group["momentum"]:
                    state = self.state[p]
                    if "b" not in state:
                        state["b"] = g.clone()
                    else:
                        state["b"].mul_(group["momentum"]).add_(g)
                    g = state["b"]
                p.add_(g, alpha=-group["lr"])
