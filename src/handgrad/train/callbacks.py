"""What a run shows besides its loss and accuracy, as Lightning callbacks (the model adds them itself, in
:meth:`HandgradClassifier.configure_callbacks`, so a plain ``Trainer`` shows them too):

    StepLogger        train/loss_step and train/grad_norm every ``log_every_n_steps`` steps; weight and gradient
                      histograms every ``log_histograms_every_n_steps`` (in ``on_before_optimizer_step``: the
                      gradients of the step about to be taken)
    ClassMetrics      per evaluation epoch: the confusion matrix C (an image and a Markdown table in TensorBoard)
                      and the accuracy of each class, acc_k = C_kk / sum_j C_kj
    HparamsLogger     TensorBoard's HPARAMS tab: the run's hyperparameters against hp/val_acc_last,
                      hp/val_acc_best, hp/best_epoch, ... and hp/test_acc; the CUSTOM SCALARS charts (train and
                      val together)
    DataSamples       a look at the data when fit starts: a grid of training images per class, the class counts
    EndProgressLine   an error after a progress bar starts on a line of its own

What the pictures and the HPARAMS entries look like, and the tag scheme: :mod:`handgrad.train.views` (what is
written straight to TensorBoard goes under :func:`handgrad.train.views.tensorboard_tag`; what ``self.log`` logs,
under the same through the logger, :class:`handgrad.train.views.TensorBoardRun`).

Every per-step hook returns at once on the steps where it has nothing to write.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics.functional.classification import multiclass_confusion_matrix

from handgrad.train.views import (KEY_HPARAMS, METRICS, add_layout, final_metrics, labelled_grid, log_confusion_matrix,
                                  log_hparams, run_hparams, tensorboard_tag, write_experiment)


def tensorboard(trainer):
    """The TensorBoard SummaryWriter, or None when the trainer logs elsewhere (or not at all)."""
    return trainer.logger.experiment if isinstance(trainer.logger, TensorBoardLogger) else None


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """||g|| = sqrt(sum_p ||g_p||^2) over all the tensors, as one tensor on their device (no host sync)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


class StepLogger(Callback):
    """Per-step scalars and histograms, written only on the steps Lightning writes step values (a ``self.log``
    call costs Python time, and the norm is a pass over every gradient)."""

    def __init__(self, histograms_every_n_steps: int = 0):
        self.histograms_every_n_steps = histograms_every_n_steps

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step  # the step about to be taken, counted from 0
        if (step + 1) % trainer.log_every_n_steps == 0:
            norm = global_norm([p.grad for p in pl_module.parameters()])
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        every = self.histograms_every_n_steps
        if every and step % every == 0 and (tb := tensorboard(trainer)) is not None:
            for name, p in pl_module.mlp.named_parameters():
                tb.add_histogram(tensorboard_tag(f"weights/{name}"), p, step)
                tb.add_histogram(tensorboard_tag(f"grads/{name}"), p.grad, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:  # (the step is counted by now)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            pl_module.log("train/loss_step", loss, on_step=True, on_epoch=False)


class ClassMetrics(Callback):
    """The confusion matrix of each validation and test epoch, from the predicted classes the model's
    ``validation_step``/``test_step`` return; ``confusion_matrix[stage]`` keeps the last one (rows: true class)."""

    def __init__(self):
        self.confusion_matrix: dict[str, Tensor] = {}
        self._batches: list[tuple[Tensor, Tensor]] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._batches = []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batches.append((outputs, batch[1]))

    on_test_batch_end = on_validation_batch_end

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_end("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_end("test", trainer, pl_module)

    def epoch_end(self, stage: str, trainer, pl_module) -> None:
        batches, self._batches = self._batches, []
        if trainer.sanity_checking or not batches:
            return
        preds, target = torch.cat([p for p, _ in batches]), torch.cat([y for _, y in batches])
        cm = multiclass_confusion_matrix(preds, target, pl_module.num_classes, validate_args=False)
        self.confusion_matrix[stage] = cm.cpu()
        per_class = cm.diag() / cm.sum(1).clamp_min(1)  # acc_k = C_kk / sum_j C_kj
        for name, value in zip(pl_module.class_names, per_class):
            # the same value on every process (evaluation is not sharded): max over them is it
            pl_module.log(f"{stage}/acc_{name}", value, sync_dist=True, reduce_fx="max")
        if (tb := tensorboard(trainer)) is not None:
            log_confusion_matrix(tb, stage, cm, pl_module.class_names, trainer.global_step)


class HparamsLogger(Callback):
    """This run's row in TensorBoard's HPARAMS tab and its CUSTOM SCALARS charts (:mod:`handgrad.train.views`):
    the hyperparameters when the first fit, validate or test starts; when a fit ends, the hp/* values of
    :func:`final_metrics` (the best also over the epochs before a resume); hp/test_acc when a test ends. A metric
    without a value is not logged. ``experiment=False``: no HPARAMS columns of its own (a run under a log root that
    holds them for all its runs: a sweep's, :func:`handgrad.train.views.write_experiment`)."""

    def __init__(self, experiment: bool = True):
        self.experiment = experiment
        self.logged = False
        self.val_acc: dict[int, float] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.val_acc = {}
        self.log_once(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.log_once(trainer, pl_module)

    on_test_start = on_validation_start

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and "val/acc" in trainer.callback_metrics:
            self.val_acc[trainer.current_epoch] = float(trainer.callback_metrics["val/acc"])

    def on_fit_end(self, trainer, pl_module) -> None:
        scores = [float(c.best_model_score) for c in trainer.checkpoint_callbacks
                  if c.monitor == "val/acc" and c.mode == "max" and c.best_model_score is not None]
        last = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train/acc", "val/loss")}
        self.log_metrics(trainer, final_metrics(self.val_acc, last.get("train/acc"),
                                                last.get("val/loss") if self.val_acc else None, max(scores, default=None)))

    def on_test_end(self, trainer, pl_module) -> None:
        if "test/acc" in trainer.callback_metrics:
            self.log_metrics(trainer, {"hp/test_acc": float(trainer.callback_metrics["test/acc"])})

    @staticmethod
    def log_metrics(trainer, metrics: dict) -> None:
        """Under their TensorBoard tags (~hp/...), whatever the logger: the HPARAMS columns name those."""
        for logger in trainer.loggers:
            logger.log_metrics({tensorboard_tag(k): v for k, v in metrics.items()}, step=trainer.global_step)

    def log_once(self, trainer, pl_module) -> None:
        if self.logged or not trainer.is_global_zero or not isinstance(trainer.logger, TensorBoardLogger):
            return
        params = run_hparams(pl_module.hparams, getattr(trainer.datamodule, "hparams", {}), trainer.max_epochs)
        # one run among others in lightning_logs: columns and types, no domains (they would hide the others' values)
        if self.experiment:
            write_experiment(trainer.logger, {k: [v] for k, v in params.items()}, METRICS, KEY_HPARAMS, domains=False)
        log_hparams(trainer.logger, params)
        add_layout(trainer.logger)
        self.logged = True


class DataSamples(Callback):
    """When the first fit starts, the data module's example grid (``sample_grid``: one row of training images per
    class) as ``~data/samples`` and its class counts per split as the Text ``~data/class_counts`` (after the
    curves: :func:`handgrad.train.views.tensorboard_tag`)."""

    def __init__(self):
        self.logged = False

    def on_fit_start(self, trainer, pl_module) -> None:
        data = trainer.datamodule
        if self.logged or getattr(data, "sample_grid", None) is None or (tb := tensorboard(trainer)) is None:
            return
        tb.add_image(tensorboard_tag("data/samples"), labelled_grid(data.sample_grid, data.class_names), 0)
        tb.add_text(tensorboard_tag("data/class_counts"), data.class_counts_table(), 0)
        self.logged = True


class EndProgressLine(Callback):
    """When training stops on an exception, end the progress bar's line (Lightning's bar writes to stdout without a
    newline until it closes), so that the ``error:`` line printed next starts a line of its own (``grep '^error:'``)."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.progress_bar_callback is not None and trainer.progress_bar_callback.is_enabled:
            print(file=sys.stdout, flush=True)


def add_lr_monitor(trainer) -> None:
    """Log the learning rate of every epoch (lr-SGD; in TensorBoard ~lr-SGD: a schedule's curve) with Lightning's
    LearningRateMonitor, when there is a logger to write to and the options did not add one already."""
    if trainer.loggers and not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks):
        trainer.callbacks.append(LearningRateMonitor(logging_interval="epoch"))

