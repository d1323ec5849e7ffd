"""The LightningModule that trains a whole grid at once (:class:`GridClassifier`); its step compiled or recorded as
one CUDA graph is :class:`handgrad.sweep.fused.FusedStep`.

The math is :mod:`handgrad.core.grid` (the stacked network, its backward pass, the per-member SGD step);
this file adds what Lightning needs around it: the training, validation and test steps, per-member
metrics summed on the device and read once per epoch, the failure mask, checkpoints.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor

from handgrad.core.grid import GridMLP, GridSGD, grid_backward
from handgrad.core.loss_scale import unscale_, update_scale_
from handgrad.core.losses import cross_entropy
from handgrad.core.mlp import MLP, check_sizes
from handgrad.core.optim import HYPERPARAMETERS
from handgrad.runtime.errors import SetupError
from handgrad.sweep.fused import COMPILE_MODES, Compile, FusedStep, check_compile
from handgrad.sweep.member_sums import MemberSums
from handgrad.sweep.outcome import METRICS, STEPS
from handgrad.sweep.search import expand_grid
from handgrad.sweep.select import is_better
from handgrad.train.callbacks import EndProgressLine
from handgrad.train.model_setup import scaler_settings, setup_model



def initial_mlp(sizes: Sequence[int], activation: str, seed: Optional[int]) -> MLP:
    """``MLP(sizes, activation)`` built right after ``torch.manual_seed(seed)``, leaving the global random state as
    it was (``seed`` None: from the current global state): the weights a seeded HandgradClassifier starts from."""
    if seed is None:
        return MLP(sizes, activation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(sizes, activation)


@torch.no_grad()
def keep_best(best: Optional[list[Tensor]], params: list[Tensor], score: list[tuple], loss: list[float],
              acc: list[float]) -> list[Tensor]:
    """Copy into ``best`` (one (K, ...) tensor per parameter, made at the first call) the slices of the members whose
    val accuracy beats their best so far (ties: a lower val loss); ``score[k]`` is member k's best (acc, loss)."""
    if best is None:
        best = [p.detach().clone() for p in params]
    better = [k for k, (a, l, best_k) in enumerate(zip(acc, loss, score)) if is_better(a, l, best_k)]
    for k in better:
        score[k] = (acc[k], loss[k])
    if better:
        idx = torch.tensor(better, device=best[0].device)
        for b, p in zip(best, params):
            b.index_copy_(0, idx, p.detach().index_select(0, idx))
    return best


class GridClassifier(L.LightningModule):
    """K classifiers ``MLP(sizes, activation)``, one per grid member, trained together with the
    hand-written batched backward (:func:`grid_backward`) and SGD step (:class:`GridSGD`).

    Args:
        grid: lists per hyperparameter (cartesian product), e.g. ``{lr: [0.01], momentum: [0, 0.9]}``.
        members: or an explicit list of members, e.g. ``[{lr: 0.01, momentum: 0.9, weight_decay: 0.001}]``.
            Keys: lr, momentum, dampening, weight_decay, nesterov (defaults as torch.optim.SGD), and ``seed``
            (this member's initial weights; default ``init_seed``). See :mod:`handgrad.sweep.search`.
        sizes: layer widths [n_0, ..., n_L] (n_0 = 3072 for CIFAR, n_L = number of classes).
        activation: hidden activation (see :mod:`handgrad.core.activations`); the output is linear.
        init_seed: the initial weights are those of ``MLP(sizes, activation)`` built right after
            ``torch.manual_seed(init_seed)`` (the global random state is left as it was), copied into
            every member: each member starts where :class:`handgrad.train.module.HandgradClassifier` starts
            when seeded with the same value. ``None``: build that MLP from the current global state.
        compile: ``"none"`` or None (eager), ``"inductor"`` (the whole training step through ``torch.compile``) or
            ``"cuda_graph"`` (the whole training step recorded as a CUDA graph and replayed; CUDA only).
            See :class:`FusedStep`. The numbers are those of the eager step up to floating-point rounding.
        keep_best: also keep each member's weights of its best validation (highest val accuracy, ties: lower
            val loss, then the earlier one) in ``best_weights`` (the sweep's ``--select best_epoch``).

    Per-member metrics are summed on the device as (K,) tensors and read once per epoch into
    ``self.history[name]`` (one list of K floats per epoch): train_loss, train_acc (means over the
    epoch's training batches, as they were trained), and per validation val_loss, val_acc;
    ``self.history_steps`` says when each row was recorded: ``train_step`` (the global step at the end of each
    training epoch), ``val_epoch`` and ``val_step`` (of each validation: it need not run every epoch).
    A member whose training loss is not finite is marked failed (``alive[k] = False``, ``failed_epoch[k]`` =
    its epoch) and frozen; the others go on. Before ``trainer.test`` set ``test_member``: only that member is
    evaluated, its numbers land in ``test_result`` (test_loss, test_acc, and its ``confusion_matrix``, rows: the
    true class).

    A training step reads nothing back from the device (no ``.item()``, no Python ``if`` on a tensor): on a GPU
    the host queues the steps ahead of the device, and synchronises once per epoch to read the metrics.
    """

    def __init__(self, grid: Optional[dict] = None, members: Optional[list[dict]] = None,
                 sizes: Sequence[int] = (3072, 512, 128, 32, 2), activation: str = "relu",
                 init_seed: Optional[int] = 265, compile: Compile = None,
                 keep_best: bool = False):
        super().__init__()
        if compile not in (None, "none", *COMPILE_MODES):  # (the Python API; the command line checks the Literal)
            raise ValueError(f"compile={compile!r}: use 'none' (eager), 'inductor' (torch.compile) or 'cuda_graph'")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.members = expand_grid(grid, members)
        self.K = len(self.members)
        self.sizes = check_sizes(sizes)
        self.net = GridMLP(self.sizes, self.K, activation)
        for seed in dict.fromkeys(m.get("seed", init_seed) for m in self.members):  # each initial MLP once
            ks = [k for k, m in enumerate(self.members) if m.get("seed", init_seed) == seed]
            self.net.load_mlp(initial_mlp(self.sizes, activation, seed), ks)
        self.register_buffer("alive", torch.ones(self.K, dtype=torch.bool))
        self.register_buffer("failed_epoch", torch.full((self.K,), -1, dtype=torch.long))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long), persistent=False)  # on the device
        self.register_buffer("loss_scale", torch.ones(self.K))  # 16-mixed: S_k (take_loss_scaler)
        self.register_buffer("scale_tracker", torch.zeros(self.K, dtype=torch.int32))
        self.scaling: Optional[dict] = None
        self._scale_set = False
        self.history: dict[str, list[list[float]]] = {k: [] for k in METRICS}
        self.history_steps: dict[str, list[int]] = {k: [] for k in STEPS}
        self.best_weights: Optional[list[Tensor]] = None  # with keep_best: one (K, ...) copy per parameter
        self._best_score = [(-math.inf, math.inf)] * self.K  # (val acc, val loss) of each member's best validation
        self.test_member: Optional[int] = None
        self.test_result: dict = {}  # test_loss, test_acc (floats), confusion_matrix (a tensor)
        self.sums = MemberSums(self.K)  # each member's epoch loss and accuracy, summed on the device
        self._test_counts: Optional[Tensor] = None  # the test member's confusion matrix, flat (on the device)
        self.fused = FusedStep(self, compile) if compile in COMPILE_MODES else None

    def setup(self, stage: str) -> None:
        setup_model(self, self.net, self.sizes)
        self.take_loss_scaler()
        if self.trainer.world_size > 1 or not isinstance(self.trainer.strategy, SingleDeviceStrategy):
            # the batched backward runs without autograd, so DDP's gradient hooks would never average anything:
            # every process would train its own replica on its own shard
            raise SetupError(f"GridClassifier trains on one device (got strategy "
                             f"{type(self.trainer.strategy).__name__} with {self.trainer.world_size} processes); "
                             f"to use several devices run `python train.py sweep --trainer.devices N`, which gives "
                             f"each process its own share of the members")
        check_compile(self.hparams.compile, self.trainer.strategy.root_device)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_callbacks(self) -> list:
        return [EndProgressLine()]  # an error after the progress bar starts a line of its own

    def configure_optimizers(self):
        return GridSGD(self.net.parameters(), **{k: [m[k] for m in self.members] for k in HYPERPARAMETERS})

    # ---------------------------------------------------------------- training

    def on_train_epoch_start(self) -> None:
        self.epoch.fill_(self.current_epoch)
        self.sums.reset("train", self.net.fc["1"].weight)

    def _train_math(self, x: Tensor, y: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Forward, per-member losses, failure mask, backward and metric sums: device work only, no host reads.
        Returns the members that step, and (16-mixed) those whose scaled gradients overflowed."""
        logits = self.net(x)
        loss, g = self.loss_and_grad(logits, y)
        newly_failed = self.alive & ~torch.isfinite(loss)
        self.failed_epoch.copy_(torch.where(newly_failed, self.epoch, self.failed_epoch))
        self.alive.logical_and_(~newly_failed)
        if self.scaling is not None:  # g_S = S_k g_k, each member with its own scale (core.loss_scale)
            g = g * self.loss_scale.view(-1, 1, 1)
        grid_backward(self.net, g)
        self.sums.add("train", loss, logits, y)
        if self.scaling is None:
            return self.alive, None
        found = unscale_([p.grad for p in self.net.parameters()], self.loss_scale)
        return self.alive & ~found, found

    def _after_step(self, found: Optional[Tensor]) -> None:
        if found is not None:
            update_scale_(self.loss_scale, self.scale_tracker, found, **self.scaling)

    def loss_and_grad(self, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Each member's cross entropy and its gradient (K,), (K, N, C); float32 under mixed precision."""
        return cross_entropy(logits.float() if self.net.compute_dtype is not None else logits, y)

    def take_loss_scaler(self) -> None:
        """16-mixed: each member scales its own loss (``loss_scale``, ``scale_tracker``: buffers, in checkpoints),
        with the settings of the plugin's GradScaler, which is then removed: the batched step skips and rescales per
        member, where one scaler would stop every member's step for one member's overflow."""
        plugin = self.trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        if scaler is None:
            self.scaling = None
            return
        settings = scaler_settings(scaler)
        if not self._scale_set:
            self.loss_scale.fill_(settings["init_scale"])
            self._scale_set = True
        self.scaling = {k: settings[k] for k in ("growth_factor", "backoff_factor", "growth_interval")}
        plugin.scaler = None

    def training_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        if y.shape[0] == 0:  # its mean loss would be 0/0 = NaN and mark every member as diverged
            raise ValueError(f"training batch {batch_idx} is empty: the data loader must not yield empty batches")
        opt = self.optimizers()  # stepped through Lightning: it counts the step and feeds checkpoints
        if not self.sums.started("train"):  # resumed mid-epoch: Lightning calls no on_train_epoch_start then
            self.on_train_epoch_start()
        self.sums.count("train", y.shape[0])
        run = self.fused.runner(opt.optimizer, x, y) if self.fused is not None else None
        if run is not None:
            opt.step(run=run)
            return
        with torch.no_grad():  # no graph: the gradients come from the cached activations
            stepping, found = self._train_math(x, y)
            opt.step(alive=stepping)
            self._after_step(found)

    def on_validation_model_zero_grad(self) -> None:
        """Keep the gradient tensors through validation (Lightning would release them): every step overwrites
        them in place, and a fused step holds their addresses."""

    def on_train_epoch_end(self) -> None:
        if not self.sums.seen("train"):
            return
        loss, acc = self.sums.read("train", self.alive)
        self.history["train_loss"].append(loss)
        self.history["train_acc"].append(acc)
        self.history_steps["train_step"].append(self.global_step)

    # ---------------------------------------------------------------- validation and test

    def on_validation_epoch_start(self) -> None:
        self.sums.reset("val", self.net.fc["1"].weight)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.sums.add("val", self.loss_and_grad(logits, y)[0], logits, y)
        self.sums.count("val", y.shape[0])

    def on_validation_epoch_end(self) -> None:
        if not self.sums.seen("val"):
            return
        loss, acc = self.sums.read("val", self.alive)
        if self.trainer.sanity_checking:
            return
        self.history["val_loss"].append(loss)
        self.history["val_acc"].append(acc)
        self.history_steps["val_epoch"].append(self.current_epoch)
        self.history_steps["val_step"].append(self.global_step)
        if self.hparams.keep_best:
            self.best_weights = keep_best(self.best_weights, list(self.net.parameters()), self._best_score, loss, acc)
        finite = [a for a in acc if math.isfinite(a)]
        # sync_dist: the identity on the one-device strategy the grid trains on; it keeps Lightning from warning
        # when the sweep's ranks share a process group (each rank's grid holds other members: nothing to reduce)
        self.log_dict({"grid/members_alive": float(len(finite)),
                       "grid/best_val_acc": max(finite) if finite else math.nan}, prog_bar=True, sync_dist=True)

    def on_test_epoch_start(self) -> None:
        if self.test_member is None or not 0 <= self.test_member < self.K:
            raise RuntimeError(f"set model.test_member to the selected member (0..{self.K - 1}) before "
                               "trainer.test: only that member is evaluated on the test set")
        self.sums.reset("test", self.net.fc["1"].weight)
        classes = self.sizes[-1]
        self._test_counts = torch.zeros(classes * classes, dtype=torch.long, device=self.net.fc["1"].weight.device)

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x, member=self.test_member)
        self.sums.add("test", self.loss_and_grad(logits, y)[0], logits, y)
        self.sums.count("test", y.shape[0])
        classes = self.sizes[-1]  # the confusion matrix, flat: C[true, predicted] at true * classes + predicted
        self._test_counts += torch.bincount(y * classes + logits.argmax(-1).reshape(-1), minlength=classes ** 2)

    def on_test_epoch_end(self) -> None:
        k, classes = self.test_member, self.sizes[-1]
        loss, acc = self.sums.read("test", self.alive[k:k + 1])
        self.test_result = {"test_loss": loss[0], "test_acc": acc[0],
                            "confusion_matrix": self._test_counts.view(classes, classes).cpu()}
        self.log_dict({"test/loss": loss[0], "test/acc": acc[0]})

    # ---------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["grid_history"] = {**self.history, **self.history_steps}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._scale_set = True  # the checkpoint's scales, not the scaler's initial one
        saved = checkpoint.get("grid_history", {})
        self.history = {k: saved.get(k, []) for k in METRICS}
        self.history_steps = {k: saved.get(k, []) for k in STEPS}
