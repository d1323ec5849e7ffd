"""``--sequential``: one HandgradClassifier per member, each with the grid's initial weights and its own trainer, to
compare with the batched run; every member logs into its own run as the main job does."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from lightning.pytorch import Callback

from handgrad.core.optim import HYPERPARAMETERS
from handgrad.runtime.errors import NonFiniteLossError
from handgrad.sweep.fitting import chunk_trainer, save_config, seed
from handgrad.sweep.outcome import METRICS, STEPS, SweepOutcome
from handgrad.sweep.ranks import Ranks
from handgrad.sweep.report import member_run
from handgrad.sweep.search import member_names
from handgrad.train.callbacks import HparamsLogger
from handgrad.train.module import HandgradClassifier


class EpochHistory(Callback):
    """Collect a :class:`HandgradClassifier`'s epoch metrics in the grid's history format (K = 1): the training
    loss summed here from each step's loss (in the training dtype), the module's train accuracy at the end of
    every training epoch, and its logged val loss and accuracy after every validation (none where none ran)."""

    def __init__(self):
        self.history = {k: [] for k in METRICS}
        self.steps = {k: [] for k in STEPS}
        self._loss_sum, self._n = None, 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._loss_sum, self._n = None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        n = len(batch[1])
        weighted = loss.detach() * n
        self._loss_sum = weighted if self._loss_sum is None else self._loss_sum + weighted
        self._n += n

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        loss = float(self._loss_sum) / self._n if self._n else math.nan
        self.history["train_loss"].append([loss])
        # the module logs train/acc in its own on_train_epoch_end, which Lightning calls after the callbacks'
        self.history["train_acc"].append([float(pl_module.train_acc.compute())])
        self.steps["train_step"].append(trainer.global_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        self.history["val_loss"].append([float(m.get("val/loss", math.nan))])
        self.history["val_acc"].append([float(m.get("val/acc", math.nan))])
        self.steps["val_epoch"].append(trainer.current_epoch)
        self.steps["val_step"].append(trainer.global_step)


def run_sequential(cli, ranks: Ranks, log_dir: Path) -> "SequentialOutcome":
    """One HandgradClassifier per member, each with the grid's initial weights and its own trainer, which logs
    into the member's run as the main job does (the same tags, its HPARAMS row and hp/* by HparamsLogger)."""
    spec, members = cli.model, cli.model.members
    save_config(cli, ranks, log_dir)
    per_member, failed, fitted, names = [], [], [], member_names(members)
    for k, m in enumerate(members):
        torch.manual_seed(m.get("seed", spec.init_seed))  # the grid's initial weights: MLP(sizes) after this seed
        model = HandgradClassifier(sizes=spec.sizes, activation=spec.activation, **{h: m[h] for h in HYPERPARAMETERS})
        record = EpochHistory()
        trainer = chunk_trainer(cli, ranks, callbacks=[record, HparamsLogger(experiment=False)],
                                logger=member_run(log_dir, names[k]))
        seed(cli)
        try:
            trainer.fit(model, datamodule=cli.datamodule)
            failed.append(-1)
        except NonFiniteLossError:  # this member diverged: report it, go on with the next
            failed.append(trainer.current_epoch)
        per_member.append(record)
        fitted.append((model, trainer))
    longest = max(per_member, key=lambda r: len(r.steps["val_step"]) + len(r.steps["train_step"]))
    history = {}  # [row][member], NaN where a member has no value (it failed, or stopped earlier)
    for name in METRICS:
        rows = len(longest.history[name])
        history[name] = [[r.history[name][e][0] if e < len(r.history[name]) and failed[k] < 0 else math.nan
                          for k, r in enumerate(per_member)] for e in range(rows)]

    steps = [trainer.global_step for (_, trainer), f in zip(fitted, failed) if f < 0]
    return SequentialOutcome(history, longest.steps, failed, max(steps, default=0), fitted, cli.datamodule)


class SequentialOutcome(SweepOutcome):
    """The members trained one by one: each keeps its model and trainer, which test it."""

    def __init__(self, history, steps, failed_epoch, global_step, fitted: list, datamodule):
        super().__init__(history, steps, failed_epoch, global_step)
        self.fitted, self.datamodule = fitted, datamodule

    def weights(self, k: int, best_epoch: bool) -> dict:
        return dict(self.fitted[k][0].mlp.state_dict())

    def test(self, k: int, best_epoch: bool) -> dict:
        model, trainer = self.fitted[k]
        metrics = trainer.test(model, datamodule=self.datamodule, verbose=False)[0]
        return {"test_loss": metrics.get("test/loss", math.nan), "test_acc": metrics.get("test/acc", math.nan)}
