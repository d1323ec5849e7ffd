"""The LightningModule: an MLP trained with the hand-written backward pass and SGD step.

One training step, in the course notation (see :mod:`handgrad.mlp`, :mod:`handgrad.backprop`):

    forward     a^0 = x,  z^l = a^{l-1} W^{l T} + b^l,  a^l = f_l(z^l)      (cached)
    loss        L = loss(a^L, y),  g = dL/da^L                             (handgrad.losses)
    backward    dL/dW^l, dL/db^l by the delta recursion                    (handgrad.backprop)
    step        p <- p - lr * (SGD with momentum and weight decay)(dL/dp)  (handgrad.optim or torch.optim)

Two switches swap a hand-written part for PyTorch's, so the two can be compared in one line:
``backprop="autograd"`` (``torch.nn.functional`` loss + ``loss.backward()``) and ``optimizer="torch"``
(``torch.optim.SGD``). Everything else (loop, logging, checkpoints, metrics) is Lightning's and torchmetrics'.

Under a distributed strategy (ddp, ddp_spawn) each process backpropagates its shard of the global batch and
one all-reduce turns the local gradients into the global-batch gradient (:mod:`handgrad.distributed`) before
the step, so W processes with batch B train exactly like one process with batch W*B.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.cli import LRSchedulerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from handgrad import losses, optim
from handgrad.activations import ACTIVATIONS
from handgrad.backprop import backward
from handgrad.distributed import all_reduce_gradients, is_distributed, world_size
from handgrad.errors import (SUPPORTED_PRECISIONS, CheckpointError, ConfigError, NonFiniteLossError,  # noqa: F401
                             SetupError, check_sizes_fit_data)
from handgrad.mlp import MLP
from handgrad.optim import SGD

BACKPROPS = ("handgrad", "autograd")
OPTIMIZERS = ("handgrad", "torch")
LOSSES = ("cross_entropy", "mse")


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


class HandgradClassifier(L.LightningModule):
    """An image classifier ``MLP(sizes, activation)`` trained with manual optimization.

    Args:
        sizes: layer widths [n_0, ..., n_L]; n_0 = 3*32*32 = 3072 for CIFAR, n_L = number of classes.
        activation: hidden activation, a key of :data:`handgrad.activations.ACTIVATIONS`.
        loss: "cross_entropy" (softmax cross entropy) or "mse" (squared error to the one-hot target).
        lr: the learning rate γ of SGD (as ``torch.optim.SGD``).
        momentum: the momentum μ (0 = plain SGD).
        dampening: the dampening τ of the momentum buffer, in [0, 1].
        weight_decay: the L2 weight decay λ (added to the gradient: g + λ p).
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        backprop: "handgrad" (delta recursion, :func:`handgrad.backprop.backward`) or "autograd".
        optimizer: "handgrad" (:class:`handgrad.optim.SGD`) or "torch" (``torch.optim.SGD``).
        lr_scheduler: optional ``optimizer -> scheduler`` callable, stepped once per epoch; in a config:
            ``lr_scheduler: {class_path: torch.optim.lr_scheduler.CosineAnnealingLR, init_args: {T_max: 30}}``.
        log_histograms_every_n_steps: write weight and gradient histograms to TensorBoard every n
            optimizer steps (0 = never; each one copies all parameters to the host).
        nan_check_every_n_steps: how often the NaN/inf loss flag is read on the host. None = every step on
            CPU (free there, and no update is made with a bad loss) and every 50 steps on an accelerator (the
            flag lives on the device and records the first bad step, so reading it rarely avoids a sync per step).
    """

    def __init__(
        self,
        sizes: Sequence[int] = (3072, 512, 128, 32, 2),
        activation: str = "relu",
        loss: Literal["cross_entropy", "mse"] = "cross_entropy",
        lr: float = 0.01,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.001,
        nesterov: bool = False,
        backprop: Literal["handgrad", "autograd"] = "handgrad",
        optimizer: Literal["handgrad", "torch"] = "handgrad",
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        log_histograms_every_n_steps: int = 0,
        nan_check_every_n_steps: Optional[int] = None,
    ):
        super().__init__()
        check_hyperparameters(sizes=sizes, activation=activation, loss=loss, lr=lr, momentum=momentum,
                              dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, backprop=backprop,
                              optimizer=optimizer, log_histograms_every_n_steps=log_histograms_every_n_steps,
                              nan_check_every_n_steps=nan_check_every_n_steps)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.lr_scheduler = lr_scheduler
        self.mlp = MLP(sizes, activation)
        self.num_classes = self.mlp.n_l[-1]
        self.class_names = [str(k) for k in range(self.num_classes)]  # replaced by the data's in setup()
        metric = dict(num_classes=self.num_classes, validate_args=False)  # validation would sync the GPU
        # Under DDP each process trains on its own shard: train/acc sums its counts over processes when computed.
        # train/loss is fed the global-batch loss (already all-reduced with the gradients, the same on every
        # process). Val and test are not sharded (every process evaluates all of them), so their metrics are
        # complete on each process and are not synced, which would count every sample once per process.
        self.train_acc = MulticlassAccuracy(average="micro", **metric)
        self.train_loss = WeightedMean(sync_on_compute=False)
        unsynced = dict(metric, sync_on_compute=False)
        self.val_acc = MulticlassAccuracy(average="micro", **unsynced)
        self.test_acc = MulticlassAccuracy(average="micro", **unsynced)
        self.val_loss = WeightedMean(sync_on_compute=False)
        self.test_loss = WeightedMean(sync_on_compute=False)
        self.val_confmat = MulticlassConfusionMatrix(**unsynced)
        self.test_confmat = MulticlassConfusionMatrix(**unsynced)
        self.confusion_matrix: dict[str, Tensor] = {}  # stage -> last confusion matrix (rows: true class)
        self._bad_step: Optional[Tensor] = None  # on device: first step with a non-finite loss, -1 if none
        self._hparams_logged = False
        self._validated_this_epoch = False  # for ReduceLROnPlateau: a fresh val/loss exists
        # (predicted class, target) of each batch, kept on the device and fed to the accuracy (and confusion matrix)
        # once per epoch: a torchmetrics update per step costs more Python time than the step's argmax
        self._predictions: dict[str, list] = {"train": [], "val": [], "test": []}

    # ---------------------------------------------------------------- setup

    def setup(self, stage: str) -> None:
        precision = self.trainer.precision
        if precision not in SUPPORTED_PRECISIONS:
            raise SetupError(
                f"trainer.precision={precision!r} is not supported: the hand-written backward pass and SGD step "
                f"run in one dtype and have no loss scaling or mixed-precision casts. Use one of "
                f"{SUPPORTED_PRECISIONS} (e.g. --trainer.precision 64-true for exact comparisons)."
            )
        if precision == "64-true":
            # Lightning restores checkpoint weights before its precision plugin converts the module: without this,
            # a float64 checkpoint would be copied into float32 parameters (rounded) and only then widened again.
            self.to(torch.float64)
        strategy = self.trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, DeepSpeedStrategy):
            raise SetupError(
                f"strategy {type(strategy).__name__} is not supported: the hand-written backward pass and SGD step "
                f"need every process to hold all parameters. Use one device or data parallel training "
                f"(--trainer.strategy ddp or ddp_spawn)."
            )
        datamodule = getattr(self.trainer, "datamodule", None)
        self.check_data(datamodule)
        names = getattr(datamodule, "class_names", None)
        if names is not None:
            self.class_names = [str(n) for n in names]

    def check_data(self, datamodule) -> None:
        """:func:`check_sizes_fit_data` for this model's sizes."""
        check_sizes_fit_data(self.mlp.n_l, datamodule)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_checkpoint(checkpoint, self._trainer.ckpt_path if self._trainer is not None else None)

    def check_checkpoint(self, checkpoint: dict, path=None) -> None:
        """Refuse a checkpoint of another architecture, saying which flags would fit it (Lightning would fail on
        the first tensor whose shape differs, or silently load weights trained with another activation)."""
        check_architecture(checkpoint, {"sizes": self.mlp.n_l, "activation": self.hparams.activation}, path)
        own = {k: v.shape for k, v in self.state_dict().items()}
        state = checkpoint.get("state_dict", {})
        if bad := [f"{k}: {tuple(state[k].shape) if k in state else 'missing'} there, {tuple(shape)} here"
                   for k, shape in own.items() if k not in state or state[k].shape != shape]:
            where = f"checkpoint {path}" if path else "the checkpoint"
            raise CheckpointError(f"{where} does not fit this model ({'; '.join(bad[:4])}); "
                                  f"is it a handgrad checkpoint of the same --model.sizes?")

    def configure_optimizers(self):
        """The same SGD hyperparameters for the hand-written optimizer and torch.optim.SGD."""
        hp = self.hparams
        sgd = SGD if hp.optimizer == "handgrad" else torch.optim.SGD
        opt = sgd(self.parameters(), lr=hp.lr, momentum=hp.momentum, dampening=hp.dampening,
                  weight_decay=hp.weight_decay, nesterov=hp.nesterov)
        if self.lr_scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.lr_scheduler(opt)}

    # ---------------------------------------------------------------- the model and its loss

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)

    def loss_and_grad(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The hand-written loss L (mean over the batch) and g = dL/da^L."""
        if self.hparams.loss == "cross_entropy":
            return losses.cross_entropy(out, y)
        return losses.mse(out, F.one_hot(y.long(), self.num_classes).to(out.dtype))

    def torch_loss(self, out: Tensor, y: Tensor) -> Tensor:
        """The same loss from torch.nn.functional, for the autograd path."""
        if self.hparams.loss == "cross_entropy":
            return F.cross_entropy(out, y)
        return F.mse_loss(out, F.one_hot(y.long(), self.num_classes).to(out.dtype))

    def forward_backward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Forward pass, loss, and parameter gradients in ``.grad``; returns (output, loss, N).

        With several processes, loss and gradients are those of the global batch, N = Σ_r n_r samples:
        L = Σ_r n_r L_r / N and g = Σ_r n_r g_r / N (:func:`handgrad.distributed.all_reduce_gradients`)."""
        n = len(y)
        if self.hparams.backprop == "handgrad":
            with torch.no_grad():  # no graph: the gradients come from the cached activations
                out = self.mlp(x)
                loss, grad_out = self.loss_and_grad(out, y)
                if n:
                    backward(self.mlp, grad_out)
                else:  # this process's share of a short last global batch is empty: it contributes nothing
                    for p in self.parameters():
                        p.grad = torch.zeros_like(p)
            loss, n_total = all_reduce_gradients(self.parameters(), loss, n)  # (loss, n) on one process
        elif self.ddp_averages_gradients():
            # DDP's hooks average the local gradients, g = Σ_r g_r / W; weighting the local loss by n_r W / N
            # (1 unless the batch splits unevenly) makes that the global-batch gradient Σ_r n_r g_r / N.
            out = self.mlp(x)
            loss = self.torch_loss(out, y)
            global_loss, n_total = all_reduce_gradients([], loss.detach(), n)
            self.manual_backward(loss * (n * world_size() / n_total) if n else out.sum())  # n = 0: zeros
            loss = global_loss
        else:
            out = self.mlp(x)
            loss = self.torch_loss(out, y)
            self.manual_backward(loss)
            loss, n_total = all_reduce_gradients(self.parameters(), loss.detach(), n)
        return out.detach(), loss.detach(), n_total

    def ddp_averages_gradients(self) -> bool:
        """True when autograd's backward goes through DistributedDataParallel's gradient hooks."""
        return (self._trainer is not None and is_distributed()
                and isinstance(self.trainer.strategy.model, DistributedDataParallel))

    # ---------------------------------------------------------------- training

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        if not len(y) and not is_distributed():  # (with several processes an empty share is fine: see below)
            raise ValueError(f"training batch {batch_idx} is empty: the data loader must not yield empty batches")
        opt = self.optimizers()
        if self.hparams.backprop == "autograd":  # autograd accumulates into .grad; handgrad's backward overwrites it
            opt.zero_grad()
        out, loss, n_total = self.forward_backward(x, y)  # the global batch's loss and gradient
        self.check_finite(loss)
        # Lightning writes step values only every log_every_n_steps steps: compute and log them only then (each
        # self.log call costs Python time, and the norm is a pass over every gradient).
        log_step = (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        grad_norm = global_norm([p.grad for p in self.parameters()]) if log_step else None
        self.log_histograms()
        opt.step()  # through Lightning: counts the step, feeds checkpoints and the precision plugin
        self._predictions["train"].append((out.argmax(1), y))
        if self.trainer.is_last_batch:  # train_acc complete before any epoch-end hook (callbacks' come first)
            self.update_from_predictions("train", self.train_acc)
        self.train_loss.update(loss, n_total)  # on the device; read once per epoch
        if log_step:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False)
            self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        self.update_from_predictions("train", self.train_acc)  # an epoch cut short (max_steps) has no last batch
        self.log("train/loss_epoch", self.train_loss)  # mean over the epoch's samples
        self.log("train/acc", self.train_acc)
        self.raise_if_nonfinite()
        scheduler = self.lr_schedulers()
        if scheduler is None:
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # it needs this epoch's val/loss: step only after an epoch that validated (check_val_every_n_epoch)
            if self._validated_this_epoch:
                scheduler.step(self.trainer.callback_metrics["val/loss"])
                self._validated_this_epoch = False
        else:
            scheduler.step()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Catch up a schedule step that a resume skipped. The scheduler is stepped once per epoch, at its end, so
        last_epoch = current_epoch during each epoch; a checkpoint written after an epoch's last batch but before
        its end (``every_n_train_steps``) resumes in the next epoch without that end (and Lightning calls no
        on_train_epoch_start for the resumed epoch). Host integers only: no sync."""
        scheduler = self.lr_schedulers()
        if scheduler is None or scheduler.last_epoch >= self.current_epoch:
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            rank_zero_warn(f"resumed from a checkpoint written before the end of epoch {self.current_epoch - 1}: "
                           f"ReduceLROnPlateau cannot take its step without that epoch's val/loss, so the learning "
                           f"rate may differ from an uninterrupted run.")
            return
        with warnings.catch_warnings():  # torch warns of a scheduler step before the (resumed) optimizer's first
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            while scheduler.last_epoch < self.current_epoch:
                scheduler.step()

    def on_fit_start(self) -> None:
        self._bad_step = None
        self._predictions["train"].clear()
        self.log_hparams_once()

    # ---------------------------------------------------------------- NaN / inf guard

    def check_finite(self, loss: Tensor) -> None:
        """Record the first step whose loss is NaN or inf (on the loss's device, no sync) and raise
        :class:`NonFiniteLossError` when the flag is read: every step on CPU, every
        ``nan_check_every_n_steps`` (default 50) on an accelerator."""
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        first = self._bad_step
        self._bad_step = torch.where(~torch.isfinite(loss) & (first < 0), first.new_full((), self.global_step), first)
        every = self.hparams.nan_check_every_n_steps or (1 if loss.device.type == "cpu" else 50)
        if self.global_step % every == 0:
            self.raise_if_nonfinite()

    def raise_if_nonfinite(self) -> None:
        if self._bad_step is None:
            return
        step = int(self._bad_step)
        if step >= 0:
            raise NonFiniteLossError(
                f"the training loss became NaN or infinite at step {step} (global step, counting optimizer "
                f"steps from 0; noticed in epoch {self.current_epoch}); training stopped. Lower --model.lr, check the "
                f"inputs for NaN/inf, or train in float64 with --trainer.precision 64-true."
            )

    # ---------------------------------------------------------------- validation, test, predict

    def validation_step(self, batch, batch_idx: int) -> None:
        self.eval_step("val", batch, batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self.eval_step("test", batch, batch_idx)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        """The predicted class index of each image."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.mlp(x).argmax(1)

    def eval_step(self, stage: str, batch, batch_idx: int) -> None:
        x, y = batch
        out = self.mlp(x)
        loss, _ = self.loss_and_grad(out, y)
        self._predictions[stage].append((out.argmax(1), y))  # into the accuracy and confusion matrix at epoch end
        getattr(self, f"{stage}_loss").update(loss, len(y))

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":
            self.raise_if_nonfinite()  # a bad step since the last check must not reach a checkpoint
        else:
            self.log_hparams_once()

    def on_test_start(self) -> None:
        self.log_hparams_once()

    def on_validation_epoch_end(self) -> None:
        self.eval_epoch_end("val")
        self._validated_this_epoch = self.trainer.state.fn == "fit" and not self.trainer.sanity_checking

    def on_test_epoch_end(self) -> None:
        self.eval_epoch_end("test")

    def update_from_predictions(self, stage: str, *metrics: Metric) -> None:
        """Feed the epoch's kept (predicted class, target) pairs of ``stage`` to each metric in one update, and
        forget them. (The confusion matrix's torch.bincount reads the data's range on the host, a GPU sync: once
        per epoch, not per step.)"""
        predictions = self._predictions[stage]
        if predictions:
            preds, target = torch.cat([p for p, _ in predictions]), torch.cat([y for _, y in predictions])
            predictions.clear()
            if len(target):  # (torchmetrics cannot take an empty share of a short last batch)
                for metric in metrics:
                    metric.update(preds, target)

    def eval_epoch_end(self, stage: str) -> None:
        """Loss and accuracy of the epoch, and the per-class accuracy from the confusion matrix C (rows: true
        class):  acc_k = C_kk / sum_j C_kj."""
        acc, mean_loss, confmat = (getattr(self, f"{stage}_{name}") for name in ("acc", "loss", "confmat"))
        self.update_from_predictions(stage, acc, confmat)
        cm = confmat.compute()
        confmat.reset()
        if self.trainer.sanity_checking:  # not this epoch's numbers: forget them
            acc.reset()
            mean_loss.reset()
            return
        self.log(f"{stage}/loss", mean_loss)
        self.log(f"{stage}/acc", acc, prog_bar=True)
        per_class = cm.diag() / cm.sum(1).clamp_min(1)
        same = dict(sync_dist=True, reduce_fx="max")  # the same value on every process: max over them is it
        for name, value in zip(self.class_names, per_class):
            self.log(f"{stage}/acc_{name}", value, **same)
        self.log(f"hp/{stage}_acc", acc.compute(), **same)
        self.confusion_matrix[stage] = cm.cpu()
        tb = self.tensorboard()
        if tb is None:
            return
        step = self.global_step
        tb.add_image(f"{stage}/confusion_matrix", confusion_matrix_image(cm, self.class_names), step)
        tb.add_text(f"{stage}/confusion_matrix", confusion_matrix_markdown(cm, self.class_names), step)

    # ---------------------------------------------------------------- TensorBoard extras

    def tensorboard(self):
        """The TensorBoard SummaryWriter, or None when the trainer logs elsewhere (or not at all)."""
        return self.logger.experiment if isinstance(self.logger, TensorBoardLogger) else None

    def log_hparams_once(self) -> None:
        """Fill TensorBoard's HPARAMS tab: model and data hyperparameters against val/test accuracy."""
        tb_logger = self.logger if isinstance(self.logger, TensorBoardLogger) else None
        if tb_logger is None or self._hparams_logged:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        params = {**getattr(datamodule, "hparams", {}), **self.hparams}  # as Lightning merges them for hparams.yaml
        params.pop("_instantiator", None)
        tb_logger.log_hyperparams(params, {"hp/val_acc": float("nan"), "hp/test_acc": float("nan")})
        self._hparams_logged = True

    def log_histograms(self) -> None:
        """Weight and gradient histograms every ``log_histograms_every_n_steps`` steps (off when 0)."""
        every = self.hparams.log_histograms_every_n_steps
        tb = self.tensorboard()
        if not every or tb is None or self.global_step % every:
            return
        for name, p in self.mlp.named_parameters():
            tb.add_histogram(f"weights/{name}", p, self.global_step)
            tb.add_histogram(f"grads/{name}", p.grad, self.global_step)


ARCHITECTURE = ("sizes", "activation")  # the hyperparameters a checkpoint's weights depend on


def list_or_value(v):
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else v


def check_architecture(checkpoint: dict, ours: dict, path=None) -> None:
    """Raise :class:`CheckpointError` when a handgrad checkpoint was trained with another value of a key of
    ``ours`` (sizes, activation): say what it was trained with, what was asked for, and the flags that fit it."""
    theirs = checkpoint.get("hyper_parameters", {})
    if "sizes" not in theirs:  # not a handgrad checkpoint: the state-dict shapes will tell
        return
    arch = {"sizes": list_or_value(theirs["sizes"]), "activation": theirs.get("activation", "relu")}
    differ = [k for k in ours if list_or_value(ours[k]) != arch[k]]
    if not differ:
        return
    asked = {**arch, **{k: list_or_value(v) for k, v in ours.items()}}
    where = f"checkpoint {path}" if path else "the checkpoint"
    fix = " ".join(f"--model.{k} '{arch[k]}'" for k in differ)
    raise CheckpointError(f"{where} was trained with sizes {arch['sizes']} and activation {arch['activation']!r}, "
                          f"this model has sizes {asked['sizes']} and activation {asked['activation']!r}; pass {fix} "
                          f"to use it (or leave out --ckpt_path to start anew).")


def check_hyperparameters(*, sizes, activation, loss, lr, momentum, dampening, weight_decay, nesterov, backprop,
                          optimizer, log_histograms_every_n_steps, nan_check_every_n_steps) -> None:
    """Raise :class:`ConfigError` naming the flag (``--model.<name>``) for any value the model cannot train with."""
    for name, value, choices in (("activation", activation, tuple(ACTIVATIONS)), ("loss", loss, LOSSES),
                                 ("backprop", backprop, BACKPROPS), ("optimizer", optimizer, OPTIMIZERS)):
        if value not in choices:
            raise ConfigError(f"--model.{name} must be one of {choices}, got {value!r}")
    if (isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) < 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)):
        raise ConfigError(f"--model.sizes must list at least two positive layer widths [n_0, ..., n_L] "
                          f"(n_0 = 3072 for CIFAR, n_L = number of classes), got {sizes!r}")
    optim.check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov, name=lambda k: f"--model.{k}",
                                error=ConfigError)
    if not isinstance(log_histograms_every_n_steps, int) or log_histograms_every_n_steps < 0:
        raise ConfigError(f"--model.log_histograms_every_n_steps must be >= 0 (0 = off), "
                          f"got {log_histograms_every_n_steps!r}")
    if nan_check_every_n_steps is not None and (not isinstance(nan_check_every_n_steps, int)
                                                or nan_check_every_n_steps < 1):
        raise ConfigError(f"--model.nan_check_every_n_steps must be >= 1 or null (automatic), "
                          f"got {nan_check_every_n_steps!r}")


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """||g|| = sqrt(sum_p ||g_p||^2) over all the tensors, as one tensor on their device (no host sync)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


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
