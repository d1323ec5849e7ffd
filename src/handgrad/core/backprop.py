"""Backpropagation by hand: the delta recursion over a batch, no autograd inside.

With the forward pass cached (a^0..a^L, z^1..z^L, see :mod:`handgrad.core.mlp`) and
g = dL/da^L given by the loss, for a batch of N rows:

    delta^L     = g ⊙ f_L'(z^L)                          (N, n_L)
    delta^{l-1} = (delta^l W^l) ⊙ f_{l-1}'(z^{l-1})      (N, n_{l-1}),  l = L..2
    dL/dW^l     = delta^{l T} a^{l-1}                    (n_l, n_{l-1})
    dL/db^l     = sum_n delta^l_n                        (n_l,)

The batch sum lives inside the matrix product, so a "mean" loss is handled by the
1/N already in g.

Mixed precision (the forward ran in a compute dtype c, see :mod:`handgrad.core.mlp`): the recursion runs in c from
c(g), with the W^l_c the forward used, and dL/dW^l, dL/db^l are written in the parameters' dtype (float32), as
autograd's gradients of ``torch.autocast`` are.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def backward(model, grad_output: Tensor, *, write_grad: bool = True) -> None:
    """Fill ``model.dL_dw[l]`` and ``model.dL_db[l]`` for l = 1..L.

    ``write_grad=True`` (training): they are the parameters' ``.grad`` (overwritten, in place when its shape and
    dtype fit), so any optimizer can step. ``write_grad=False``: they are new tensors of their own and every
    ``.grad`` is left as it was (autograd's gradients, for example, stay there to be compared with).

    ``model`` exposes ``L``, ``fc`` (``fc[str(l)].weight`` is W^l), ``a``, ``z``, ``df`` as
    :class:`handgrad.core.mlp.MLP` does; ``grad_output`` is dL/da^L, shaped like ``model.a[L]``.
    Inputs may be a batch (N, n) or a single sample (n,). With a leading member axis, as
    :class:`handgrad.core.grid.GridMLP` has (W^l (K, n_l, n_{l-1}), b^l (K, n_l), a^l (K, N, n_l), a^0 (N, n_0)
    shared), the same lines compute every member's gradients: the matrix products batch over k.
    """
    L = model.L
    weights = getattr(model, "w", None) or {}  # (a course-style model has no such cache: its fc weights, as used)
    if isinstance(model.z, dict) and L not in model.z:
        raise RuntimeError("backward() needs the cached activations: call model(x) first")
    if grad_output.shape != model.a[L].shape:
        raise ValueError(
            f"grad_output has shape {tuple(grad_output.shape)}, the network output a[L] has {tuple(model.a[L].shape)}"
        )
    single = grad_output.dim() == 1  # one sample: treat as a batch of one
    z_L = model.z[L]
    delta = grad_output.to(z_L.dtype) * model.df[L](z_L)
    if single:
        delta = delta[None]
    for l in range(L, 0, -1):
        a_prev = model.a[l - 1]
        if single:
            a_prev = a_prev.reshape(1, -1)
        elif a_prev.dim() > delta.dim():  # an input cached unflattened, e.g. (N, 3, 32, 32)
            a_prev = a_prev.flatten(delta.dim() - 1)
        layer = model.fc[str(l)]
        model.dL_dw[l] = gradient(layer.weight, write_grad, torch.matmul, delta.transpose(-2, -1), a_prev)
        model.dL_db[l] = gradient(layer.bias, write_grad, torch.sum, delta, -2)
        if l > 1:
            z_prev = model.z[l - 1]
            w = weights.get(l, layer.weight)  # W^l as the forward used it
            delta = (delta @ w) * model.df[l - 1](z_prev[None] if single else z_prev)


def gradient(p: Tensor | None, write_grad: bool, op, *args) -> Tensor:
    """``op(*args)``, the gradient of parameter p: into ``p.grad`` (overwritten) when ``write_grad``, else a new
    tensor; in p's dtype (the product may run in a lower one: mixed precision). A missing p (no bias): op's."""
    if p is None:
        return op(*args)
    into = grad_buffer(p) if write_grad else None
    if args[0].dtype == p.dtype:
        return op(*args, out=into)
    return into.copy_(op(*args)) if into is not None else op(*args).to(p.dtype)


def grad_buffer(p: Tensor) -> Tensor:
    """``p.grad``, to be overwritten in place, when its shape, dtype and device fit; else a new ``p.grad``.
    Reusing it saves allocating a large gradient every step (page faults on a CPU) and keeps its address
    (needed by a captured or compiled step)."""
    g = p.grad
    if g is None or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device or g.requires_grad:
        g = p.grad = torch.empty_like(p)
    return g


def backpropagation(model, y_true: Tensor, y_pred: Tensor) -> None:
    """The course's entry point: backpropagate the sum of squared errors

        L = sum (y_pred - y_true)^2,   dL/dy_pred = 2 (y_pred - y_true)

    through any model exposing ``L, fc, a, z, df, dL_dw, dL_db`` (not only ours),
    for one sample or a batch. ``y_pred`` is the output of the last ``model(x)``.
    ``model.dL_dw[l]``, ``dL_db[l]`` are tensors of their own; the parameters' ``.grad`` (autograd's, in
    the course's grader) are not touched.
    """
    with torch.no_grad():
        backward(model, 2 * (y_pred - y_true), write_grad=False)
