"""The LightningModule: an MLP trained with the hand-written backward pass and SGD step.

One training step, in the course notation (see :mod:`handgrad.core.mlp`, :mod:`handgrad.core.backprop`):

    forward     a^0 = x,  z^l = a^{l-1} W^{l T} + b^l,  a^l = f_l(z^l)      (cached)
    loss        L = loss(a^L, y),  g = dL/da^L                             (handgrad.core.losses)
    backward    dL/dW^l, dL/db^l by the delta recursion                    (handgrad.core.backprop)
    step        p <- p - lr * (SGD with momentum and weight decay)(dL/dp)  (handgrad.core.optim or torch.optim)

Two switches swap a hand-written part for PyTorch's, so the two can be compared in one line:
``backprop="autograd"`` (``torch.nn.functional`` loss + ``loss.backward()``) and ``optimizer="torch"``
(``torch.optim.SGD``). Everything else (loop, logging, checkpoints, metrics) is Lightning's and torchmetrics'; what
TensorBoard shows besides loss and accuracy is in :mod:`handgrad.train.callbacks`.

Under a distributed strategy (ddp, ddp_spawn) each process backpropagates its shard of the global batch and
one all-reduce turns the local gradients into the global-batch gradient (:mod:`handgrad.core.distributed`) before
the step, so W processes with batch B train exactly like one process with batch W*B.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, get_args

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import ReduceLROnPlateau

from handgrad.core import losses, optim
from handgrad.core.activations import Activation
from handgrad.core.backprop import backward
from handgrad.core.distributed import all_reduce_gradients, is_distributed, world_size
from handgrad.core.mlp import MLP
from handgrad.data.normalization import InputContract
from handgrad.runtime.errors import ConfigError, SetupError
from handgrad.train.callbacks import ClassMetrics, DataSamples, EndProgressLine, HparamsLogger, StepLogger
from handgrad.train.checkpoints import StoppedMidEpoch, check_state_dict_fits
from handgrad.train.epoch_metrics import EpochMetrics
from handgrad.train import model_setup
from handgrad.train.nan_guard import FiniteLossGuard


Loss = Literal["cross_entropy", "mse"]
Backprop = Literal["handgrad", "autograd"]  # the delta recursion of handgrad.core.backprop, or loss.backward()
Optimizer = Literal["handgrad", "torch"]  # handgrad.core.optim.SGD, or torch.optim.SGD


class HandgradClassifier(InputContract, EpochMetrics, FiniteLossGuard, L.LightningModule):
    """An image classifier ``MLP(sizes, activation)`` trained with manual optimization.

    Args:
        sizes: layer widths [n_0, ..., n_L]; n_0 = 3*32*32 = 3072 for CIFAR, n_L = number of classes.
        activation: hidden activation, a key of :data:`handgrad.core.activations.ACTIVATIONS`.
        loss: "cross_entropy" (softmax cross entropy) or "mse" (squared error to the one-hot target).
        lr: the learning rate γ of SGD (as ``torch.optim.SGD``).
        momentum: the momentum μ (0 = plain SGD; μ >= 1 is allowed, as in torch, but never decays: a warning).
        dampening: the dampening τ of the momentum buffer, in [0, 1].
        weight_decay: the L2 weight decay λ (added to the gradient: g + λ p).
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        backprop: "handgrad" (delta recursion, :func:`handgrad.core.backprop.backward`) or "autograd".
        optimizer: "handgrad" (:class:`handgrad.core.optim.SGD`) or "torch" (``torch.optim.SGD``).
        lr_scheduler: optional ``optimizer -> scheduler`` callable, stepped once per epoch (after the epoch's last
            batch; ``ReduceLROnPlateau`` after each validation, with val/loss); in a config:
            ``lr_scheduler: {class_path: torch.optim.lr_scheduler.CosineAnnealingLR, init_args: {T_max: 30}}``.
        log_histograms_every_n_steps: write weight and gradient histograms to TensorBoard every n
            optimizer steps (0 = never; each one copies all parameters to the host).
        nan_check_every_n_steps: how often the NaN/inf loss flag is read on the host. None = every step on
            CPU (free there, and no update is made with a bad loss) and every 50 steps on an accelerator (the
            flag lives on the device and records the first bad step; it is also read before every checkpoint).
        class_names: the name of each output (n_L names); None = taken from the data when training starts.

    The input contract travels with the weights (so every checkpoint holds it): ``hparams.class_names`` and the
    buffers ``input_mean``, ``input_std`` (3,), the per-channel statistics of the training split, set when ``fit``
    starts: float64, exactly the values the training images were normalized with (:mod:`handgrad.data.normalization`); 0
    (unknown) until the model is trained. :meth:`forward` takes normalized images; :meth:`classify` raw uint8 ones.
    """

    def __init__(
        self,
        sizes: Sequence[int] = (3072, 512, 128, 32, 2),
        activation: Activation = "relu",
        loss: Loss = "cross_entropy",
        lr: float = 0.01,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.001,
        nesterov: bool = False,
        backprop: Backprop = "handgrad",
        optimizer: Optimizer = "handgrad",
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        log_histograms_every_n_steps: int = 0,
        nan_check_every_n_steps: Optional[int] = None,
        class_names: Optional[list[str]] = None,
    ):
        super().__init__()
        for name, value, choices in (("loss", loss, Loss), ("backprop", backprop, Backprop),
                                     ("optimizer", optimizer, Optimizer)):  # (the command line checks them too)
            if value not in get_args(choices):
                raise ConfigError(f"--model.{name} must be one of {get_args(choices)}, got {value!r}")
        # SGD's settings are checked here, not when fit builds the optimizer: a bad one then writes nothing
        optim.check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov, name=lambda k: f"--model.{k}",
                                    error=ConfigError)
        if not isinstance(log_histograms_every_n_steps, int) or log_histograms_every_n_steps < 0:
            raise ConfigError(f"--model.log_histograms_every_n_steps must be >= 0 (0 = off), "
                              f"got {log_histograms_every_n_steps!r}")
        if nan_check_every_n_steps is not None and (not isinstance(nan_check_every_n_steps, int)
                                                    or nan_check_every_n_steps < 1):
            raise ConfigError(f"--model.nan_check_every_n_steps must be >= 1 or null (automatic), "
                              f"got {nan_check_every_n_steps!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.lr_scheduler = lr_scheduler
        try:
            self.mlp = MLP(sizes, activation)
        except ValueError as err:  # the network checks its sizes and activation ("sizes must ...")
            raise ConfigError(f"--model.{err}") from None
        self.num_classes = self.mlp.n_l[-1]
        if class_names is not None and len(class_names) != self.num_classes:
            raise ConfigError(f"--model.class_names {list(class_names)} names {len(class_names)} classes, but the "
                              f"model has {self.num_classes} outputs (sizes[-1]); give one name per output or null")
        # the data's names when training starts (setup), else these
        self.class_names = [str(c) for c in class_names] if class_names else [str(k) for k in range(self.num_classes)]
        self.register_input_statistics()  # input_mean, input_std: 0 (unknown) until fit starts
        self.init_metrics(self.num_classes)  # train/val/test loss and accuracy (handgrad.train.epoch_metrics)
        self._callbacks: Optional[list] = None
        self.scaler = None  # the loss scaler under 16-mixed (setup)

    # ---------------------------------------------------------------- setup and checks

    def preflight(self, trainer, datamodule=None) -> None:
        """Everything this model needs from the trainer and the data, checked before any work (Lightning calls it
        from :meth:`setup`; ``train.py`` before anything is written): the precision, the strategy, and that
        ``sizes`` fit the data's image size and number of classes. Raises :class:`SetupError` naming the fix."""
        check_strategy(trainer.strategy)
        model_setup.preflight(trainer, datamodule, self.mlp.n_l)

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer.strategy)
        model_setup.setup_model(self, self.mlp, self.mlp.n_l)
        self.scaler = model_setup.hand_loss_scaler(self.trainer)  # 16-mixed: also the plugin's, which steps with it
        self.take_input_contract(self.trainer.datamodule, stage)

    def configure_callbacks(self) -> list:
        """The extras of :mod:`handgrad.train.callbacks`, the same instances for every run of this model; those of a kind the
        trainer has already are left out (added once; a caller's own wins, e.g. a sweep's HparamsLogger)."""
        if self._callbacks is None:
            self._callbacks = [StepLogger(self.hparams.log_histograms_every_n_steps), ClassMetrics(), HparamsLogger(),
                               DataSamples(), EndProgressLine(), StoppedMidEpoch()]
        return [c for c in self._callbacks if not any(isinstance(t, type(c)) for t in self.trainer.callbacks)]

    def configure_optimizers(self):
        """The same SGD hyperparameters for the hand-written optimizer and torch.optim.SGD."""
        hp = self.hparams
        sgd = optim.SGD if hp.optimizer == "handgrad" else torch.optim.SGD
        opt = sgd(self.parameters(), lr=hp.lr, momentum=hp.momentum, dampening=hp.dampening,
                  weight_decay=hp.weight_decay, nesterov=hp.nesterov)
        return opt if self.lr_scheduler is None else {"optimizer": opt, "lr_scheduler": self.lr_scheduler(opt)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another architecture, saying which flags fit it (before Lightning copies it)."""
        try:
            path = self.trainer.ckpt_path
        except RuntimeError:  # not attached to a trainer: load_from_checkpoint
            path = None
        check_state_dict_fits(checkpoint, self, path)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_nonfinite()  # no checkpoint is ever written after a NaN/inf loss, however rarely it is read

    # ---------------------------------------------------------------- forward, loss, backward, step

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)

    def loss_and_grad(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The hand-written loss L (mean over the batch) and g = dL/da^L (in float32 under mixed precision, as
        torch.autocast runs a loss)."""
        out = out.float() if self.mlp.compute_dtype is not None else out
        if self.hparams.loss == "cross_entropy":
            return losses.cross_entropy(out, y)
        return losses.mse(out, F.one_hot(y.long(), self.num_classes).to(out.dtype))

    def torch_loss(self, out: Tensor, y: Tensor) -> Tensor:
        """The same loss from torch.nn.functional, for the autograd path."""
        out = out.float() if self.mlp.compute_dtype is not None else out
        if self.hparams.loss == "cross_entropy":
            return F.cross_entropy(out, y)
        return F.mse_loss(out, F.one_hot(y.long(), self.num_classes).to(out.dtype))

    def forward_backward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Forward pass, loss, and parameter gradients in ``.grad``; returns (output, loss, N).

        With several processes, loss and gradients are those of the global batch, N = Σ_r n_r samples:
        L = Σ_r n_r L_r / N and g = Σ_r n_r g_r / N (:func:`handgrad.core.distributed.all_reduce_gradients`)."""
        n = len(y)
        if self.hparams.backprop == "handgrad":
            with torch.no_grad():  # no graph: the gradients come from the cached activations
                out = self.mlp(x)
                loss, grad_out = self.loss_and_grad(out, y)
                if self.scaler is not None:  # 16-mixed: g_S = S g, unscaled before the step (core.loss_scale)
                    grad_out = self.scaler.scale(grad_out)
                if n:
                    backward(self.mlp, grad_out)  # overwrites .grad
                else:  # this process's share of a short last global batch is empty: it contributes nothing
                    for p in self.parameters():
                        p.grad = torch.zeros_like(p)
            loss, n_total = all_reduce_gradients(self.parameters(), loss, n)  # (loss, n) on one process
            return out, loss, n_total
        for p in self.parameters():
            p.grad = None  # autograd accumulates into .grad
        out = self.mlp(x)
        loss = self.torch_loss(out, y)
        if is_distributed() and isinstance(self.trainer.strategy.model, DistributedDataParallel):
            # DDP's hooks average the local gradients, g = Σ_r g_r / W; weighting the local loss by n_r W / N
            # (1 unless the batch splits unevenly) makes that the global-batch gradient Σ_r n_r g_r / N.
            global_loss, n_total = all_reduce_gradients([], loss.detach(), n)
            self.manual_backward(loss * (n * world_size() / n_total) if n else out.sum())  # n = 0: zeros
            return out.detach(), global_loss, n_total
        self.manual_backward(loss)
        loss, n_total = all_reduce_gradients(self.parameters(), loss.detach(), n)
        return out.detach(), loss, n_total

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        if not len(y) and not is_distributed():  # (with several processes an empty share is fine)
            raise ValueError(f"training batch {batch_idx} is empty: the data loader must not yield empty batches")
        out, loss, n = self.forward_backward(x, y)  # forward, loss, backward: the global batch's loss and gradient
        self.check_finite(loss)
        self.optimizers().step()  # step, through Lightning: it counts the step and feeds checkpoints and hooks
        self.after_step(out, y, loss, n)
        return loss

    def after_step(self, out: Tensor, y: Tensor, loss: Tensor, n: Tensor) -> None:
        """Keep the step's predictions and loss for the epoch's metrics (on the device, no sync); after the epoch's
        last batch, complete train/acc and step the learning-rate schedule, so that a checkpoint written after
        this step holds the stepped schedule (ReduceLROnPlateau steps after validation, with val/loss)."""
        self.keep("train", out.argmax(1), y, loss, n)
        if self.trainer.is_last_batch:
            self.update_from_predictions("train", self.train_acc)
            scheduler = self.lr_schedulers()
            if scheduler is not None and not isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step()

    def on_fit_start(self) -> None:
        self.reset_guard()
        self._predictions["train"].clear()
        if self.hparams.momentum >= 1:
            rank_zero_warn(f"--model.momentum {self.hparams.momentum} >= 1: the momentum buffer b <- μ b + (1 - τ) g "
                           f"never decays, so old gradients are never forgotten and the steps grow; use a momentum "
                           f"in [0, 1) unless that is what you want to see.")

    def on_train_epoch_end(self) -> None:
        self.log_epoch("train")  # (an epoch cut short by max_steps has no last batch: its accuracy completes here)
        self.raise_if_nonfinite()

    # ---------------------------------------------------------------- validation, test, predict

    def validation_step(self, batch, batch_idx: int) -> Tensor:
        return self.eval_step("val", batch)

    def test_step(self, batch, batch_idx: int) -> Tensor:
        return self.eval_step("test", batch)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        """The probabilities (N, k) of each image's classes (see :meth:`classify`); a uint8 batch holds raw
        images, normalized here with the model's statistics."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.probabilities(self.normalize_input(x) if x.dtype == torch.uint8 else x)

    def eval_step(self, stage: str, batch) -> Tensor:
        """The loss and the predicted classes (returned for :class:`handgrad.train.callbacks.ClassMetrics`)."""
        x, y = batch
        out = self.mlp(x)
        loss, _ = self.loss_and_grad(out, y)
        pred = out.argmax(1)
        self.keep(stage, pred, y, loss, len(y))
        return pred

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":
            self.raise_if_nonfinite()  # a bad step since the last check: no validation of NaN weights

    def on_validation_epoch_end(self) -> None:
        self.log_epoch("val")
        scheduler = self.lr_schedulers() if self.trainer.state.fn == "fit" else None
        if isinstance(scheduler, ReduceLROnPlateau) and not self.trainer.sanity_checking:
            scheduler.step(self.val_loss.compute())  # it needs this validation's val/loss

    def on_test_epoch_end(self) -> None:
        self.log_epoch("test")


def check_strategy(strategy) -> None:
    """The hand-written backward and SGD step need every process to hold all parameters: one device, or data
    parallel (ddp, ddp_spawn); not FSDP, DeepSpeed or model parallel strategies."""
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, DeepSpeedStrategy):
        raise SetupError(f"strategy {type(strategy).__name__} is not supported: the hand-written backward pass and SGD "
                         f"step need every process to hold all parameters. Use one device or data parallel training "
                         f"(--trainer.strategy ddp or ddp_spawn).")
