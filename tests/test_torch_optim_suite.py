"""PyTorch's own optimizer tests, run on handgrad.optim.SGD (CPU).

A port of pytorch/pytorch's ``test/test_optim.py`` class ``TestOptimRenewed`` (the tests that apply to SGD on
a CPU) and of the SGD tests of ``test/optim/test_optim.py`` class ``TestDifferentiableOptimizer``, written anew
from their upstream versions of 2024-2025 (the installed torch is 2.14.1; its wheel ships the test database but
not these test files). Each test keeps its upstream name and checks.

The configurations are torch's own: the SGD entry of ``torch.testing._internal.common_optimizers.optim_db`` (its
optimizer inputs, error inputs, LR schedulers, sparse settings and skips), with ``optim_cls`` replaced by
``handgrad.optim.SGD`` and ``"fused"`` removed from its implementations, because handgrad refuses
``fused=True``. torch's ``@optims`` decorator and ``instantiate_device_type_tests`` generate one test per
(test, parameters, dtype) on the CPU, as upstream does. ``torch.testing._internal`` is not a public API: it is
used here because it *is* torch's test database, so these tests follow what torch tests; if it changes shape,
this module fails to import (a loud failure, not a silent pass).

Not ported (they need what a CPU run does not have): the CUDA/multi-GPU/large-memory tests
(``test_forloop_goes_right_direction_multigpu``, ``test_mixed_device_dtype``, ``test_state_dict_with_cuda_params``,
``test_set_default_dtype_works_with_foreach``, ``test_foreach_large_tensor``, ``test_peak_memory_foreach``,
``test_defaults_changed_to_foreach``), the tests of other optimizers (``test_adamw_serialization``,
``test_second_order_optims_return_consistent_types``), and every ``fused`` test (refused by design).

``HANDGRAD_SUITE_OPTIM=torch pytest tests/test_torch_optim_suite.py`` runs the same tests on torch.optim.SGD
(with its fused tests) for comparison.
"""

import functools
import math
import os
import tempfile
from copy import copy, deepcopy

import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_device_type import instantiate_device_type_tests, onlyCPU
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    TensorTracker,
    _get_optim_inputs_including_global_cliquey_kwargs as all_inputs,
    optim_db,
    optims,
)
from torch.testing._internal.common_utils import TestCase, parametrize

import handgrad

# Importing torch.testing._internal.common_utils freezes torch.backends' flags (torch.backends.disable_global_flags(),
# for torch's own test runs). pytest imports every test module before running any, so Lightning's Trainer in the
# other test files could then not set torch.backends.cudnn.benchmark (it does with deterministic=True):
# unfreeze them again (the flag is a global of torch/backends/__init__.py, read by flags_frozen()).
# test_backend_flags_stay_settable fails if torch renames it.
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True


def sgd_info(optimizer: str):
    """torch's OptimizerInfo for SGD, or a copy for handgrad's SGD without the fused implementation."""
    torch_sgd = next(o for o in optim_db if o.optim_cls is torch.optim.SGD)
    if optimizer == "torch":
        return torch_sgd
    ours = copy(torch_sgd)
    ours.optim_cls = handgrad.SGD
    ours.supported_impls = tuple(i for i in torch_sgd.supported_impls if i != "fused")
    ours.supports_fused_on = ()
    return ours


DB = [sgd_info(os.environ.get("HANDGRAD_SUITE_OPTIM", "handgrad"))]


def rosenbrock(t):
    x, y = t
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def drosenbrock(t):
    x, y = t
    return torch.stack((-400 * x * (y - x**2) - 2 * (1 - x), 200 * (y - x**2)))


def linear_problem(device, dtype, contiguous=True):
    """weight (10, 5), bias (10) as Parameters (strided views when not contiguous) and an input (5)."""
    if contiguous:
        weight, bias = torch.randn(10, 5, device=device, dtype=dtype), torch.randn(10, device=device, dtype=dtype)
    else:
        weight = torch.randn(10, 5, 2, device=device, dtype=dtype)[..., 0]
        bias = torch.randn(10, 2, device=device, dtype=dtype)[..., 0]
    return Parameter(weight), Parameter(bias), torch.randn(5, device=device, dtype=dtype)


def step_schedulers(schedulers, loss):
    for s in schedulers:
        s.step(loss) if isinstance(s, ReduceLROnPlateau) else s.step()


def state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1

def state_dict_post_hook(optimizer, state_dict):
    state_dict["ran_state_dict_pre_hook"] = state_dict["state"].pop("test", None) is not None
    return state_dict

def load_state_dict_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002

def load_state_dict_pre_hook2(optimizer, state_dict):
    mine = deepcopy(state_dict)  # a hook may return a new state dict: that one is loaded
    mine["param_groups"][0]["lr"] = 0.003
    return mine

def load_state_dict_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


class TestOptimRenewed(TestCase):
    # ---- the update goes the right way ----

    @onlyCPU
    @optims(DB)
    def test_optim_infos_do_not_specify_global_cliquey_kwargs(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device=device):
            self.assertFalse({"foreach", "fused", "differentiable"} & set(optim_input.kwargs))

    @optims([o for o in DB if o.optim_error_inputs_func is not None])
    def test_errors(self, device, dtype, optim_info):
        for error_input in optim_info.optim_error_inputs_func(device=device, dtype=dtype):
            inp = error_input.optimizer_error_input
            check = self.assertWarnsRegex if issubclass(error_input.error_type, Warning) else self.assertRaisesRegex
            if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
                with check(error_input.error_type, error_input.error_regex):
                    optim_info.optim_cls(inp.params, **inp.kwargs)
            else:
                optimizer = optim_info.optim_cls(inp.params, **inp.kwargs)
                with check(error_input.error_type, error_input.error_regex):
                    optimizer.step()

    @parametrize("contiguous", [True, False])
    @parametrize("with_lrsched", [True, False])
    @optims(DB, dtypes=[torch.float32])
    def test_forloop_goes_right_direction(self, device, dtype, optim_info, contiguous, with_lrsched):
        for schedulers_c in optim_info.scheduler_inputs if with_lrsched else [[]]:
            for optim_input in optim_info.optim_inputs_func(device=device):  # fresh inputs: a tensor lr mutates
                weight, bias, x = linear_problem(device, dtype, contiguous)
                optimizer = optim_info.optim_cls([weight, bias], **optim_input.kwargs, foreach=False)
                schedulers = [s(optimizer) for s in schedulers_c]

                def closure():
                    optimizer.zero_grad()
                    loss = (weight.mv(x) + bias).pow(2).sum()
                    loss.backward()
                    return loss

                initial = closure().item()
                for _ in range(20):
                    loss = closure()
                    optimizer.step()
                    step_schedulers(schedulers, loss)
                if optim_input.kwargs.get("maximize", False):
                    self.assertGreater(closure().item(), initial)
                else:
                    self.assertLess(closure().item(), initial)

    @optims(DB, dtypes=[torch.float32])
    def test_param_group_with_lrscheduler_goes_right_direction(self, device, dtype, optim_info):
        for schedulers_c in optim_info.scheduler_inputs:
            weight = Parameter(torch.randn(10, 5, device=device, dtype=dtype))
            weight2 = Parameter(torch.randn(10, 5, device=device, dtype=dtype))
            x = torch.randn(5, device=device, dtype=dtype)
            optimizer = optim_info.optim_cls([{"params": [weight]}, {"params": [weight2], "lr": 0.01}])
            schedulers = [s(optimizer) for s in schedulers_c]

            def closure():
                optimizer.zero_grad()
                loss = (weight.mv(x) + weight2.mv(x)).pow(2).sum()
                loss.backward()
                return loss

            initial = closure().item()
            for _ in range(20):
                step_schedulers(schedulers, optimizer.step(closure))
            self.assertLess(closure().item(), initial)

    @parametrize("num_dim", [0, 1, 2])
    @optims(DB, dtypes=[torch.float32])
    def test_tensor_lr(self, device, dtype, optim_info, num_dim):
        for optim_input in all_inputs(device, dtype, optim_info, skip=("differentiable",)):
            weight, bias, x = linear_problem(device, dtype)
            weight_c, bias_c = (p.detach().clone().requires_grad_() for p in (weight, bias))
            kwargs = {**optim_input.kwargs, "lr": 1e-3}
            optimizer_r = optim_info.optim_cls([weight, bias], **kwargs)
            kwargs["lr"] = torch.tensor(1e-3).reshape([1] * num_dim)
            optimizer = optim_info.optim_cls([weight_c, bias_c], **kwargs)
            for _ in range(5):
                for opt, w, b in ((optimizer_r, weight, bias), (optimizer, weight_c, bias_c)):
                    opt.zero_grad()
                    (w.mv(x) + b).pow(2).sum().backward()
                    opt.step()
                self.assertEqual(weight, weight_c)
                self.assertEqual(bias, bias_c)

    @parametrize("with_lrsched", [True, False])
    @optims([o for o in DB if o.supports_sparse], dtypes=[torch.float64])
    def test_rosenbrock_sparse(self, device, dtype, optim_info, with_lrsched):
        """Cyclic coordinate descent on Rosenbrock with uncoalesced sparse gradients, against the same run with
        dense gradients; the settings torch tunes for sparse (metadata_for_sparse) replace the inputs' own."""
        kwarg_updates, schedulers_c = optim_info.metadata_for_sparse
        if with_lrsched and not schedulers_c:
            return
        inputs, seen = [], set()
        for inp in all_inputs(device, dtype, optim_info, skip=("differentiable", "fused")):
            kwargs = {k: v for k, v in inp.kwargs.items() if k not in kwarg_updates}
            key = tuple(sorted(kwargs.items()))
            if kwargs and key not in seen:
                seen.add(key)
                inputs.append({**kwargs, **({"lr": kwarg_updates["lr"]} if "lr" in kwarg_updates else {})})
        for kwargs in inputs:
            multi_tensor = kwargs.get("foreach", False)
            start = [torch.tensor([1.5, 1.5])] + ([torch.tensor([1.5, 1.5], dtype=dtype)] if multi_tensor else [])
            params, params_c = [Parameter(t.clone()) for t in start], [Parameter(t.clone()) for t in start]
            optimizer, optimizer_c = optim_info.optim_cls(params, **kwargs), optim_info.optim_cls(params_c, **kwargs)
            schedulers = [s(optimizer) for s in schedulers_c] if with_lrsched else []
            schedulers_cc = [s(optimizer_c) for s in schedulers_c] if with_lrsched else []
            solution = torch.tensor([1, 1])
            with torch.no_grad():
                initial_dist = sum(p.dist(solution) for p in params)

            def gradient(p, sparse, w):
                grad = drosenbrock(p)  # only the x (w = 1) or the y component, split in two sparse entries
                if sparse:
                    i, v = ((torch.tensor([[0, 0]]), torch.stack([grad[0] / 4, grad[0] - grad[0] / 4])) if w else
                            (torch.tensor([[1, 1]]), torch.stack([grad[1] - grad[1] / 4, grad[1] / 4])))
                    return torch.sparse_coo_tensor(i, v.detach(), (2,), dtype=v.dtype)
                return torch.tensor([grad[0], 0] if w else [0, grad[1]], dtype=p.dtype)

            def closure(opt, ps, sparse, w):
                opt.zero_grad()
                loss = sum(rosenbrock(p) for p in ps)
                loss.backward()
                grads = [gradient(p, sparse, w) for p in ps]
                with torch.no_grad():
                    for p, g in zip(ps, grads):
                        p.grad = g.to(p.dtype)
                return loss

            for i in range(1800):
                w = i % 2
                optimizer.step(functools.partial(closure, optimizer, params, True, w))
                step_schedulers(schedulers, rosenbrock(params[0]))
                optimizer_c.step(functools.partial(closure, optimizer_c, params_c, False, w))
                step_schedulers(schedulers_cc, rosenbrock(params_c[0]))
                for p, q in zip(params, params_c):  # x against x - x/4 + x/4: close, not equal
                    self.assertTrue(torch.allclose(p, q, atol=5e-6, rtol=5e-6), i)
            if kwargs.get("maximize", False):
                self.assertGreaterEqual(sum(rosenbrock(p) for p in params), sum(rosenbrock(t) for t in start))
            else:
                self.assertLessEqual(sum(p.dist(solution) for p in params), initial_dist)

    @optims([o for o in DB if o.supports_complex], dtypes=[torch.complex64])
    def test_complex(self, device, dtype, optim_info):
        """Complex parameters step exactly as their view_as_real twins (the last parameter is real)."""
        for optim_input in all_inputs(device, dtype, optim_info, skip=("differentiable", "fused")):
            complex_params = [torch.randn(10, 5, device=device, dtype=dtype, requires_grad=True),
                              torch.randn(10, device=device, dtype=dtype, requires_grad=True),
                              torch.randn(10, 5, device=device, dtype=torch.float32, requires_grad=True)]
            real_params = [(torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
                           for p in complex_params]
            complex_opt = optim_info.optim_cls(complex_params, **optim_input.kwargs)
            real_opt = optim_info.optim_cls(real_params, **optim_input.kwargs)
            real_steps, complex_steps = [], []
            for _ in range(3):
                for p, q in zip(real_params, complex_params):
                    g = torch.randn_like(p)
                    real_steps.append(p.detach().clone())
                    complex_steps.append(torch.view_as_real_copy(q.detach()) if q.is_complex() else q.detach().clone())
                    p.grad = g
                    q.grad = torch.view_as_complex(g.clone()) if q.is_complex() else g.clone()
                real_opt.step()
                complex_opt.step()
            self.assertEqual(real_params, [torch.view_as_real(p) if p.is_complex() else p for p in complex_params])
            self.assertEqual(complex_steps, real_steps)

    @optims([o for o in DB if o.supports_complex], dtypes=[torch.complex64])
    def test_complex_2d(self, device, dtype, optim_info):
        """A complex 2-vector against its real and imaginary parts as two real parameters, on |rosenbrock|."""
        for optim_input in all_inputs(device, dtype, optim_info, skip=("differentiable", "fused")):
            a1 = torch.randn(2, device=device, dtype=dtype, requires_grad=True)
            a1_real, a1_imag = a1.real.detach().clone().requires_grad_(), a1.imag.detach().clone().requires_grad_()
            optim1 = optim_info.optim_cls([a1], **optim_input.kwargs)
            optim2 = optim_info.optim_cls([a1_real, a1_imag], **optim_input.kwargs)
            trackers = [TensorTracker() for _ in range(5)]  # real, imag, grad real, grad imag, loss
            for _ in range(3):
                optim1.zero_grad()
                loss = rosenbrock(a1).abs()
                loss.backward()
                for t, v in zip(trackers, (a1.real, a1.imag, a1.grad.real, a1.grad.imag, loss)):
                    t.add(v)
                optim2.zero_grad()
                trackers[0].pop_check_set(a1_real, self)
                trackers[1].pop_check_set(a1_imag, self)
                loss2 = rosenbrock(torch.complex(a1_real, a1_imag)).abs()
                trackers[4].pop_check_set(loss2, self)
                loss2.backward()
                trackers[2].pop_check_set(a1_real.grad, self)
                trackers[3].pop_check_set(a1_imag.grad, self)
                optim1.step()
                optim2.step()
                self.assertEqual(a1.real, a1_real)
                self.assertEqual(a1.imag, a1_imag)
            self.assertTrue(all(t.all_popped() for t in trackers))

    # ---- the foreach path equals the for-loop path ----

    def _test_derived_optimizers(self, device, dtype, optim_info, flag):
        """7 steps of a small sigmoid network (a layer frozen at steps 3-4, no gradients at step 2, a 0-dim
        parameter last), ``flag`` (foreach or fused) False against True: parameters and state equal at every
        step."""
        for optim_input in optim_info.optim_inputs_func(device=device, dtype=dtype):
            models, optimizers = [], []
            for value in (False, True):
                torch.manual_seed(1)
                model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1),
                                            torch.nn.Sigmoid()).to(dtype=dtype, device=device)
                empty = torch.empty((), device=device, dtype=dtype, requires_grad=True)
                empty.grad = torch.rand_like(empty)
                optimizers.append(optim_info.optim_cls([*model.parameters(), empty],
                                                       **{**deepcopy(optim_input.kwargs), flag: value}))
                models.append(model)
            x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype, device=device).reshape(3, 2)
            tracker = TensorTracker()
            for i in range(7):
                for model, optimizer in zip(models, optimizers):
                    optimizer.zero_grad()
                    if i in (3, 5):
                        model[2].requires_grad_(i == 5)
                    if i != 2:
                        model(x).sum().backward()
                    optimizer.step()
                for p, q in zip(models[0].parameters(), models[1].parameters()):
                    tracker.add(p)
                    tracker.pop_check_set(q, self)
                    for k, v in optimizers[0].state[p].items():
                        tracker.add(v)
                        tracker.pop_check_set(optimizers[1].state[q][k], self)
            self.assertTrue(tracker.all_popped())

    @optims([o for o in DB if "foreach" in o.supported_impls], dtypes=[torch.float64])
    def test_foreach_matches_forloop(self, device, dtype, optim_info):
        self._test_derived_optimizers(device, dtype, optim_info, "foreach")

    # fused: generated only for an optimizer whose info lists "fused" (torch's; handgrad refuses fused=True)

    @optims([o for o in DB if "fused" in o.supported_impls],
            dtypes=[torch.float32, torch.float64, torch.bfloat16, torch.float16])
    def test_fused_matches_forloop(self, device, dtype, optim_info):
        if device not in optim_info.supports_fused_on:
            self.skipTest(f"{device} is not supported for fused")
        self._test_derived_optimizers(device, dtype, optim_info, "fused")

    @optims([o for o in DB if "fused" in o.supported_impls], dtypes=[torch.float32])
    def test_fused_error_on_params_on_meta(self, device, dtype, optim_info):
        if device not in optim_info.supports_fused_on:
            self.skipTest(f"{device} is not supported for fused")
        with torch.device("meta"):
            model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1),
                                        torch.nn.Sigmoid()).to(dtype)
        optimizer = optim_info.optim_cls(model.parameters(), fused=True)
        with torch.device("meta"):
            for p in model.parameters():
                p.grad = torch.rand_like(p)
        with self.assertRaisesRegex(RuntimeError, "`fused=True` requires all the params to be floating point"):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.to_empty(device=device)
        for p in model.parameters():
            p.grad = torch.rand_like(p)
        optimizer.step()

    # ---- parameter groups ----

    @optims(DB, dtypes=[torch.float32])
    def test_param_groups_weight_decay(self, device, dtype, optim_info):
        for optim_input in all_inputs(device, dtype, optim_info, skip=("differentiable",)):
            weight, bias, x = linear_problem(device, dtype)
            optimizer = optim_info.optim_cls([dict(params=[weight], **optim_input.kwargs),
                                              dict(params=[bias], **{**optim_input.kwargs, "weight_decay": 0.0})])
            initial = (weight.mv(x) + bias).pow(2).sum().item()
            for _ in range(20):
                optimizer.zero_grad()
                loss = (weight.mv(x) + bias).pow(2).sum()
                loss.backward()
                optimizer.step()
            if optim_input.kwargs.get("maximize", False):
                self.assertGreater(loss.item(), initial)
            else:
                self.assertLess(loss.item(), initial)

    @optims(DB, dtypes=[torch.float32])
    def test_param_groups_lr(self, device, dtype, optim_info):
        """A group with its own lr trains; a parameter in a group with the (tiny) default lr does not move."""
        for optim_input in all_inputs(device, dtype, optim_info, skip=("differentiable",)):
            kwargs = {**optim_input.kwargs}
            if not kwargs.get("lr"):
                kwargs["lr"] = 1e-3
            weight, bias, x = linear_problem(device, dtype)
            irrelevant = Parameter(torch.randn(2, device=device, dtype=dtype))
            irrelevant_clone = irrelevant.clone()
            optimizer = optim_info.optim_cls([dict(params=[weight, bias], **kwargs), dict(params=[irrelevant])],
                                             lr=1e-28)
            initial = (weight.mv(x) + bias).pow(2).sum().item()
            for _ in range(20):
                optimizer.zero_grad()
                loss = (weight.mv(x) + bias).pow(2).sum()
                loss.backward()
                irrelevant.grad = torch.rand_like(irrelevant)
                optimizer.step()
            if kwargs.get("maximize", False):
                self.assertGreater(loss.item(), initial)
            else:
                self.assertLess(loss.item(), initial)
            self.assertEqual(irrelevant, irrelevant_clone)

    # ---- steps that must not move anything ----

    @optims(DB, dtypes=[torch.float32])
    def test_step_is_noop_when_params_have_no_grad(self, device, dtype, optim_info):
        params = [torch.randn(2, 3, requires_grad=False, device=device, dtype=dtype) for _ in range(2)]
        old = [p.clone() for p in params]
        for optim_input in all_inputs(device, dtype, optim_info):
            optim_info.optim_cls(params, **optim_input.kwargs).step(lambda: torch.tensor([1], device=device))
        self.assertEqual(params, old)

    @optims(DB, dtypes=[torch.float32])
    def test_step_is_noop_for_zero_grads(self, device, dtype, optim_info):
        param = torch.randn(5, 1, device=device, dtype=dtype, requires_grad=True)
        old = param.detach().clone()
        for optim_input in all_inputs(device, dtype, optim_info):
            kwargs = optim_input.kwargs
            if kwargs.get("weight_decay", 0) != 0:  # λ p moves p even with a zero gradient
                continue
            params = [param.clone()] if kwargs.get("differentiable", False) else [param]
            optimizer = optim_info.optim_cls(params, **kwargs)
            params[0].grad = torch.zeros_like(params[0])
            optimizer.step(lambda: torch.tensor([1], device=device, dtype=dtype))
            self.assertEqual(old, params[0])

    @optims(DB, dtypes=[torch.float32])
    def test_optimizer_can_be_printed(self, device, dtype, optim_info):
        params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
        for optim_input in all_inputs(device, dtype, optim_info):
            self.assertIn("SGD", repr(optim_info.optim_cls(params, **optim_input.kwargs)))

    # ---- state dicts ----

    def _fwd_bwd(self, optimizer, w, b, x):
        optimizer.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss

    @parametrize("is_named_optim0", [True, False])
    @parametrize("is_named_optim1", [True, False])
    @optims(DB, dtypes=[torch.float32])
    def test_state_dict_deterministic(self, device, dtype, optim_info, is_named_optim0, is_named_optim1):
        """A fresh optimizer loaded with another's state dict continues exactly as it does; equal state dicts."""
        def named(params, is_named):
            return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else params

        def without_names(sd):
            sd = deepcopy(sd)
            for group in sd["param_groups"]:
                group.pop("param_names", None)
            return sd

        weight = Parameter(torch.randn(2, 3, device=device, dtype=dtype))
        bias = Parameter(torch.randn(2, device=device, dtype=dtype))
        x = torch.randn(3, requires_grad=True, device=device, dtype=dtype)
        for optim_input in all_inputs(device, dtype, optim_info, skip=("differentiable",)):
            optimizer = optim_info.optim_cls(named([weight, bias], is_named_optim0), **optim_input.kwargs)
            for _ in range(10):
                self._fwd_bwd(optimizer, weight, bias, x)
                optimizer.step()
            with torch.no_grad():
                weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
            optimizer_c = optim_info.optim_cls(named([weight_c, bias_c], is_named_optim1), **optim_input.kwargs)
            optimizer_c.load_state_dict(deepcopy(optimizer.state_dict()))
            for _ in range(10):
                self._fwd_bwd(optimizer, weight, bias, x)
                self._fwd_bwd(optimizer_c, weight_c, bias_c, x)
                optimizer.step()
                optimizer_c.step()
                self.assertEqual(weight, weight_c)
                self.assertEqual(bias, bias_c)
            self.assertEqual(without_names(optimizer.state_dict()), without_names(optimizer_c.state_dict()))
            optimizer_c.param_groups.extend(optimizer_c.param_groups)  # repeated parameters: same representation
            self.assertEqual(without_names(optimizer.state_dict())["param_groups"][-1],
                             without_names(optimizer_c.state_dict())["param_groups"][-1])

    def _conv_bn(self, device, dtype):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05,
                                                                                              momentum=0.1))
        return model.to(dtype=dtype, device=device), torch.rand(1, 4, 16, 16, device=device, dtype=dtype)

    @optims(DB, dtypes=[torch.float32])
    def test_can_load_older_state_dict(self, device, dtype, optim_info):
        """A state dict without the flags added after the optimizer's first release loads and steps."""
        for optim_input in all_inputs(device, dtype, optim_info, skip=("differentiable",)):
            model, x = self._conv_bn(device, dtype)
            optimizer = optim_info.optim_cls(model.parameters(), **optim_input.kwargs)
            for _ in range(3):
                optimizer.zero_grad()
                model(x).sum().backward()
                optimizer.step()
            old = deepcopy(optimizer.state_dict())
            for group in old["param_groups"]:
                for flag in optim_info.not_og_supported_flags:
                    group.pop(flag, None)
            optimizer.load_state_dict(old)
            optimizer.zero_grad()
            model(x).sum().backward()
            optimizer.step()

    @parametrize("is_named_optim0", [True, False])
    @parametrize("is_named_optim1", [True, False])
    @optims(DB, dtypes=[torch.float32])
    def test_can_load_from_to_named_state_dict(self, device, dtype, optim_info, is_named_optim0, is_named_optim1):
        for optim_input in all_inputs(device, dtype, optim_info, skip=("differentiable",)):
            model, x = self._conv_bn(device, dtype)
            params = model.named_parameters() if is_named_optim0 else model.parameters()
            optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
            for _ in range(3):
                optimizer.zero_grad()
                model(x).sum().backward()
                optimizer.step()
            params2 = model.named_parameters() if is_named_optim1 else model.parameters()
            optimizer2 = optim_info.optim_cls(params2, **optim_input.kwargs)
            optimizer2.load_state_dict(deepcopy(optimizer.state_dict()))
            optimizer2.zero_grad()
            model(x).sum().backward()
            optimizer2.step()
            if is_named_optim0 or is_named_optim1:
                self.assertEqual(optimizer2.state_dict()["param_groups"][0]["param_names"],
                                 ["0.weight", "0.bias", "1.weight", "1.bias"])

    @parametrize("is_named_optim", [True, False])
    @optims(DB, dtypes=[torch.float32])
    def test_save_load_equality_with_weights_only(self, device, dtype, optim_info, is_named_optim):
        weight = Parameter(torch.randn(2, 3, device=device, dtype=dtype))
        bias = Parameter(torch.randn(2, device=device, dtype=dtype))
        x = torch.randn(3, requires_grad=True, device=device, dtype=dtype)
        params = [("name0", weight), ("name1", bias)] if is_named_optim else [weight, bias]
        for optim_input in all_inputs(device, dtype, optim_info, skip=("differentiable",)):
            optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
            for _ in range(3):
                optimizer.step(functools.partial(self._fwd_bwd, optimizer, weight, bias, x))
            sd = optimizer.state_dict()
            with tempfile.TemporaryFile() as f:
                torch.save(sd, f)
                f.seek(0)
                self.assertEqual(torch.load(f), sd)
                f.seek(0)
                self.assertEqual(torch.load(f, weights_only=True), sd)

    @optims(DB, dtypes=[torch.float32])
    def test_load_nontensor_step(self, device, dtype, optim_info):
        params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)
        for optim_input in all_inputs(device, dtype, optim_info, skip=("differentiable",)):
            optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
            for _ in range(3):
                optimizer.step()
            sd = deepcopy(optimizer.state_dict())
            for state in sd["state"].values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].item()
            optimizer.load_state_dict(sd)
            optimizer.step()

    # ---- hooks ----

    def _each_optimizer(self, device, dtype, optim_info):
        for optim_input in all_inputs(device, dtype, optim_info):
            param = torch.rand(2, 3, device=device, dtype=dtype, requires_grad=True)
            yield optim_info.optim_cls([param], **optim_input.kwargs)

    @optims(DB, dtypes=[torch.float32])
    def test_state_dict_pre_hook(self, device, dtype, optim_info):
        for optim in self._each_optimizer(device, dtype, optim_info):
            optim.register_state_dict_pre_hook(state_dict_pre_hook)
            self.assertEqual(optim.state_dict()["state"]["test"], 1)

    @optims(DB, dtypes=[torch.float32])
    def test_state_dict_post_hook(self, device, dtype, optim_info):
        for optim in self._each_optimizer(device, dtype, optim_info):
            optim.register_state_dict_post_hook(state_dict_post_hook)
            self.assertFalse(optim.state_dict()["ran_state_dict_pre_hook"])

    @optims(DB, dtypes=[torch.float32])
    def test_state_dict_pre_post_hook(self, device, dtype, optim_info):
        for optim in self._each_optimizer(device, dtype, optim_info):
            optim.register_state_dict_pre_hook(state_dict_pre_hook)
            optim.register_state_dict_post_hook(state_dict_post_hook)
            sd = optim.state_dict()
            self.assertNotIn("test", sd["state"])
            self.assertTrue(sd["ran_state_dict_pre_hook"])

    @optims(DB, dtypes=[torch.float32])
    def test_load_state_dict_pre_hook_and_prepend(self, device, dtype, optim_info):
        for optim in self._each_optimizer(device, dtype, optim_info):
            sd = optim.state_dict()
            optim.register_load_state_dict_pre_hook(load_state_dict_pre_hook1)
            optim.load_state_dict(sd)
            self.assertEqual(optim.param_groups[0]["lr"], 0.002)
            optim.register_load_state_dict_pre_hook(load_state_dict_pre_hook2, prepend=True)
            optim.load_state_dict(sd)
            self.assertEqual(optim.param_groups[0]["lr"], 0.002)  # hook1 runs last and wins

    @optims(DB, dtypes=[torch.float32])
    def test_load_state_dict_post_hook(self, device, dtype, optim_info):
        for optim in self._each_optimizer(device, dtype, optim_info):
            optim.register_load_state_dict_post_hook(load_state_dict_post_hook)
            optim.load_state_dict(optim.state_dict())
            self.assertFalse(optim.state["ran_load_state_dict_pre_hook2"])
            self.assertTrue(optim.state["ran_load_state_dict_post_hook"])

    @optims(DB, dtypes=[torch.float32])
    def test_load_state_dict_pre_post_hook(self, device, dtype, optim_info):
        for optim in self._each_optimizer(device, dtype, optim_info):
            optim.register_load_state_dict_pre_hook(load_state_dict_pre_hook2)
            optim.register_load_state_dict_post_hook(load_state_dict_post_hook)
            optim.load_state_dict(optim.state_dict())
            self.assertTrue(optim.state["ran_load_state_dict_pre_hook2"])
            self.assertTrue(optim.state["ran_load_state_dict_post_hook"])

    def _check_step_hook(self, device, dtype, optim_info, register, start, end):
        calls = []
        params = [torch.tensor([1, 1], device=device, dtype=dtype)]
        for optim_input in all_inputs(device, dtype, optim_info):
            optim = optim_info.optim_cls(params, **optim_input.kwargs)
            calls.clear()
            handle = register(optim, lambda opt, args, kwargs: calls.append(2))
            optim.step()
            optim.step()
            self.assertEqual(start + sum(calls), end)
            handle.remove()
            optim.step()
            self.assertEqual(start + sum(calls), end)

    @optims(DB, dtypes=[torch.float32])
    def test_step_post_hook(self, device, dtype, optim_info):
        self._check_step_hook(device, dtype, optim_info, lambda o, h: o.register_step_post_hook(h), 2, 6)

    @optims(DB, dtypes=[torch.float32])
    def test_step_pre_hook(self, device, dtype, optim_info):
        self._check_step_hook(device, dtype, optim_info, lambda o, h: o.register_step_pre_hook(h), 5, 9)

    @optims(DB, dtypes=[torch.float32])
    def test_step_all_hooks(self, device, dtype, optim_info):
        """Global pre (0), local pre (1), local post (2), global post (5), in that order, with torch's SGD too."""
        params = [torch.tensor([1, 1], device=device, dtype=dtype)]
        for optim_input in all_inputs(device, dtype, optim_info):
            optim, optim2 = optim_info.optim_cls(params, **optim_input.kwargs), torch.optim.SGD(params)
            data = []
            handles = [register_optimizer_step_pre_hook(lambda *a: data.append(0)),
                       register_optimizer_step_post_hook(lambda *a: data.append(5))]
            for o in (optim, optim2):
                handles += [o.register_step_pre_hook(lambda *a: data.append(1)),
                            o.register_step_post_hook(lambda *a: data.append(2))]
            optim.step()
            self.assertListEqual(data, [0, 1, 2, 5])
            optim2.step()
            optim.step()
            self.assertListEqual(data, [0, 1, 2, 5] * 3)
            for h in handles:
                h.remove()
            optim.step()
            optim2.step()
            self.assertListEqual(data, [0, 1, 2, 5] * 3)

    # ---- copies and state ----

    @optims(DB, dtypes=[torch.float32])
    def test_deepcopy_copies_all_public_attrs(self, device, dtype, optim_info):
        params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)
        for optim_input in all_inputs(device, dtype, optim_info, skip=("differentiable",)):
            optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
            for _ in range(3):
                optimizer.step()
            public = {k for k in optimizer.__dict__ if not k.startswith("_")}
            self.assertEqual(public, {k for k in deepcopy(optimizer).__dict__ if not k.startswith("_")})

    @optims(DB, dtypes=[torch.float32])
    def test_non_empty_state(self, device, dtype, optim_info):
        model = torch.nn.Linear(5, 5).to(dtype=dtype, device=device)
        x = torch.rand(2, 5, dtype=dtype, device=device)
        for optim_input in optim_info.optim_inputs_func(device=device):
            optim = optim_info.optim_cls(model.parameters(), **optim_input.kwargs)
            optim.zero_grad()
            model(x).sum().backward()
            optim.step()
            for state in optim.state.values():
                self.assertGreater(len(state), 0)


instantiate_device_type_tests(TestOptimRenewed, globals(), only_for="cpu")


# ---- test/optim/test_optim.py, TestDifferentiableOptimizer: the SGD tests ----


def _diff_fn(p, grad, opt_differentiable_state, opt_class, kwargs, *ignored):
    """One differentiable step from (p, grad, state); returns p and the state tensors that require grad.
    ``ignored`` lists the state's tensors again, so that gradcheck sees them as inputs."""
    p = p.clone()
    p.grad = grad
    opt = opt_class([p], **kwargs)
    opt.state[p].update({k: v.clone() if torch.is_tensor(v) else v for k, v in opt_differentiable_state.items()})
    opt.step()
    return (p,) + tuple(v for v in opt.state[p].values() if torch.is_tensor(v) and v.requires_grad)


def _multistep_backprop_diff_hyperparams_fn(params, grad, opt_differentiable_state, opt_class, kwargs, *ignored):
    """Two steps on an MSE loss whose gradients keep their graph; returns the final loss (the meta loss), the
    state and the tensor hyperparameters, after checking that the meta loss reaches every hyperparameter."""
    assert kwargs["differentiable"] is True
    params = params.clone()
    params.grad = grad
    kwargs = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    hyper = [v for v in kwargs.values() if torch.is_tensor(v) and v.requires_grad]
    optimizer = opt_class([params], **kwargs)
    optimizer.state[params].update({k: v.clone() if torch.is_tensor(v) else v
                                    for k, v in opt_differentiable_state.items()})
    x, y = torch.tensor([1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(x * torch.sum(params), y)
        loss.backward(inputs=(params,), create_graph=True)
        optimizer.step()
        optimizer.zero_grad()
    loss.backward(inputs=tuple(hyper), create_graph=True)
    assert all(h.grad is not None for h in hyper)
    state = tuple(v for v in optimizer.state[params].values() if torch.is_tensor(v) and v.requires_grad)
    return (loss,) + state + tuple(hyper)


class TestDifferentiableOptimizer(TestCase):
    def setUp(self):
        super().setUp()
        self.SGD = DB[0].optim_cls

    def _rand(self):
        return torch.rand(10, requires_grad=True, dtype=torch.float64)

    def test_sgd(self):
        p, grad, mbuff = self._rand(), self._rand(), self._rand()
        state = {"momentum_buffer": mbuff}
        torch.autograd.gradcheck(_diff_fn, (p, grad, state, self.SGD, {"lr": 0.9, "differentiable": True},
                                            *state.values()))

    def _check_hyperparams(self, **hyper):
        params, grad = self._rand(), self._rand()
        state = {"momentum_buffer": self._rand()}
        kwargs = {**{k: torch.tensor(v, requires_grad=True, dtype=torch.float64) for k, v in hyper.items()},
                  "differentiable": True}
        torch.autograd.gradcheck(_multistep_backprop_diff_hyperparams_fn,
                                 (params, grad, state, self.SGD, kwargs, *state.values(), *kwargs.values()))

    def test_differentiable_lr(self):
        self._check_hyperparams(lr=0.001)

    def test_differentiable_weight_decay(self):
        self._check_hyperparams(weight_decay=0.9)

    def test_differentiable_weight_decay_and_lr(self):
        self._check_hyperparams(weight_decay=0.9, lr=0.001)


def test_the_suite_runs_handgrad_without_fused():
    """The tests above run handgrad's SGD (unless HANDGRAD_SUITE_OPTIM=torch), from torch's own SGD entry."""
    info = DB[0]
    if os.environ.get("HANDGRAD_SUITE_OPTIM", "handgrad") == "handgrad":
        assert info.optim_cls is handgrad.SGD and "fused" not in info.supported_impls
    assert info.optim_inputs_func(device="cpu")  # torch's SGD inputs are there
    assert math.isclose(info.metadata_for_sparse[0]["lr"], 4.8e-3)


def test_backend_flags_stay_settable():
    """After this module's imports, a Trainer(deterministic=True) may still set torch.backends.cudnn.benchmark."""
    assert not torch.backends.flags_frozen()
    torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark
