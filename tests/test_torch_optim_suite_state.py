"""PyTorch's own optimizer tests on handgrad.core.optim.SGD, part 2: state dicts, hooks, copies (TestOptimRenewed)
and the SGD tests of test/optim/test_optim.py's TestDifferentiableOptimizer. See test_torch_optim_suite.py."""

import functools
import tempfile
from copy import deepcopy

import torch
from torch.nn import Parameter
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_device_type import instantiate_device_type_tests
from torch.testing._internal.common_optimizers import (
    _get_optim_inputs_including_global_cliquey_kwargs as all_inputs,
    optims,
)
from torch.testing._internal.common_utils import TestCase, parametrize

from torch_suite import DB


def stepped_three_times(device, dtype, optim_info):
    """For every input of the SGD entry (differentiable ones left out), an optimizer over two parameters with
    fixed random gradients, after three steps."""
    params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    for optim_input in all_inputs(device, dtype, optim_info, skip=("differentiable",)):
        optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
        for _ in range(3):
            optimizer.step()
        yield optimizer


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
        for optimizer in stepped_three_times(device, dtype, optim_info):
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
        for optimizer in stepped_three_times(device, dtype, optim_info):
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
