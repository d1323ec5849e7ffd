"""What a sweep searches over, and how it picks the winner.

A member is one configuration of the hand-written SGD step, ``{lr, momentum, dampening, weight_decay, nesterov}``
(missing keys take torch.optim.SGD's defaults), and optionally ``seed``: the seed of its initial weights.
The members of a sweep come from exactly one of

- ``members``: an explicit list, e.g. ``[{lr: 0.01}, {lr: 0.01, momentum: 0.9, weight_decay: 0.001}]``;
- ``grid``: a list per hyperparameter, the members are the cartesian product, e.g. ``{lr: [0.01, 0.1], momentum:
  [0, 0.9]}`` (4 members);
- ``grid`` with ``samples: N``: random search, N members, each hyperparameter drawn independently from its
  distribution, reproducibly from ``sample_seed``:

      {log_uniform: [a, b]}    exp(U(log a, log b))       e.g. lr: {log_uniform: [1.0e-4, 0.1]}
      {uniform: [a, b]}        U(a, b)                    e.g. momentum: {uniform: [0.0, 0.99]}
      {choice: [v1, v2, ...]}  one of the values, each equally likely (a plain list means the same)
      v                        always v

``seeds: [s1, s2, ...]`` repeats every configuration once per initial-weight seed (the seed varies fastest:
member k is configuration k // S with seed s_{k mod S}); the results table then shows the mean and standard
deviation over the seeds, and the selection compares configurations by their mean.

How the winner is picked: :mod:`handgrad.sweep.select`.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from typing import Optional, Sequence

from handgrad.core.optim import HYPERPARAMETERS, check_hyperparameters

HPARAM_DEFAULTS = {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
DISTRIBUTIONS = ("log_uniform", "uniform", "choice")


def check_member(d: dict, where: str) -> dict:
    """One member's SGD hyperparameters (and optional init ``seed``), defaults filled in and checked as
    torch.optim.SGD checks them."""
    if not isinstance(d, dict):
        raise TypeError(f"{where}: expected a mapping like {{lr: 0.01, momentum: 0.9}}, got {d!r}")
    unknown = sorted(set(d) - set(HYPERPARAMETERS) - {"seed"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; a member is described by {list(HYPERPARAMETERS)} (and seed)")
    if "lr" not in d:
        raise ValueError(f"{where}: 'lr' is required (got {d!r})")
    m = {**HPARAM_DEFAULTS, **d}
    check_hyperparameters(*(m[k] for k in HYPERPARAMETERS), name=lambda k: f"{where}: {k}")
    out = {k: (m[k] if k == "nesterov" else float(m[k])) for k in HYPERPARAMETERS}
    if "seed" in d:
        if not isinstance(d["seed"], int) or isinstance(d["seed"], bool):
            raise ValueError(f"{where}: seed must be an integer, got {d['seed']!r}")
        out["seed"] = d["seed"]
    return out


def expand_grid(grid: Optional[dict] = None, members: Optional[Sequence[dict]] = None, samples: Optional[int] = None,
                seeds: Optional[Sequence[int]] = None, sample_seed: int = 0) -> list[dict]:
    """The list of members (see the module docstring): from ``members``, the product of ``grid``, or ``samples``
    draws from ``grid``'s distributions; each repeated once per entry of ``seeds``."""
    if (grid is None) == (members is None):
        raise ValueError("give exactly one of `grid` (lists, cartesian product) or `members` (explicit list); "
                         "to replace the members of configs/grid.yaml by a product: "
                         "--model.members null --model.grid '{lr: [0.01, 0.1], momentum: [0, 0.9]}'")
    if samples is not None and members is not None:
        raise ValueError("`samples` draws members from the distributions of `grid`; it cannot go with `members`")
    if members is not None:
        if len(members) == 0:
            raise ValueError("`members` is empty: list at least one configuration, e.g. [{lr: 0.01}]")
        configs = [check_member(dict(m), f"members[{i}]") for i, m in enumerate(members)]
    else:
        configs = _from_grid(grid, samples, sample_seed)
    if seeds is None:
        return configs
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) < len(seeds):
        raise ValueError(f"`seeds` must list distinct integers, e.g. [265, 266, 267], got {seeds!r}")
    return [{**c, "seed": s} for c in configs for s in seeds]


def _from_grid(grid: dict, samples: Optional[int], sample_seed: int) -> list[dict]:
    if not isinstance(grid, dict):
        raise TypeError(f"`grid` must map hyperparameter names to lists, got {grid!r}")
    unknown = sorted(set(grid) - set(HYPERPARAMETERS))
    if unknown:
        raise ValueError(f"grid: unknown key(s) {unknown}; allowed: {list(HYPERPARAMETERS)}")
    if "lr" not in grid:
        raise ValueError("grid: 'lr' is required, e.g. grid: {lr: [0.01]}")
    if samples is not None:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be an integer >= 1 (members drawn at random), got {samples!r}")
        rng = random.Random(sample_seed)
        draws = {k: _distribution(k, grid[k]) for k in HYPERPARAMETERS if k in grid}
        return [check_member({k: draw(rng) for k, draw in draws.items()}, f"sample {i}") for i in range(samples)]
    axes = []
    for k in HYPERPARAMETERS:
        v = grid.get(k, [HPARAM_DEFAULTS.get(k)])
        if isinstance(v, dict):
            raise ValueError(f"grid: {k} is a distribution {v!r}; drawing from it needs --model.samples N")
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        if not v:
            raise ValueError(f"grid: the list for {k!r} is empty")
        axes.append(v)
    return [check_member(dict(zip(HYPERPARAMETERS, combo)), f"grid member {i}") for i, combo in enumerate(itertools.product(*axes))]


def _distribution(key: str, spec):
    """A function rng -> one value of ``key``, from ``{log_uniform|uniform: [a, b]}``, ``{choice: [...]}``, a list
    (choice) or a single value."""
    if isinstance(spec, (list, tuple)):
        spec = {"choice": list(spec)}
    if not isinstance(spec, dict):
        return lambda rng: spec
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ValueError(f"grid: {key}: {spec!r} is not a distribution; use one of {{log_uniform: [a, b]}}, "
                         f"{{uniform: [a, b]}}, {{choice: [...]}}")
    (kind, args), = spec.items()
    if kind == "choice":
        if not isinstance(args, (list, tuple)) or not args:
            raise ValueError(f"grid: {key}: choice needs a non-empty list, got {args!r}")
        return lambda rng: rng.choice(list(args))
    ok = isinstance(args, (list, tuple)) and len(args) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in args)
    if not ok or args[0] > args[1] or (kind == "log_uniform" and args[0] <= 0):
        raise ValueError(f"grid: {key}: {kind} needs [low, high] with low <= high" +
                         (" and low > 0" if kind == "log_uniform" else "") + f", got {args!r}")
    low, high = float(args[0]), float(args[1])
    if kind == "uniform":
        return lambda rng: rng.uniform(low, high)
    return lambda rng: math.exp(rng.uniform(math.log(low), math.log(high)))


SHORT = {"lr": "lr", "momentum": "m", "dampening": "d", "weight_decay": "wd", "nesterov": "nesterov"}


def member_names(members: Sequence[dict]) -> list[str]:
    """The members' TensorBoard run names, e.g. ``m0.9_wd0.001``: only the hyperparameters that vary within the
    sweep (nesterov as ``_nesterov`` where set), and ``_s266`` when the seed varies. Led by the member index
    (``03_m0.9_wd0.001``) where names would repeat or TensorBoard's alphabetical order would not be the members'."""
    def varies(key):
        return len({repr(m.get(key)) for m in members}) > 1

    keys = [k for k in HYPERPARAMETERS if varies(k)] or ["lr", "momentum", "weight_decay"]  # one member: its optimizer

    def name(m):
        parts = [SHORT[k] if k == "nesterov" else f"{SHORT[k]}{m[k]:g}" for k in keys if k != "nesterov" or m[k]]
        return "_".join(parts + ([f"s{m['seed']}"] if varies("seed") else []))

    names = [name(m) for m in members]
    if len(set(names)) < len(names) or sorted(names) != names:
        width = max(2, len(str(len(members) - 1)))
        names = [f"{k:0{width}d}_{n}" if n else f"{k:0{width}d}" for k, n in enumerate(names)]
    return names


def config_of(m: dict) -> tuple:
    """A member's configuration without its seed: members that differ only in ``seed`` share it."""
    return tuple(m[k] for k in HYPERPARAMETERS)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN when any value is NaN (a failed seed)."""
    if not values or any(not math.isfinite(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
