"""Each member's epoch metrics, summed on the device: a few host reads per epoch, none per step."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class MemberSums:
    """Per stage (train, val, test): each member's sum of N · loss_k and its number of correct predictions, as (K,)
    tensors on the device, zeroed in place (allocated once: a captured CUDA-graph step keeps writing into the same
    tensors); and the samples seen, counted on the host. The epoch means are loss_k = Σ N · loss_k / N and
    acc_k = correct_k / N."""

    def __init__(self, members: int):
        self.K = members
        self.sums: dict[str, tuple[Tensor, Tensor]] = {}  # stage -> (sum of N * loss_k, correct_k)
        self.counts: dict[str, int] = {}  # stage -> samples seen

    def reset(self, stage: str, like: Tensor) -> None:
        """Zero the stage's sums, on ``like``'s device (float64 sums for a float64 model, else float32: bfloat16
        sums would round)."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        sums = self.sums.get(stage)
        if sums is None or sums[0].device != like.device or sums[0].dtype != dtype:
            self.sums[stage] = (torch.zeros(self.K, dtype=dtype, device=like.device),
                                torch.zeros(self.K, dtype=torch.long, device=like.device))
        else:
            sums[0].zero_()
            sums[1].zero_()
        self.counts[stage] = 0

    def started(self, stage: str) -> bool:
        return stage in self.counts

    def seen(self, stage: str) -> int:
        return self.counts.get(stage, 0)

    def add(self, stage: str, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        """Add N * loss_k and the number of correct predictions of each member, in place (device work only)."""
        loss_sum, correct = self.sums[stage]
        loss_sum.add_(loss * y.shape[0])
        correct.add_((logits.argmax(-1) == y).sum(-1))

    def count(self, stage: str, n: int) -> None:
        self.counts[stage] += n

    def read(self, stage: str, alive: Tensor) -> tuple[list[float], list[float]]:
        """Epoch means (loss, accuracy) per member, NaN where not ``alive``; the stage is then closed. The accuracy
        is correct / N in Python floats (exact counts, no float32 rounding)."""
        n = self.counts.pop(stage)
        loss_sum, correct = self.sums[stage]
        ok, loss_sum, correct = alive.tolist(), loss_sum.tolist(), correct.tolist()
        loss = [s / n if a else math.nan for a, s in zip(ok, loss_sum)]
        acc = [c / n if a else math.nan for a, c in zip(ok, correct)]
        return loss, acc
