"""The batched grid (handgrad.core.grid) against independent references: autograd, torch.optim.SGD, and
each member trained alone by a plain loop (handgrad.core.mlp.MLP + autograd + torch.optim.SGD)."""

from __future__ import annotations

import math
import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from handgrad.core.grid import GridMLP, GridSGD, grid_backward
from handgrad.sweep.module import GridClassifier
from handgrad.core.optim import HYPERPARAMETERS
from handgrad.sweep.search import expand_grid, member_names
from handgrad.sweep.select import select_best
from handgrad.core.activations import ACTIVATIONS
from handgrad.core.losses import cross_entropy
from handgrad.core.mlp import MLP

SIZES = [48, 24, 12, 3]  # small enough for the 2-core CPU, deep enough for the recursion
SEED = 7


# ----------------------------------------------------------------------------- helpers


class TensorData(L.LightningDataModule):
    """Random CIFAR-like tensors with a class-dependent mean (learnable), split train/val/test."""

    def __init__(self, n_features=SIZES[0], classes=SIZES[-1], n=(96, 40, 40), batch_size=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.batch_size = batch_size
        self.splits = {}
        centers = torch.randn(classes, n_features, generator=g)
        for name, m in zip(("train", "val", "test"), n):
            y = torch.randint(0, classes, (m,), generator=g)
            x = centers[y] * 0.7 + torch.randn(m, n_features, generator=g)
            self.splits[name] = (x.view(m, 3, n_features // 3), y)

    def _loader(self, name):
        return DataLoader(TensorDataset(*self.splits[name]), batch_size=self.batch_size)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")


def trainer(max_epochs, precision="64-true", **kw):
    return L.Trainer(max_epochs=max_epochs, precision=precision, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, **kw)


def train_alone(member: dict, data: TensorData, epochs: int, dtype=torch.float64) -> dict:
    """Reference: one member alone, a plain loop with autograd and torch.optim.SGD (no handgrad code
    except the MLP container), starting from MLP(SIZES) seeded as GridClassifier(init_seed=SEED)."""
    torch.manual_seed(SEED)
    mlp = MLP(SIZES).to(dtype)
    opt = torch.optim.SGD(mlp.parameters(), **member)
    hist = {"train_loss": [], "train_acc": [], "val_loss": [], "val_acc": []}

    def mean_over(batches, train):
        tot_loss, tot_correct, n = 0.0, 0, 0
        for x, y in batches:
            x = x.to(dtype)
            out = mlp(x)
            loss = F.cross_entropy(out, y)
            if train:
                opt.zero_grad()
                loss.backward()
                opt.step()
            tot_loss += loss.item() * len(y)
            tot_correct += int((out.argmax(1) == y).sum())
            n += len(y)
        return tot_loss / n, tot_correct / n

    for _ in range(epochs):
        loss, acc = mean_over(data.train_dataloader(), True)
        hist["train_loss"].append(loss)
        hist["train_acc"].append(acc)
        with torch.no_grad():
            loss, acc = mean_over(data.val_dataloader(), False)
        hist["val_loss"].append(loss)
        hist["val_acc"].append(acc)
    return hist


MEMBERS = [  # the reference grid's kinds of members, plus dampening and nesterov
    dict(lr=0.05, momentum=0.0, weight_decay=0.0),
    dict(lr=0.05, momentum=0.0, weight_decay=0.01),
    dict(lr=0.05, momentum=0.9, weight_decay=0.0),
    dict(lr=0.02, momentum=0.9, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, weight_decay=0.001, dampening=0.3),
    dict(lr=0.03, momentum=0.9, weight_decay=0.001, nesterov=True),
]


# ----------------------------------------------------------------------------- the grid declaration


def test_expand_grid_cartesian_product_and_explicit_list():
    members = expand_grid(grid={"lr": [0.01, 0.1], "momentum": [0, 0.9], "weight_decay": [0.0, 0.01, 0.001]})
    assert len(members) == 12
    assert members[0] == dict(lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)
    assert members[1]["weight_decay"] == 0.01 and members[3]["momentum"] == 0.9 and members[6]["lr"] == 0.1
    assert {(m["lr"], m["momentum"], m["weight_decay"]) for m in members} == {
        (lr, mu, wd) for lr in (0.01, 0.1) for mu in (0.0, 0.9) for wd in (0.0, 0.01, 0.001)}
    explicit = expand_grid(members=[{"lr": 0.01}, {"lr": 0.01, "momentum": 0.9, "nesterov": True}])
    assert explicit[1] == dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True)
    # run names: only what varies (a single member: its optimizer), the index where order or uniqueness needs it
    assert member_names(expand_grid(members=[dict(lr=0.01, momentum=0.9, weight_decay=0.001)])) == \
        ["lr0.01_m0.9_wd0.001"]
    assert member_names(members[:2]) == ["wd0", "wd0.01"]
    assert member_names(members[4:7]) == ["00_lr0.01_m0.9_wd0.01", "01_lr0.01_m0.9_wd0.001", "02_lr0.1_m0_wd0"]
    assert member_names(explicit) == ["m0", "m0.9_nesterov"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(grid={"lr": [0.1]}, members=[{"lr": 0.1}]), "exactly one"),
    (dict(), "exactly one"),
    (dict(grid={"lr": [0.1], "momentun": [0.9]}), "momentun"),
    (dict(grid={"momentum": [0.9]}), "'lr' is required"),
    (dict(grid={"lr": []}), "empty"),
    (dict(members=[{"lr": 0.1, "wd": 0.1}]), "wd"),
    (dict(members=[{"lr": -1.0}]), "members[0]: lr must be a finite number >= 0, got -1.0"),
    (dict(members=[{"lr": True}]), "members[0]: lr must be a finite number >= 0, got True"),
    (dict(members=[{"lr": 0.1, "dampening": float("nan")}]), "dampening must be a number in [0, 1], got nan"),
    (dict(members=[{"lr": 0.1, "momentum": 0.9, "nesterov": "false"}]), "nesterov must be true or false, got 'false'"),
    (dict(grid={"lr": [0.1, "0.2"]}), "grid member 1: lr must be a finite number >= 0, got '0.2'"),
    (dict(members=[{"lr": 0.1, "nesterov": True}]), "nesterov"),
    (dict(members=[]), "empty"),
])
def test_expand_grid_errors_say_what_is_wrong(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        expand_grid(**kwargs)


def test_random_search_draws_from_each_distribution_reproducibly():
    space = {"lr": {"log_uniform": [1e-4, 1e-1]}, "momentum": {"uniform": [0.5, 0.99]},
             "weight_decay": {"choice": [0.0, 0.001]}, "nesterov": [False]}
    members = expand_grid(grid=space, samples=400, sample_seed=3)
    assert members == expand_grid(grid=space, samples=400, sample_seed=3)  # seeded: the same members again
    assert members != expand_grid(grid=space, samples=400, sample_seed=4)
    lr = [m["lr"] for m in members]
    assert all(1e-4 <= v <= 1e-1 for v in lr) and all(0.5 <= m["momentum"] <= 0.99 for m in members)
    # log-uniform: log10(lr) is uniform on [-4, -1], so about a third of the draws fall in each decade
    decades = [sum(-4 + d <= math.log10(v) < -3 + d for v in lr) for d in range(3)]
    assert all(100 <= n <= 170 for n in decades), decades
    assert {m["weight_decay"] for m in members} == {0.0, 0.001} and not any(m["nesterov"] for m in members)
    assert 150 <= sum(m["weight_decay"] == 0 for m in members) <= 250


def test_seeds_repeat_every_configuration_seed_fastest():
    members = expand_grid(grid={"lr": [0.01, 0.1]}, seeds=[265, 266, 267])
    assert [(m["lr"], m["seed"]) for m in members] == [(0.01, 265), (0.01, 266), (0.01, 267),
                                                       (0.1, 265), (0.1, 266), (0.1, 267)]
    assert member_names(members) == ["lr0.01_s265", "lr0.01_s266", "lr0.01_s267", "lr0.1_s265", "lr0.1_s266",
                                     "lr0.1_s267"]
    model = GridClassifier(members=members[:2], sizes=SIZES, init_seed=SEED)  # each member its own initial MLP
    for k, seed in enumerate((265, 266)):
        torch.manual_seed(seed)
        reference = MLP(SIZES)
        assert torch.equal(model.net.member(k).fc["1"].weight, reference.fc["1"].weight)


@pytest.mark.parametrize("kwargs, message", [
    (dict(grid={"lr": {"log_uniform": [1e-4, 0.1]}}), "drawing from it needs --model.samples N"),
    (dict(members=[{"lr": 0.1}], samples=3), "cannot go with `members`"),
    (dict(grid={"lr": {"log_uniform": [0, 0.1]}}, samples=3), "low > 0"),
    (dict(grid={"lr": {"uniform": [0.1, 0.01]}}, samples=3), "low <= high"),
    (dict(grid={"lr": {"normal": [0, 1]}}, samples=3), "is not a distribution"),
    (dict(grid={"lr": [0.1]}, samples=0), "samples must be an integer >= 1"),
    (dict(grid={"lr": [0.1]}, seeds=[1, 1]), "distinct integers"),
    (dict(grid={"lr": {"uniform": [-1, 1]}}, samples=20), "lr must be a finite number >= 0"),
])
def test_search_space_errors_say_what_is_wrong(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        expand_grid(**kwargs)


# ----------------------------------------------------------------------------- forward, backward, step


def _grid_of_distinct_members(K=3, dtype=torch.float64, activation="relu"):
    torch.manual_seed(0)
    net = GridMLP(SIZES, K, activation).to(dtype)
    mlps = [MLP(SIZES, activation).to(dtype) for _ in range(K)]
    for k, m in enumerate(mlps):
        net.load_mlp(m, [k])
    return net, mlps


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_grid_forward_and_backward_match_autograd_per_member(activation):
    net, mlps = _grid_of_distinct_members(activation=activation)
    x = torch.randn(10, 3, 16, dtype=torch.float64)
    y = torch.randint(0, SIZES[-1], (10,))
    logits = net(x)
    loss, g = cross_entropy(logits, y)
    grid_backward(net, g)
    for k, m in enumerate(mlps):
        out = m(x)
        ref = F.cross_entropy(out, y)
        ref.backward()
        torch.testing.assert_close(logits[k], out, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(loss[k], ref, rtol=1e-13, atol=1e-14)
        for l in range(1, len(SIZES)):
            torch.testing.assert_close(net.fc[str(l)].weight.grad[k], m.fc[str(l)].weight.grad, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(net.fc[str(l)].bias.grad[k], m.fc[str(l)].bias.grad, rtol=1e-12, atol=1e-14)
    assert net.dL_dw[1] is net.fc["1"].weight.grad and net.dL_dw[1].shape == (3, SIZES[1], SIZES[0])


def test_cross_entropy_of_stacked_logits_is_each_members_own_loss():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 9, 3, generator=g, dtype=torch.float64) * 5
    logits[2] *= 100  # large logits: the max shift must keep it finite
    y = torch.randint(0, 3, (9,), generator=g)
    loss, grad = cross_entropy(logits, y)  # (K, N, C) logits, one target
    assert loss.shape == (4,) and grad.shape == logits.shape
    for k in range(4):
        ref_loss, ref_grad = cross_entropy(logits[k], y)
        torch.testing.assert_close(loss[k], ref_loss, rtol=1e-14, atol=0)
        torch.testing.assert_close(grad[k], ref_grad, rtol=1e-14, atol=1e-16)
        leaf = logits[k].clone().requires_grad_()  # and both against autograd
        F.cross_entropy(leaf, y).backward()
        torch.testing.assert_close(loss[k], F.cross_entropy(logits[k], y), rtol=1e-13, atol=0)
        torch.testing.assert_close(grad[k], leaf.grad, rtol=1e-12, atol=1e-16)
    assert torch.isfinite(loss).all()
    with pytest.raises(TypeError, match="class indices"):
        cross_entropy(logits, y.double())
    with pytest.raises(ValueError, match=r"\(N, C\) or \(K, N, C\)"):
        cross_entropy(logits[None], y)


def test_grid_backward_reuses_grad_buffers_and_checks_shapes():
    net, _ = _grid_of_distinct_members()
    x = torch.randn(4, SIZES[0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=re.escape("call model(x) first")):
        grid_backward(net, torch.randn(3, 4, SIZES[-1], dtype=torch.float64))
    net(x)
    grid_backward(net, torch.randn(3, 4, SIZES[-1], dtype=torch.float64))
    before = net.fc["1"].weight.grad
    net(x)
    g = torch.randn(3, 4, SIZES[-1], dtype=torch.float64)
    grid_backward(net, g)
    assert net.fc["1"].weight.grad is before  # overwritten in place, not reallocated
    with pytest.raises(ValueError, match="grad_output has shape"):
        grid_backward(net, g[:2])
    with pytest.raises(ValueError, match="features per sample"):
        net(torch.randn(4, 5))
    net(x, member=1)  # one member's forward only
    with pytest.raises(ValueError, match="needs the forward of all K = 3 members"):
        grid_backward(net, g[:1])


def test_member_extraction_and_shared_initialisation():
    model = GridClassifier(members=MEMBERS, sizes=SIZES, init_seed=SEED)
    torch.manual_seed(SEED)
    ref = MLP(SIZES)
    state = torch.random.get_rng_state()
    GridClassifier(members=MEMBERS, sizes=SIZES, init_seed=SEED)
    assert torch.equal(state, torch.random.get_rng_state())  # the global random state is untouched
    for k in range(len(MEMBERS)):
        m = model.net.member(k)
        for l in range(1, len(SIZES)):
            assert torch.equal(m.fc[str(l)].weight, ref.fc[str(l)].weight)
            assert torch.equal(m.fc[str(l)].bias, ref.fc[str(l)].bias)


def _sgd_pair(members, K, per_member=None):
    net, mlps = _grid_of_distinct_members(K)
    hp = {h: [m.get(h, {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}.get(h))
              for m in members] for h in HYPERPARAMETERS}
    opt = GridSGD(net.parameters(), **hp, per_member=per_member)
    refs = [torch.optim.SGD(m.parameters(), **members[k]) for k, m in enumerate(mlps)]
    return net, mlps, opt, refs


def _set_grads(net, mlps, gen, nan_member=None):
    for l in range(1, len(SIZES)):
        for name in ("weight", "bias"):
            p = getattr(net.fc[str(l)], name)
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if nan_member is not None:
                g[nan_member] = math.nan
            p.grad = g
            for k, m in enumerate(mlps):
                q = getattr(m.fc[str(l)], name)
                q.grad = g[k].reshape(q.shape).clone()


SGD_MEMBERS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.25, weight_decay=0.01),
    dict(lr=0.2, momentum=0.8, weight_decay=0.001, nesterov=True),
    dict(lr=0.1, dampening=0.5, weight_decay=0.1),  # dampening without momentum: ignored, as torch does
]


@pytest.mark.parametrize("per_member", [True, False], ids=["per-member layout", "stacked layout"])
def test_grid_sgd_equals_torch_sgd_for_every_member(per_member):
    """Per member: torch.optim.SGD's own operations on slices, so bitwise equal. Stacked: (K, 1, 1) tensors and
    addcmul, equal up to rounding (the stacked layout is the accelerator default, checked on the CPU here)."""
    net, mlps, opt, refs = _sgd_pair(SGD_MEMBERS, len(SGD_MEMBERS), per_member)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        _set_grads(net, mlps, gen)
        opt.step()
        for r in refs:
            r.step()
    for k, m in enumerate(mlps):
        assert refs[k].state[m.fc["1"].weight].get("momentum_buffer") is not None or not SGD_MEMBERS[k].get("momentum")
        for l in range(1, len(SIZES)):
            mine = (net.fc[str(l)].weight[k], net.fc[str(l)].bias[k])
            ref = (m.fc[str(l)].weight, m.fc[str(l)].bias)
            for a, b in zip(mine, ref):
                if per_member:
                    assert torch.equal(a, b), (k, l)
                else:
                    torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)
    assert opt.state[net.fc["1"].weight]["momentum_buffer"].shape == net.fc["1"].weight.shape


def test_grid_sgd_layouts_agree_and_per_member_is_the_cpu_default():
    members = SGD_MEMBERS
    results = []
    for per_member in (None, True, False):
        net, mlps, opt, _ = _sgd_pair(members, len(members), per_member)
        gen = torch.Generator().manual_seed(3)
        for _ in range(4):
            _set_grads(net, mlps, gen)
            opt.step()
        results.append([p.detach().clone() for p in net.parameters()])
    for a, b, c in zip(*results):
        assert torch.equal(a, b)  # None on a CPU = per member
        torch.testing.assert_close(a, c, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("per_member", [True, False], ids=["per-member layout", "stacked layout"])
def test_grid_sgd_alive_mask_freezes_a_member_and_keeps_the_others_going(per_member):
    net, mlps, opt, refs = _sgd_pair(SGD_MEMBERS[:3], 3, per_member)
    gen = torch.Generator().manual_seed(2)
    frozen = {n: p[1].clone() for n, p in net.named_parameters()}
    alive = torch.tensor([True, False, True])
    for _ in range(3):
        _set_grads(net, mlps, gen, nan_member=1)  # member 1's gradients are NaN
        opt.step(alive=alive)
        for k in (0, 2):
            refs[k].step()
    for n, p in net.named_parameters():
        assert torch.equal(p[1], frozen[n])  # unchanged, no NaN leaked in
    for k in (0, 2):
        for l in range(1, len(SIZES)):
            torch.testing.assert_close(net.fc[str(l)].weight[k], mlps[k].fc[str(l)].weight, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("per_member", [True, False], ids=["per-member layout", "stacked layout"])
def test_grid_sgd_skipped_steps_leave_a_member_as_torch_sgd_not_stepped(per_member):
    """A step a member skips (its scaled gradients overflowed, core.loss_scale) leaves its parameters and momentum
    buffer as they were; its first step taken sets b_1 = g (with dampening, not μ·0 + (1 - τ) g), as a
    torch.optim.SGD that was simply not stepped then."""
    net, mlps, opt, refs = _sgd_pair(SGD_MEMBERS, len(SGD_MEMBERS), per_member)
    gen = torch.Generator().manual_seed(4)
    masks = [[False, True, False, True, True], [False, True, True, False, True], [True] * 5, [True, False, True,
                                                                                            True, False]]
    for mask in masks:
        _set_grads(net, mlps, gen, nan_member=mask.index(False) if False in mask else None)
        opt.step(alive=torch.tensor(mask))
        for k, ref in enumerate(refs):
            if mask[k]:
                ref.step()
    for k, mlp in enumerate(mlps):
        for l in range(1, len(SIZES)):
            for name in ("weight", "bias"):
                ours, theirs = getattr(net.fc[str(l)], name)[k], getattr(mlp.fc[str(l)], name)
                if per_member:
                    assert torch.equal(ours, theirs), (k, l, name)
                else:
                    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-15)
    assert opt.state[net.fc["1"].weight]["member_step"].tolist() == [2, 3, 3, 3, 3]


def test_grid_sgd_rejects_bad_hyperparameters():
    net, _ = _grid_of_distinct_members(2)
    with pytest.raises(ValueError, match="one value per member"):
        GridSGD(net.parameters(), lr=[0.1], momentum=[0, 0], dampening=[0, 0], weight_decay=[0, 0], nesterov=[0, 0])
    with pytest.raises(ValueError, match="nesterov"):
        GridSGD(net.parameters(), lr=[0.1, 0.1], momentum=[0, 0], dampening=[0, 0], weight_decay=[0, 0],
                nesterov=[True, False])
    with pytest.raises(ValueError, match="member axis"):
        GridSGD([torch.nn.Parameter(torch.zeros(3, 2))], lr=[0.1, 0.1], momentum=[0, 0], dampening=[0, 0],
                weight_decay=[0, 0], nesterov=[False, False])
    with pytest.raises(ValueError, match=r"member 1: nesterov must be true or false, got 'false'"):
        GridSGD(net.parameters(), lr=[0.1, 0.1], momentum=[0.9, 0.9], dampening=[0, 0], weight_decay=[0, 0],
                nesterov=[False, "false"])  # bool("false") would be True
    with pytest.raises(ValueError, match=r"member 0: lr must be a finite number >= 0, got True"):
        GridSGD(net.parameters(), lr=[True, 0.1], momentum=[0, 0], dampening=[0, 0], weight_decay=[0, 0],
                nesterov=[False, False])


def test_grid_sgd_keeps_low_precision_members_hyperparameters_in_float32():
    """On bfloat16 parameters the stacked step's hyperparameters stay float32 (momentum 0.9, not bfloat16's
    0.8984375), as torch.optim.SGD keeps them Python floats; a float64 grid keeps them float64."""
    net, _ = _grid_of_distinct_members(2)
    opt = GridSGD(net.parameters(), lr=[0.01, 0.1], momentum=[0.9, 0.0], dampening=[0, 0], weight_decay=[0, 0],
                  nesterov=[False, False], per_member=False)
    group = opt.param_groups[0]
    low = opt.member_tensors(group, torch.zeros(2, dtype=torch.bfloat16))
    assert low["momentum"].dtype == torch.float32 and low["momentum"].flatten().tolist() == [
        torch.tensor(0.9, dtype=torch.float32).item(), 0.0]
    assert opt.member_tensors(group, torch.zeros(2, dtype=torch.float64))["lr"].flatten().tolist() == [0.01, 0.1]


# ----------------------------------------------------------------------------- selection


def test_select_best_by_val_acc_then_val_loss_skipping_failed():
    assert select_best([0.80, 0.90, 0.85], [0.3, 0.5, 0.1], [False] * 3) == 1
    assert select_best([0.90, 0.90, 0.85], [0.5, 0.4, 0.1], [False] * 3) == 1  # tie: lower val loss
    assert select_best([0.90, 0.90], [0.4, 0.4], [False, False]) == 0  # full tie: lower index
    assert select_best([0.99, 0.90, math.nan], [0.1, 0.4, 0.1], [True, False, False]) == 1  # failed, NaN skipped
    with pytest.raises(RuntimeError, match="every member"):
        select_best([0.9, 0.8], [0.1, 0.1], [True, True])


# ----------------------------------------------------------------------------- training: batched == alone


def test_batched_training_equals_each_member_trained_alone_float64():
    data = TensorData()
    model = GridClassifier(members=MEMBERS, sizes=SIZES, init_seed=SEED)
    trainer(3).fit(model, datamodule=data)
    assert len(model.history["train_loss"]) == 3 and model.alive.all()
    for k, m in enumerate(MEMBERS):
        ref = train_alone(m, data, 3)
        for e in range(3):
            for name in ("train_loss", "val_loss"):
                assert model.history[name][e][k] == pytest.approx(ref[name][e], rel=1e-9), (k, e, name)
            for name in ("train_acc", "val_acc"):
                assert model.history[name][e][k] == ref[name][e], (k, e, name)
    # the members really differ (the comparison is not between identical copies)
    assert len({round(model.history["train_loss"][-1][k], 6) for k in range(len(MEMBERS))}) == len(MEMBERS)


def test_batched_training_equals_each_member_trained_alone_float32():
    data = TensorData()
    model = GridClassifier(members=MEMBERS, sizes=SIZES, init_seed=SEED)
    trainer(4, precision="32-true").fit(model, datamodule=data)
    assert model.net.fc["1"].weight.dtype == torch.float32
    for k, m in enumerate(MEMBERS):
        ref = train_alone(m, data, 4, dtype=torch.float32)
        assert abs(model.history["val_acc"][-1][k] - ref["val_acc"][-1]) <= 0.005, k
        assert abs(model.history["train_acc"][-1][k] - ref["train_acc"][-1]) <= 0.005, k
        for name in ("train_loss", "val_loss"):  # float32 rounding in other orders: ~1e-7 apart after 4 epochs
            assert model.history[name][-1][k] == pytest.approx(ref[name][-1], rel=1e-5), (k, name)


def test_diverging_member_is_marked_failed_and_the_others_are_unaffected():
    """lr 1e3 overflows float32 within the first epoch (in float64 the loss only reaches ~1e45)."""
    data = TensorData()
    members = [MEMBERS[0], dict(lr=1e3, momentum=0.9), MEMBERS[2]]
    model = GridClassifier(members=members, sizes=SIZES, init_seed=SEED)
    trainer(3, precision="32-true").fit(model, datamodule=data)
    assert model.alive.tolist() == [True, False, True]
    assert model.failed_epoch.tolist() == [-1, 0, -1]
    assert all(math.isnan(model.history[name][-1][1]) for name in model.history)
    assert all(math.isfinite(v) for p in model.net.parameters() for v in p[1].flatten().tolist())  # frozen, not NaN
    without = GridClassifier(members=[members[0], members[2]], sizes=SIZES, init_seed=SEED)
    trainer(3, precision="32-true").fit(without, datamodule=data)
    for e in range(3):
        for name in model.history:
            assert [model.history[name][e][k] for k in (0, 2)] == pytest.approx(without.history[name][e], rel=1e-6)
    for k in (0, 2):
        ref = train_alone(members[k], data, 3, dtype=torch.float32)
        assert abs(model.history["val_acc"][-1][k] - ref["val_acc"][-1]) <= 0.005
    assert select_best(model.history["val_acc"][-1], model.history["val_loss"][-1], (~model.alive).tolist()) != 1


def test_test_evaluates_only_the_selected_member():
    data = TensorData()
    model = GridClassifier(members=MEMBERS[:3], sizes=SIZES, init_seed=SEED)
    t = trainer(2)
    t.fit(model, datamodule=data)
    with pytest.raises(RuntimeError, match="test_member"):
        t.test(model, datamodule=data, verbose=False)
    model.test_member = 2
    t.test(model, datamodule=data, verbose=False)
    mlp = model.net.member(2)
    x, y = data.splits["test"]
    with torch.no_grad():
        out = mlp(x.double())
    assert model.test_result["test_acc"] == pytest.approx(float((out.argmax(1) == y).double().mean()), abs=1e-12)
    assert model.test_result["test_loss"] == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-9)
    # its confusion matrix (rows: the true class), the one the sweep shows in the selected member's TensorBoard run
    k = SIZES[-1]
    expected = torch.zeros(k, k, dtype=torch.long)
    expected.index_put_((y.cpu(), out.argmax(1).cpu()), torch.ones(len(y), dtype=torch.long), accumulate=True)
    assert torch.equal(model.test_result["confusion_matrix"], expected)


def test_checkpoint_holds_momentum_buffers_and_resume_is_exact(tmp_path):
    data = TensorData()
    full = GridClassifier(members=MEMBERS, sizes=SIZES, init_seed=SEED)
    trainer(2).fit(full, datamodule=data)

    first = GridClassifier(members=MEMBERS, sizes=SIZES, init_seed=SEED)
    t1 = trainer(1)
    t1.fit(first, datamodule=data)
    ckpt = tmp_path / "one.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    bufs = [s["momentum_buffer"] for s in saved["optimizer_states"][0]["state"].values()]
    assert len(bufs) == 2 * (len(SIZES) - 1) and bufs[0].shape[0] == len(MEMBERS)
    assert saved["optimizer_states"][0]["param_groups"][0]["momentum"] == [m.get("momentum", 0.0) for m in MEMBERS]

    # built in float32 as the sweep builds it: setup() widens it under 64-true before Lightning restores the
    # checkpoint's float64 weights (else they would be rounded through float32 on the way in)
    resumed = GridClassifier(members=MEMBERS, sizes=SIZES, init_seed=SEED)
    trainer(2).fit(resumed, datamodule=data, ckpt_path=ckpt)
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    assert resumed.history["train_loss"] == full.history["train_loss"]


def test_class_mismatch_is_explained():
    class TwoClasses(TensorData):
        class_names = ["a", "b"]

    model = GridClassifier(members=MEMBERS[:2], sizes=SIZES, init_seed=SEED)
    with pytest.raises(ValueError, match="sizes"):
        trainer(1).fit(model, datamodule=TwoClasses())


def test_several_processes_are_refused_with_the_sweep_as_the_way():
    """The batched backward runs without autograd, so DDP would never average its gradients: each process would
    train its own replica. setup() refuses it (checked on a trainer that is configured, not launched)."""
    model = GridClassifier(members=MEMBERS[:2], sizes=SIZES, init_seed=SEED)
    model.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(ValueError, match=re.escape("run `python train.py sweep --trainer.devices N`")):
        model.setup("fit")
    model.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    model.setup("fit")  # one device: fine


def test_resume_mid_epoch_equals_uninterrupted(image_folder, tmp_path):
    """Lightning calls no on_train_epoch_start for an epoch resumed mid-way: the grid must still train on exactly."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from handgrad.data.datamodule import CIFAR10DataModule

    root, _ = image_folder

    def fit(max_steps=-1, ckpt_path=None, callbacks=()):
        model = GridClassifier(grid={"lr": [0.01, 0.1], "momentum": [0.9]}, sizes=[3072, 8, 2], init_seed=0)
        data = CIFAR10DataModule(str(root), batch_size=8, download=False)
        L.Trainer(max_epochs=2, max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                  enable_checkpointing=bool(callbacks), callbacks=list(callbacks)).fit(model, data, ckpt_path=ckpt_path)
        return model

    full = fit()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=3)
    fit(max_steps=6, callbacks=[ckpt])  # 4 steps per epoch: step 6 is in the middle of the second epoch
    resumed = fit(ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    for name, w in full.net.state_dict().items():
        assert torch.equal(w, resumed.net.state_dict()[name]), name
