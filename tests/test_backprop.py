"""Hand-written backward against autograd and central finite differences; the course entry point."""

import random

import pytest
import torch
import torch.nn.functional as F
from course_models import CourseNet  # the course's way of writing a model (also loaded by verify)

from handgrad.core import activations
from handgrad.core import losses
from handgrad.core.backprop import backpropagation, backward
from handgrad.core.mlp import MLP
from handgrad.verify.checks import central_differences

ACTS = sorted(activations.ACTIVATIONS)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def random_case(seed, activation, loss, reduction):
    """A random-depth (1-5 layers), random-width float64 MLP, a batch, and its targets."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    sizes = [rng.randint(2, 7) for _ in range(rng.randint(1, 5) + 1)]
    out_act = rng.choice([None, "tanh", "sigmoid"]) if loss == "mse" else None
    model = MLP(sizes, activation=activation, output_activation=out_act).double()
    n = rng.randint(1, 9)
    x = torch.randn(n, sizes[0], dtype=torch.float64)
    if loss == "mse":
        y = torch.randn(n, sizes[-1], dtype=torch.float64)
        fn = lambda out: losses.mse(out, y, reduction)
        ref = lambda out: F.mse_loss(out, y, reduction=reduction)
    else:
        y = torch.randint(0, sizes[-1], (n,))
        fn = lambda out: losses.cross_entropy(out, y, reduction)
        ref = lambda out: F.cross_entropy(out, y, reduction=reduction)
    return model, x, fn, ref


CASES = [(a, l, r, s) for a in ACTS for l in ("mse", "cross_entropy") for r in ("mean", "sum") for s in range(3)]


@pytest.mark.parametrize("activation, loss, reduction, seed", CASES)
def test_backward_matches_autograd(activation, loss, reduction, seed):
    model, x, fn, ref = random_case(seed, activation, loss, reduction)
    out = model(x)
    ref_loss = ref(out)
    grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    ref_grads = dict(zip([n for n, _ in model.named_parameters()], grads))

    with torch.no_grad():  # the hand-written path must not need autograd
        out = model(x)
        value, dout = fn(out)
        backward(model, dout)
    assert torch.allclose(value, ref_loss.detach(), rtol=1e-13, atol=0)
    for l in range(1, model.L + 1):
        w, b = model.fc[str(l)].weight, model.fc[str(l)].bias
        assert rel_err(model.dL_dw[l], ref_grads[f"fc.{l}.weight"]) < 1e-10, f"W^{l}"
        assert rel_err(model.dL_db[l], ref_grads[f"fc.{l}.bias"]) < 1e-10, f"b^{l}"
        assert w.grad is model.dL_dw[l] and b.grad is model.dL_db[l]  # write_grad=True: .grad, for the optimizer
    addresses = [p.grad.data_ptr() for p in model.parameters()]
    with torch.no_grad():
        backward(model, fn(model(x))[1])
    assert [p.grad.data_ptr() for p in model.parameters()] == addresses  # the .grad buffers are reused


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_backward_matches_finite_differences(activation, loss):
    model, x, fn, _ = random_case(7, activation, loss, "mean")
    with torch.no_grad():
        _, dout = fn(model(x))
        backward(model, dout)
        eps = 1e-6
        for l in range(1, model.L + 1):
            for p, g in ((model.fc[str(l)].weight, model.dL_dw[l]), (model.fc[str(l)].bias, model.dL_db[l])):
                fd = central_differences(lambda: fn(model(x))[0], p.view(-1), range(p.numel()), eps).view_as(p)
                assert rel_err(g, fd) < 1e-6, f"layer {l}, {tuple(p.shape)}"


@pytest.mark.parametrize("activation", ACTS)
def test_derivatives_at_zero_and_signed_zero_equal_autograd(activation):
    """Random inputs never hit z = 0 exactly, where relu and leaky_relu have a kink: f'(±0) must be autograd's."""
    z = torch.tensor([-1.5, -0.0, 0.0, 2.0, 1e-300, -1e-300], dtype=torch.float64, requires_grad=True)
    f, df = activations.ACTIVATIONS[activation]
    f(z).sum().backward()
    torch.testing.assert_close(df(z.detach()), z.grad, rtol=1e-15, atol=0)  # (tanh: 1 - t^2 may differ by an ulp)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.uint16, torch.uint32,
                                   torch.uint64])
def test_cross_entropy_takes_class_indices_of_any_integer_dtype(dtype):
    logits = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 2, 3, 0])
    ref = losses.cross_entropy(logits, y)
    for ours, theirs in zip(losses.cross_entropy(logits, y.to(dtype)), ref):
        assert torch.equal(ours, theirs)
    torch.testing.assert_close(ref[0], F.cross_entropy(logits, y), rtol=1e-14, atol=0)
    for bad in (y.double(), y.bool()):
        with pytest.raises(TypeError, match="class indices"):
            losses.cross_entropy(logits, bad)


def test_backward_needs_a_forward_pass_and_right_shape():
    model = MLP([4, 3, 2]).double()
    with pytest.raises(RuntimeError, match="call model"):
        backward(model, torch.zeros(5, 2, dtype=torch.float64))
    model(torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="grad_output has shape"):
        backward(model, torch.zeros(5, 3, dtype=torch.float64))


def test_unknown_activation_and_bad_sizes():
    with pytest.raises(ValueError, match=r"activation must be one of \[.*\], got 'swish'"):
        MLP([4, 2], activation="swish")
    with pytest.raises(ValueError, match="at least two"):
        MLP([4])
    with pytest.raises(ValueError, match="expects n_0 = 4"):
        MLP([4, 2])(torch.randn(3, 5))


# --- the course entry point: backpropagation(model, y_true, y_pred) with the sum of squared errors ---


@pytest.mark.parametrize("net", [CourseNet, lambda s: MLP(s, activation="tanh", output_activation="tanh")])
@pytest.mark.parametrize("sizes", [[2, 3, 2], [576, 16, 10]])
@pytest.mark.parametrize("batch", [None, 1, 8])  # None: a single sample without a batch axis
def test_backpropagation_course_entry_point(net, sizes, batch):
    torch.manual_seed(0)
    model = net(sizes).double()
    shape_x = (sizes[0],) if batch is None else (batch, sizes[0])
    shape_y = (sizes[-1],) if batch is None else (batch, sizes[-1])
    x, y = torch.randn(shape_x, dtype=torch.float64), torch.randn(shape_y, dtype=torch.float64)
    if batch is None and isinstance(model, MLP):
        x = x[None]  # MLP takes batches; the course net also takes a bare vector
        y = y[None]
    y_pred = model(x)
    ref = torch.autograd.grad(((y_pred - y) ** 2).sum(), list(model.parameters()))
    ref = dict(zip([n for n, _ in model.named_parameters()], ref))
    backpropagation(model, y, y_pred.detach())
    for l in range(1, model.L + 1):
        assert rel_err(model.dL_dw[l], ref[f"fc.{l}.weight"]) < 1e-12
        assert rel_err(model.dL_db[l], ref[f"fc.{l}.bias"]) < 1e-12
        assert model.fc[str(l)].weight.grad is None and model.fc[str(l)].bias.grad is None  # .grad untouched


# --- the course's grader: autograd's .grad, then backpropagation(), compare, step torch.optim.SGD on .grad ---


class WrongCourseNet(CourseNet):
    """A student's mistake: f'(z) of tanh written as 1 - tanh(z) instead of 1 - tanh(z)^2."""

    def __init__(self, sizes):
        super().__init__(sizes)
        self.df = {l: (lambda z: 1 - torch.tanh(z)) for l in range(1, self.L + 1)}


def grader_step(model, opt, x, y):
    """One step of the grader's loop. Returns the largest relative error between the student's dL_dw/dL_db and
    autograd's .grad, after checking that backpropagation() left .grad bitwise as autograd wrote it."""
    opt.zero_grad()
    y_pred = model(x)
    ((y_pred - y) ** 2).sum().backward()
    params = list(model.parameters())
    autograd = [p.grad.clone() for p in params]
    backpropagation(model, y, y_pred)
    for p, g in zip(params, autograd):
        assert torch.equal(p.grad, g), "backpropagation() changed autograd's .grad"
    errors = []
    for l in range(1, model.L + 1):
        layer = model.fc[str(l)]
        assert model.dL_dw[l] is not layer.weight.grad and model.dL_db[l] is not layer.bias.grad
        errors += [rel_err(model.dL_dw[l], layer.weight.grad), rel_err(model.dL_db[l], layer.bias.grad)]
    opt.step()  # torch.optim.SGD on autograd's .grad
    return max(errors)


def grader_data(sizes=(4, 5, 3), n=6):
    torch.manual_seed(1)
    return torch.randn(n, sizes[0], dtype=torch.float64), torch.randn(n, sizes[-1], dtype=torch.float64)


def test_course_grader_loop_compares_against_autograd():
    """tanh CourseNet, 5 steps of the grader: .grad unchanged by backpropagation(), dL_dw/dL_db agree with it to
    1e-12, and the trained weights are those of plain autograd + torch.optim.SGD, bit for bit."""
    x, y = grader_data()
    torch.manual_seed(0)
    model = CourseNet([4, 5, 3]).double()
    ref = CourseNet([4, 5, 3]).double()
    ref.load_state_dict(model.state_dict())
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, ref))
    for _ in range(5):
        assert grader_step(model, opt, x, y) < 1e-12
        ref_opt.zero_grad()
        ((ref(x) - y) ** 2).sum().backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_course_grader_catches_a_wrong_derivative():
    x, y = grader_data()
    torch.manual_seed(0)
    model = WrongCourseNet([4, 5, 3]).double()
    assert grader_step(model, torch.optim.SGD(model.parameters(), lr=0.05), x, y) > 0.01


def test_zero_grad_and_later_backward_leave_dL_dw_alone():
    x, y = grader_data()
    torch.manual_seed(0)
    model = CourseNet([4, 5, 3]).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    y_pred = model(x)
    ((y_pred - y) ** 2).sum().backward()
    backpropagation(model, y, y_pred)
    saved = {l: (model.dL_dw[l].clone(), model.dL_db[l].clone()) for l in model.dL_dw}
    opt.zero_grad(set_to_none=False)  # .grad zeroed in place
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    (model(x) ** 3).sum().backward()  # another autograd backward accumulates into .grad
    for l, (dw, db) in saved.items():
        assert torch.equal(model.dL_dw[l], dw) and torch.equal(model.dL_db[l], db)
        assert torch.count_nonzero(dw) > 0


# --- the course's "train vs train_manual_update" check on the reference architecture ---


def _train(backprop, optimizer, epochs=5, batch=64, n=512):
    """Train the reference MLP (float64) on fixed random images; return the loss of every step."""
    torch.manual_seed(0)
    x = torch.randn(n, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 2, (n,))
    model = MLP([3072, 512, 128, 32, 2]).double()
    opt_cls = {"handgrad": __import__("handgrad").SGD, "torch": torch.optim.SGD}[optimizer]
    opt = opt_cls(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.001)
    out = []
    for _ in range(epochs):
        for i in range(0, n, batch):
            xb, yb = x[i : i + batch], y[i : i + batch]
            if backprop == "handgrad":
                with torch.no_grad():
                    loss, dout = losses.cross_entropy(model(xb), yb)
                    backward(model, dout)
            else:
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
            opt.step()
            out.append(loss.detach())
    return torch.stack(out)


def test_training_equivalence_reference_mlp():
    hand = _train("handgrad", "handgrad")
    ref = _train("autograd", "torch")
    assert len(ref) == 40 and ref[-1] < ref[0]  # it learns
    assert torch.allclose(hand, ref, rtol=1e-12, atol=0), (hand - ref).abs().max()
    # same (autograd) gradients into both optimizers: the losses are bitwise equal
    assert torch.equal(_train("autograd", "handgrad"), ref)
