"""The sweep's results: one row per member, the tables on disk and in TensorBoard.

    history[name][row][k]      member k's value of metric ``name`` (train_loss, train_acc per training epoch;
                               val_loss, val_acc per validation), NaN where member k has failed
    steps["train_step"][e]     the global step at the end of training epoch e
    steps["val_epoch"][v]      the epoch and the global step of validation v (it need not run every epoch)
    steps["val_step"][v]

Per member the table shows the last validation (``val_acc``: the course's rule) and the best one
(``best_val_acc`` at ``best_epoch``: highest val accuracy, ties: lower val loss, then the earlier one).
``--select last`` picks on the first, ``--select best_epoch`` on the second (:mod:`handgrad.sweep.select`). When
members repeat a configuration over several seeds, the table by configuration shows mean ± std.
"""

from __future__ import annotations

import csv
import math
import shlex
from pathlib import Path
from typing import Optional

from torch import Tensor

from handgrad.runtime.text import markdown_table
from handgrad.core.optim import HYPERPARAMETERS
from handgrad.sweep.search import config_of, mean_std, member_names
from handgrad.sweep.outcome import METRICS
from handgrad.sweep.select import best_validation
from handgrad.train.views import (SWEEP_METRICS, SWEEP_SHOWN, TensorBoardRun, add_layout, final_metrics,
                                  log_confusion_matrix, log_hparams, run_hparams, write_experiment)

COLUMNS = ("member", "lr", "momentum", "weight_decay", "dampening", "nesterov", "seed", "status",
           "train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc", "best_epoch", "test_acc", "selected")
SUMMED = ("train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc")  # mean ± std over seeds
CONFIG_COLUMNS = ("config", "lr", "momentum", "weight_decay", "dampening", "nesterov", "seeds", "status",
                  *SUMMED, "test_acc", "selected")


def results_table(members: list[dict], history: dict, failed_epoch: list[int], best: Optional[int], test: dict,
                  steps: Optional[dict] = None) -> list[dict]:
    """One row per member (the columns of :data:`COLUMNS`); test_acc only for the selected member."""
    rows = []
    val_epoch = (steps or {}).get("val_epoch") or list(range(len(history["val_acc"])))
    for k, m in enumerate(members):
        ok = failed_epoch[k] < 0
        row = {"member": k, **{h: m[h] for h in ("lr", "momentum", "weight_decay", "dampening", "nesterov")},
               "seed": m.get("seed", "")}
        row["status"] = "ok" if ok else f"failed (epoch {failed_epoch[k]})"
        for name in METRICS:
            row[name] = history[name][-1][k] if history[name] and ok else math.nan
        v = best_validation([r[k] for r in history["val_acc"]], [r[k] for r in history["val_loss"]]) if ok else None
        row["best_val_acc"] = history["val_acc"][v][k] if v is not None else math.nan
        row["best_val_loss"] = history["val_loss"][v][k] if v is not None else math.nan
        row["best_epoch"] = val_epoch[v] if v is not None else ""
        row["best_row"] = v
        row["test_acc"] = test.get("test_acc", math.nan) if k == best else math.nan
        row["selected"] = k == best
        rows.append(row)
    return rows


def by_config(rows: list[dict]) -> list[dict]:
    """One row per configuration over its seeds: mean and std of each metric (columns ``<name>_mean``,
    ``<name>_std``), the selected member's test accuracy on the selected configuration."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(config_of(r), []).append(r)
    out = []
    for i, group in enumerate(groups.values()):
        first = group[0]
        row = {"config": i, **{h: first[h] for h in ("lr", "momentum", "weight_decay", "dampening", "nesterov")},
               "seeds": " ".join(str(r["seed"]) for r in group)}
        n_failed = sum(r["status"] != "ok" for r in group)
        row["status"] = "ok" if not n_failed else f"{n_failed} of {len(group)} failed"
        for name in SUMMED:
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([r[name] for r in group])
        chosen = [r for r in group if r["selected"]]
        row["test_acc"] = chosen[0]["test_acc"] if chosen else math.nan
        row["selected"] = bool(chosen)
        out.append(row)
    return out


def _fmt(column: str, value) -> str:
    """One table cell: the hyperparameters as a config writes them (``0.01``, ``false``), metrics with 4 decimals
    (blank where missing), and the ``selected`` column as a marker: ``yes`` on the selected row, blank elsewhere."""
    if column == "selected":
        return "yes" if value else ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if column in ("lr", "momentum", "weight_decay", "dampening"):
        return f"{value:g}"
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}" if abs(value) < 10 else f"{value:.4g}"
    return str(value)


def markdown(rows: list[dict], columns=COLUMNS) -> str:
    """The table in Markdown (cells: :func:`_fmt`); in the table by configuration a metric is ``mean ± std``."""
    def cell(r, c):
        if c in SUMMED and columns is CONFIG_COLUMNS:
            mean, std = r[f"{c}_mean"], r[f"{c}_std"]
            return "" if math.isnan(mean) else f"{_fmt(c, mean)} ± {_fmt(c, std)}"
        return _fmt(c, r[c])

    return markdown_table(columns, ([cell(r, c) for c in columns] for r in rows))


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if isinstance(r[c], float) and math.isnan(r[c]) else r[c]) for c in columns})


def write_results(log_dir: Path, rows: list[dict], config_rows: Optional[list[dict]] = None) -> tuple[Path, Path]:
    """``results.csv`` (full precision, empty cells for missing values) and ``results.md``; with repeated seeds
    also ``results_by_config.csv`` / ``.md`` (mean and std over the seeds)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = log_dir / "results.csv", log_dir / "results.md"
    _write_csv(csv_path, rows, list(COLUMNS))
    md_path.write_text(markdown(rows) + "\n")
    if config_rows is not None:
        columns = [c for name in CONFIG_COLUMNS for c in ((f"{name}_mean", f"{name}_std") if name in SUMMED else (name,))]
        _write_csv(log_dir / "results_by_config.csv", config_rows, columns)
        (log_dir / "results_by_config.md").write_text(markdown(config_rows, CONFIG_COLUMNS) + "\n")
    return csv_path, md_path


# ----------------------------------------------------------------------------- TensorBoard: one run per member


def member_run(log_dir: Path, name: str) -> TensorBoardRun:
    """A member's TensorBoard run, ``log_dir/<name>/`` (names: :func:`handgrad.sweep.search.member_names`), with
    the main job's tags (:class:`handgrad.train.views.TensorBoardRun`)."""
    return TensorBoardRun(save_dir=str(log_dir), name="", version=name, default_hp_metric=False)


def write_member_curves(log_dir: Path, members: list[dict], indices: list[int], history: dict, steps: dict) -> None:
    """The epoch curves (train/loss, train/acc at the end of every training epoch; val/loss, val/acc at every
    validation) of the members ``indices``, whose values are columns 0.. of ``history``, each in its own run; at
    the step Lightning logs a main job's (and a --sequential member's) epoch metrics: the epoch's last, global
    step - 1, so that their curves line up."""
    names = member_names(members)
    for j, k in enumerate(indices):
        run = member_run(log_dir, names[k])
        points = [(s, {"train/loss": history["train_loss"][e][j], "train/acc": history["train_acc"][e][j]})
                  for e, s in enumerate(steps["train_step"])]
        points += [(s, {"val/loss": history["val_loss"][v][j], "val/acc": history["val_acc"][v][j]})
                   for v, s in enumerate(steps["val_step"])]
        for step, metrics in sorted(points, key=lambda p: p[0]):
            finite = {name: x for name, x in metrics.items() if math.isfinite(x)}
            if finite:
                run.log_metrics(finite, step=step - 1)
        run.finalize("success")


def member_params(member: dict, model: dict, data_hparams: dict, max_epochs) -> dict:
    """A member's hyperparameters for HPARAMS (:func:`run_hparams`): the network's (``model``: sizes, activation,
    ...), the member's SGD ones and its initial-weight seed, the data's, max_epochs."""
    model = {**model, **{h: member[h] for h in HYPERPARAMETERS}, "seed": member.get("seed", model.get("seed"))}
    return run_hparams(model, data_hparams, max_epochs)


def member_metrics(r: dict, history: dict, steps: dict) -> dict:
    """Member row ``r``'s hp/* values (:func:`final_metrics` of its val accuracy at each validation, its last
    train accuracy and val loss), hp/selected, and hp/test_acc on the selected member only. A failed member has
    only hp/selected: no final values (the table shows none either)."""
    k, val_epoch = r["member"], steps.get("val_epoch") or list(range(len(history["val_acc"])))
    metrics = {}
    if r["status"] == "ok":
        val_acc = {e: row[k] for e, row in zip(val_epoch, history["val_acc"]) if math.isfinite(row[k])}
        metrics = final_metrics(val_acc, r["train_acc"], r["val_loss"])
    metrics["hp/selected"] = float(r["selected"])
    if r["selected"] and math.isfinite(r["test_acc"]):
        metrics["hp/test_acc"] = float(r["test_acc"])
    return metrics


def log_member_hparams(log_dir: Path, members: list[dict], rows: list[dict], history: dict, steps: dict,
                       params: list[dict], trained_by_lightning: bool = False,
                       test_confusion_matrix: Optional[Tensor] = None, class_names: Optional[list] = None) -> None:
    """TensorBoard's HPARAMS tab for the sweep: once, in the first member's run (no run of its own: it would show
    as an empty run ``.`` at the log root), its columns: the hyperparameters that vary and lr
    (:data:`SWEEP_SHOWN`), all ticked, no constant (a constant would be ticked where fewer than five vary; every
    row still holds it), and :data:`SWEEP_METRICS`; per member run its row (``params[k]`` against
    :func:`member_metrics`) and the CUSTOM SCALARS layout; in the selected member's run its test confusion matrix
    (``test_confusion_matrix``, rows named by ``class_names``), as the main job's test writes it.
    ``trained_by_lightning`` (--sequential): each member's Trainer wrote its row, layout and hp/* (HparamsLogger),
    its test's hp/test_acc and confusion matrix too: only hp/selected is added."""
    columns = {name: [p.get(name, "") for p in params] for name in params[0]}
    names = member_names(members)
    for r in rows:
        k = r["member"]
        run = member_run(log_dir, names[k])
        step = steps["train_step"][-1] if steps.get("train_step") else 0
        if k == 0:
            write_experiment(run, columns, SWEEP_METRICS, SWEEP_SHOWN, constants=False)
        if r["selected"] and test_confusion_matrix is not None:
            log_confusion_matrix(run, "test", test_confusion_matrix, class_names or
                                 [str(c) for c in range(len(test_confusion_matrix))], step)
        if trained_by_lightning:
            run.log_metrics({"hp/selected": float(r["selected"])}, step=step)
        else:
            run.log_hyperparams(params[k])  # hparams.yaml (no HPARAMS row: default_hp_metric=False, no metrics)
            add_layout(run)
            log_hparams(run, params[k], member_metrics(r, history, steps), step=step)
        run.finalize("success")


def retest_command(ckpt: Path, data_dir, precision: str) -> str:
    """The ``train.py test`` line that evaluates ``ckpt`` on the sweep's test data again: the checkpoint carries
    its class names and the training split's statistics (:mod:`handgrad.data.normalization`), so only where the images
    are, and the precision of a float64 sweep."""
    words = ["python", "train.py", "test", "--ckpt_path", str(ckpt), "--data.data_dir", str(data_dir)]
    if precision != "32-true":
        words += ["--trainer.precision", precision]
    return shlex.join(words)
