"""Training on many processes and surviving a kill: the hand-written gradient all-reduce, atomic checkpoints.

Data parallel training (Lightning's ddp / ddp_spawn strategies, any launcher). PyTorch's
DistributedDataParallel averages gradients from autograd hooks; handgrad's backward does not go through
autograd, so the hooks never fire. Instead, after the hand-written backward, process r holds, for its own
n_r samples of the global batch, the mean loss L_r and its gradient g_r = dL_r/dθ. The loss of the global
batch of N = Σ_r n_r samples and its gradient are

    L = Σ_r n_r L_r / N,        g = Σ_r n_r g_r / N

computed with ONE all-reduce (sum) of the flat buffer [n_r g_r, n_r L_r, n_r], then divided by its last
entry N. Weighting by n_r keeps the result exact when the last global batch splits unevenly (or leaves a
process with no sample at all).

Checkpoints. Lightning's TorchCheckpointIO (2.6) serializes to memory and writes through an fsspec
transaction, whose temporary file lives in the system temp folder: when that is another file system than the
checkpoint's, the "commit" is a copy onto the final name, and a kill during it leaves a truncated last.ckpt.
:class:`AtomicCheckpointIO` writes a temporary file beside the target, fsyncs it and renames it over the
target (os.replace), so a kill at any moment leaves either the old or the new checkpoint, never a mix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor

from handgrad.compat import CHECKPOINT_IO_TAKES_WEIGHTS_ONLY
from handgrad.errors import CheckpointError


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
    tensors on the loss's device (no host sync). A process with n_local = 0 contributes zeros (its mean loss
    0/0 is NaN and must not reach the sum). Outside a process group of more than one process: (loss, n_local).
    """
    if not is_distributed():
        return loss, loss.new_full((), n_local)  # a fill on the device, not a host-to-device copy (a sync)
    grads = [p.grad for p in params if p.grad is not None]
    dtype = grads[0].dtype if grads else loss.dtype
    tail = [loss.detach().reshape(1).to(dtype), loss.new_ones(1, dtype=dtype)]
    flat = torch.cat([g.reshape(-1) for g in grads] + tail)
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
    return flat[-1].to(loss.dtype), n_total.to(loss.dtype)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, fsync, then os.replace over the target; loading
    errors name the file and say what to do. Remote paths (s3://, ...) keep Lightning's behaviour."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{path.name}."
        for stale in path.parent.glob(f"{prefix}*.tmp"):  # left by a process killed while writing this name
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would create it (mkstemp makes 0600)
            os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old or the new file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def load_checkpoint(self, path, map_location=None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        kwargs = {} if map_location is None else {"map_location": map_location}
        if CHECKPOINT_IO_TAKES_WEIGHTS_ONLY:
            kwargs["weights_only"] = weights_only
        try:
            return super().load_checkpoint(path, **kwargs)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} does not exist; check --ckpt_path (e.g. "
                                  f"lightning_logs/version_N/checkpoints/last.ckpt).") from None
        except Exception as e:
            if "weights_only" in str(e) or "Weights only" in str(e):
                raise  # torch's own message says how to allow the object
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                f"it is truncated or corrupt. Resume from another checkpoint (e.g. a best-*.ckpt beside it) or start "
                f"without --ckpt_path.") from None


def _is_local(path) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(path), LocalFileSystem)


def _fsync_dir(d: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
