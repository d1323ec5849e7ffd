"""Losses that return their value and their gradient with respect to the network output.

Each function returns ``(loss, dloss_doutput)``; the gradient is written by hand and is
what :func:`handgrad.core.backprop.backward` takes as ``grad_output``.
"""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def mse(y_pred: Tensor, y_true: Tensor, reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """Squared error and its gradient (as ``torch.nn.functional.mse_loss``).

        sum:   L = sum_i (y_i - t_i)^2          dL/dy_i = 2 (y_i - t_i)
        mean:  L = (1/M) sum_i (y_i - t_i)^2    dL/dy_i = 2 (y_i - t_i) / M,   M = number of elements
    """
    _check_reduction(reduction)
    if y_pred.shape != y_true.shape:
        raise ValueError(f"mse: y_pred shape {tuple(y_pred.shape)} != y_true shape {tuple(y_true.shape)}")
    diff = y_pred - y_true
    if reduction == "sum":
        return (diff * diff).sum(), 2 * diff
    m = diff.numel()
    return (diff * diff).sum() / m, 2 * diff / m


def cross_entropy(logits: Tensor, target: Tensor, reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """Softmax cross entropy on class indices, and its gradient (as ``torch.nn.functional.cross_entropy``).

    With a stable log-sum-exp (m_n = max_k x_nk):
        log p_nk = x_nk - m_n - log sum_j exp(x_nj - m_n)
        sum:   L = - sum_n log p_{n, t_n}          dL/dx_nk = p_nk - [k == t_n]
        mean:  L = - (1/N) sum_n log p_{n, t_n}    dL/dx_nk = (p_nk - [k == t_n]) / N

    ``logits`` is (N, C), or (K, N, C) for K models scored on the same batch (a grid,
    :mod:`handgrad.core.grid`): then the loss is one value per model, shape (K,).
    """
    _check_reduction(reduction)
    if logits.dim() not in (2, 3):
        raise ValueError(f"cross_entropy: logits must have shape (N, C) or (K, N, C), got {tuple(logits.shape)}")
    n, c = logits.shape[-2:]
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"cross_entropy: target must hold class indices (an integer tensor), got dtype {target.dtype}")
    if target.shape != (n,):
        raise ValueError(f"cross_entropy: target must have shape ({n},), got {tuple(target.shape)}")
    target = target.long()
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    log_p = shifted - shifted.exp().sum(dim=-1, keepdim=True).log()
    # (N, C), shared by every model; scatter_ raises on indices outside [0, C)
    one_hot = torch.zeros(n, c, dtype=logits.dtype, device=logits.device).scatter_(1, target[:, None], 1.0)
    grad = log_p.exp() - one_hot
    loss = -log_p.gather(-1, target.expand(log_p.shape[:-1])[..., None]).sum((-2, -1))
    if reduction == "sum":
        return loss, grad
    return loss / n, grad / n
