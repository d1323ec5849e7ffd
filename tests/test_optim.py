"""handgrad.optim.SGD against torch.optim.SGD: bitwise equal parameters after every step."""

import itertools

import pytest
import torch

import handgrad

SETTINGS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product((0.0, 0.9), (0.0, 0.5), (False, True), (0.0, 0.01), (False, True))
    if not (n and (m == 0 or d != 0))  # torch rejects these: tested in test_invalid_arguments
]


def make_params(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (7,), (3, 7), (3,)]
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def two_groups(params, lr, settings):
    """Two parameter groups: the second with its own lr and (when set) a different momentum."""
    second = dict(lr=lr * 0.5)
    if settings["momentum"] != 0:
        second["momentum"] = 0.5
    return [{"params": params[:2]}, {"params": params[2:], **second}]


def run_pair(dtype, settings, foreach, steps=50, seed=0, save_at=None):
    """Step torch's and handgrad's SGD side by side on identical gradients; assert bitwise equality after each step."""
    g = torch.Generator().manual_seed(seed + 1)
    lr = float(torch.empty(()).uniform_(0.001, 0.1, generator=g))
    ref_p = [p.requires_grad_() for p in make_params(dtype, seed)]
    our_p = [p.detach().clone().requires_grad_() for p in ref_p]
    ref = torch.optim.SGD(two_groups(ref_p, lr, settings), lr=lr, foreach=foreach, **settings)
    ours = handgrad.SGD(two_groups(our_p, lr, settings), lr=lr, foreach=foreach, **settings)
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=g, dtype=dtype) for p in ref_p]
        for p, q, gr in zip(ref_p, our_p, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        ref.step()
        ours.step()
        for p, q in zip(ref_p, our_p):
            assert torch.equal(p, q), f"step {step}: parameters differ ({settings}, foreach={foreach}, {dtype})"
        if step == save_at:  # round trip through a state dict, as a checkpoint would
            state = ours.state_dict()
            ours = handgrad.SGD(two_groups(our_p, lr, settings), lr=lr, foreach=foreach, **settings)
            ours.load_state_dict(state)
    return ref_p, our_p


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_bitwise_equal_to_torch(settings, dtype, foreach):
    ref_p, our_p = run_pair(dtype, settings, foreach)
    assert not torch.equal(ref_p[0], make_params(dtype, 0)[0])  # the parameters did move


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_state_dict_round_trip_continues_bitwise(foreach):
    settings = dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, maximize=False)
    run_pair(torch.float64, settings, foreach, save_at=20)


def test_state_dict_holds_momentum_buffers():
    p = torch.nn.Parameter(torch.ones(3))
    opt = handgrad.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    buf = opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(buf, torch.tensor([1.0, 2.0, 3.0]))  # first step: b = g
    assert torch.equal(p.detach(), torch.tensor([0.9, 0.8, 0.7]))


def test_single_and_foreach_paths_agree():
    settings = dict(momentum=0.9, dampening=0.5, nesterov=False, weight_decay=0.01, maximize=True)
    a, _ = run_pair(torch.float64, settings, foreach=False, steps=10)
    b, _ = run_pair(torch.float64, settings, foreach=True, steps=10)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_foreach_nesterov_leaves_grads_untouched():
    p = torch.nn.Parameter(torch.ones(4))
    opt = handgrad.SGD([p], lr=0.1, momentum=0.9, nesterov=True, foreach=True)
    for _ in range(3):
        p.grad = torch.full((4,), 2.0)
        opt.step()
        assert torch.equal(p.grad, torch.full((4,), 2.0))


def test_works_with_lr_scheduler():
    torch.manual_seed(0)
    ref_p = [torch.nn.Parameter(torch.randn(5, 3))]
    our_p = [torch.nn.Parameter(ref_p[0].detach().clone())]
    ref = torch.optim.SGD(ref_p, lr=0.1, momentum=0.9)
    ours = handgrad.SGD(our_p, lr=0.1, momentum=0.9)
    sched_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    sched_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=2, gamma=0.5)
    for _ in range(6):
        gr = torch.randn(5, 3)
        ref_p[0].grad, our_p[0].grad = gr.clone(), gr.clone()
        ref.step(), ours.step()
        sched_ref.step(), sched_ours.step()
    assert ours.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert torch.equal(ref_p[0], our_p[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-0.1), "Invalid learning rate"),
        (dict(lr=0.1, momentum=-0.5), "Invalid momentum value"),
        (dict(lr=0.1, weight_decay=-1.0), "Invalid weight_decay value"),
        (dict(lr=0.1, nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
        (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov momentum requires"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], **kwargs)  # the reference raises too
    with pytest.raises(ValueError, match=message):
        handgrad.SGD([torch.nn.Parameter(torch.ones(1))], **kwargs)


@pytest.mark.parametrize("foreach", [False, True])
def test_a_parameter_whose_gradient_starts_later_matches_torch(foreach):
    """b gets its first gradient at step 3, when a's momentum buffer already exists: the foreach path then mixes
    new and old buffers in one group (its own branch). Bitwise equal to torch.optim.SGD at every step."""
    g = torch.Generator().manual_seed(3)
    grads = [(torch.randn(5, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64))
             for _ in range(6)]
    ours = [torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64)) for n in (5, 4)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    hp = dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.01)
    opts = handgrad.SGD(ours, foreach=foreach, **hp), torch.optim.SGD(theirs, foreach=foreach, **hp)
    for step, (ga, gb) in enumerate(grads):
        for params, opt in zip((ours, theirs), opts):
            params[0].grad = ga.clone()
            params[1].grad = gb.clone() if step >= 2 else None
            opt.step()
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q), step
    assert not torch.equal(theirs[1].detach(), ours[1].detach() * 0)  # (b moved)


def test_skips_parameters_without_grad():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = handgrad.SGD([a, b], lr=0.5, momentum=0.9)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(a.detach(), torch.full((2,), 0.5))
    assert torch.equal(b.detach(), torch.ones(2))
    assert "momentum_buffer" not in opt.state[b]
