"""Mixed precision by hand, against PyTorch's own: torch.autocast for the gradients, torch.amp.GradScaler for the loss
scaling, torch.optim.SGD for the step; and the training stack around it (Lightning's precision plugins, checkpoints,
resume, the grid), on the CPU.

How close the hand-written gradients must be to autograd's under the same torch.autocast (the tolerance, derived):

    Both sides run the forward with the same kernels on the same inputs (z^l, a^l are bitwise equal: asserted). In
    the backward pass every entry of delta^l, dL/dW^l and dL/db^l is a product or a sum of inputs in the low dtype
    c, accumulated in float32 and rounded once to c. The two sides may accumulate in another order (another matrix
    layout for delta^T a than autograd's): float32's error, about n 2^-24 relative for n terms, is far below c's
    unit roundoff u (bfloat16 2^-8, float16 2^-11), but near a tie it can round an entry to the neighbouring value
    of c: a relative difference of at most 2u in that entry. A difference in delta^l carries into delta^{l-1} and
    the gradients below it through the products, and each layer can add its own rounding; so for layer l of L the
    norm-relative difference of a gradient is at most

        e_l <= 2u (L - l + 2)        (bfloat16, L = 4: 0.016 at layer 4 ... 0.039 at layer 1)

    The measured values are far smaller (most entries are bitwise equal); the bound is what a test may demand
    without depending on a kernel's accumulation order.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision

from handgrad.core import losses
from handgrad.core.backprop import backward
from handgrad.core.loss_scale import LossScaler, unscale_, update_scale_
from handgrad.core.mlp import MLP
from handgrad.core.optim import SGD
from handgrad.train.model_setup import MIXED
from handgrad.train.module import HandgradClassifier
from test_module import TensorData

SIZES = [3072, 32, 16, 10]
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def tolerance(dtype: torch.dtype, L: int, l: int) -> float:
    """The bound of the module docstring: e_l <= 2u (L - l + 2)."""
    return 2 * UNIT_ROUNDOFF[dtype] * (L - l + 2)


def relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_hand_gradients_equal_autograd_under_autocast(dtype, loss):
    torch.manual_seed(0)
    hand, reference = MLP(SIZES), MLP(SIZES)
    reference.load_state_dict(hand.state_dict())
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    target = y if loss == "cross_entropy" else F.one_hot(y, 10).float()
    hand.compute_dtype = dtype
    with torch.no_grad():
        out = hand(x)
        value, g = getattr(losses, loss)(out.float(), target)
        backward(hand, g)
    with torch.autocast("cpu", dtype=dtype):  # PyTorch's mixed precision: nn.Linear cast by autocast, no casts of ours
        ref_out = reference(x)
        ref_value = (F.cross_entropy if loss == "cross_entropy" else F.mse_loss)(ref_out.float(), target)
    ref_value.backward()
    assert out.dtype == dtype and torch.equal(out, ref_out.detach())  # the same forward, bitwise
    assert value.dtype == torch.float32 and math.isclose(value.item(), ref_value.item(), rel_tol=1e-6)
    L = len(SIZES) - 1
    for l in range(1, L + 1):
        layer, ref = hand.fc[str(l)], reference.fc[str(l)]
        assert layer.weight.grad.dtype == torch.float32  # into the float32 master weights' .grad
        for ours, theirs in ((layer.weight.grad, ref.weight.grad), (layer.bias.grad, ref.bias.grad)):
            assert relative(ours, theirs) <= tolerance(dtype, L, l), (l, relative(ours, theirs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_low_precision_products_differ_from_float32(dtype):
    """The test above is not vacuous: at every layer, the hand-written gradients with low-precision products are at
    least 10 times closer to autocast's than the same network's float32 gradients are (so a backward pass that ran
    in float32 would be told apart, at the top layers too, where the bound alone would let it pass)."""
    torch.manual_seed(0)
    full, low, reference = MLP(SIZES), MLP(SIZES), MLP(SIZES)
    low.load_state_dict(full.state_dict())
    reference.load_state_dict(full.state_dict())
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    low.compute_dtype = dtype
    for net in (full, low):
        with torch.no_grad():
            backward(net, losses.cross_entropy(net(x).float(), y)[1])
    with torch.autocast("cpu", dtype=dtype):
        F.cross_entropy(reference(x).float(), y).backward()
    for l in range(1, len(SIZES)):
        for name in ("weight", "bias"):
            theirs = getattr(reference.fc[str(l)], name).grad
            ours, float32 = (getattr(net.fc[str(l)], name).grad for net in (low, full))
            assert relative(float32, theirs) > 1e-5  # float32 products do give other gradients
            assert relative(ours, theirs) <= relative(float32, theirs) / 10, (l, name)


# ------------------------------------------------------------------ the loss scale against torch.amp.GradScaler


def overflowing_gradients(steps: int = 40, seed: int = 0) -> list[list[torch.Tensor]]:
    """Scaled-looking gradients of two parameters, some steps with an inf or a NaN (a run made to overflow)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        grads = [torch.randn(5, 3, generator=g) * 1e3, torch.randn(3, generator=g) * 1e3]
        if t in (0, 1, 2, 9, 17, 18, 30):
            grads[t % 2].view(-1)[t % 3] = float("inf") if t % 3 else float("nan")
        out.append(grads)
    return out


def test_loss_scaler_equals_torch_grad_scaler_on_an_overflowing_run():
    """The same gradients into both (growth every 4 good steps, backoff 0.5, growth 2): the same scale after every
    step, the same skipped steps, and with SGD (momentum 0.9, weight decay) bitwise the same parameters."""
    settings = dict(init_scale=2.0 ** 10, growth_factor=2.0, backoff_factor=0.5, growth_interval=4)
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(3)]
    ours_p = [p.clone().requires_grad_() for p in start]
    theirs_p = [p.clone().requires_grad_() for p in start]
    ours_opt, theirs_opt = SGD(ours_p, lr=0.1, momentum=0.9, weight_decay=0.01), \
        torch.optim.SGD(theirs_p, lr=0.1, momentum=0.9, weight_decay=0.01)
    ours, theirs = LossScaler(**settings), torch.amp.GradScaler("cpu", **settings)
    theirs.scale(torch.ones(()))  # (GradScaler makes its scale tensor at the first scale())
    scales, skipped = [], []
    for grads in overflowing_gradients():
        for params in (ours_p, theirs_p):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        before = [p.detach().clone() for p in ours_p]
        ours.step(ours_opt)
        theirs.step(theirs_opt)
        skipped.append(all(torch.equal(a, b) for a, b in zip(before, ours_p)))
        ours.update()
        theirs.update()
        assert ours.get_scale() == theirs.get_scale() and ours.state_dict() == theirs.state_dict()
        assert all(torch.equal(a, b) for a, b in zip(ours_p, theirs_p))
        scales.append(ours.get_scale())
    steps = list(zip(scales, scales[1:]))
    assert sum(skipped) == 7 and any(b > a for a, b in steps) and any(b < a for a, b in steps)  # skip, grow, fall


def test_per_member_scales_follow_each_member_alone():
    """A (K,) scale: member k's scales and skips are those of a GradScaler that sees member k's gradients only."""
    members = [overflowing_gradients(seed=s) for s in range(3)]
    scale, tracker = torch.full((3,), 2.0 ** 10), torch.zeros(3, dtype=torch.int32)
    alone = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=4) for _ in members]
    for s in alone:
        s.scale(torch.ones(()))
    for t in range(40):
        stacked = [torch.stack([m[t][i] for m in members]) for i in range(2)]
        found = unscale_(stacked, scale)
        update_scale_(scale, tracker, found, 2.0, 0.5, 4)
        for k, s in enumerate(alone):
            opt = torch.optim.SGD([torch.zeros(5, 3, requires_grad=True), torch.zeros(3, requires_grad=True)], lr=0.1)
            for p, g in zip(opt.param_groups[0]["params"], members[k][t]):
                p.grad = g.clone()
            s.unscale_(opt)
            unscaled = opt.param_groups[0]["params"][0].grad  # the same unscaled gradient, bitwise (NaN where NaN)
            assert torch.allclose(stacked[0][k], unscaled, rtol=0, atol=0, equal_nan=True)
            s.step(opt)
            s.update()
        assert scale.tolist() == [s.get_scale() for s in alone]


# ------------------------------------------------------------------ the training stack


def trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   default_root_dir=tmp_path)
    return L.Trainer(**(options | kwargs))


class Scales(L.Callback):
    """The loss scale after every optimizer step, and which steps left the weights as they were."""

    def __init__(self):
        self.scales, self.skipped, self._before = [], [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = pl_module.mlp.fc["1"].weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.scales.append(trainer.scaler.get_scale())
        self.skipped.append(torch.equal(self._before, pl_module.mlp.fc["1"].weight))


def grad_scaler_run(start: dict, data, epochs: int, settings: dict, device: str):
    """The reference: the same MLP trained by a plain loop with torch.autocast (float16), torch.amp.GradScaler and
    torch.optim.SGD (lr 0.05, momentum 0.9, weight decay 0.001); (the MLP, the scale after each step, which steps
    left the weights as they were)."""
    reference = MLP(SIZES).to(device)
    reference.load_state_dict({k.removeprefix("mlp."): v for k, v in start.items() if k.startswith("mlp.")})
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=0.001)
    scaler = torch.amp.GradScaler(device, **settings)
    scales, skipped = [], []
    for x, y in [batch for _ in range(epochs) for batch in data.train_dataloader()]:
        before = reference.fc["1"].weight.detach().clone()
        opt.zero_grad()
        with torch.autocast(device, dtype=torch.float16):
            loss = F.cross_entropy(reference(x.to(device)).float(), y.to(device))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        skipped.append(torch.equal(before, reference.fc["1"].weight))
    return reference, scales, skipped


def test_16_mixed_in_lightning_scales_by_hand_like_grad_scaler(tmp_path):
    """Lightning's MixedPrecision plugin with a CPU GradScaler (as Lightning makes one on CUDA): the model puts the
    hand-written scaler in its place, with its settings; a run started at a scale that overflows float16 skips steps
    and lowers the scale exactly as a plain loop with torch.autocast, torch.amp.GradScaler and torch.optim.SGD."""
    settings = dict(init_scale=2.0 ** 24, growth_interval=3)
    epochs = 3
    torch.manual_seed(0)
    model = HandgradClassifier(SIZES, lr=0.05)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorData()
    record = Scales()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", **settings))
    trainer(tmp_path, max_epochs=epochs, plugins=[plugin], callbacks=[record], limit_val_batches=0).fit(model, data)
    assert isinstance(plugin.scaler, LossScaler) and model.mlp.compute_dtype == torch.float16

    reference, scales, skipped = grad_scaler_run(start, data, epochs, settings, "cpu")
    assert record.skipped == skipped and record.scales == scales
    assert skipped[0] and not all(skipped) and scales[0] < 2.0 ** 24  # it overflowed, then trained
    for l in range(1, 4):  # the same steps from nearly the same gradients
        assert torch.allclose(model.mlp.fc[str(l)].weight, reference.fc[str(l)].weight, rtol=0, atol=1e-3)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_resumes_bitwise(tmp_path, precision):
    """Two epochs straight, and one epoch then a resume from its checkpoint: the same weights and momentum, and
    under 16-mixed the same scaler state (saved by Lightning's plugin, from the hand-written scaler)."""

    def run(epochs, ckpt=None, callbacks=()):
        torch.manual_seed(0)
        model = HandgradClassifier(SIZES)
        plugins = [] if precision == "bf16-mixed" else \
            [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 20,
                                                                           growth_interval=2))]
        t = trainer(tmp_path, max_epochs=epochs, callbacks=list(callbacks), enable_checkpointing=True,
                    **({"precision": precision} if not plugins else {"plugins": plugins}))
        t.fit(model, TensorData(), ckpt_path=ckpt)
        return model, t

    straight, t_straight = run(2)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="e{epoch}", save_top_k=-1,
                                                auto_insert_metric_name=False)
    run(1, callbacks=[saver])
    resumed, t_resumed = run(2, ckpt=str(tmp_path / "ckpt" / "e0.ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    bufs = [[o.state[p]["momentum_buffer"] for p in o.param_groups[0]["params"]] for o in
            (t_straight.optimizers[0], t_resumed.optimizers[0])]
    assert all(torch.equal(a, b) for a, b in zip(*bufs))
    if precision == "16-mixed":
        assert t_straight.scaler.state_dict() == t_resumed.scaler.state_dict()
        assert t_straight.scaler.get_scale() != 2.0 ** 20  # (the state moved during the run)


def test_a_checkpoint_evaluates_in_another_precision(tmp_path):
    """Trained in bf16-mixed (float32 master weights), tested in 32-true and in bf16-true; trained in bf16-true
    (bfloat16 weights), tested in 32-true: the loaded weights are the trained ones, the statistics float64."""
    data = TensorData()
    for trained, tested in (("bf16-mixed", "32-true"), ("bf16-mixed", "bf16-true"), ("bf16-true", "32-true")):
        torch.manual_seed(0)
        model = HandgradClassifier(SIZES)
        t = trainer(tmp_path, max_epochs=1, precision=trained, enable_checkpointing=True)
        t.fit(model, data)
        ckpt = t.checkpoint_callback.best_model_path
        evaluator = trainer(tmp_path, precision=tested)
        result = evaluator.test(HandgradClassifier(SIZES), data, ckpt_path=ckpt, verbose=False)[0]
        tested_model = evaluator.lightning_module
        w = model.mlp.fc["1"].weight.detach().to(tested_model.mlp.fc["1"].weight.dtype)
        assert torch.equal(tested_model.mlp.fc["1"].weight, w) and tested_model.input_mean.dtype == torch.float64
        assert math.isfinite(result["test/acc"]) and tested_model.mlp.compute_dtype == MIXED.get(tested)


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("16-true", torch.float16)])
def test_true_half_precision_runs_everything_in_that_dtype(tmp_path, precision, dtype):
    torch.manual_seed(0)
    model = HandgradClassifier(SIZES)
    model.input_mean.copy_(torch.tensor([0.1234567890123, 0.2, 0.3], dtype=torch.float64))
    seen = set()

    class Grads(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.update(p.grad.dtype for p in pl_module.parameters())

    trainer(tmp_path, max_epochs=1, precision=precision, callbacks=[Grads()]).fit(model, TensorData())
    assert {p.dtype for p in model.parameters()} == {dtype} == seen and model.mlp.a[1].dtype == dtype
    # the statistics keep float64 (nn.Module._apply, which .to() and the precision plugin go through)
    assert model.input_mean.dtype == torch.float64
    model.to(torch.float16)
    assert model.input_std.dtype == torch.float64 and model.mlp.fc["1"].weight.dtype == torch.float16


def test_the_grid_scales_each_member_like_its_own_scaler(tmp_path):
    """16-mixed in the batched grid: each member's scale and skipped steps are those of the same member trained
    alone with the hand-written scaler (itself equal to torch.amp.GradScaler, above): one member's overflow never
    stops another's step."""
    from handgrad.sweep.module import GridClassifier

    members = [dict(lr=0.05, momentum=0.9, weight_decay=0.001), dict(lr=0.002, momentum=0.0, weight_decay=0.0)]
    settings = dict(init_scale=2.0 ** 24, growth_interval=3)
    scales = {}

    class GridScales(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            scales.setdefault("grid", []).append(pl_module.loss_scale.tolist())

    grid = GridClassifier(members=members, sizes=SIZES, init_seed=0)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", **settings))
    trainer(tmp_path, max_epochs=3, limit_val_batches=0, plugins=[plugin], callbacks=[GridScales()]).fit(grid, TensorData())
    assert plugin.scaler is None and grid.net.compute_dtype == torch.float16  # the grid scales per member itself
    for k, member in enumerate(members):
        torch.manual_seed(0)  # the grid's initial weights: MLP(sizes) right after manual_seed(init_seed)
        alone, record = HandgradClassifier(SIZES, **member), Scales()
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", **settings))
        trainer(tmp_path, max_epochs=3, limit_val_batches=0, plugins=[plugin], callbacks=[record]).fit(alone, TensorData())
        assert [row[k] for row in scales["grid"]] == record.scales, k
    assert scales["grid"][0][0] < 2.0 ** 24 and len({tuple(row) for row in scales["grid"]}) > 2
