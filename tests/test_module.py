"""HandgradClassifier inside a Lightning Trainer, on small random tensors (no files, CPU).

References: a plain PyTorch loop (autograd + torch.optim.SGD, no Lightning) for the training numbers,
and predictions recomputed from the trained weights for the metrics.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from handgrad.train.callbacks import ClassMetrics
from handgrad.runtime.errors import NonFiniteLossError, SetupError
from handgrad.train.module import HandgradClassifier

SIZES = [3072, 16, 10]


class TensorData(L.LightningDataModule):
    """A fixed random data set served in a fixed order (train, val and test are different tensors)."""

    def __init__(self, n: int = 160, k: int = 10, batch_size: int = 32, nan_at: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.x = {s: torch.randn(n, 3, 32, 32, generator=g) for s in ("train", "val", "test")}
        self.y = {s: torch.randint(0, k, (n,), generator=g) for s in ("train", "val", "test")}
        for s in self.y:  # a learnable signal: shift each image by its class
            self.x[s] += 0.1 * self.y[s].view(-1, 1, 1, 1)
        if nan_at is not None:  # one NaN pixel in training batch `nan_at` of every epoch
            self.x["train"][nan_at * batch_size, 0, 0, 0] = float("nan")
        self.batch_size = batch_size
        self.class_names = [f"class{i}" for i in range(k)]

    def _loader(self, split):
        return DataLoader(TensorDataset(self.x[split], self.y[split]), batch_size=self.batch_size)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def batches(self, split="train", dtype=torch.float64):
        return [(x.to(dtype), y) for x, y in self._loader(split)]


class RecordSteps(L.Callback):
    """Keeps the loss of every training step and the parameter dtype seen during training."""

    def __init__(self):
        self.losses, self.dtypes = [], set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].clone())
        self.dtypes.add(pl_module.mlp.fc["1"].weight.dtype)


def trainer(tmp_path, **kw):
    args = dict(max_epochs=2, precision="64-true", accelerator="cpu", devices=1, default_root_dir=tmp_path,
                enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False)
    args.update(kw)
    return L.Trainer(**args)


def fit(tmp_path, data=None, **model_kw):
    """Train a fresh model (seed 265) for 2 epochs in float64; return (initial weights, model, step recorder)."""
    L.seed_everything(265)
    model = HandgradClassifier(SIZES, **model_kw)
    init = copy.deepcopy(model.state_dict())
    rec = RecordSteps()
    trainer(tmp_path, callbacks=[rec]).fit(model, data or TensorData())
    return init, model, rec


def reference_run(init, batches, epochs=2, lr=0.01, momentum=0.9, weight_decay=0.001, loss="cross_entropy",
                  dtype=torch.float64):
    """The same training as a plain PyTorch loop: autograd gradients and torch.optim.SGD, no Lightning."""
    model = HandgradClassifier(SIZES).mlp.to(dtype)
    model.load_state_dict({k[len("mlp."):]: v for k, v in init.items() if k.startswith("mlp.")})
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad()
            out = model(x)
            value = F.cross_entropy(out, y) if loss == "cross_entropy" else F.mse_loss(out, F.one_hot(y, 10).to(dtype))
            value.backward()
            opt.step()
            losses.append(value.detach())
    return model, torch.stack(losses)


def weights(model):
    return {k: v for k, v in model.state_dict().items() if k.startswith("mlp.")}


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_four_switch_combinations_agree(tmp_path, loss):
    runs = {(b, o): fit(tmp_path, backprop=b, optimizer=o, loss=loss)
            for b in ("handgrad", "autograd") for o in ("handgrad", "torch")}
    init = runs["handgrad", "handgrad"][0]
    assert all(torch.equal(init[k], r[0][k]) for r in runs.values() for k in init)  # seed 265: same start
    ref_model, ref_losses = reference_run(init, TensorData().batches(), loss=loss)
    assert len(ref_losses) == 10

    for (b, o), (_, model, rec) in runs.items():
        assert rec.dtypes == {torch.float64}, (b, o)
        losses = torch.stack(rec.losses)
        assert losses.dtype == torch.float64
        assert (losses - ref_losses).abs().max() < 1e-10, (b, o)
        for name, w in weights(model).items():
            assert (w - ref_model.state_dict()[name[len("mlp."):]]).abs().max() < 1e-10, (b, o, name)
    assert ref_losses[-1] < ref_losses[0]  # it learned something, so the comparison is not vacuous

    # with the same gradients the two optimizers agree bit for bit
    for b in ("handgrad", "autograd"):
        (_, m_hand, r_hand), (_, m_torch, r_torch) = runs[b, "handgrad"], runs[b, "torch"]
        assert torch.equal(torch.stack(r_hand.losses), torch.stack(r_torch.losses)), b
        for k, w in weights(m_hand).items():
            assert torch.equal(w, weights(m_torch)[k]), (b, k)
    # and autograd + torch.optim.SGD inside Lightning is the plain loop, bit for bit
    _, m_auto, r_auto = runs["autograd", "torch"]
    assert torch.equal(torch.stack(r_auto.losses), ref_losses)
    for k, w in weights(m_auto).items():
        assert torch.equal(w, ref_model.state_dict()[k[len("mlp."):]]), k


def test_float32_default_and_optimizer_state(tmp_path):
    L.seed_everything(265)
    model = HandgradClassifier(SIZES)
    init = copy.deepcopy(model.state_dict())
    rec = RecordSteps()
    trainer(tmp_path, precision="32-true", callbacks=[rec]).fit(model, TensorData())
    assert rec.dtypes == {torch.float32}
    assert model.trainer.global_step == 10  # Lightning counted the manual optimizer steps
    opt = model.trainer.optimizers[0]
    assert type(opt).__module__ == "handgrad.core.optim"
    assert all(opt.state[p]["momentum_buffer"].shape == p.shape for p in model.parameters())
    # the numbers: the plain float32 loop, up to float32 rounding in another order
    ref_model, ref_losses = reference_run(init, TensorData().batches(dtype=torch.float32), dtype=torch.float32)
    torch.testing.assert_close(torch.stack(rec.losses), ref_losses, rtol=1e-5, atol=0)
    for name, w in weights(model).items():
        torch.testing.assert_close(w, ref_model.state_dict()[name[len("mlp."):]], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["classifier", "grid"])
def test_an_empty_training_batch_is_named_not_taken_for_divergence(tmp_path, kind):
    from handgrad.sweep.module import GridClassifier

    x, y = TensorData().batches("train", torch.float32)[0]

    class Batches:  # a loader that yields an empty second batch
        def __iter__(self):
            return iter([(x, y), (x[:0], y[:0])])

        def __len__(self):
            return 2

    batches = Batches()
    model = (HandgradClassifier(SIZES) if kind == "classifier"
             else GridClassifier(members=[{"lr": 0.01}, {"lr": 0.1}], sizes=SIZES))
    with pytest.raises(ValueError, match="training batch 1 is empty"):
        trainer(tmp_path, precision="32-true", limit_val_batches=0).fit(model, train_dataloaders=batches)


def test_nan_loss_stops_naming_the_step(tmp_path):
    L.seed_everything(265)
    model = HandgradClassifier(SIZES)
    with pytest.raises(NonFiniteLossError, match=r"at step 3 \("):
        trainer(tmp_path).fit(model, TensorData(nan_at=3))
    assert model.trainer.global_step == 3  # steps 0, 1, 2 were taken, the bad one was not
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_check_deferred_names_the_first_bad_step(tmp_path):
    """The accelerator path (flag kept on the device, read every n steps) still names the first bad step."""
    L.seed_everything(265)
    model = HandgradClassifier(SIZES, nan_check_every_n_steps=4)
    with pytest.raises(NonFiniteLossError, match=r"at step 1 \("):
        trainer(tmp_path).fit(model, TensorData(nan_at=1))
    assert model.trainer.global_step == 4  # read at step 4, before its update


@pytest.mark.parametrize("precision", ["transformer-engine", "transformer-engine-float16", "8-true"])
def test_unsupported_precision_is_refused(precision):
    """Lightning's transformer-engine precisions replace nn.Linear layers, which the hand-written network does not
    use: refused, naming those that run (a Trainer cannot be built with them without the package: checked as typed)."""
    from handgrad.train.model_setup import check_precision

    with pytest.raises(SetupError, match=rf"precision {precision} is not supported.*'32-true', '64-true', "
                                         rf"'bf16-mixed', '16-mixed', 'bf16-true', '16-true'"):
        check_precision(precision)


def test_output_size_must_match_the_classes(tmp_path):
    model = HandgradClassifier([3072, 16, 2])
    with pytest.raises(SetupError, match=r"2 outputs.*10 classes.*sizes '\[3072, 16, 10\]'"):
        trainer(tmp_path).fit(model, TensorData())


def test_bad_switch_values():
    with pytest.raises(ValueError, match="backprop must be one of"):
        HandgradClassifier(SIZES, backprop="numpy")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        HandgradClassifier(SIZES, optimizer="adam")


def test_metrics_match_recomputed_predictions(tmp_path):
    init, model, _ = fit(tmp_path)
    data = TensorData()
    trainer_ = trainer(tmp_path)
    metrics = trainer_.validate(model, data, verbose=False)[0]
    with torch.no_grad():
        x, y = data.x["val"].double(), data.y["val"]
        out = model.mlp(x)
        pred = out.argmax(1)
        loss = F.cross_entropy(out, y)
    cm = torch.zeros(10, 10, dtype=torch.long)
    cm.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    class_metrics = next(c for c in trainer_.callbacks if isinstance(c, ClassMetrics))  # added by the model
    assert torch.equal(class_metrics.confusion_matrix["val"], cm)
    assert metrics["val/acc"] == pytest.approx((pred == y).double().mean().item(), abs=1e-6)
    assert metrics["val/loss"] == pytest.approx(loss.item(), rel=1e-6)
    for k in range(10):
        mask = y == k
        assert metrics[f"val/acc_class{k}"] == pytest.approx((pred[mask] == k).double().mean().item(), abs=1e-6)
    assert pred.unique().numel() >= 3 and 0 < metrics["val/acc"] < 1  # a non-degenerate confusion matrix


def test_train_metrics_are_the_epochs_predictions_before_each_step(tmp_path):
    """train/acc and train/loss of the last epoch: the predictions and losses each step made before its update,
    recomputed by the plain loop (autograd + torch.optim.SGD)."""
    init, model, _ = fit(tmp_path)
    ref = HandgradClassifier(SIZES).mlp.double()
    ref.load_state_dict({k[len("mlp."):]: v for k, v in init.items() if k.startswith("mlp.")})
    opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9, weight_decay=0.001)
    for _ in range(2):
        correct, loss_sum, n = 0, 0.0, 0
        for x, y in TensorData().batches():
            out = ref(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((out.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
            n += len(y)
    metrics = model.trainer.callback_metrics
    assert 0 < correct < n  # neither all right nor all wrong: the comparison can fail
    assert metrics["train/acc"].item() == pytest.approx(correct / n, abs=1e-6)
    assert metrics["train/loss"].item() == pytest.approx(loss_sum / n, rel=1e-9)


def test_lr_scheduler_is_stepped_each_epoch(tmp_path):
    from functools import partial

    sched = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    _, model, _ = fit(tmp_path, lr_scheduler=sched)
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**2)
    assert model.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2


def test_logged_grad_norm_is_the_global_gradient_norm(tmp_path):
    """train/grad_norm = sqrt(sum_p ||dL/dp||^2), checked against autograd gradients at the initial weights."""
    L.seed_everything(265)
    model = HandgradClassifier(SIZES)
    ref = copy.deepcopy(model.mlp).double()
    trainer(tmp_path, max_steps=1, log_every_n_steps=1).fit(model, TensorData())
    x, y = TensorData().batches()[0]
    F.cross_entropy(ref(x), y).backward()
    expected = math.sqrt(sum((p.grad**2).sum().item() for p in ref.parameters()))
    assert model.trainer.callback_metrics["train/grad_norm"].item() == pytest.approx(expected, rel=1e-10)


def test_float64_resume_restores_the_weights_exactly(tmp_path):
    """A float64 checkpoint must come back bitwise: Lightning loads weights before its precision plugin widens the
    module, so the module widens itself in setup() (else the weights pass through float32 and are rounded)."""
    _, full, _ = fit(tmp_path / "full")
    L.seed_everything(265)
    first = HandgradClassifier(SIZES)
    t = trainer(tmp_path / "first", max_epochs=1)
    t.fit(first, TensorData())
    t.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = HandgradClassifier(SIZES)
    trainer(tmp_path / "resumed").fit(resumed, TensorData(), ckpt_path=tmp_path / "epoch1.ckpt")
    assert resumed.mlp.fc["1"].weight.dtype == torch.float64
    for name, w in weights(full).items():
        assert torch.equal(w, weights(resumed)[name]), name


def test_plateau_scheduler_steps_only_after_a_validation(tmp_path):
    """ReduceLROnPlateau needs this epoch's val/loss: with validation every 2nd epoch it steps on those epochs only."""
    import functools

    sched = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0, factor=0.5)
    model = HandgradClassifier(SIZES, lr_scheduler=sched)
    trainer(tmp_path, max_epochs=4, check_val_every_n_epoch=2, num_sanity_val_steps=0).fit(model, TensorData())
    scheduler = model.lr_schedulers()
    assert scheduler.last_epoch == 2  # stepped after epochs 2 and 4, not after 1 and 3


def test_plateau_scheduler_with_sparse_validation_warns_of_no_resume(tmp_path):
    """Regression: with ReduceLROnPlateau and validation every 2nd epoch, a fresh run warned on every epoch that it
    had "resumed from a checkpoint written before the end of epoch ..." (a plateau scheduler counts its own steps)."""
    import functools
    import warnings

    sched = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0, factor=0.5)
    model = HandgradClassifier(SIZES, lr_scheduler=sched)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_epochs=4, check_val_every_n_epoch=2, num_sanity_val_steps=0).fit(model, TensorData())
    assert [str(w.message) for w in caught if "resumed from a checkpoint" in str(w.message)] == []
    assert model.lr_schedulers().last_epoch == 2


def test_no_checkpoint_is_written_after_a_nan_loss_when_the_flag_is_read_rarely(tmp_path):
    """Regression: the NaN flag read every 1000 steps (as on an accelerator, every 50) while a ModelCheckpoint saves
    after every step: the checkpoint after the bad step (its update made the weights NaN) must never be written."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(265)
    model = HandgradClassifier(SIZES, nan_check_every_n_steps=1000)
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    with pytest.raises(NonFiniteLossError, match=r"at step 2 \("):
        trainer(tmp_path, callbacks=[every_step], enable_checkpointing=True).fit(model, TensorData(nan_at=2))
    saved = sorted((tmp_path / "ckpts").glob("*.ckpt"))
    states = [torch.load(p, weights_only=True) for p in saved]
    assert [s["global_step"] for s in states] == [1, 2]  # after steps 0 and 1, not after the bad step 2
    assert all(torch.isfinite(w).all() for s in states for w in s["state_dict"].values())


@pytest.mark.parametrize("momentum", [1.0, 1.5])
def test_momentum_of_one_or_more_trains_but_warns_once(tmp_path, momentum):
    """torch.optim.SGD allows momentum >= 1, so handgrad does too; the buffer then never decays: one warning."""
    import warnings

    model = HandgradClassifier(SIZES, momentum=momentum)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=2).fit(model, TensorData())
    said = [str(w.message) for w in caught if "never decays" in str(w.message)]
    assert said == [f"--model.momentum {momentum} >= 1: the momentum buffer b <- μ b + (1 - τ) g never decays, so old "
                    f"gradients are never forgotten and the steps grow; use a momentum in [0, 1) unless that is what "
                    f"you want to see."]
    assert model.trainer.global_step == 2
