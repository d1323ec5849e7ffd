"""How a sweep picks its winner: the one selection rule, and everything that ranks validations by it.

    rank(acc, loss, index) = (-acc, loss, index)        the smaller, the better

The highest val accuracy wins; ties go to the lower val loss (a NaN loss counts as +inf), then to the lower index:
the earlier member, or the earlier validation of one member. A failed (diverged) member, or one without a finite
val accuracy, is never selected. Every comparison in the sweep goes through :func:`rank`:

    select_best        the member to select, from each member's val accuracy and loss
    best_validation    a member's best validation (the table's best_val_acc, best_epoch)
    is_better          whether a new validation beats a member's best so far (the best-epoch weights kept on the fly)
    select             the selected member of a table, by the last validation or by each member's best one; members
                       that repeat a configuration over seeds compete as one, by their mean
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from handgrad.sweep.search import config_of, mean_std

RULES = ("last", "best_epoch")


def rank(acc: float, loss: float, index: int = 0) -> tuple:
    """The sort key of the rule: higher accuracy first, then lower loss (NaN: +inf), then the lower index."""
    return -acc, (loss if math.isfinite(loss) else math.inf), index


def select_best(val_acc: Sequence[float], val_loss: Sequence[float], failed: Sequence[bool]) -> int:
    """Index of the member to select; raises when every member failed."""
    candidates = [k for k in range(len(val_acc)) if not failed[k] and math.isfinite(val_acc[k])]
    if not candidates:
        raise RuntimeError("every member of the grid failed (diverged): nothing to select; lower the learning rates")
    return min(candidates, key=lambda k: rank(val_acc[k], val_loss[k], k))


def best_validation(val_acc: Sequence[float], val_loss: Sequence[float]) -> Optional[int]:
    """Index of a member's best validation (the earliest of equals), None if it has none with a finite accuracy."""
    rows = [v for v, a in enumerate(val_acc) if math.isfinite(a)]
    return min(rows, key=lambda v: rank(val_acc[v], val_loss[v], v)) if rows else None


def is_better(acc: float, loss: float, best: tuple[float, float]) -> bool:
    """Whether a validation (acc, loss) ranks before the best (acc, loss) so far: being later, it must rank
    strictly before on accuracy and loss."""
    return math.isfinite(acc) and rank(acc, loss) < rank(*best)


def select(rows: list[dict], rule: str = "last") -> int:
    """The selected member of a results table under ``rule`` ("last": the last validation, "best_epoch": each member's
    best one). Members that share a configuration (repeated seeds) compete as one, by their mean; then the
    configuration's best member is taken by the same rule."""
    acc, loss = ("val_acc", "val_loss") if rule == "last" else ("best_val_acc", "best_val_loss")
    failed = [r["status"] != "ok" for r in rows]
    groups: dict[tuple, list[int]] = {}
    for r in rows:
        groups.setdefault(config_of(r), []).append(r["member"])
    if all(len(g) == 1 for g in groups.values()):
        return select_best([r[acc] for r in rows], [r[loss] for r in rows], failed)
    keys = list(groups)
    means = [[mean_std([rows[k][name] for k in groups[c]])[0] for c in keys] for name in (acc, loss)]
    bad = [any(failed[k] for k in groups[c]) for c in keys]
    winner = groups[keys[select_best(means[0], means[1], bad)]]
    return winner[select_best([rows[k][acc] for k in winner], [rows[k][loss] for k in winner], [False] * len(winner))]
