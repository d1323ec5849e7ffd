"""The checks of ``python train.py verify``, as plain functions that return rows of a report.

A :class:`Subject` is a course-style model (``L``, ``fc``, ``a``, ``z``, ``df``, ``dL_dw``, ``dL_db``, as
:class:`handgrad.core.mlp.MLP`) with two ways to the gradient of its loss on a batch (x, y):

    hand      forward, loss and the hand-written backward, which fills model.dL_dw[l], model.dL_db[l]
    autograd  the same loss, differentiated by torch.autograd

The checks, layers listed in backpropagation order (L down to 1), so the first failing row is where an error
enters the delta recursion:

    autograd        e = ‖g − g_ref‖ / ‖g_ref‖ for dL/dW^l and dL/db^l, and the element of largest |g − g_ref|
    finite diff.    r = ‖g_fd − g‖ / (‖g_fd‖ + ‖g‖) on a seeded sample S of entries, with central differences
                        g_fd,i = (L(θ + ε e_i) − L(θ − ε e_i)) / 2ε,   i ∈ S
    sgd             an optimizer against torch.optim.SGD fed the same gradients: bitwise equal, else the
                    largest distance in ulps (units in the last place) between the two parameters
    training        N steps of hand backward + optimizer against autograd + torch.optim.SGD, every step's loss:
                        |L_t − L_t^ref| / |L_t^ref|
    data parallel   the all-reduced hand gradient of W shards against the hand gradient of the whole global batch
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from handgrad.core import losses
from handgrad.core.backprop import backward
from handgrad.core.distributed import all_reduce_gradients
from handgrad.core.mlp import MLP
from handgrad.runtime import text

GRADS = ("dL_dw", "dL_db")  # the model's gradient dicts, for the parameters W^l and b^l
INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # a float's bits, by its size in bytes
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # u = 2^-(significand bits)


@dataclass
class Row:
    """One line of the report: ``check`` on ``layer`` (None: the whole model) and ``param`` gave ``value``, which
    passes when value <= tol. verdict: "pass", "FAIL" or "skipped"; detail: the worst element, ulps, or why."""

    check: str
    layer: Optional[int]
    param: str
    value: Optional[float]
    tol: Optional[float]
    verdict: str
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def judge(check, layer, param, value, tol, detail="") -> Row:
    return Row(check, layer, param, value, tol, "pass" if value <= tol else "FAIL", detail)  # NaN fails


@dataclass
class Subject:
    """A model and its two gradients. ``hand(model, x, y)`` returns the loss and fills model.dL_dw / dL_db without
    autograd; ``loss(model, x, y)`` is the same loss, for autograd. ``mean``: the loss is a batch mean (else a sum)."""

    name: str
    model: nn.Module
    hand: Callable[[nn.Module, Tensor, Tensor], Tensor]
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]
    mean: bool = True


def reference_subject(sizes, activation: str, loss: str) -> Subject:
    """handgrad's MLP, its loss (``handgrad.core.losses``, mean over the batch) and :func:`handgrad.core.backprop.backward`."""
    model = MLP(sizes, activation)

    def target(out, y):
        return y if loss == "cross_entropy" else F.one_hot(y.long(), out.shape[-1]).to(out.dtype)

    def as_weights(model, out):  # the loss in the weights' dtype: float32 under mixed precision (as autocast runs it)
        return out.to(model.fc["1"].weight.dtype)

    def hand(model, x, y):
        with torch.no_grad():
            out = as_weights(model, model(x))
            value, grad_out = getattr(losses, loss)(out, target(out, y))
            backward(model, grad_out)
        return value

    def torch_loss(model, x, y):
        out = as_weights(model, model(x))
        return (F.cross_entropy if loss == "cross_entropy" else F.mse_loss)(out, target(out, y))

    return Subject(f"MLP {list(sizes)} {activation}, {loss}", model, hand, torch_loss)


def course_subject(model: nn.Module, backprop: Callable, name: str) -> Subject:
    """A course-style model and its ``backprop(model, y_true, y_pred)``, on the course's loss, the sum of squared
    errors to the one-hot target: L = Σ (y_pred − y_true)^2 (as :func:`handgrad.core.backprop.backpropagation`)."""

    def sse(out, y):
        return ((out - F.one_hot(y.long(), out.shape[-1]).to(out.dtype)) ** 2).sum()

    def hand(model, x, y):
        with torch.no_grad():
            out = model(x)
            backprop(model, F.one_hot(y.long(), out.shape[-1]).to(out.dtype), out)
            return sse(out, y)

    return Subject(name, model, hand, lambda model, x, y: sse(model(x), y), mean=False)


def parameters(model) -> list[tuple[int, str, Tensor]]:
    """(l, "dL_dw", W^l) and (l, "dL_db", b^l) for l = L..1: backpropagation order."""
    return [(l, name, getattr(model.fc[str(l)], attr)) for l in range(model.L, 0, -1)
            for name, attr in zip(GRADS, ("weight", "bias"))]


def copy_of(model, device, dtype):
    """A deep copy of ``model`` in ``dtype`` on ``device``, made after emptying its caches (a, z, dL_dw, dL_db):
    tensors that are part of an autograd graph cannot be copied."""
    for name in ("a", "z", "w", *GRADS):
        cache = getattr(model, name, None)
        if isinstance(cache, dict):
            cache.clear()
    return copy.deepcopy(model).to(device, dtype)


def hand_gradients(subject: Subject, model, x, y) -> tuple[Optional[Tensor], dict, str]:
    """Run the hand-written backward on a fresh ``model.dL_dw`` / ``dL_db``; returns (loss, {(l, name): gradient or
    None when it was not set}, the error it raised or "")."""
    for name in GRADS:
        getattr(model, name).clear()
    loss, error = None, ""
    try:
        loss = subject.hand(model, x, y)
    except Exception as err:  # the code under test is the student's: report it as a failure, not a crash
        error = f"the backward raised {type(err).__name__}: {err}"
    grads = {(l, name): getattr(model, name).get(l) for l, name, _ in parameters(model)}
    return loss, {k: None if g is None else g.detach().clone() for k, g in grads.items()}, error


def autograd_gradients(subject: Subject, model, x, y) -> dict:
    """{(l, name): dL/dθ} by torch.autograd of ``subject.loss`` (no ``.grad`` is touched)."""
    params = parameters(model)
    grads = torch.autograd.grad(subject.loss(model, x, y), [p for _, _, p in params])
    return {(l, name): g for (l, name, _), g in zip(params, grads)}


def compare(check: str, key, got: Optional[Tensor], ref: Tensor, tol: float, error: str = "") -> Row:
    """The relative error e = ‖g − g_ref‖ / ‖g_ref‖ of one gradient, and its worst element."""
    l, name = key
    if got is None or got.shape != ref.shape:
        why = error or (f"model.{name}[{l}] was not set by the backward" if got is None
                        else f"model.{name}[{l}] has shape {tuple(got.shape)}, the parameter {tuple(ref.shape)}")
        return Row(check, l, name, float("inf"), tol, "FAIL", why)
    got, ref = got.double(), ref.double()
    diff, ref_norm = (got - ref).norm().item(), ref.norm().item()
    value = diff / ref_norm if ref_norm > 0 else (0.0 if diff == 0 else float("inf"))
    i = int((got - ref).abs().flatten().argmax()) if ref.numel() else 0
    index = list(torch.unravel_index(torch.tensor(i), ref.shape)) if ref.numel() else []
    worst = f"worst {[int(j) for j in index]}: {got.flatten()[i]:.6e} vs {ref.flatten()[i]:.6e}" if ref.numel() else ""
    return judge(check, l, name, value, tol, worst)


def check_autograd(subject: Subject, x, y, dtype, tol: float) -> list[Row]:
    """Hand-written gradients against autograd's of the same loss, with the model, x in ``dtype``; a bfloat16 or
    float16 ``dtype`` is judged against :func:`low_precision_tolerance` instead of ``tol``."""
    model = copy_of(subject.model, x.device, dtype)
    x = x.to(dtype)
    _, hand, error = hand_gradients(subject, model, x, y)
    ref = autograd_gradients(subject, model, x, y)
    return [compare(f"autograd {dtype_name(dtype)}", k, hand[k], ref[k],
                    low_precision_tolerance(dtype, model.L, k[0]) if dtype in UNIT_ROUNDOFF else tol, error)
            for k in ref]


def check_mixed(subject: Subject, x, y, dtype) -> list[Row]:
    """Mixed precision: the hand-written products in ``dtype`` on float32 weights (``model.compute_dtype``) against
    autograd of the plain float32 model under ``torch.autocast(dtype)``, judged by :func:`low_precision_tolerance`."""
    name = f"autograd {'bf16' if dtype == torch.bfloat16 else '16'}-mixed"
    if not hasattr(subject.model, "compute_dtype"):
        return [Row(name, None, "-", None, None, "skipped", "a course-style model has no compute_dtype")]
    hand_model = copy_of(subject.model, x.device, torch.float32)
    hand_model.compute_dtype = dtype
    _, hand, error = hand_gradients(subject, hand_model, x.float(), y)
    ref_model = copy_of(subject.model, x.device, torch.float32)
    with torch.autocast(x.device.type, dtype=dtype):
        ref = autograd_gradients(subject, ref_model, x.float(), y)
    return [compare(name, k, hand[k], ref[k], low_precision_tolerance(dtype, hand_model.L, k[0]), error) for k in ref]


def low_precision_tolerance(dtype, L: int, l: int) -> float:
    """How far two correct gradients of layer l (of L) may be in bfloat16 or float16, e <= 2u (L - l + 2), u the unit
    roundoff: both sides run the same products on the same inputs, accumulated in float32 and rounded once to the
    dtype; another accumulation order can round an entry to the neighbouring value (2u), and a difference in delta^l
    reaches every layer below it, each adding its own rounding (the derivation: tests/test_precision.py)."""
    return 2 * UNIT_ROUNDOFF[dtype] * (L - l + 2)


def central_differences(loss: Callable[[], Tensor], flat: Tensor, indices, eps: float) -> Tensor:
    """g_fd,i = (L(θ + ε e_i) − L(θ − ε e_i)) / 2ε for each i of ``indices``: θ is ``flat`` (a parameter's values,
    a view), moved by ±ε in place and put back; ``loss()`` evaluates L at the current θ."""
    fd = torch.empty(len(indices), dtype=torch.float64)
    with torch.no_grad():
        for j, i in enumerate(indices):
            orig = flat[i].item()
            flat[i] = orig + eps
            up = loss()
            flat[i] = orig - eps
            down = loss()
            flat[i] = orig
            fd[j] = (up - down).item() / (2 * eps)
    return fd


def check_finite_differences(subject: Subject, x, y, samples: int, eps: float, tol: float, seed: int) -> list[Row]:
    """Central differences of the loss in float64 on ``samples`` entries of each W^l and b^l (drawn with ``seed``),
    against the hand-written gradient: the residual r = ‖g_fd − g‖ / (‖g_fd‖ + ‖g‖)."""
    model = copy_of(subject.model, x.device, torch.float64)
    x = x.to(torch.float64)
    _, hand, error = hand_gradients(subject, model, x, y)
    draw = torch.Generator().manual_seed(seed)
    rows = []
    for l, name, p in parameters(model):
        idx = torch.randperm(p.numel(), generator=draw)[:samples].tolist()
        fd = central_differences(lambda: subject.loss(model, x, y), p.detach().view(-1), idx, eps)
        g = hand[(l, name)]
        if g is None or g.shape != p.shape:
            rows.append(compare("finite differences", (l, name), g, p, tol, error))  # the missing/shape row
            continue
        g = g.detach().view(-1)[idx].double().cpu()
        denom = (fd.norm() + g.norm()).item()
        value = (fd - g).norm().item() / denom if denom > 0 else 0.0
        rows.append(judge("finite differences", l, name, value, tol, f"{len(idx)} entries, ε = {eps:g}"))
    return rows


def ulp_distance(a: Tensor, b: Tensor) -> Tensor:
    """|a − b| in units in the last place, element-wise: the distance of the two floats in the ordered integer
    view of their bits (sign-magnitude mapped to a signed integer: m for a >= 0, −m for a < 0, m = the magnitude
    bits), computed in int64."""
    bits = INT_VIEW[a.element_size()]
    mask = torch.iinfo(bits).max

    def ordered(t):
        i = t.contiguous().view(bits).to(torch.int64)
        magnitude = i & mask
        return torch.where(i < 0, -magnitude, magnitude)

    return (ordered(a) - ordered(b)).abs()


def compare_bits(check: str, key, ours: Tensor, theirs: Tensor) -> Row:
    """Bitwise equality of two parameters; else the largest ulp distance and where."""
    bits = INT_VIEW[ours.element_size()]
    l, name = key
    param = {"dL_dw": "W", "dL_db": "b"}[name]
    if torch.equal(ours.view(bits), theirs.view(bits)):
        return Row(check, l, param, 0.0, 0.0, "pass", "bitwise equal")
    ulps = ulp_distance(ours, theirs).flatten()
    i = int(ulps.argmax())
    index = [int(j) for j in torch.unravel_index(torch.tensor(i), ours.shape)]
    detail = (f"not bitwise equal: max {int(ulps[i])} ulp at {index} ({ours.flatten()[i]:.9e} vs "
              f"{theirs.flatten()[i]:.9e})")
    return Row(check, l, param, float(ulps[i]), 0.0, "FAIL", detail)


def check_sgd(optimizer: type, hparams: dict, model, grads: list[dict]) -> list[Row]:
    """``optimizer`` against torch.optim.SGD with the same hyperparameters, on both the single-tensor and the
    foreach path: each starts from ``model``'s parameters and takes one step per gradient dict of ``grads``; the
    parameters are compared after the first step and after the last."""
    keys = [(l, name) for l, name, _ in parameters(model)]
    start = [p.detach().clone() for _, _, p in parameters(model)]
    rows = []
    for foreach in (False, True):
        path = "foreach" if foreach else "single-tensor"
        ours, theirs = ([p.clone() for p in start] for _ in range(2))
        opts = [optimizer(ours, foreach=foreach, **hparams), torch.optim.SGD(theirs, foreach=foreach, **hparams)]
        for t, step_grads in enumerate(grads, 1):
            for params, opt in zip((ours, theirs), opts):
                for p, k in zip(params, keys):
                    p.grad = step_grads[k].to(p.dtype).clone()
                opt.step()
            if t in (1, len(grads)):
                check = f"sgd {t} step{'s' if t > 1 else ''} {path}"
                rows += [compare_bits(check, k, a, b) for k, a, b in zip(keys, ours, theirs)]
    return rows


def check_training(subject: Subject, optimizer: type, hparams: dict, batches: list, tol: float,
                   progress: Callable = iter) -> list[Row]:
    """N = len(batches) training steps in float64, hand backward + ``optimizer`` against autograd +
    torch.optim.SGD from the same weights: the relative loss difference |L_t − L_t^ref| / |L_t^ref| of every step.
    ``progress(batches)`` iterates them (e.g. with a progress bar)."""
    hand_model = copy_of(subject.model, batches[0][0].device, torch.float64)
    ref_model = copy_of(hand_model, hand_model.fc["1"].weight.device, torch.float64)
    hand_params, ref_params = ([p for _, _, p in parameters(m)] for m in (hand_model, ref_model))
    hand_opt, ref_opt = optimizer(hand_params, **hparams), torch.optim.SGD(ref_params, **hparams)
    rows = []
    for t, (x, y) in enumerate(progress(batches), 1):
        x = x.to(torch.float64)
        loss, grads, error = hand_gradients(subject, hand_model, x, y)
        if error or any(g is None or g.shape != p.shape for g, p in zip(grads.values(), hand_params)):
            return rows + [Row("training float64", None, f"step {t}", None, tol, "skipped",
                               error or "the hand-written backward does not set every gradient")]
        for p, g in zip(hand_params, grads.values()):
            p.grad = g
        hand_opt.step()
        ref_opt.zero_grad()
        ref_loss = subject.loss(ref_model, x, y)
        ref_loss.backward()
        ref_opt.step()
        ref_value = abs(ref_loss.item())
        diff = abs(loss.item() - ref_loss.item())
        value = diff / ref_value if ref_value > 0 else diff
        rows.append(judge("training float64", None, f"loss step {t}", value, tol,
                          f"loss {loss.item():.12g} vs {ref_loss.item():.12g}"))
    return rows


def check_data_parallel(subject: Subject, x, y, dtype, tol: float) -> list[Row]:
    """Inside a process group: this process's shard (x, y) of the global batch. Every process backpropagates its
    shard by hand and :func:`handgrad.core.distributed.all_reduce_gradients` combines the gradients; the result is
    compared with the hand gradient of the whole global batch (all shards, gathered) on one process. For a sum
    loss both sides are divided by their number of samples first (what the all-reduce of means expects)."""
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, (x.cpu(), y.cpu()))
    model = copy_of(subject.model, x.device, dtype)
    params = parameters(model)
    loss, local, error = hand_gradients(subject, model, x.to(dtype), y)
    n = len(y)
    scale = 1.0 if subject.mean else 1.0 / max(n, 1)
    for l, name, p in params:
        g = local[(l, name)]
        p.grad = torch.zeros_like(p) if g is None or g.shape != p.shape else g * scale
    loss = loss if loss is not None else torch.zeros((), device=x.device)
    all_reduce_gradients([p for _, _, p in params], loss * scale, n)
    reduced = {(l, name): p.grad.clone() for l, name, p in params}  # the next backward may write into .grad
    x_all = torch.cat([s[0] for s in shards]).to(x.device, dtype)
    y_all = torch.cat([s[1] for s in shards]).to(y.device)
    _, single, _ = hand_gradients(subject, model, x_all, y_all)
    check = f"data parallel {dtype_name(dtype)}"
    rows = []
    for l, name, p in params:
        ref = single[(l, name)]
        if ref is None or local[(l, name)] is None:
            rows.append(compare(check, (l, name), None, p, tol, error or "no hand-written gradient"))
            continue
        ref = ref if subject.mean else ref / len(y_all)
        row = compare(check, (l, name), reduced[(l, name)], ref, tol)
        row.detail = f"{len(shards)} processes, global batch {len(y_all)}; {row.detail}"
        rows.append(row)
    return rows


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- the report's table


def first_failure(rows: list[dict]) -> Optional[str]:
    """'layer 2 dL_dw (autograd float64: 0.31 > 1e-10; worst ...)' for the first failing row, None if none fails."""
    for r in rows:
        if r["verdict"] == "FAIL":
            where = f"layer {r['layer']} {r['param']}" if r["layer"] is not None else r["param"]
            return f"{where} ({r['check']}: {fmt(r['value'])} > {fmt(r['tol'])}; {r['detail']})"
    return None


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if float(v).is_integer() and abs(v) < 1e6 else f"{v:.3g}"


COLUMNS = ("check", "layer", "param", "value", "tolerance", "verdict", "detail")


def table_cells(rows: list[dict]) -> list[list[str]]:
    return [[r["check"], "-" if r["layer"] is None else str(r["layer"]), r["param"], fmt(r["value"]), fmt(r["tol"]),
             r["verdict"], r["detail"]] for r in rows]


def text_table(rows: list[dict]) -> str:
    """The report as aligned text columns, one row per check per layer and parameter."""
    cells = [list(COLUMNS)] + table_cells(rows)
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in cells)


def markdown_table(rows: list[dict]) -> str:
    """The same table in Markdown (TensorBoard's Text tab renders it)."""
    return text.markdown_table(COLUMNS, ([c.replace("|", "\\|") for c in line] for line in table_cells(rows)))


def json_safe(value):
    """inf and NaN as strings: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
