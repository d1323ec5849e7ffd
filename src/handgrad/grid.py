"""A whole hyperparameter grid trained at once: K MLPs stacked on a member axis.

Member k of the grid is the network of :mod:`handgrad.mlp` with its own weights
W^l_k (n_l, n_{l-1}) and biases b^l_k; here they are stacked into one tensor per layer,
``fc[l].weight`` of shape (K, n_l, n_{l-1}) and ``fc[l].bias`` of shape (K, n_l), and every
member sees the same mini-batch x (N, n_0). With a^0_k = x for every k:

    z^l_k = a^{l-1}_k W^{l T}_k + b^l_k        torch.baddbmm over the member axis   (K, N, n_l)
    a^l_k = f_l(z^l_k)

The backward pass is :func:`handgrad.backprop.backward` itself: its matrix products take the
member axis in front as a batch axis (g_k = dL_k/da^L_k, each member's loss L_k is its own
mean over the batch), so delta^l is (K, N, n_l) and dL/dW^l is (K, n_l, n_{l-1}).

Members never mix: every product is batched over k, so member k's numbers are those of
the same network trained alone (up to floating-point summation order inside a matrix
product). The SGD step (:class:`GridSGD`) takes per-member lr / momentum / dampening /
weight decay / nesterov (member by member on a CPU, for cache locality; as (K, 1, 1) tensors
over the whole stack on an accelerator), and a member whose loss is not finite is frozen
(its update is replaced by "keep the old value"), without a host synchronisation per step
on an accelerator. ``GridClassifier(compile="cuda_graph" | "inductor")`` runs the whole
training step as one CUDA graph or one compiled function (:class:`FusedStep`).
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, Optional, Sequence

import lightning as L
from lightning.pytorch.strategies import SingleDeviceStrategy
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from handgrad import activations
from handgrad.backprop import backward
from handgrad.losses import cross_entropy
from handgrad.mlp import MLP
from handgrad.errors import SUPPORTED_PRECISIONS, check_sizes_fit_data  # noqa: F401
from handgrad.optim import _single_tensor_sgd, check_hyperparameters

HPARAMS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
HPARAM_DEFAULTS = {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")


# ----------------------------------------------------------------------------- the grid


def _member(d: dict, where: str) -> dict:
    """One member's SGD hyperparameters, defaults filled in and checked as torch.optim.SGD checks them."""
    if not isinstance(d, dict):
        raise TypeError(f"{where}: expected a mapping like {{lr: 0.01, momentum: 0.9}}, got {d!r}")
    unknown = sorted(set(d) - set(HPARAMS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; a member is described by {list(HPARAMS)}")
    if "lr" not in d:
        raise ValueError(f"{where}: 'lr' is required (got {d!r})")
    m = {**HPARAM_DEFAULTS, **d}
    check_hyperparameters(*(m[k] for k in HPARAMS), name=lambda k: f"{where}: {k}")
    m = {k: (m[k] if k == "nesterov" else float(m[k])) for k in HPARAMS}
    return m


def expand_grid(grid: Optional[dict] = None, members: Optional[Sequence[dict]] = None) -> list[dict]:
    """The list of members, from exactly one of:

    - ``grid``: lists per hyperparameter, e.g. ``{lr: [0.01, 0.1], momentum: [0, 0.9]}``; the members
      are their cartesian product, ordered as ``itertools.product`` over (lr, momentum, dampening,
      weight_decay, nesterov) (missing keys take the torch.optim.SGD default);
    - ``members``: an explicit list, e.g. ``[{lr: 0.01}, {lr: 0.01, momentum: 0.9, weight_decay: 0.001}]``.
    """
    if (grid is None) == (members is None):
        raise ValueError("give exactly one of `grid` (lists, cartesian product) or `members` (explicit list); "
                         "to replace the members of configs/grid.yaml by a product: "
                         "--model.members null --model.grid '{lr: [0.01, 0.1], momentum: [0, 0.9]}'")
    if members is not None:
        if len(members) == 0:
            raise ValueError("`members` is empty: list at least one configuration, e.g. [{lr: 0.01}]")
        return [_member(dict(m), f"members[{i}]") for i, m in enumerate(members)]
    if not isinstance(grid, dict):
        raise TypeError(f"`grid` must map hyperparameter names to lists, got {grid!r}")
    unknown = sorted(set(grid) - set(HPARAMS))
    if unknown:
        raise ValueError(f"grid: unknown key(s) {unknown}; allowed: {list(HPARAMS)}")
    if "lr" not in grid:
        raise ValueError("grid: 'lr' is required, e.g. grid: {lr: [0.01]}")
    axes = []
    for k in HPARAMS:
        v = grid.get(k, [HPARAM_DEFAULTS.get(k)])
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        if not v:
            raise ValueError(f"grid: the list for {k!r} is empty")
        axes.append(v)
    return [_member(dict(zip(HPARAMS, combo)), f"grid member {i}") for i, combo in enumerate(itertools.product(*axes))]


def member_name(k: int, m: dict) -> str:
    """Run name of member k, e.g. ``member_02_lr0.01_m0.9_wd0.001`` (dampening / nesterov only when set)."""
    name = f"member_{k:02d}_lr{m['lr']:g}_m{m['momentum']:g}_wd{m['weight_decay']:g}"
    if m["dampening"]:
        name += f"_d{m['dampening']:g}"
    if m["nesterov"]:
        name += "_nesterov"
    return name


# ----------------------------------------------------------------------------- the batched network


class StackedLinear(nn.Module):
    """K ``nn.Linear(n_in, n_out)`` layers stacked on a member axis: ``weight`` (K, n_out, n_in), ``bias`` (K, n_out)."""

    def __init__(self, num_members: int, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_members, n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(num_members, n_out))


class GridMLP(nn.Module):
    """K copies of ``MLP(sizes, activation, output_activation)`` as one module, with the attributes of
    :class:`handgrad.mlp.MLP` that :func:`handgrad.backprop.backward` reads, the member axis first:

    ``fc[str(l)].weight``: (K, n_l, n_{l-1}), ``fc[str(l)].bias``: (K, n_l); ``a``, ``z``: the
    forward cache (a[0] is the shared input (N, n_0), a[l], z[l] are (K, N, n_l));
    ``dL_dw``, ``dL_db``: filled by :func:`grid_backward`.
    """

    def __init__(self, sizes: Sequence[int], num_members: int, activation: str = "relu",
                 output_activation: Optional[str] = None):
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(f"sizes must list at least two positive layer widths (input, ..., output), got {sizes}")
        if num_members < 1:
            raise ValueError(f"num_members must be >= 1, got {num_members}")
        self.n_l, self.L, self.K = sizes, len(sizes) - 1, int(num_members)
        self.activation, self.output_activation = activation, output_activation
        self.fc = nn.ModuleDict({str(l): StackedLinear(self.K, sizes[l - 1], sizes[l]) for l in range(1, self.L + 1)})
        self.f, self.df = activations.per_layer(self.L, activation, output_activation)
        self.a: dict[int, Tensor] = {}
        self.z: dict[int, Tensor] = {}
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
        ks = slice(None) if member is None else slice(member, member + 1)
        self.a = {0: a0}
        self.z = {}
        a = a0.expand(self.K if member is None else 1, *a0.shape)
        for l in range(1, self.L + 1):
            layer = self.fc[str(l)]
            z = torch.baddbmm(layer.bias[ks, None], a, layer.weight[ks].transpose(1, 2))
            a = self.f[l](z)
            self.z[l], self.a[l] = z, a
        return a


def grid_backward(net: GridMLP, grad_output: Tensor) -> None:
    """:func:`handgrad.backprop.backward` for the whole grid: fills the parameters' ``.grad`` (overwritten in place)
    and ``net.dL_dw[l]``, ``net.dL_db[l]`` (the same tensors) from g = dL_k/da^L_k of shape (K, N, n_L)."""
    if net.L in net.a and net.a[net.L].shape[0] != net.K:
        raise ValueError(f"the last forward pass computed {net.a[net.L].shape[0]} member(s); a backward pass needs "
                         f"the forward of all K = {net.K} members (call net(x) without member=)")
    backward(net, grad_output)


# ----------------------------------------------------------------------------- the batched SGD step


class GridSGD(Optimizer):
    """SGD of :mod:`handgrad.optim` with one set of hyperparameters per member.

    Every parameter has the member axis first (K, ...). With per-member γ_k (lr), μ_k (momentum),
    τ_k (dampening), λ_k (weight decay), ν_k (nesterov):

        g_t = g_t + λ p_{t-1}
        b_t = g_t                              at the first step
        b_t = μ b_{t-1} + (1 - τ) g_t          after that
        d_t = g_t + μ b_t  where ν,  b_t elsewhere (and g_t where μ = 0: plain SGD, no buffer)
        p_t = p_{t-1} - γ d_t                  where alive,  p_{t-1} where not (a frozen member)

    Two memory layouts, as :mod:`handgrad.optim` has two paths:

    - per member (:func:`_member_sgd`, the default on a CPU): for k = 0..K-1 the slices ``p[k]`` are updated by
      :func:`handgrad.optim._single_tensor_sgd` with member k's hyperparameters as Python numbers (bitwise equal
      to torch.optim.SGD). One member's slices stay in the CPU cache through all the operations,
      where a pass over the whole stacked (K, 512, 3072) tensor per operation would go to main memory each
      time (measured: 5x slower). Frozen members are skipped, which reads ``alive`` on the host: free on a CPU.
    - stacked (:func:`_stacked_sgd`, the default on accelerators): each line is one operation on the whole
      (K, ...) tensor with the hyperparameters as (K, 1, 1) tensors, ``alive`` used on the device through
      ``torch.where`` (so a NaN update cannot leak in): a few kernels per parameter, no host synchronisation,
      capturable in a CUDA graph. For μ = 0 it computes b_t = 0·b_{t-1} + 1·g_t = g_t, i.e. plain SGD
      (hence τ' = τ where μ != 0 and 0 where μ = 0), and λ = 0 adds 0·p = 0.

    The buffers (``state[p]["momentum_buffer"]``, (K, ...)) are saved in checkpoints with the optimizer state;
    the hyperparameters are plain lists in the param group (saved as well). ``per_member``: None chooses by
    device as above; True or False forces a layout (both give the same numbers up to rounding).

    ``step(alive=mask)`` takes a (K,) boolean tensor: members where it is False keep their parameters unchanged.
    """

    def __init__(self, params, lr: Sequence[float], momentum: Sequence[float], dampening: Sequence[float],
                 weight_decay: Sequence[float], nesterov: Sequence[bool], per_member: Optional[bool] = None):
        hp = {"lr": [float(v) for v in lr], "momentum": [float(v) for v in momentum],
              "dampening": [float(v) for v in dampening], "weight_decay": [float(v) for v in weight_decay],
              "nesterov": [bool(v) for v in nesterov]}
        K = len(hp["lr"])
        if K == 0 or any(len(v) != K for v in hp.values()):
            raise ValueError(f"GridSGD: every hyperparameter needs one value per member, got lengths "
                             f"{ {k: len(v) for k, v in hp.items()} }")
        for k in range(K):
            _member({name: v[k] for name, v in hp.items()}, f"GridSGD member {k}")
        super().__init__(params, hp)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 1 or p.shape[0] != K:
                    raise ValueError(f"GridSGD: every parameter needs the member axis first (K = {K}), got shape "
                                     f"{tuple(p.shape)}")
        self.per_member = per_member
        self._hp_cache: dict = {}
        self._scratch: dict = {}  # one work tensor per parameter, reused every step (not state: not saved)

    def _member_tensors(self, group: dict, like: Tensor) -> dict[str, Tensor]:
        """The group's hyperparameters as (K, 1, 1) tensors on ``like``'s device and dtype (built once)."""
        key = (like.device, like.dtype, *(tuple(group[k]) for k in HPARAMS))
        if key not in self._hp_cache:
            t = {k: torch.tensor(group[k], dtype=like.dtype).view(-1, 1, 1) for k in HPARAMS if k != "nesterov"}
            t["lr_neg"] = -t["lr"]
            t["one_minus_dampening"] = torch.where(t["momentum"] != 0, 1 - t["dampening"], torch.ones_like(t["lr"]))
            t["nesterov"] = torch.tensor(group["nesterov"]).view(-1, 1, 1)
            self._hp_cache[key] = {k: v.to(like.device) for k, v in t.items()}
        return self._hp_cache[key]

    def _work_tensor(self, p: Tensor) -> Tensor:
        d = self._scratch.get(p)
        if d is None or d.shape != p.shape or d.dtype != p.dtype or d.device != p.device:
            d = self._scratch[p] = torch.empty_like(p)
        return d

    @torch.no_grad()
    def step(self, closure=None, alive: Optional[Tensor] = None, run=None):
        """One update of every parameter with a gradient (rule in the class docstring).

        ``run``: a callable that already performs the whole training step, this update included (a captured CUDA
        graph or a compiled function, see :class:`GridClassifier`); ``step`` then only calls it, so that a caller
        (Lightning) still sees and counts an optimizer step."""
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
    def update(self, alive: Optional[Tensor] = None) -> None:
        """The update itself, in the layout ``per_member`` asks for (the first call creates the buffers)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            first = [self.state[p].get("momentum_buffer") is None for p in params]
            if any(first):  # the buffers are created once, zero; the first step writes b_1 = g into them
                for p, new in zip(params, first):
                    if new:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            per_member = self.per_member if self.per_member is not None else all(p.is_cpu for p in params)
            if per_member:
                _member_sgd(params, bufs, group, alive=None if alive is None else alive.tolist(), first=first)
            else:
                scratch = [self._work_tensor(p) for p in params]
                _stacked_sgd(params, bufs, scratch, self._member_tensors(group, params[0]), alive=alive,
                             first=first, any_nesterov=any(group["nesterov"]))


def _member_sgd(params, bufs, group: dict, *, alive: Optional[list], first: list) -> None:
    """The rule member by member (the CPU layout): :func:`handgrad.optim._single_tensor_sgd`, torch.optim.SGD's
    single-tensor path, on member k's slices p[k] with member k's hyperparameters as Python numbers."""
    for k in range(params[0].shape[0]):
        if alive is not None and not alive[k]:
            continue  # a frozen member: parameters and buffers untouched
        member_bufs = [None if new else b[k] for b, new in zip(bufs, first)]  # None: the first step makes it
        _single_tensor_sgd([p[k] for p in params], [p.grad[k] for p in params], member_bufs,
                           lr=group["lr"][k], momentum=group["momentum"][k], dampening=group["dampening"][k],
                           weight_decay=group["weight_decay"][k], nesterov=group["nesterov"][k], maximize=False)
        if group["momentum"][k] != 0:
            for b, made, new in zip(bufs, member_bufs, first):
                if new:
                    b[k].copy_(made)  # b_1 = g, into the stacked buffer


def _stacked_sgd(params, bufs, scratch, hp: dict, *, alive: Optional[Tensor], first: list, any_nesterov: bool) -> None:
    """The rule on whole (K, ...) tensors, hyperparameters as (K, 1, 1) tensors (the accelerator layout); every
    full-size operation writes into the buffer or the work tensor ``d`` (``out=``): no allocation per step."""
    for p, buf, d, new in zip(params, bufs, scratch, first):
        shape = (-1,) + (1,) * (p.dim() - 1)
        lr_neg, mu, wd = (hp[k].view(shape) for k in ("lr_neg", "momentum", "weight_decay"))
        torch.addcmul(p.grad, wd, p, out=d)  # g = g + λ p
        if new:
            buf.copy_(d)  # b_1 = g
        else:
            buf.mul_(mu).addcmul_(hp["one_minus_dampening"].view(shape), d)  # b = μ b + (1 - τ') g
        if any_nesterov:
            torch.where(hp["nesterov"].view(shape), d.addcmul_(mu, buf), buf, out=d)  # d = g + μ b | b
            torch.addcmul(p, lr_neg, d, out=d)  # p - γ d
        else:
            torch.addcmul(p, lr_neg, buf, out=d)  # p - γ b
        if alive is None:
            p.copy_(d)
        else:
            torch.where(alive.view(shape), d, p, out=p)


# ----------------------------------------------------------------------------- selection


def select_best(val_acc: Sequence[float], val_loss: Sequence[float], failed: Sequence[bool]) -> int:
    """Index of the member with the highest val accuracy; ties go to the lower val loss, then to the
    lower index. Failed members and members with a non-finite val accuracy are never selected."""
    candidates = [k for k in range(len(val_acc))
                  if not failed[k] and math.isfinite(val_acc[k])]
    if not candidates:
        raise RuntimeError("every member of the grid failed (diverged): nothing to select; lower the learning rates")
    vl = [v if math.isfinite(v) else math.inf for v in val_loss]
    return min(candidates, key=lambda k: (-val_acc[k], vl[k], k))


# ----------------------------------------------------------------------------- the LightningModule


class FusedStep:
    """The whole training step of a :class:`GridClassifier` (forward, losses, failure mask, backward, SGD update,
    metric sums) as one function of (x, y) made of tensor operations only, run either

    - ``"inductor"``: through ``torch.compile`` (fused kernels; C++ on a CPU, Triton on a GPU), one compiled
      graph per batch shape (the last, shorter batch of an epoch gets its own);
    - ``"cuda_graph"``: recorded once per batch shape as a CUDA graph and replayed (one launch per step
      instead of ~100 kernel launches); the batch is copied into the graph's static input tensors first.
      The first step of each shape runs eagerly on a side stream (the usual warm-up), the second is
      recorded and replayed, later ones are replayed.

    It is valid only while every tensor it touches keeps its address: parameters, gradients, momentum buffers,
    work tensors, ``alive``/``failed_epoch`` and the metric sums are all updated in place (and the gradients are
    kept through validation, see ``GridClassifier.on_validation_model_zero_grad``); every step checks those
    addresses (a few dozen pointer reads) and rebuilds the plan, dropping the graphs, when one has moved.
    """

    def __init__(self, model: "GridClassifier", mode: str):
        self.model, self.mode = model, mode
        self.plan: Optional[list] = None  # per param group: (params, bufs, scratch, hp tensors, any_nesterov)
        self._addresses: list = []  # where every tensor the step touches was when the plan was made
        self.compiled = None
        self.graphs: dict = {}  # batch shape -> (graph, static x, static y) or the count of warm-up steps done
        self.steps = 0  # steps run by this object (the others were eager)

    def _current_plan(self, opt: GridSGD) -> list:
        """The optimizer's tensors, gathered once (the compiled function and the graphs see plain lists); gathered
        again, and the graphs dropped, when any tensor the step touches has moved (a checkpoint loaded into the
        optimizer, the model moved to another device and back between two fits, ...)."""
        plan = [([p for p in g["params"]], [opt.state[p]["momentum_buffer"] for p in g["params"]],
                 [opt._work_tensor(p) for p in g["params"]], opt._member_tensors(g, g["params"][0]),
                 any(g["nesterov"])) for g in opt.param_groups]
        m = self.model
        tensors = [t for params, bufs, scratch, hp, _ in plan for t in (*params, *bufs, *scratch, *hp.values())]
        tensors += [p.grad for params, *_ in plan for p in params]
        tensors += [*m.buffers(), *m._sums["train"]]
        addresses = [(t.device, t.data_ptr()) for t in tensors]
        if addresses != self._addresses:
            self.plan, self._addresses = plan, addresses
            self.compiled, self.graphs = None, {}
        return self.plan

    def _step(self, x: Tensor, y: Tensor) -> None:
        m = self.model
        with torch.no_grad():
            m._train_math(x, y)
            for params, bufs, scratch, hp, any_nesterov in self.plan:
                _stacked_sgd(params, bufs, scratch, hp, alive=m.alive, first=[False] * len(params),
                             any_nesterov=any_nesterov)

    def runner(self, opt: GridSGD, x: Tensor, y: Tensor):
        """A callable doing this step (for ``GridSGD.step(run=...)``), or None: take an eager step instead
        (the first step creates the momentum buffers, so it is always eager)."""
        if not opt.state or any(p.grad is None for g in opt.param_groups for p in g["params"]):
            return None
        self._current_plan(opt)
        self.steps += 1
        if self.mode == "inductor":
            if self.compiled is None:
                self.compiled = torch.compile(self._step, dynamic=False)
            return lambda: self.compiled(x, y)
        key = (tuple(x.shape), tuple(y.shape), x.dtype, y.dtype)
        entry = self.graphs.get(key, 0)
        if entry == 0:  # warm-up: a real (eager) step on a side stream, as CUDA graph capture wants
            self.graphs[key] = 1
            return lambda: self._on_side_stream(x, y)
        if entry == 1:
            self.graphs[key] = entry = self._capture(x, y)
        graph, static_x, static_y = entry

        def replay():
            static_x.copy_(x)
            static_y.copy_(y)
            graph.replay()

        return replay

    def _on_side_stream(self, x: Tensor, y: Tensor) -> None:
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            self._step(x, y)
        torch.cuda.current_stream(x.device).wait_stream(side)

    def _capture(self, x: Tensor, y: Tensor):
        """Record the step into a CUDA graph (nothing runs while recording) for this batch shape."""
        static_x, static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(static_x, static_y)
        return graph, static_x, static_y


COMPILE_MODES = ("inductor", "cuda_graph")


class GridClassifier(L.LightningModule):
    """K classifiers ``MLP(sizes, activation)``, one per grid member, trained together with the
    hand-written batched backward (:func:`grid_backward`) and SGD step (:class:`GridSGD`).

    Args:
        grid: lists per hyperparameter (cartesian product), e.g. ``{lr: [0.01], momentum: [0, 0.9]}``.
        members: or an explicit list of members, e.g. ``[{lr: 0.01, momentum: 0.9, weight_decay: 0.001}]``.
            Keys: lr, momentum, dampening, weight_decay, nesterov (defaults as torch.optim.SGD).
        sizes: layer widths [n_0, ..., n_L] (n_0 = 3072 for CIFAR, n_L = number of classes).
        activation: hidden activation (see :mod:`handgrad.activations`); the output is linear.
        init_seed: the initial weights are those of ``MLP(sizes, activation)`` built right after
            ``torch.manual_seed(init_seed)`` (the global random state is left as it was), copied into
            every member: each member starts where :class:`handgrad.module.HandgradClassifier` starts
            when seeded with the same value. ``None``: build that MLP from the current global state.
        compile: None (eager), ``"inductor"`` (the whole training step through ``torch.compile``) or
            ``"cuda_graph"`` (the whole training step recorded as a CUDA graph and replayed; CUDA only).
            See :class:`FusedStep`. The numbers are those of the eager step up to floating-point rounding.

    Per-member metrics are summed on the device as (K,) tensors and read once per epoch into
    ``self.history[name]`` (one list of K floats per epoch): train_loss, train_acc (means over the
    epoch's training batches, as they were trained), val_loss, val_acc. A member whose training
    loss is not finite is marked failed (``alive[k] = False``, ``failed_epoch[k]`` = its epoch) and
    frozen; the others go on. Before ``trainer.test`` set ``test_member``: only that member is
    evaluated, its numbers land in ``test_result``. With ``member_loggers`` set (a list of K loggers),
    each member's epoch metrics go to its own logger (train/loss, train/acc, val/loss, val/acc).

    A training step reads nothing back from the device (no ``.item()``, no Python ``if`` on a tensor): on a GPU
    the host queues the steps ahead of the device, and synchronises once per epoch to read the metrics.
    """

    def __init__(self, grid: Optional[dict] = None, members: Optional[list[dict]] = None,
                 sizes: Sequence[int] = (3072, 512, 128, 32, 2), activation: str = "relu",
                 init_seed: Optional[int] = 265, compile: Optional[Literal["inductor", "cuda_graph"]] = None):
        super().__init__()
        if compile is not None and compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}: use null (eager), 'inductor' (torch.compile) or 'cuda_graph'")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.members = expand_grid(grid, members)
        self.K = len(self.members)
        self.sizes = [int(n) for n in sizes]
        self.net = GridMLP(self.sizes, self.K, activation)
        if init_seed is None:
            mlp = MLP(self.sizes, activation)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                mlp = MLP(self.sizes, activation)
        self.net.load_mlp(mlp)
        self.register_buffer("alive", torch.ones(self.K, dtype=torch.bool))
        self.register_buffer("failed_epoch", torch.full((self.K,), -1, dtype=torch.long))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long), persistent=False)  # on the device
        self.history: dict[str, list[list[float]]] = {k: [] for k in METRICS}
        self.member_loggers: Optional[list] = None  # one Lightning logger per member, set by handgrad.sweep
        self.test_member: Optional[int] = None
        self.test_result: dict[str, float] = {}
        self._sums: dict[str, tuple[Tensor, Tensor]] = {}  # stage -> (sum of N * loss_k, correct_k), in place
        self._counts: dict[str, int] = {}  # stage -> samples seen (on the host)
        self.fused = FusedStep(self, compile) if compile else None

    def setup(self, stage: str) -> None:
        if self.trainer.precision not in SUPPORTED_PRECISIONS:
            raise ValueError(f"trainer.precision={self.trainer.precision!r} is not supported: the hand-written "
                             f"backward and SGD step run in one dtype. Use one of {SUPPORTED_PRECISIONS}.")
        check_sizes_fit_data(self.sizes, getattr(self.trainer, "datamodule", None))
        if self.trainer.world_size > 1 or not isinstance(self.trainer.strategy, SingleDeviceStrategy):
            # the batched backward runs without autograd, so DDP's gradient hooks would never average anything:
            # every process would train its own replica on its own shard
            raise ValueError(f"GridClassifier trains on one device (got strategy "
                             f"{type(self.trainer.strategy).__name__} with {self.trainer.world_size} processes); "
                             f"to use several devices run `python train.py sweep --trainer.devices N`, which gives "
                             f"each device its own share of the members")
        if self.hparams.compile == "cuda_graph" and self.trainer.strategy.root_device.type != "cuda":
            raise ValueError("compile='cuda_graph' records the training step as a CUDA graph and needs a CUDA "
                             "device (--trainer.accelerator gpu); on a CPU use compile='inductor' or null")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self):
        return GridSGD(self.net.parameters(), **{k: [m[k] for m in self.members] for k in HPARAMS})

    # ---------------------------------------------------------------- per-member metrics, on the device

    def _reset(self, stage: str) -> None:
        """Zero the stage's sums in place (allocated once: a captured step keeps writing into the same tensors)."""
        w = self.net.fc["1"].weight
        sums = self._sums.get(stage)
        if sums is None or sums[0].device != w.device or sums[0].dtype != w.dtype:
            self._sums[stage] = (w.new_zeros(self.K), torch.zeros(self.K, dtype=torch.long, device=w.device))
        else:
            sums[0].zero_()
            sums[1].zero_()
        self._counts[stage] = 0

    def _accumulate(self, stage: str, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        """Add N * loss_k and the number of correct predictions of each member to the (K,) sums, in place."""
        loss_sum, correct = self._sums[stage]
        loss_sum.add_(loss * y.shape[0])
        correct.add_((logits.argmax(-1) == y).sum(-1))

    def _read(self, stage: str, alive: Tensor) -> tuple[list[float], list[float]]:
        """Epoch means (loss, accuracy) per member, NaN where not ``alive``: a few host reads per epoch.
        The accuracy is correct / N in Python floats (exact counts, no float32 rounding)."""
        n = self._counts.pop(stage)
        loss_sum, correct = self._sums[stage]
        ok, loss_sum, correct = alive.tolist(), loss_sum.tolist(), correct.tolist()
        loss = [s / n if a else math.nan for a, s in zip(ok, loss_sum)]
        acc = [c / n if a else math.nan for a, c in zip(ok, correct)]
        return loss, acc

    # ---------------------------------------------------------------- training

    def on_train_epoch_start(self) -> None:
        self.epoch.fill_(self.current_epoch)
        self._reset("train")

    def _train_math(self, x: Tensor, y: Tensor) -> None:
        """Forward, per-member losses, failure mask, backward and metric sums: device work only, no host reads."""
        logits = self.net(x)
        loss, g = cross_entropy(logits, y)
        newly_failed = self.alive & ~torch.isfinite(loss)
        self.failed_epoch.copy_(torch.where(newly_failed, self.epoch, self.failed_epoch))
        self.alive.logical_and_(~newly_failed)
        grid_backward(self.net, g)
        self._accumulate("train", loss, logits, y)

    def training_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        if y.shape[0] == 0:  # its mean loss would be 0/0 = NaN and mark every member as diverged
            raise ValueError(f"training batch {batch_idx} is empty: the data loader must not yield empty batches")
        opt = self.optimizers()  # stepped through Lightning: it counts the step and feeds checkpoints
        if "train" not in self._counts:  # resumed mid-epoch: Lightning calls no on_train_epoch_start then
            self.on_train_epoch_start()
        self._counts["train"] += y.shape[0]
        run = self.fused.runner(opt.optimizer, x, y) if self.fused is not None else None
        if run is not None:
            opt.step(run=run)
            return
        with torch.no_grad():  # no graph: the gradients come from the cached activations
            self._train_math(x, y)
            opt.step(alive=self.alive)

    def on_validation_model_zero_grad(self) -> None:
        """Keep the gradient tensors through validation (Lightning would release them): every step overwrites
        them in place, and a fused step holds their addresses."""

    def on_train_epoch_end(self) -> None:
        if not self._counts.get("train"):
            return
        loss, acc = self._read("train", self.alive)
        self.history["train_loss"].append(loss)
        self.history["train_acc"].append(acc)
        if self.member_loggers:
            self._log_members()

    def _log_members(self) -> None:
        """This epoch's numbers of member k to ``member_loggers[k]`` (its own TensorBoard run)."""
        h, epoch = self.history, len(self.history["train_loss"])
        has_val = len(h["val_loss"]) == epoch  # validation ran at the end of this epoch
        for k, logger in enumerate(self.member_loggers):
            metrics = {"train/loss": h["train_loss"][-1][k], "train/acc": h["train_acc"][-1][k]}
            if has_val:
                metrics.update({"val/loss": h["val_loss"][-1][k], "val/acc": h["val_acc"][-1][k]})
            logger.log_metrics({name: v for name, v in metrics.items() if math.isfinite(v)}, step=self.global_step)

    # ---------------------------------------------------------------- validation and test

    def on_validation_epoch_start(self) -> None:
        self._reset("val")

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self._accumulate("val", cross_entropy(logits, y)[0], logits, y)
        self._counts["val"] += y.shape[0]

    def on_validation_epoch_end(self) -> None:
        if not self._counts.get("val"):
            return
        loss, acc = self._read("val", self.alive)
        if self.trainer.sanity_checking:
            return
        self.history["val_loss"].append(loss)
        self.history["val_acc"].append(acc)
        finite = [a for a in acc if math.isfinite(a)]
        self.log_dict({"grid/members_alive": float(len(finite)),
                       "grid/best_val_acc": max(finite) if finite else math.nan}, prog_bar=True)

    def on_test_epoch_start(self) -> None:
        if self.test_member is None or not 0 <= self.test_member < self.K:
            raise RuntimeError(f"set model.test_member to the selected member (0..{self.K - 1}) before "
                               "trainer.test: only that member is evaluated on the test set")
        self._reset("test")

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x, member=self.test_member)
        self._accumulate("test", cross_entropy(logits, y)[0], logits, y)
        self._counts["test"] += y.shape[0]

    def on_test_epoch_end(self) -> None:
        k = self.test_member
        loss, acc = self._read("test", self.alive[k:k + 1])
        self.test_result = {"test_loss": loss[0], "test_acc": acc[0]}
        self.log_dict({"test/loss": loss[0], "test/acc": acc[0]})

    # ---------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["grid_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = checkpoint.get("grid_history", self.history)
