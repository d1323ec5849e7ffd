"""Model selection over a grid of SGD hyperparameters, the whole grid trained at once.

    python train.py sweep --config configs/grid.yaml                      # the reference grid, 30 epochs
    python train.py sweep --config configs/grid.yaml --trainer.max_epochs 2 --data.data_dir X
    python train.py sweep --config configs/grid.yaml --sequential         # one member after the other
    python train.py sweep --config configs/grid.yaml --trainer.accelerator gpu --model.compile cuda_graph
                                                                          # on a GPU: the step as one CUDA graph
    python -m handgrad.sweep ...                                          # the same without train.py

Steps: train every member (batched: one :class:`handgrad.grid.GridClassifier` holding all K members;
``--sequential``: one :class:`handgrad.module.HandgradClassifier` per member, for comparison), select
the best member by final val accuracy (ties: lower val loss, then lower index; failed members are
never selected), evaluate only that member on the test set, once, and write ``results.csv`` and
``results.md`` into the sweep's log directory (printed too), and the selected member's weights as a
standalone :class:`handgrad.module.HandgradClassifier` checkpoint, ``selected.ckpt`` (``python train.py test
--ckpt_path <log dir>/selected.ckpt ...`` evaluates it again). Every member is also its own TensorBoard
run, ``<log dir>/member_KK_lr.._m.._wd../``, with its epoch curves and its hyperparameters against its
final metrics (``hp/*``), so TensorBoard's HPARAMS tab compares them.

Bad options (members, grid, sizes, batch size, precision, an unwritable log folder) are refused as
:class:`handgrad.module.ConfigError` / ``SetupError`` before anything is written; ``train.py sweep`` and
``python -m handgrad.sweep`` print them as one line ``error: ...`` and exit with code 2.

Several devices (``--trainer.devices N`` with N > 1): the members are split into N contiguous chunks
and each chunk is trained as one batched model in its own process on its own device (one worker
process per device, started here; on CUDA each worker sees one GPU through CUDA_VISIBLE_DEVICES).
The workers write their members' histories and weights to the log directory; this process merges
them, selects, and tests the selected member on one device. With ``--sequential`` only one device is used.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from jsonargparse import ActionYesNo, lazy_instance
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import SingleDeviceStrategy

from handgrad.data import BadDataError, CIFAR10DataModule, DataNotFoundError
from handgrad.grid import HPARAMS, METRICS, SUPPORTED_PRECISIONS, GridClassifier, member_name, select_best
from handgrad.checkpoints import SELECTED_CKPT, save_selected, selected_checkpoint  # noqa: F401
from handgrad.module import ConfigError, HandgradClassifier, SetupError, check_sizes_fit_data
from handgrad.outputs import OutputDirError, check_output_dirs

WORKER_ENV = "HANDGRAD_SWEEP_WORKER"  # internal: set for the per-device worker processes
COLUMNS = ("member", "lr", "momentum", "weight_decay", "dampening", "nesterov", "status",
           "train_loss", "train_acc", "val_loss", "val_acc", "test_acc", "selected")


class SweepCLI(LightningCLI):
    """The usual LightningCLI options (``--trainer.*``, ``--model.*``, ``--data.*``, ``--config``) for a
    :class:`GridClassifier` on :class:`CIFAR10DataModule`, plus ``--sequential``."""

    def __init__(self, args=None, datamodule_class=CIFAR10DataModule):
        with warnings.catch_warnings():  # LightningCLI warns when args are given while sys.argv has some
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().__init__(
                GridClassifier, datamodule_class, args=args, run=False, auto_configure_optimizers=False,
                save_config_callback=None if os.environ.get(WORKER_ENV) else SaveConfigCallback,
                save_config_kwargs={"overwrite": True}, seed_everything_default=265,
                trainer_defaults={"logger": lazy_instance(TensorBoardLogger, save_dir="lightning_logs",
                                                          name="sweep", default_hp_metric=False)},
                parser_kwargs={"description": __doc__, "formatter_class": RawDescriptionHelpFormatter})

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--sequential", action=ActionYesNo, default=False,
                            help="train the members one by one (HandgradClassifier each), to compare with the batched run")

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a constructor that refuses an option value (a member's lr < 0, an empty
        or unknown grid key, batch_size 0, ...) becomes a :class:`ConfigError` with the constructor's message."""
        try:
            super().instantiate_classes()
        except (DataNotFoundError, BadDataError, ConfigError, SetupError):
            raise
        except (ValueError, MisconfigurationException) as err:
            raise ConfigError(str(err)) from err


# ----------------------------------------------------------------------------- checks before anything is written


def check_options(cli: SweepCLI) -> None:
    """Refuse option combinations the sweep cannot run, as :class:`ConfigError` naming the flag to change."""
    trainer, hp = cli.trainer, cli.model.hparams
    if cli.config.sequential and hp.init_seed is None:
        raise ConfigError("--sequential needs --model.init_seed (an int): every member must start from the same "
                          "weights; e.g. --model.init_seed 265")
    if trainer.num_nodes > 1:
        raise ConfigError("the sweep runs on one machine: use --trainer.num_nodes 1 (members are split over "
                          "--trainer.devices of this machine)")


def check_setup(cli: SweepCLI) -> None:
    """What :meth:`GridClassifier.setup` and the first batch would refuse, checked before anything is written:
    the precision, the network's input size and number of outputs against the data, the strategy, the compile
    mode. Raises :class:`SetupError` saying which option fixes it."""
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    if trainer.precision not in SUPPORTED_PRECISIONS:
        raise SetupError(f"--trainer.precision {trainer.precision} is not supported: the hand-written backward and "
                         f"SGD step run in one dtype. Use one of {SUPPORTED_PRECISIONS}.")
    check_sizes_fit_data([int(n) for n in model.sizes], data)
    batched_here = trainer.num_devices == 1 and not cli.config.sequential
    if batched_here and not isinstance(trainer.strategy, SingleDeviceStrategy):
        raise SetupError(f"the batched sweep trains on one device, not with strategy "
                         f"{type(trainer.strategy).__name__}: "
                         f"leave out --trainer.strategy (several devices: --trainer.devices N splits the members)")
    if model.hparams.compile == "cuda_graph" and trainer.strategy.root_device.type != "cuda":
        raise SetupError("--model.compile cuda_graph records the training step as a CUDA graph and needs a CUDA "
                         "device (--trainer.accelerator gpu); on a CPU use --model.compile inductor or null")


# ----------------------------------------------------------------------------- training


class EpochHistory(Callback):
    """Collect a :class:`HandgradClassifier`'s epoch metrics in the grid's history format (K = 1).

    The training loss is summed here, on the device, from the loss each training step returns (in the
    training dtype: float64 under 64-true); the train accuracy is the module's metric, val loss and accuracy
    its logged metrics."""

    def __init__(self):
        self.history = {k: [] for k in METRICS}
        self._loss_sum, self._n = None, 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._loss_sum, self._n = None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        n = len(batch[1])
        weighted = loss.detach() * n
        self._loss_sum = weighted if self._loss_sum is None else self._loss_sum + weighted
        self._n += n

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        loss = float(self._loss_sum) / self._n if self._n else m.get("train/loss_epoch", math.nan)
        self.history["train_loss"].append([loss])
        # the module logs train/acc in its own on_train_epoch_end, which Lightning calls after the callbacks'
        self.history["train_acc"].append([float(pl_module.train_acc.compute())])
        if "val/acc" in m:
            self.history["val_loss"].append([m.get("val/loss", math.nan)])
            self.history["val_acc"].append([m["val/acc"]])


def _seed(cli: SweepCLI) -> None:
    """Re-seed before every fit, so each run (and each sequential member) sees the same random stream."""
    seed = cli.config.seed_everything
    if seed is not False and seed is not None:
        L.seed_everything(int(seed), verbose=False)


def member_runs(log_dir: Path, members: list[dict], indices: list[int]) -> list[TensorBoardLogger]:
    """One TensorBoard run per member: ``log_dir/member_KK_.../``."""
    return [TensorBoardLogger(save_dir=str(log_dir), name="", version=member_name(k, members[k]),
                              default_hp_metric=False) for k in indices]


def run_batched(cli: SweepCLI, runs: list) -> dict:
    """All members in one GridClassifier on one device. Returns the outcome (history, failed, test)."""
    model, trainer = cli.model, cli.trainer
    model.member_loggers = runs
    _seed(cli)
    trainer.fit(model, datamodule=cli.datamodule)

    def test(best: int) -> dict:
        model.test_member = best
        trainer.test(model, datamodule=cli.datamodule, verbose=False)
        return model.test_result

    return {"history": model.history, "failed_epoch": model.failed_epoch.tolist(), "test": test,
            "member": model.net.member, "global_step": trainer.global_step}


def run_sequential(cli: SweepCLI, runs: list) -> dict:
    """One HandgradClassifier per member, each with the grid's initial weights, its own trainer and run."""
    from handgrad.module import NonFiniteLossError

    hp = cli.model.hparams  # init_seed is an int: check_options
    per_member, failed, fitted = [], [], []
    for k, m in enumerate(cli.model.members):
        torch.manual_seed(hp.init_seed)  # the grid's initial weights: MLP(sizes) right after this seed
        model = HandgradClassifier(sizes=hp.sizes, activation=hp.activation, **{h: m[h] for h in HPARAMS})
        # one device: several would make Lightning relaunch this script (and the whole sweep) per rank
        trainer = cli.instantiate_trainer(logger=runs[k], devices=1, num_nodes=1, strategy="auto")
        record = EpochHistory()
        trainer.callbacks.append(record)
        _seed(cli)
        try:
            trainer.fit(model, datamodule=cli.datamodule)
            failed.append(-1)
        except NonFiniteLossError:  # this member diverged: report it, go on with the next
            failed.append(trainer.current_epoch)
        per_member.append(record.history)
        fitted.append((model, trainer))
    history = {}  # [epoch][member], NaN where a member has no value (it failed, or stopped earlier)
    for name in METRICS:
        epochs = max(len(h[name]) for h in per_member)
        history[name] = [[h[name][e][0] if e < len(h[name]) and failed[k] < 0 else math.nan
                          for k, h in enumerate(per_member)] for e in range(epochs)]

    def test(best: int) -> dict:
        model, trainer = fitted[best]
        metrics = trainer.test(model, datamodule=cli.datamodule, verbose=False)[0]
        return {"test_loss": metrics.get("test/loss", math.nan), "test_acc": metrics.get("test/acc", math.nan)}

    steps = [trainer.global_step for (_, trainer), f in zip(fitted, failed) if f < 0]
    return {"history": history, "failed_epoch": failed, "test": test,
            "member": lambda best: fitted[best][0].mlp, "global_step": max(steps, default=0)}


def chunks(n: int, parts: int) -> list[list[int]]:
    """range(n) in ``parts`` contiguous chunks whose sizes differ by at most one (empty chunks dropped)."""
    q, r = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = q + (i < r)
        if size:
            out.append(list(range(start, start + size)))
        start += size
    return out


def run_split(cli: SweepCLI, args: list[str], log_dir: Path) -> dict:
    """Members split over the trainer's devices: one worker process per device, each a batched
    GridClassifier over its chunk; then the selected member is tested here on one device."""
    trainer, members = cli.trainer, cli.model.members
    device_ids = list(trainer.device_ids)
    parts = chunks(len(members), len(device_ids))
    procs = []
    for i, idx in enumerate(parts):
        out = log_dir / f"worker_{i}.pt"
        env = dict(os.environ)
        env[WORKER_ENV] = json.dumps({"members": idx, "log_dir": str(log_dir), "out": str(out)})
        extra = ["--trainer.devices", "1", "--trainer.strategy", "auto",
                 "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                 "--model.grid", "null", "--model.members", json.dumps([members[k] for k in idx])]
        if trainer.strategy.root_device.type == "cuda":  # the worker sees only its GPU (ids as this process sees them)
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[device_ids[i]] if visible else str(device_ids[i])
        procs.append((subprocess.Popen([sys.executable, "-m", "handgrad.sweep", *args, *extra], env=env), out, idx))
    failed_workers = [i for i, (p, _, _) in enumerate(procs) if p.wait() != 0]
    if failed_workers:
        raise RuntimeError(f"sweep worker(s) {failed_workers} failed (see their output above)")
    parts_out = [torch.load(out, weights_only=True) for _, out, _ in procs]
    history = {name: [sum((w["history"][name][e] for w in parts_out), []) for e in range(len(parts_out[0]["history"][name]))]
               for name in METRICS}
    failed = sum((w["failed_epoch"] for w in parts_out), [])

    def member_model(best: int) -> GridClassifier:
        """Member ``best`` alone, as a one-member GridClassifier with the weights its worker trained."""
        i = next(i for i, (_, _, idx) in enumerate(procs) if best in idx)
        local = procs[i][2].index(best)
        hp = cli.model.hparams
        model = GridClassifier(members=[members[best]], sizes=hp.sizes, activation=hp.activation,
                               init_seed=hp.init_seed)
        state = {k: v[local:local + 1] for k, v in parts_out[i]["state_dict"].items()}
        model.net.to(state["net.fc.1.weight"].dtype)  # load float64 weights as float64, not rounded through float32
        model.load_state_dict(state)
        return model

    def test(best: int) -> dict:
        model = member_model(best)
        model.test_member = 0
        tester = cli.instantiate_trainer(devices=1, strategy="auto", logger=False, default_root_dir=str(log_dir))
        tester.test(model, datamodule=cli.datamodule, verbose=False)
        return model.test_result

    return {"history": history, "failed_epoch": failed, "test": test,
            "member": lambda best: member_model(best).net.member(0),
            "global_step": max(w["global_step"] for w in parts_out)}


def run_worker(cli: SweepCLI, spec: dict) -> None:
    """Worker process of :func:`run_split`: train this chunk, save history, failures and weights."""
    model = cli.model
    runs = member_runs(Path(spec["log_dir"]), {i: m for i, m in zip(spec["members"], model.members)}, spec["members"])
    model.member_loggers = runs
    _seed(cli)
    cli.trainer.fit(model, datamodule=cli.datamodule)
    for run in runs:
        run.finalize("success")
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    torch.save({"history": model.history, "failed_epoch": model.failed_epoch.tolist(), "state_dict": state,
                "global_step": cli.trainer.global_step}, spec["out"])


# ----------------------------------------------------------------------------- results


def final(history: dict, name: str) -> list[float]:
    """The last epoch's values of one metric, one per member (NaN when it never ran)."""
    return history[name][-1] if history[name] else []


def results_table(members: list[dict], history: dict, failed_epoch: list[int], best: Optional[int],
                  test: dict) -> list[dict]:
    """One row per member (the columns of :data:`COLUMNS`); test_acc only for the selected member."""
    rows = []
    last = {name: final(history, name) for name in METRICS}
    for k, m in enumerate(members):
        row = {"member": k, **{h: m[h] for h in ("lr", "momentum", "weight_decay", "dampening", "nesterov")}}
        row["status"] = f"failed (epoch {failed_epoch[k]})" if failed_epoch[k] >= 0 else "ok"
        for name in METRICS:
            row[name] = last[name][k] if k < len(last[name]) and failed_epoch[k] < 0 else math.nan
        row["test_acc"] = test.get("test_acc", math.nan) if k == best else math.nan
        row["selected"] = k == best
        rows.append(row)
    return rows


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


def markdown(rows: list[dict]) -> str:
    """The table in Markdown (cells: :func:`_fmt`)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(c, r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def write_results(log_dir: Path, rows: list[dict]) -> tuple[Path, Path]:
    """``results.csv`` (full precision, empty cells for missing values) and ``results.md``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = log_dir / "results.csv", log_dir / "results.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if isinstance(r[c], float) and math.isnan(r[c]) else r[c]) for c in COLUMNS})
    md_path.write_text(markdown(rows) + "\n")
    return csv_path, md_path


def log_member_hparams(runs: list, rows: list[dict], extra: dict) -> None:
    """Each member's hyperparameters against its final metrics, in its own run (TensorBoard HPARAMS tab)."""
    for run, r in zip(runs, rows):
        params = {"lr": r["lr"], "momentum": r["momentum"], "weight_decay": r["weight_decay"],
                  "dampening": r["dampening"], "nesterov": r["nesterov"], **extra}
        metrics = {f"hp/{name}": r[name] for name in (*METRICS, "test_acc")}
        metrics["hp/selected"] = float(r["selected"])
        metrics["hp/failed"] = float(r["status"] != "ok")
        run.log_hyperparams(params, metrics)
        run.finalize("success")


def retest_command(ckpt: Path, data_hparams: dict, precision: str) -> str:
    """The ``train.py test`` line that evaluates ``ckpt`` on the sweep's test data again: the data options that
    fix the test images and their normalisation (the training split's statistics), and the precision."""
    words = ["python train.py test --ckpt_path", str(ckpt)]
    if "data_dir" in data_hparams:
        words += ["--data.data_dir", str(data_hparams["data_dir"])]
    if "classes" in data_hparams:
        words += ["--data.classes", "'[" + ", ".join(map(str, data_hparams["classes"])) + "]'"]
    for key in ("val_fraction", "split_seed"):
        if key in data_hparams:
            words += [f"--data.{key}", str(data_hparams[key])]
    if precision != "32-true":
        words += ["--trainer.precision", precision]
    return " ".join(words)


# ----------------------------------------------------------------------------- the command


def main(args: Optional[list[str]] = None, datamodule_class=CIFAR10DataModule) -> dict:
    """Run the sweep; returns {"rows", "best", "log_dir", "history", "mode", "selected_ckpt"} (also written to the
    log directory). Bad options raise :class:`ConfigError` or :class:`SetupError` before anything is written."""
    args = sys.argv[1:] if args is None else list(args)
    cli = SweepCLI(args=args, datamodule_class=datamodule_class)
    worker = os.environ.get(WORKER_ENV)
    if worker:
        run_worker(cli, json.loads(worker))
        return {}
    trainer, members = cli.trainer, cli.model.members
    check_options(cli)
    check_setup(cli)
    check_output_dirs(trainer)
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    runs = member_runs(log_dir, members, list(range(len(members))))
    mode = "sequential" if cli.config.sequential else "batched"
    if cli.config.sequential or trainer.num_devices > 1:  # the batched fit saves it through its trainer
        log_dir.mkdir(parents=True, exist_ok=True)
        cli.parser.save(cli.config, log_dir / "config.yaml", skip_none=False, overwrite=True)
    if cli.config.sequential:
        outcome = run_sequential(cli, runs)
    elif trainer.num_devices > 1:
        outcome = run_split(cli, args, log_dir)
        mode = f"batched, split over {trainer.num_devices} devices"
    else:
        outcome = run_batched(cli, runs)
    history, failed = outcome["history"], outcome["failed_epoch"]
    if not history["val_acc"]:
        raise RuntimeError("no validation ran: the selection needs val accuracy (check limit_val_batches / "
                           "check_val_every_n_epoch)")
    failed_flags = [f >= 0 for f in failed]
    best = select_best(final(history, "val_acc"), final(history, "val_loss"), failed_flags)
    test = outcome["test"](best)
    rows = results_table(members, history, failed, best, test)
    csv_path, md_path = write_results(log_dir, rows)
    data_hp = dict(getattr(cli.datamodule, "hparams", {}))
    b = rows[best]
    sweep_info = {"member": best, **{h: members[best][h] for h in HPARAMS}, "val_acc": b["val_acc"],
                  "test_acc": b["test_acc"], "log_dir": str(log_dir)}
    ckpt = save_selected(log_dir, selected_checkpoint(
        outcome["member"](best), members[best], cli.model.hparams.activation, epoch=len(history["train_loss"]),
        global_step=outcome["global_step"], data_hparams=data_hp, sweep_info=sweep_info))
    log_member_hparams(runs, rows, {"batch_size": data_hp.get("batch_size", 0), "max_epochs": trainer.max_epochs or 0,
                                    "mode": mode})
    print(f"\nGrid of {len(members)} members, {len(history['train_loss'])} epochs ({mode}):\n")
    print(markdown(rows))
    print(f"\nselected: member {best} (lr {b['lr']:g}, momentum {b['momentum']:g}, weight decay {b['weight_decay']:g})"
          f": val acc {b['val_acc']:.4f}, test acc {b['test_acc']:.4f}")
    print(f"selected checkpoint: {ckpt}\n  test it again: {retest_command(ckpt, data_hp, str(trainer.precision))}")
    print(f"results: {csv_path}, {md_path}\nTensorBoard: tensorboard --logdir {log_dir}")
    return {"rows": rows, "best": best, "log_dir": log_dir, "history": history, "mode": mode, "selected_ckpt": ckpt}


def run_as_script() -> None:
    """``python -m handgrad.sweep``: :func:`main`, with a user error (bad option, missing data) printed as one line
    ``error: ...`` and exit code 2, as ``train.py sweep`` does."""
    from handgrad.errors import CheckpointError

    try:
        main()
    except (ConfigError, SetupError, DataNotFoundError, BadDataError, CheckpointError, OutputDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_as_script()
