"""Loss and accuracy of an epoch, per stage (train, val, test), kept on the device and computed once per epoch.

    loss_epoch = Σ_b n_b L_b / Σ_b n_b          (WeightedMean: the mean over the epoch's samples)
    acc_epoch  = #(argmax a^L_n = y_n) / N      (torchmetrics' MulticlassAccuracy, fed once per epoch)

Each step keeps its (predicted class, target) pair on the device; the accuracy is updated from all of them at the
epoch's end (a torchmetrics update per step costs more Python time than the step's argmax).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy


class WeightedMean(Metric):
    """mean = Σ_i w_i v_i / Σ_i w_i over all updates (summed over processes when synced). Unlike
    torchmetrics.MeanMetric it checks no value for NaN, which would read the device on every update."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("weighted_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight) -> None:
        self.weighted_sum += value * weight
        self.weight += weight

    def compute(self) -> Tensor:
        return self.weighted_sum / self.weight


class EpochMetrics:
    """Mixed into a LightningModule: ``{train,val,test}_acc`` and ``{train,val,test}_loss``, and the logging of each
    epoch's ``<stage>/loss`` and ``<stage>/acc``."""

    def init_metrics(self, num_classes: int) -> None:
        # Train: each process sees its shard, so train/acc sums its counts over processes; train/loss is fed the
        # global-batch loss (all-reduced with the gradients). Val and test are not sharded: not synced.
        acc = dict(num_classes=num_classes, average="micro", validate_args=False)  # validation: a GPU sync
        self.train_acc, self.train_loss = MulticlassAccuracy(**acc), WeightedMean(sync_on_compute=False)
        self.val_acc, self.val_loss = MulticlassAccuracy(**acc, sync_on_compute=False), WeightedMean(sync_on_compute=False)
        self.test_acc, self.test_loss = MulticlassAccuracy(**acc, sync_on_compute=False), WeightedMean(sync_on_compute=False)
        self._predictions: dict[str, list] = {"train": [], "val": [], "test": []}

    def keep(self, stage: str, pred: Tensor, y: Tensor, loss: Tensor, n) -> None:
        """One batch's predicted classes, targets and mean loss (weighted by its n samples), on the device."""
        self._predictions[stage].append((pred, y))
        getattr(self, f"{stage}_loss").update(loss, n)

    def update_from_predictions(self, stage: str, metric: Metric) -> None:
        """Feed the epoch's kept (predicted class, target) pairs of ``stage`` to the metric in one update, and
        forget them."""
        predictions = self._predictions[stage]
        if predictions:
            preds, target = torch.cat([p for p, _ in predictions]), torch.cat([y for _, y in predictions])
            predictions.clear()
            if len(target):  # (torchmetrics cannot take an empty share of a short last batch)
                metric.update(preds, target)

    def log_epoch(self, stage: str) -> None:
        """Log ``<stage>/loss`` and ``<stage>/acc`` of the epoch (a sanity check's numbers are forgotten)."""
        acc, mean_loss = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_loss")
        self.update_from_predictions(stage, acc)
        if stage != "train" and self.trainer.sanity_checking:
            acc.reset()
            mean_loss.reset()
            return
        self.log(f"{stage}/loss", mean_loss)
        self.log(f"{stage}/acc", acc, prog_bar=stage != "train")
