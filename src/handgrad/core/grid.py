"""A whole hyperparameter grid as one network: K MLPs stacked on a member axis, their backward pass and SGD step.

Member k of the grid is the network of :mod:`handgrad.core.mlp` with its own weights
W^l_k (n_l, n_{l-1}) and biases b^l_k; here they are stacked into one tensor per layer,
``fc[l].weight`` of shape (K, n_l, n_{l-1}) and ``fc[l].bias`` of shape (K, n_l), and every
member sees the same mini-batch x (N, n_0). With a^0_k = x for every k:

    z^l_k = a^{l-1}_k W^{l T}_k + b^l_k        torch.baddbmm over the member axis   (K, N, n_l)
    a^l_k = f_l(z^l_k)

The backward pass is :func:`handgrad.core.backprop.backward` itself: its matrix products take the
member axis in front as a batch axis (g_k = dL_k/da^L_k, each member's loss L_k is its own
mean over the batch), so delta^l is (K, N, n_l) and dL/dW^l is (K, n_l, n_{l-1}).

Members never mix: every product is batched over k, so member k's numbers are those of
the same network trained alone (up to floating-point summation order inside a matrix
product). The SGD step (:class:`GridSGD`) takes per-member lr / momentum / dampening /
weight decay / nesterov, and a member whose loss is not finite is frozen (its update is
replaced by "keep the old value").

The LightningModule that trains a grid is :class:`handgrad.sweep.module.GridClassifier`; which members a
sweep holds is :mod:`handgrad.sweep.search`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from handgrad.core import activations
from handgrad.core.backprop import backward
from handgrad.core.mlp import MLP, check_sizes
from handgrad.core.optim import HYPERPARAMETERS, check_hyperparameters, single_tensor_sgd


# ----------------------------------------------------------------------------- the batched network


class StackedLinear(nn.Module):
    """K ``nn.Linear(n_in, n_out)`` layers stacked on a member axis: ``weight`` (K, n_out, n_in), ``bias`` (K, n_out)."""

    def __init__(self, num_members: int, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_members, n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(num_members, n_out))


class GridMLP(nn.Module):
    """K copies of ``MLP(sizes, activation, output_activation)`` as one module, with the attributes of
    :class:`handgrad.core.mlp.MLP` that :func:`handgrad.core.backprop.backward` reads, the member axis first:

    ``fc[str(l)].weight``: (K, n_l, n_{l-1}), ``fc[str(l)].bias``: (K, n_l); ``a``, ``z``: the
    forward cache (a[0] is the shared input (N, n_0), a[l], z[l] are (K, N, n_l));
    ``dL_dw``, ``dL_db``: filled by :func:`grid_backward`.
    """

    def __init__(self, sizes: Sequence[int], num_members: int, activation: str = "relu",
                 output_activation: Optional[str] = None):
        super().__init__()
        sizes = check_sizes(sizes)
        if num_members < 1:
            raise ValueError(f"num_members must be >= 1, got {num_members}")
        self.n_l, self.L, self.K = sizes, len(sizes) - 1, int(num_members)
        self.activation, self.output_activation = activation, output_activation
        self.fc = nn.ModuleDict({str(l): StackedLinear(self.K, sizes[l - 1], sizes[l]) for l in range(1, self.L + 1)})
        self.f, self.df = activations.per_layer(self.L, activation, output_activation)
        self.compute_dtype: Optional[torch.dtype] = None  # mixed precision, as in MLP
        self.a: dict[int, Tensor] = {}
        self.z: dict[int, Tensor] = {}
        self.w: dict[int, Tensor] = {}
        self.dL_dw: dict[int, Tensor] = {}
        self.dL_db: dict[int, Tensor] = {}

    @torch.no_grad()
    def load_mlp(self, mlp: MLP, members: Optional[Sequence[int]] = None) -> "GridMLP":
        """Copy one :class:`MLP`'s weights into the given member slices (all by default)."""
        if list(mlp.n_l) != self.n_l:
            raise ValueError(f"MLP sizes {mlp.n_l} differ from the grid's {self.n_l}")
        ks = range(self.K) if members is None else members
        for l in range(1, self.L + 1):
            for k in ks:
                self.fc[str(l)].weight[k].copy_(mlp.fc[str(l)].weight)
                self.fc[str(l)].bias[k].copy_(mlp.fc[str(l)].bias)
        return self

    @torch.no_grad()
    def member(self, k: int) -> MLP:
        """Member k as a standalone :class:`MLP` (a copy, same dtype and device)."""
        if not 0 <= k < self.K:
            raise IndexError(f"member {k} does not exist: the grid has K = {self.K} members")
        w = self.fc["1"].weight
        mlp = MLP(self.n_l, self.activation, self.output_activation).to(device=w.device, dtype=w.dtype)
        for l in range(1, self.L + 1):
            mlp.fc[str(l)].weight.copy_(self.fc[str(l)].weight[k])
            mlp.fc[str(l)].bias.copy_(self.fc[str(l)].bias[k])
        return mlp

    def forward(self, x: Tensor, member: Optional[int] = None) -> Tensor:
        """Logits (K, N, n_L) of every member, or (1, N, n_L) of one member when ``member`` is given.

        z^l = baddbmm(b^l, a^{l-1}, W^{l T}): the shared input enters as a stride-0 expand, no copy.
        """
        if x.dim() < 2:
            raise ValueError(f"expected a batch of inputs of shape (N, ...), got shape {tuple(x.shape)}")
        a0 = x.flatten(1)
        if a0.shape[1] != self.n_l[0]:
            raise ValueError(
                f"input has {a0.shape[1]} features per sample (shape {tuple(x.shape)}), the network expects n_0 = {self.n_l[0]}")
        c = self.compute_dtype
        a0 = a0 if c is None else a0.to(c)
        self.a, self.z, self.w = {0: a0}, {}, {}
        a = a0.expand(self.K if member is None else 1, *a0.shape)
        for l in range(1, self.L + 1):
            layer = self.fc[str(l)]
            w, b = (layer.weight, layer.bias) if member is None else \
                (layer.weight[member:member + 1], layer.bias[member:member + 1])
            w, b = (w, b) if c is None else (w.to(c), b.to(c))
            z = torch.baddbmm(b[:, None], a, w.transpose(1, 2))
            a = self.f[l](z)
            self.w[l], self.z[l], self.a[l] = w, z, a
        return a


def grid_backward(net: GridMLP, grad_output: Tensor) -> None:
    """:func:`handgrad.core.backprop.backward` for the whole grid: fills the parameters' ``.grad`` (overwritten in place)
    and ``net.dL_dw[l]``, ``net.dL_db[l]`` (the same tensors) from g = dL_k/da^L_k of shape (K, N, n_L)."""
    if net.L in net.a and net.a[net.L].shape[0] != net.K:
        raise ValueError(f"the last forward pass computed {net.a[net.L].shape[0]} member(s); a backward pass needs "
                         f"the forward of all K = {net.K} members (call net(x) without member=)")
    backward(net, grad_output)


# ----------------------------------------------------------------------------- the batched SGD step


class GridSGD(Optimizer):
    """SGD of :mod:`handgrad.core.optim` with one set of hyperparameters per member.

    Every parameter has the member axis first (K, ...). With per-member γ_k (lr), μ_k (momentum),
    τ_k (dampening), λ_k (weight decay), ν_k (nesterov), for the members that step (``mask``):

        g_t = g_t + λ p_{t-1}
        b_t = g_t                              at the member's first step
        b_t = μ b_{t-1} + (1 - τ) g_t          after that
        d_t = g_t + μ b_t  where ν,  b_t elsewhere (and g_t where μ = 0: plain SGD, no buffer)
        p_t = p_{t-1} - γ d_t

    and the others keep p and b (a member frozen after a non-finite loss, or one whose scaled gradients overflowed:
    :mod:`handgrad.core.loss_scale`). ``state[p]["member_step"]`` counts each member's steps.

    Two memory layouts, as :mod:`handgrad.core.optim` has two paths:

    - per member (:func:`member_sgd`, the default on a CPU): for each stepping member k the slices ``p[k]`` are
      updated by :func:`handgrad.core.optim.single_tensor_sgd` with member k's hyperparameters as Python numbers
      (bitwise equal to torch.optim.SGD).
    - stacked (:func:`stacked_sgd`, the default on accelerators): each line is one operation on the whole (K, ...)
      tensor with the hyperparameters as (K, 1, 1) tensors and the mask used on the device through ``torch.where``
      (a NaN update cannot leak in). For μ = 0 it computes b_t = 0·b_{t-1} + 1·g_t = g_t, i.e. plain SGD (hence
      τ' = τ where μ != 0 and 0 where μ = 0), and λ = 0 adds 0·p = 0.

    The buffers and step counts are saved in checkpoints with the optimizer state; the hyperparameters are plain
    lists in the param group (saved as well). ``per_member``: None chooses by device as above; True or False forces
    a layout (both give the same numbers up to rounding).
    """

    def __init__(self, params, lr: Sequence[float], momentum: Sequence[float], dampening: Sequence[float],
                 weight_decay: Sequence[float], nesterov: Sequence[bool], per_member: Optional[bool] = None):
        raw = {"lr": list(lr), "momentum": list(momentum), "dampening": list(dampening),
               "weight_decay": list(weight_decay), "nesterov": list(nesterov)}
        K = len(raw["lr"])
        if K == 0 or any(len(v) != K for v in raw.values()):
            raise ValueError(f"GridSGD: every hyperparameter needs one value per member, got lengths "
                             f"{ {k: len(v) for k, v in raw.items()} }")
        for k in range(K):  # the values as given: "false" is not a boolean, True is not a learning rate
            check_hyperparameters(*(raw[name][k] for name in HYPERPARAMETERS), name=lambda h: f"GridSGD member {k}: {h}")
        hp = {k: [bool(v) if k == "nesterov" else float(v) for v in values] for k, values in raw.items()}
        super().__init__(params, hp)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 1 or p.shape[0] != K:
                    raise ValueError(f"GridSGD: every parameter needs the member axis first (K = {K}), got shape "
                                     f"{tuple(p.shape)}")
        self.per_member = per_member
        self._hp_cache: dict = {}
        self._scratch: dict = {}  # two work tensors per parameter, reused every step (not state: not saved)

    def member_tensors(self, group: dict, like: Tensor) -> dict[str, Tensor]:
        """The group's hyperparameters as (K, 1, 1) tensors on ``like``'s device (built once), in its dtype but at
        least float32: in bfloat16 momentum 0.9 would be 0.8984375, while torch's SGD keeps it a Python float."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        key = (like.device, dtype, *(tuple(group[k]) for k in HYPERPARAMETERS))
        if key not in self._hp_cache:
            t = {k: torch.tensor(group[k], dtype=dtype).view(-1, 1, 1) for k in HYPERPARAMETERS if k != "nesterov"}
            t["lr_neg"] = -t["lr"]
            t["one_minus_dampening"] = torch.where(t["momentum"] != 0, 1 - t["dampening"], torch.ones_like(t["lr"]))
            t["nesterov"] = torch.tensor(group["nesterov"]).view(-1, 1, 1)
            self._hp_cache[key] = {k: v.to(like.device) for k, v in t.items()}
        return self._hp_cache[key]

    def work_tensors(self, p: Tensor) -> tuple[Tensor, Tensor]:
        d = self._scratch.get(p)
        if d is None or d[0].shape != p.shape or d[0].dtype != p.dtype or d[0].device != p.device:
            d = self._scratch[p] = (torch.empty_like(p), torch.empty_like(p))
        return d

    def buffers(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Each parameter's momentum buffer (K, ...) and per-member step count (K,), made (zero) at the first call."""
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                self.state[p]["member_step"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        return ([self.state[p]["momentum_buffer"] for p in params], [self.state[p]["member_step"] for p in params])

    @torch.no_grad()
    def step(self, closure=None, alive: Optional[Tensor] = None, run=None):
        """One update of every parameter with a gradient (rule in the class docstring); ``alive``: the (K,) mask
        of the members that step (None: all).

        ``run``: a callable that already performs the whole training step, this update included (a captured CUDA
        graph or a compiled function, see :class:`handgrad.sweep.fused.FusedStep`); ``step`` then only calls it, so
        that a caller (Lightning) still sees and counts an optimizer step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if run is not None:
            run()
        else:
            self.update(alive)
        return loss

    @torch.no_grad()
    def update(self, mask: Optional[Tensor] = None) -> None:
        """The update itself, in the layout ``per_member`` asks for."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs, steps = self.buffers(params)
            per_member = self.per_member if self.per_member is not None else all(p.is_cpu for p in params)
            if per_member:
                member_sgd(params, bufs, steps, group, mask=None if mask is None else mask.tolist())
            else:
                stacked_sgd(params, bufs, steps, [self.work_tensors(p) for p in params],
                            self.member_tensors(group, params[0]), mask=mask, any_nesterov=any(group["nesterov"]))


def member_sgd(params, bufs, steps, group: dict, *, mask: Optional[list]) -> None:
    """The rule member by member (the CPU layout): :func:`handgrad.core.optim.single_tensor_sgd`, torch.optim.SGD's
    single-tensor path, on member k's slices p[k] with member k's hyperparameters as Python numbers."""
    started = [s.tolist() for s in steps]
    stepping = [k for k in range(params[0].shape[0]) if mask is None or mask[k]]  # the others: p, b untouched
    for k in stepping:
        member_bufs = [b[k] if s[k] else None for b, s in zip(bufs, started)]  # None: this step makes it (b_1 = g)
        single_tensor_sgd([p[k] for p in params], [p.grad[k] for p in params], member_bufs,
                          lr=group["lr"][k], momentum=group["momentum"][k], dampening=group["dampening"][k],
                          weight_decay=group["weight_decay"][k], nesterov=group["nesterov"][k], maximize=False)
        for b, made, s in zip(bufs, member_bufs, started):
            if not s[k] and group["momentum"][k] != 0:
                b[k].copy_(made)  # b_1 = g, into the stacked buffer
    for count in steps:
        count[stepping] += 1


def stacked_sgd(params, bufs, steps, scratch, hp: dict, *, mask: Optional[Tensor], any_nesterov: bool) -> None:
    """The rule on whole (K, ...) tensors, hyperparameters as (K, 1, 1) tensors (the accelerator layout); every
    full-size operation writes into a buffer or the work tensors ``d``, ``e`` (``out=``): no allocation per step."""
    for p, buf, count, (d, e) in zip(params, bufs, steps, scratch):
        shape = (-1,) + (1,) * (p.dim() - 1)
        lr_neg, mu, wd = (hp[k].view(shape) for k in ("lr_neg", "momentum", "weight_decay"))
        steps_ = mask.view(shape) if mask is not None else None
        torch.addcmul(p.grad, wd, p, out=d)  # g = g + λ p
        torch.mul(buf, mu, out=e).addcmul_(hp["one_minus_dampening"].view(shape), d)  # μ b + (1 - τ') g
        torch.where((count > 0).view(shape), e, d, out=e)  # b_1 = g at a member's first step
        if steps_ is None:
            buf.copy_(e)
        else:
            torch.where(steps_, e, buf, out=buf)
        if any_nesterov:
            torch.where(hp["nesterov"].view(shape), d.addcmul_(mu, buf), buf, out=d)  # d = g + μ b | b
            torch.addcmul(p, lr_neg, d, out=e)  # p - γ d
        else:
            torch.addcmul(p, lr_neg, buf, out=e)  # p - γ b
        if steps_ is None:
            p.copy_(e)
            count.add_(1)
        else:
            torch.where(steps_, e, p, out=p)
            count.add_(mask.to(count.dtype))
