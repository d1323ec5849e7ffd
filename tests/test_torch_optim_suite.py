"""PyTorch's own optimizer tests, run on handgrad.core.optim.SGD (CPU).

A port of pytorch/pytorch's ``test/test_optim.py`` class ``TestOptimRenewed`` (the tests that apply to SGD on
a CPU) and of the SGD tests of ``test/optim/test_optim.py`` class ``TestDifferentiableOptimizer``, written anew
from their upstream versions of 2024-2025 (the installed torch is 2.14.1; its wheel ships the test database but
not these test files). Each test keeps its upstream name and checks.

The configurations are torch's own: the SGD entry of ``torch.testing._internal.common_optimizers.optim_db`` (its
optimizer inputs, error inputs, LR schedulers, sparse settings and skips), with ``optim_cls`` replaced by
``handgrad.core.optim.SGD`` and ``"fused"`` removed from its implementations, because handgrad refuses
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
from copy import deepcopy

import torch
from torch.nn import Parameter
from torch.testing._internal.common_device_type import instantiate_device_type_tests, onlyCPU
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    TensorTracker,
    _get_optim_inputs_including_global_cliquey_kwargs as all_inputs,
    optims,
)
from torch.testing._internal.common_utils import TestCase, parametrize

import handgrad
from torch_suite import DB, OPTIMIZER, drosenbrock, linear_problem, rosenbrock, step_schedulers


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
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # dense += sparse starts a thread pool per call: ms each on a busy machine
        try:
            self._rosenbrock_sparse(device, dtype, optim_info, with_lrsched)
        finally:
            torch.set_num_threads(threads)

    def _rosenbrock_sparse(self, device, dtype, optim_info, with_lrsched):
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


instantiate_device_type_tests(TestOptimRenewed, globals(), only_for="cpu")


def test_the_suite_runs_handgrad_without_fused():
    """The tests above run handgrad's SGD (unless HANDGRAD_SUITE_OPTIM=torch), from torch's own SGD entry."""
    info = DB[0]
    if OPTIMIZER == "handgrad":
        assert info.optim_cls is handgrad.SGD and "fused" not in info.supported_impls
    assert info.optim_inputs_func(device="cpu")  # torch's SGD inputs are there
    assert math.isclose(info.metadata_for_sparse[0]["lr"], 4.8e-3)


def test_backend_flags_stay_settable():
    """After this module's imports, a Trainer(deterministic=True) may still set torch.backends.cudnn.benchmark."""
    assert not torch.backends.flags_frozen()
    torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark
