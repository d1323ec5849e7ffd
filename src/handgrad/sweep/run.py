"""Model selection over SGD hyperparameters: every member of the search trained, the best one tested once.

    python train.py sweep --config configs/grid.yaml                      # the reference grid, 30 epochs
    python train.py sweep --config configs/grid.yaml --trainer.max_epochs 2 --data.data_dir X
    python train.py sweep --config configs/grid.yaml --sequential         # one member after the other
    python train.py sweep --config configs/grid.yaml --select best_epoch  # select on each member's best epoch
    python train.py sweep --config configs/grid.yaml --trainer.strategy ddp --trainer.devices 4   # 4 processes
    python -m handgrad sweep ...                                          # the same without train.py

Steps: train every member (batched: chunks of ``--model.members_per_step`` members, each chunk one
:class:`handgrad.sweep.module.GridClassifier`; ``--sequential``: one :class:`handgrad.train.module.HandgradClassifier`
per member, for comparison), select one member by val accuracy (``--select``, see :mod:`handgrad.sweep.select`),
evaluate only that member on the test set, once, and write into the sweep's log directory ``results.csv`` and
``results.md`` (printed too), one TensorBoard run per member (named by what varies,
:func:`handgrad.sweep.search.member_names`: its epoch curves, custom-scalars layout and HPARAMS row,
:mod:`handgrad.train.views`; the HPARAMS columns once, in the first member's run; the selected member's test
confusion matrix in its run), and the selected member's weights as a
standalone :class:`handgrad.train.module.HandgradClassifier` checkpoint, ``selected.ckpt``, with the data's statistics and class names (``python train.py test --ckpt_path
<log dir>/selected.ckpt --data.data_dir D`` evaluates it again).

Several processes (Lightning's ``ddp`` strategy, ``torchrun``, ``srun``): the members are spread over the ranks
by chunks, rank 0 gathers and selects (:mod:`handgrad.sweep.ranks`). Every finished chunk is saved in
``<log dir>/chunks/``: a sweep rerun into the same log folder trains only the chunks that are missing.

Bad options are refused as :class:`handgrad.runtime.errors.HandgradError` before anything is written; ``train.py
sweep`` prints them as one line ``error: ...`` and exits with code 2.
"""


from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import Optional

from handgrad.core.optim import HYPERPARAMETERS
from handgrad.data.datamodule import CIFAR10DataModule
from handgrad.runtime import disk
from handgrad.runtime.errors import SetupError
from handgrad.runtime.exits import command_line
from handgrad.runtime.run_folders import check_output_dirs
from handgrad.sweep.chunks import saved_plan
from handgrad.sweep.cli import SweepCLI, check
from handgrad.sweep.fitting import evaluate_on_test, run_chunks
from handgrad.sweep.outcome import SweepOutcome
from handgrad.sweep.ranks import Ranks
from handgrad.sweep.report import (CONFIG_COLUMNS, by_config, log_member_hparams, markdown, member_params,
                                   results_table, retest_command, write_results)
from handgrad.sweep.select import select
from handgrad.sweep.selected import member_mlp, save_selected, selected_checkpoint
from handgrad.sweep.sequential import run_sequential


def main(args: Optional[list[str]] = None, datamodule_class=CIFAR10DataModule) -> dict:
    """Run the sweep; returns {"rows", "best", "log_dir", "history", "mode", "selected_ckpt"} on rank 0 (also
    written to the log directory) and {} on the other ranks. Bad options raise :class:`HandgradError` before
    anything is written."""
    args = sys.argv[1:] if args is None else list(args)
    cli = SweepCLI(args=args, datamodule_class=datamodule_class, description=__doc__)
    cli.args = args
    check(cli, args)
    check_output_dirs(cli.trainer)
    logger = cli.trainer.logger
    if hasattr(logger, "planned_log_dir") and logger.asked_version is not None:  # a rerun into a given folder
        saved_plan(Path(logger.planned_log_dir()))
    strategy = cli.trainer.strategy
    if strategy.world_size > 1:  # Lightning starts the other processes (ddp) or finds them (torchrun, srun)
        return strategy.launcher.launch(run, cli)
    return run(cli)


def run(cli: SweepCLI) -> dict:
    """The sweep in one of its processes: train this rank's members; on rank 0 select, test and report."""
    trainer = cli.trainer
    ranks = Ranks(trainer.strategy if trainer.strategy.world_size > 1 else None)
    log_dir = None
    if ranks.rank == 0:
        log_dir = trainer.logger.log_dir if trainer.logger is not None else trainer.default_root_dir
    log_dir = Path(ranks.broadcast(str(log_dir)))
    again = rerun_command(cli, log_dir)
    ranks.resume["how"] = again
    disk.set_resume_advice(lambda folder: f"the chunks trained so far are saved in {log_dir / 'chunks'}; free some "
                                          f"space, then resume with: {again}")
    mode = "sequential" if cli.config.sequential else "batched"
    if ranks.world > 1:
        mode += f", {ranks.world} processes"
    outcome = run_sequential(cli, ranks, log_dir) if cli.config.sequential else run_chunks(cli, ranks, log_dir)
    ranks.close()
    if ranks.rank != 0:
        return {}
    return report(cli, ranks, log_dir, outcome, mode)


def rerun_command(cli: SweepCLI, log_dir: Path) -> str:
    """The command that runs this sweep again into ``log_dir``, training only the chunks not saved there."""
    version = ["--trainer.logger.init_args.version", log_dir.name.removeprefix("version_")]
    return command_line(["sweep", *cli.args], drop=(version[0],)) + " " + shlex.join(version)


def report(cli: SweepCLI, ranks: Ranks, log_dir: Path, outcome: SweepOutcome, mode: str) -> dict:
    """Select by the --select rule, test the selected member once, write the tables, runs and selected.ckpt."""
    members, rule = cli.model.members, cli.config.select
    history, steps = outcome.history, outcome.steps
    if not history["val_acc"]:
        raise SetupError("no validation ran: the selection needs val accuracy (check --trainer.limit_val_batches / "
                         "--trainer.check_val_every_n_epoch)")
    rows = results_table(members, history, outcome.failed_epoch, None, {}, steps)
    best, use_best = select(rows, rule), rule == "best_epoch"
    b = rows[best]
    state = outcome.weights(best, use_best)
    test = outcome.test(best, use_best) or evaluate_on_test(cli, ranks, members[best], state)
    b["test_acc"], b["selected"] = test.get("test_acc", math.nan), True
    config_rows = by_config(rows) if members[0].get("seed") is not None else None
    written = write_results(log_dir, rows, config_rows)
    data = cli.datamodule  # set up on rank 0: the training split's statistics travel in selected.ckpt
    data_hp = dict(getattr(data, "hparams", {}))
    acc = "best_val_acc" if use_best else "val_acc"
    sweep_info = {"member": best, **{h: members[best][h] for h in HYPERPARAMETERS}, "seed": members[best].get("seed"),
                  "select": rule, "val_acc": b[acc], "test_acc": b["test_acc"], "log_dir": str(log_dir)}
    epoch, step = len(history["train_loss"]), outcome.global_step
    if use_best:
        epoch, step = steps["val_epoch"][b["best_row"]], steps["val_step"][b["best_row"]]
    mlp = member_mlp(cli.model.sizes, cli.model.activation, state)
    ckpt = save_selected(log_dir, selected_checkpoint(mlp, members[best], cli.model.activation, epoch=epoch,
                                                      global_step=step, data_hparams=data_hp, sweep_info=sweep_info,
                                                      input_mean=data.mean, input_std=data.std,
                                                      class_names=getattr(data, "class_names", None)))
    network = {"sizes": cli.model.sizes, "activation": cli.model.activation, "seed": cli.model.init_seed}
    params = [member_params(m, network, data_hp, cli.trainer.max_epochs) for m in members]
    log_member_hparams(log_dir, members, rows, history, steps, params, trained_by_lightning=cli.config.sequential,
                       test_confusion_matrix=test.get("confusion_matrix"), class_names=getattr(data, "class_names", None))
    print(f"\nSweep of {len(members)} members, {len(history['train_loss'])} epochs ({mode}), selected by {rule}:\n")
    print(markdown(rows) if config_rows is None else markdown(config_rows, columns=CONFIG_COLUMNS))
    print(f"\nselected: member {best} (lr {b['lr']:g}, momentum {b['momentum']:g}, weight decay {b['weight_decay']:g}"
          f"{', seed ' + str(b['seed']) if b['seed'] != '' else ''}): val acc {b[acc]:.4f}, test acc {b['test_acc']:.4f}")
    again = retest_command(ckpt, data_hp.get("data_dir", "DATA_DIR"), str(cli.trainer.precision))
    print(f"selected checkpoint: {ckpt}\n  test it again: {again}")
    print(f"results: {written[0]}, {written[1]}\nTensorBoard: tensorboard --logdir {shlex.quote(str(log_dir))}")
    return {"rows": rows, "best": best, "log_dir": log_dir, "history": history, "mode": mode, "selected_ckpt": ckpt,
            "config_rows": config_rows}
