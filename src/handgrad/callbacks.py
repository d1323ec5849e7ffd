"""What a run shows besides its loss and accuracy, as Lightning callbacks (the model adds them itself, in
:meth:`HandgradClassifier.configure_callbacks`, so a plain ``Trainer`` shows them too):

    StepLogger        train/loss_step and train/grad_norm every ``log_every_n_steps`` steps; weight and gradient
                      histograms every ``log_histograms_every_n_steps`` (in ``on_before_optimizer_step``: the
                      gradients of the step about to be taken)
    ClassMetrics      per evaluation epoch: the confusion matrix C (an image and a Markdown table in TensorBoard)
                      and the accuracy of each class, acc_k = C_kk / sum_j C_kj
    HparamsLogger     TensorBoard's HPARAMS tab: the model's and the data's hyperparameters against hp/val_acc and
                      hp/test_acc

Every per-step hook returns at once on the steps where it has nothing to write.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torchvision
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics.functional.classification import multiclass_confusion_matrix


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
                tb.add_histogram(f"weights/{name}", p, step)
                tb.add_histogram(f"grads/{name}", p.grad, step)

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
            names, step = pl_module.class_names, trainer.global_step
            tb.add_image(f"{stage}/confusion_matrix", confusion_matrix_image(cm, names), step)
            tb.add_text(f"{stage}/confusion_matrix", confusion_matrix_markdown(cm, names), step)


class HparamsLogger(Callback):
    """Fill TensorBoard's HPARAMS tab once: model and data hyperparameters against hp/val_acc and hp/test_acc
    (which the model logs at the end of each validation and test)."""

    def __init__(self):
        self.logged = False

    def on_fit_start(self, trainer, pl_module) -> None:
        self.log_once(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.log_once(trainer, pl_module)

    on_test_start = on_validation_start

    def log_once(self, trainer, pl_module) -> None:
        if self.logged or not isinstance(trainer.logger, TensorBoardLogger):
            return
        datamodule = trainer.datamodule
        params = {**getattr(datamodule, "hparams", {}), **pl_module.hparams}  # as Lightning merges them
        params.pop("_instantiator", None)
        trainer.logger.log_hyperparams(params, {"hp/val_acc": float("nan"), "hp/test_acc": float("nan")})
        self.logged = True


def add_lr_monitor(trainer) -> None:
    """Log the learning rate of every epoch (lr-SGD in TensorBoard: a schedule's curve) with Lightning's
    LearningRateMonitor, when there is a logger to write to and the options did not add one already."""
    if trainer.loggers and not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks):
        trainer.callbacks.append(LearningRateMonitor(logging_interval="epoch"))


def confusion_matrix_markdown(cm: Tensor, class_names: Sequence[str]) -> str:
    """The confusion matrix as a Markdown table (rows: true class, columns: predicted)."""
    cm = cm.cpu().tolist()
    lines = ["| true \\ predicted | " + " | ".join(class_names) + " |", "|---" * (len(class_names) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(str(int(v)) for v in row) + " |" for name, row in zip(class_names, cm)]
    return "\n".join(lines)


def confusion_matrix_image(cm: Tensor, class_names: Sequence[str], cell: int = 40) -> Tensor:
    """Draw the confusion matrix as an RGB uint8 image (3, H, W): rows are the true class, columns the
    predicted one (numbered as the rows), each cell holds its count and is shaded by its share of the row."""
    from PIL import Image, ImageDraw, ImageFont

    cm = cm.cpu()
    k = cm.shape[0]
    share = cm.double() / cm.sum(1, keepdim=True).clamp_min(1)
    font = ImageFont.load_default()
    left, top = 12 + int(max(font.getlength(f"{i} {n}") for i, n in enumerate(class_names))), 30
    img = Image.new("RGB", (left + k * cell + 10, top + k * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), "rows: true, columns: predicted", fill="black", font=font)
    for j in range(k):
        draw.text((left + j * cell + cell // 3, top - 14), str(j), fill="black", font=font)
    for i, name in enumerate(class_names):
        draw.text((4, top + i * cell + cell // 3), f"{i} {name}", fill="black", font=font)
        for j in range(k):
            s = float(share[i, j])
            color = (int(255 * (1 - 0.8 * s)), int(255 * (1 - 0.6 * s)), 255)  # white -> blue
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=color, outline="gray")
            draw.text((x0 + 4, y0 + cell // 3), str(int(cm[i, j])), fill="black" if s < 0.6 else "white", font=font)
    return torchvision.transforms.functional.pil_to_tensor(img)
