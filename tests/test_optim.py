"""handgrad.core.optim.SGD against torch.optim.SGD: bitwise equal parameters after every step."""

import inspect
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


# --- torch.optim.SGD's whole contract: keywords, param_groups, state dicts both ways, sparse, differentiable, fused ---


def test_signature_is_torchs():
    """Every keyword of torch.optim.SGD, of the same kind and with the same default."""
    ours, theirs = inspect.signature(handgrad.SGD), inspect.signature(torch.optim.SGD)
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.parameters.values()]


@pytest.mark.parametrize("kwargs", [{}, dict(momentum=0.9, nesterov=True, foreach=True, differentiable=False,
                                              fused=False, maximize=True, weight_decay=0.1)])
def test_param_groups_equal_torchs(kwargs):
    ps = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    ours = handgrad.SGD([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.5}], lr=0.1, **kwargs)
    theirs = torch.optim.SGD([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.5}], lr=0.1, **kwargs)
    assert ours.state_dict() == theirs.state_dict()
    assert ours.param_groups[0].keys() == theirs.param_groups[0].keys()


@pytest.mark.parametrize("first", ["torch", "handgrad"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_state_dict_loads_into_the_other_optimizer(first, foreach):
    """10 steps with one optimizer, its state dict loaded into the other, 10 more steps: bitwise equal to 20 steps
    of torch.optim.SGD alone, and the loaded optimizer's state dict equals the one it was given."""
    classes = {"torch": torch.optim.SGD, "handgrad": handgrad.SGD}
    second = "handgrad" if first == "torch" else "torch"
    hp = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, foreach=foreach)
    g = torch.Generator().manual_seed(5)
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in ((4, 3), (4,))] for _ in range(20)]
    start = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((4, 3), (4,))]
    ref = [torch.nn.Parameter(t.clone()) for t in start]
    mixed = [torch.nn.Parameter(t.clone()) for t in start]
    ref_opt = torch.optim.SGD([{"params": ref[:1]}, {"params": ref[1:], "lr": 0.02}], **hp)
    opt = classes[first]([{"params": mixed[:1]}, {"params": mixed[1:], "lr": 0.02}], **hp)
    for step, gs in enumerate(grads):
        if step == 10:
            state = opt.state_dict()
            opt = classes[second]([{"params": mixed[:1]}, {"params": mixed[1:]}], lr=0.3)
            opt.load_state_dict(state)
            assert opt.state_dict() == state
        for p, q, gr in zip(ref, mixed, gs):
            p.grad, q.grad = gr.clone(), gr.clone()
        ref_opt.step()
        opt.step()
        for p, q in zip(ref, mixed):
            assert torch.equal(p, q), step


def sparse_grad(step, dtype):
    """An uncoalesced sparse gradient of a 3-vector (index 0 twice, index 1 never)."""
    return torch.sparse_coo_tensor(torch.tensor([[0, 0, 2]]), torch.tensor([1.0, -2.0, 0.5 + step], dtype=dtype), (3,),
                                   check_invariants=True)


SPARSE_SETTINGS = [dict(), dict(maximize=True), dict(momentum=0.9), dict(momentum=0.9, dampening=0.5),
                   dict(momentum=0.9, nesterov=True), dict(momentum=0.9, nesterov=True, maximize=True)]


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("settings", SPARSE_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sparse_gradients_bitwise_equal_to_torch(settings, foreach):
    """Sparse gradients as torch.optim.SGD takes them: the same parameters and (sparse) momentum buffers."""
    ours = [torch.nn.Parameter(torch.tensor([1.5, 1.5, -0.5], dtype=dt)) for dt in (torch.float64, torch.float32)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opts = [cls(ps, lr=0.1, foreach=foreach, **settings)
            for cls, ps in ((handgrad.SGD, ours), (torch.optim.SGD, theirs))]
    for step in range(4):
        for ps, opt in zip((ours, theirs), opts):
            for p in ps:
                p.grad = sparse_grad(step, p.dtype)
            opt.step()
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q), step
            assert p[1] == 1.5  # no gradient there: unchanged
            if "momentum" in settings:
                b, c = opts[0].state[p]["momentum_buffer"], opts[1].state[q]["momentum_buffer"]
                assert b.is_sparse and torch.equal(b.to_dense(), c.to_dense())


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_sparse_gradients_with_weight_decay_refused_as_torch(foreach):
    """torch.optim.SGD cannot add λ p (dense) to a sparse gradient; neither can handgrad: the same error."""
    for cls in (torch.optim.SGD, handgrad.SGD):
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = sparse_grad(0, torch.float32)
        with pytest.raises(RuntimeError, match=r"add\(sparse, dense\) is not supported"):
            cls([p], lr=0.1, weight_decay=0.1, foreach=foreach).step()


def test_fused_true_is_refused_naming_foreach():
    p = torch.nn.Parameter(torch.ones(3))
    for make in (lambda: handgrad.SGD([p], lr=0.1, fused=True),
                 lambda: handgrad.SGD([{"params": [p], "fused": True}], lr=0.1)):
        with pytest.raises(NotImplementedError, match=r"fused=True.*foreach=True"):
            make()
    for fused in (None, False):
        handgrad.SGD([p], lr=0.1, fused=fused)
    # a torch checkpoint written with fused=True: loading works, stepping says why it cannot go on
    q = torch.nn.Parameter(torch.ones(3))
    torch_fused = torch.optim.SGD([q], lr=0.1, momentum=0.9, fused=True)
    q.grad = torch.ones(3)
    torch_fused.step()
    ours = handgrad.SGD([p], lr=0.1, momentum=0.9)
    ours.load_state_dict(torch_fused.state_dict())
    p.grad = torch.ones(3)
    with pytest.raises(NotImplementedError, match="foreach=True"):
        ours.step()


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_differentiable_step_has_torchs_values(settings):
    """differentiable=True changes what autograd records, not the numbers: bitwise equal to torch.optim.SGD."""
    g = torch.Generator().manual_seed(2)
    ours = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    theirs = ours.detach().clone().requires_grad_()
    p, q = ours.clone(), theirs.detach().clone()  # p: a non-leaf, so the step may change it in place
    opt_p = handgrad.SGD([p], lr=0.1, differentiable=True, **settings)
    opt_q = torch.optim.SGD([q], lr=0.1, **settings)
    for _ in range(4):
        gr = torch.randn(6, dtype=torch.float64, generator=g)
        p.grad, q.grad = gr.clone(), gr.clone()
        opt_p.step()
        opt_q.step()
        assert torch.equal(p.detach(), q)
    assert p.grad_fn is not None  # autograd recorded the steps


D = torch.float64


def multistep_loss(kwargs, steps=3):
    """f(p_0, g_0, b_0, hyperparameters) = loss after ``steps`` differentiable SGD steps on ((p·x) - 2)^2, whose
    gradients are taken with create_graph, so autograd differentiates through every step (p_0, the extra first
    gradient g_0, the momentum buffer b_0 and the hyperparameters given as tensors)."""
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    x = torch.tensor([1.0, -2.0, 0.5], dtype=D)

    def f(p0, g0, b0, *hps):
        p = p0.clone()
        opt = handgrad.SGD([p], differentiable=True, **{**kwargs, **dict(zip(names, hps))})
        if kwargs.get("momentum", 0):
            opt.state[p]["momentum_buffer"] = b0.clone()
        for step in range(steps):
            loss = ((p * x).sum() - 2.0) ** 2
            p.grad = torch.autograd.grad(loss, p, create_graph=True)[0] + (g0 if step == 0 else 0)
            opt.step()
            opt.zero_grad()
        return ((p * x).sum() - 2.0) ** 2, p

    return f, [kwargs[n] for n in names]


def tensor(value):
    return torch.tensor(value, dtype=D, requires_grad=True)


@pytest.mark.parametrize("kwargs", [
    dict(lr=tensor(0.1)),
    dict(lr=0.1, weight_decay=tensor(0.3)),
    dict(lr=tensor(0.1), weight_decay=tensor(0.3)),
    dict(lr=0.1, momentum=0.9),
    dict(lr=tensor(0.1), momentum=0.9, dampening=0.2, weight_decay=tensor(0.3)),
    dict(lr=tensor(0.1), momentum=0.9, nesterov=True, maximize=True, weight_decay=0.3),
], ids=["lr", "weight_decay", "lr,weight_decay", "momentum_buffer", "lr,weight_decay,momentum,dampening",
        "lr,nesterov,maximize"])
def test_differentiable_gradcheck(kwargs):
    """autograd through three steps agrees with finite differences (gradcheck) for p_0, g_0, the momentum buffer
    and the tensor hyperparameters. torch.optim.SGD fails the lr+weight_decay+momentum case (an in-place update
    of a tensor autograd saved)."""
    f, hps = multistep_loss(kwargs)
    torch.manual_seed(0)
    inputs = [torch.rand(3, dtype=D, requires_grad=True) for _ in range(3)] + hps
    assert torch.autograd.gradcheck(f, inputs)


def test_differentiable_first_momentum_step_follows_the_gradient():
    """b_1 = g: the first step's momentum buffer is the gradient itself, so dp_1/dg = -γ I (gradcheck).
    (torch.optim.SGD detaches b_1 from g and gives 0 here.)"""
    def f(p0, g0):
        p = p0.clone()
        p.grad = g0.clone()
        handgrad.SGD([p], lr=0.5, momentum=0.9, differentiable=True).step()
        return p

    p0, g0 = (torch.rand(3, dtype=D, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(f, (p0, g0))
    jac = torch.autograd.functional.jacobian(f, (p0, g0))[1]
    assert torch.equal(jac, -0.5 * torch.eye(3, dtype=D))
