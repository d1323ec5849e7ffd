"""Activation functions and their derivatives, each derivative written by hand.

Every entry is a pair ``(f, df)`` where ``f(z)`` is the activation and ``df(z)`` is
``f'(z)`` evaluated element-wise at the pre-activation ``z`` (not at ``f(z)``), the
form the delta recursion needs:  delta^{l} = (delta^{l+1} W^{l+1}) * f'(z^{l}).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

LEAKY_SLOPE = 0.01  # as torch.nn.LeakyReLU's default


def relu(z: Tensor) -> Tensor:
    """f(z) = max(z, 0)"""
    return torch.relu(z)


def d_relu(z: Tensor) -> Tensor:
    """f'(z) = 1 if z > 0 else 0   (0 at z = 0, as autograd uses)

    Computed as sign(max(z, 0)): the same values as ``(z > 0).to(z.dtype)`` in two fast float kernels, where a
    comparison to a bool tensor and its conversion back take about 4x longer on a CPU."""
    return torch.relu(z).sign_()


def tanh(z: Tensor) -> Tensor:
    """f(z) = tanh(z)"""
    return torch.tanh(z)


def d_tanh(z: Tensor) -> Tensor:
    """f'(z) = 1 - tanh(z)^2"""
    t = torch.tanh(z)
    return 1 - t * t


def sigmoid(z: Tensor) -> Tensor:
    """f(z) = 1 / (1 + exp(-z))"""
    return torch.sigmoid(z)


def d_sigmoid(z: Tensor) -> Tensor:
    """f'(z) = s(z) (1 - s(z)),  s = sigmoid"""
    s = torch.sigmoid(z)
    return s * (1 - s)


def leaky_relu(z: Tensor) -> Tensor:
    """f(z) = z if z > 0 else 0.01 z"""
    return torch.nn.functional.leaky_relu(z, LEAKY_SLOPE)


def d_leaky_relu(z: Tensor) -> Tensor:
    """f'(z) = 1 if z > 0 else 0.01"""
    return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, LEAKY_SLOPE))


def identity(z: Tensor) -> Tensor:
    """f(z) = z"""
    return z


def d_identity(z: Tensor) -> Tensor:
    """f'(z) = 1"""
    return torch.ones_like(z)


ACTIVATIONS = {
    "relu": (relu, d_relu),
    "tanh": (tanh, d_tanh),
    "sigmoid": (sigmoid, d_sigmoid),
    "leaky_relu": (leaky_relu, d_leaky_relu),
    "identity": (identity, d_identity),
}


Activation = Literal[tuple(ACTIVATIONS)]  # the names, as a type (a command-line option checks its value against it)


def get(name: str | None):
    """Return ``(f, df)`` for an activation name; ``None`` means identity."""
    key = "identity" if name is None else name
    if key not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[key]


def per_layer(L: int, activation: str | None, output_activation: str | None):
    """Dicts ``f, df`` keyed by layer l = 1..L: the hidden activation for l < L, the output one for l = L."""
    hidden, out = get(activation), get(output_activation)
    f = {l: (out if l == L else hidden)[0] for l in range(1, L + 1)}
    df = {l: (out if l == L else hidden)[1] for l in range(1, L + 1)}
    return f, df
