"""A fully connected network in the course notation, with its forward pass cached for backprop.

For l = 1..L (L weight layers, sizes n_0, n_1, ..., n_L):

    a^0 = x                         (flattened input, shape (N, n_0))
    z^l = a^{l-1} W^{l T} + b^l     (W^l: (n_l, n_{l-1}), b^l: (n_l,))
    a^l = f_l(z^l)                  (f_L is the output activation, identity by default)

``forward`` keeps every ``a[l]`` and ``z[l]`` so that :func:`handgrad.core.backprop.backward`
can run the delta recursion without autograd.

Mixed precision (``compute_dtype`` c, e.g. bfloat16; the parameters stay float32, the master weights): the
products run in c on rounded copies, as ``torch.autocast`` would run them,

    a^0_c = c(x),   W^l_c = c(W^l),   b^l_c = c(b^l)
    z^l = a^{l-1}_c W^l_c^T + b^l_c,   a^l = f_l(z^l)     (in c; the loss takes c(a^L) in float32)

and ``w[l]`` keeps W^l_c for the backward pass (the same tensor as W^l when c is None).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from handgrad.core import activations


def check_sizes(sizes: Sequence[int]) -> list[int]:
    """The layer widths [n_0, ..., n_L] as ints: at least two, each a positive integer (ValueError otherwise)."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) < 2 or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise ValueError(f"sizes must list at least two positive layer widths [n_0, ..., n_L] (input, ..., output; "
                         f"n_0 = 3072 for CIFAR, n_L = number of classes), got {sizes!r}")
    return [int(s) for s in sizes]


class MLP(nn.Module):
    """``MLP([3072, 512, 128, 32, 2])`` is the reference model: ReLU hidden layers, linear output.

    Attributes (course notation):
        L: number of weight layers.  n_l: the layer sizes [n_0, ..., n_L].
        fc: ``nn.ModuleDict`` with keys "1".."L", ``fc[str(l)]`` an ``nn.Linear(n_{l-1}, n_l)``.
        f, df: dicts l -> activation of layer l and its derivative (w.r.t. z^l).
        a, z, w: dicts filled by ``forward``: a[0..L], z[1..L], and w[1..L] the weights as it used them.
        compute_dtype: the dtype of the products (None: the parameters'); set by the trainer's mixed precision.
        dL_dw, dL_db: dicts filled by a backward pass: gradients of W^l and b^l.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu", output_activation: str | None = None):
        super().__init__()
        sizes = check_sizes(sizes)
        self.n_l = sizes
        self.L = len(sizes) - 1
        self.activation = activation
        self.output_activation = output_activation
        self.fc = nn.ModuleDict({str(l): nn.Linear(sizes[l - 1], sizes[l]) for l in range(1, self.L + 1)})
        self.f, self.df = activations.per_layer(self.L, activation, output_activation)
        self.compute_dtype: torch.dtype | None = None
        self.a: dict[int, Tensor] = {}
        self.z: dict[int, Tensor] = {}
        self.w: dict[int, Tensor] = {}
        self.dL_dw: dict[int, Tensor] = {}
        self.dL_db: dict[int, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"expected a batch of inputs of shape (N, ...), got shape {tuple(x.shape)}")
        a = x.flatten(1)
        if a.shape[1] != self.n_l[0]:
            raise ValueError(
                f"input has {a.shape[1]} features per sample (shape {tuple(x.shape)}), the network expects n_0 = {self.n_l[0]}"
            )
        c = self.compute_dtype
        self.a[0] = a = a if c is None else a.to(c)
        for l in range(1, self.L + 1):
            layer = self.fc[str(l)]
            w, b = (layer.weight, layer.bias) if c is None else (layer.weight.to(c), layer.bias.to(c))
            z = F.linear(a, w, b)
            a = self.f[l](z)
            self.w[l], self.z[l], self.a[l] = w, z, a
        return a

    def extra_repr(self) -> str:
        return f"sizes={self.n_l}, activation={self.activation!r}, output_activation={self.output_activation!r}"
