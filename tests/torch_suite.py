"""Shared by the port of PyTorch's optimizer tests (test_torch_optim_suite*.py): torch's SGD test entry, for
handgrad's SGD or (HANDGRAD_SUITE_OPTIM=torch) torch's own, and small helpers of the upstream tests."""

import os
from copy import copy

import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.testing._internal.common_optimizers import optim_db

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


OPTIMIZER = os.environ.get("HANDGRAD_SUITE_OPTIM", "handgrad")
DB = [sgd_info(OPTIMIZER)]


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
