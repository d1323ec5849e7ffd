"""Training on many processes: the hand-written gradient all-reduce.

Data parallel training (Lightning's ddp / ddp_spawn strategies, any launcher). PyTorch's
DistributedDataParallel averages gradients from autograd hooks; handgrad's backward does not go through
autograd, so the hooks never fire. Instead, after the hand-written backward, process r holds, for its own
n_r samples of the global batch, the mean loss L_r and its gradient g_r = dL_r/dθ. The loss of the global
batch of N = Σ_r n_r samples and its gradient are

    L = Σ_r n_r L_r / N,        g = Σ_r n_r g_r / N

computed with ONE all-reduce (sum) of the flat buffer [n_r g_r, n_r L_r, n_r], then divided by its last
entry N. Weighting by n_r keeps the result exact when the last global batch splits unevenly (or leaves a
process with no sample at all).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


@torch.no_grad()
def all_reduce_gradients(params: Iterable[Tensor], loss: Tensor, n_local: int, group=None) -> tuple[Tensor, Tensor]:
    """The global-batch gradient and loss from every process's local ones, with one all-reduce:

        [Σ_r n_r g_r, Σ_r n_r L_r, N] = all_reduce_sum([n_r g_r, n_r L_r, n_r])
        g = Σ_r n_r g_r / N,   L = Σ_r n_r L_r / N

    Every ``p.grad`` is replaced by g in place (pass no params to reduce only the loss); returns (L, N), both
    tensors on the loss's device (no host sync); the sum, and N, in float32 at least (half-precision gradients
    are summed in float32 and rounded once). A process with n_local = 0 contributes zeros (its mean loss 0/0 is
    NaN and must not reach the sum). Outside a process group of more than one process: (loss, n_local).
    """
    if not is_distributed():  # N: a fill on the device, not a host-to-device copy (a sync); float32 at least
        return loss, loss.new_full((), n_local, dtype=torch.promote_types(loss.dtype, torch.float32))
    grads = [p.grad for p in params if p.grad is not None]
    dtype = torch.promote_types(grads[0].dtype if grads else loss.dtype, torch.float32)  # bfloat16 counts 999 as 1000
    tail = [loss.detach().reshape(1).to(dtype), loss.new_ones(1, dtype=dtype)]
    flat = torch.cat([g.reshape(-1).to(dtype) for g in grads] + tail)
    if n_local == 0:
        flat.zero_()
    else:
        flat.mul_(n_local)  # [n_r g_r, n_r L_r, n_r]
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    n_total = flat[-1]
    flat = flat[:-1] / n_total
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[-1].to(loss.dtype), n_total
