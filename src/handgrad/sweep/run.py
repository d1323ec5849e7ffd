"""Model selection over SGD hyperparameters: every member of the search trained, the best one tested once.

    python train.py sweep --config configs/grid.yaml                      # the reference grid, 30 epochs
    python train.py sweep --config configs/grid.yaml --trainer.max_epochs 2 --data.data_dir X
    python train.py sweep --config configs/grid.yaml --sequential         # one member after the other
    python train.py sweep --config configs/grid.yaml --select best_epoch  # select on each member's best epoch
    python train.py sweep --config configs/grid.yaml --trainer.strategy ddp --trainer.devices 4   # 4 processes
    python -m handgrad.sweep.run ...                                          # the same without train.py

Steps: train every member (batched: chunks of ``--model.members_per_step`` members, each chunk one
:class:`handgrad.sweep.module.GridClassifier`; ``--sequential``: one :class:`handgrad.train.module.HandgradClassifier`
per member, for comparison), select one member by val accuracy (``--select``, see :mod:`handgrad.sweep.report`),
evaluate only that member on the test set, once, and write into the sweep's log directory ``results.csv`` and
``results.md`` (printed too), one TensorBoard run per member (named by what varies,
:func:`handgrad.sweep.search.member_names`: its epoch curves, custom-scalars layout and HPARAMS row,
:mod:`handgrad.train.views`; the HPARAMS columns once at the log root), and the selected member's weights as a standalone :class:`handgrad.train.module.HandgradClassifier`
checkpoint, ``selected.ckpt``, with the data's statistics and class names (``python train.py test --ckpt_path
<log dir>/selected.ckpt --data.data_dir D`` evaluates it again).

Several processes (Lightning's ``ddp`` strategy, ``torchrun``, ``srun``): the members are spread over the ranks
by chunks, rank 0 gathers and selects (:mod:`handgrad.sweep.ranks`). Every finished chunk is saved in
``<log dir>/chunks/``: a sweep rerun into the same log folder trains only the chunks that are missing.

Bad options are refused as :class:`handgrad.runtime.errors.HandgradError` before anything is written; ``train.py sweep``
and ``python -m handgrad.sweep.run`` print them as one line ``error: ...`` and exit with code 2.
"""

from __future__ import annotations

import gc
import math
import sys
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch import Callback

from handgrad.data.datamodule import CIFAR10DataModule
from handgrad.train.checkpoints import save_selected, selected_checkpoint
from handgrad.train.cli import exit_on_user_error, quiet_lightning_notices
from handgrad.runtime.errors import SetupError
from handgrad.sweep.module import METRICS, STEPS, GridClassifier
from handgrad.core.mlp import MLP
from handgrad.train.module import HandgradClassifier
from handgrad.runtime.outputs import check_output_dirs
from handgrad.train.callbacks import HparamsLogger
from handgrad.sweep.search import HPARAMS, member_names
from handgrad.sweep.chunks import chunk_plan, merged_outcome, save_chunk
from handgrad.sweep.cli import SweepCLI, check
from handgrad.sweep.ranks import Ranks, default_members_per_step
from handgrad.sweep.report import (CONFIG_COLUMNS, by_config, log_member_hparams, markdown, member_params,
                                   member_run, results_table, retest_command, select, write_member_curves,
                                   write_results)



# ----------------------------------------------------------------------------- training


def _seed(cli: SweepCLI) -> None:
    """Re-seed before every fit, so each run (each chunk, each sequential member) sees the same random stream."""
    seed = cli.config.seed_everything
    if seed is not False and seed is not None:
        L.seed_everything(int(seed), verbose=False)


def chunk_trainer(cli: SweepCLI, ranks: Ranks, **kwargs) -> L.Trainer:
    """A one-device Trainer on this rank's device, with the options' settings: the members of a chunk are one
    batched model, trained on the full training set (nothing to average with other ranks)."""
    device = cli.trainer.strategy.root_device
    show = ranks.rank == 0
    config = cli.config.trainer
    options = dict(devices=[device.index] if device.type == "cuda" else 1, num_nodes=1, strategy="auto",
                   logger=False, enable_checkpointing=False, callbacks=list(cli.config_init.trainer.callbacks or []),
                   enable_progress_bar=show and config.enable_progress_bar is not False,
                   enable_model_summary=show and config.enable_model_summary is not False)
    return cli.instantiate_trainer(**(options | kwargs))


def save_config(cli: SweepCLI, ranks: Ranks, log_dir: Path) -> None:
    """The sweep's options as ``config.yaml`` in its log folder (``--config`` it to run the same sweep again)."""
    if ranks.rank == 0:
        log_dir.mkdir(parents=True, exist_ok=True)
        cli.parser.save(cli.config, log_dir / "config.yaml", overwrite=True)


def loaders(data, trainer: L.Trainer, stage: str) -> list:
    """The datamodule's loaders for ``trainer`` (its device and dtype; one process: the full training set).

    A fit given a datamodule calls ``prepare_data`` inside a barrier of every process whenever torch.distributed
    is initialized, whatever the strategy; the sweep's ranks fit different numbers of chunks, so it prepares the
    data itself (:func:`run_chunks`, once per machine) and hands each fit its loaders."""
    data.trainer = trainer
    data.setup(stage)
    if stage == "test":
        return [data.test_dataloader()]
    return [data.train_dataloader(), data.val_dataloader()]


def train_chunk(cli: SweepCLI, ranks: Ranks, chunk: int, indices: list[int]) -> dict:
    """Train the members ``indices`` as one GridClassifier; returns what rank 0 saves (histories, weights)."""
    spec = cli.model
    keep_best = cli.config.select == "best_epoch"
    model = GridClassifier(members=[spec.members[k] for k in indices], sizes=spec.sizes, activation=spec.activation,
                           init_seed=spec.init_seed, compile=spec.compile, keep_best=keep_best)
    trainer = chunk_trainer(cli, ranks)
    _seed(cli)
    trainer.fit(model, *loaders(cli.datamodule, trainer, "fit"))
    cli.datamodule.trainer = None  # it would keep this chunk's trainer, and with it the model, alive
    names = [n for n, _ in model.net.named_parameters()]
    return {"chunk": chunk, "members": indices, "history": model.history, "steps": model.history_steps,
            "failed_epoch": model.failed_epoch.tolist(), "global_step": trainer.global_step,
            "final": {k: v.detach().cpu() for k, v in model.net.state_dict().items()},
            "best": dict(zip(names, (b.cpu() for b in model.best_weights))) if model.best_weights else None}


def run_chunks(cli: SweepCLI, ranks: Ranks, log_dir: Path) -> Optional[dict]:
    """Every rank trains its chunks; rank 0 saves each as it arrives. Returns the merged outcome on rank 0."""
    spec, data = cli.model, cli.datamodule
    dtype = torch.float64 if str(cli.trainer.precision) == "64-true" else torch.float32
    k = spec.members_per_step or default_members_per_step(cli.trainer.strategy.root_device, spec.sizes,
                                                          getattr(data, "hparams", {}).get("batch_size", 256), dtype,
                                                          cli.config.select == "best_epoch")
    chunks, todo = chunk_plan(cli, ranks, log_dir, ranks.all_min(min(k, len(spec.members))))
    save_config(cli, ranks, log_dir)
    if ranks.rank == 0 and len(todo) < len(chunks):
        print(f"resuming the sweep in {log_dir}: {len(chunks) - len(todo)} of {len(chunks)} chunks are done")
    if ranks.local_rank == 0:  # decode the images once per machine; the other ranks read the cache
        cli.datamodule.prepare_data()
        cli.datamodule.setup("fit")
    ranks.barrier()
    members = cli.model.members
    for r in range(math.ceil(len(todo) / ranks.world)):
        i = r * ranks.world + ranks.rank
        result = train_chunk(cli, ranks, todo[i], chunks[todo[i]]) if i < len(todo) else None
        for got in ranks.gather(result) or []:
            if got is not None:
                save_chunk(log_dir, got)
                write_member_curves(log_dir, members, got["members"], got["history"], got["steps"])
        result = got = None  # peak memory: one chunk of members per rank (rank 0: also one round's results)
        gc.collect()  # the chunk's trainer and model refer to each other: free them now, not at some later collection
    return merged_outcome(cli, log_dir, chunks) if ranks.rank == 0 else None


class EpochHistory(Callback):
    """Collect a :class:`HandgradClassifier`'s epoch metrics in the grid's history format (K = 1): the training
    loss summed here from each step's loss (in the training dtype), the module's train accuracy at the end of
    every training epoch, and its logged val loss and accuracy after every validation (none where none ran)."""

    def __init__(self):
        self.history = {k: [] for k in METRICS}
        self.steps = {k: [] for k in STEPS}
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
        loss = float(self._loss_sum) / self._n if self._n else math.nan
        self.history["train_loss"].append([loss])
        # the module logs train/acc in its own on_train_epoch_end, which Lightning calls after the callbacks'
        self.history["train_acc"].append([float(pl_module.train_acc.compute())])
        self.steps["train_step"].append(trainer.global_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        self.history["val_loss"].append([float(m.get("val/loss", math.nan))])
        self.history["val_acc"].append([float(m.get("val/acc", math.nan))])
        self.steps["val_epoch"].append(trainer.current_epoch)
        self.steps["val_step"].append(trainer.global_step)


def run_sequential(cli: SweepCLI, ranks: Ranks, log_dir: Path) -> dict:
    """One HandgradClassifier per member, each with the grid's initial weights and its own trainer, which logs
    into the member's run as the main job does (the same tags, its HPARAMS row and hp/* by HparamsLogger)."""
    from handgrad.runtime.errors import NonFiniteLossError

    spec, members = cli.model, cli.model.members
    save_config(cli, ranks, log_dir)
    per_member, failed, fitted, names = [], [], [], member_names(members)
    for k, m in enumerate(members):
        torch.manual_seed(m.get("seed", spec.init_seed))  # the grid's initial weights: MLP(sizes) after this seed
        model = HandgradClassifier(sizes=spec.sizes, activation=spec.activation, **{h: m[h] for h in HPARAMS})
        record = EpochHistory()
        trainer = chunk_trainer(cli, ranks, callbacks=[record, HparamsLogger(experiment=False)],
                                logger=member_run(log_dir, names[k]))
        _seed(cli)
        try:
            trainer.fit(model, datamodule=cli.datamodule)
            failed.append(-1)
        except NonFiniteLossError:  # this member diverged: report it, go on with the next
            failed.append(trainer.current_epoch)
        per_member.append(record)
        fitted.append((model, trainer))
    longest = max(per_member, key=lambda r: len(r.steps["val_step"]) + len(r.steps["train_step"]))
    history = {}  # [row][member], NaN where a member has no value (it failed, or stopped earlier)
    for name in METRICS:
        rows = len(longest.history[name])
        history[name] = [[r.history[name][e][0] if e < len(r.history[name]) and failed[k] < 0 else math.nan
                          for k, r in enumerate(per_member)] for e in range(rows)]

    def test(best: int, best_epoch: bool) -> dict:
        model, trainer = fitted[best]
        metrics = trainer.test(model, datamodule=cli.datamodule, verbose=False)[0]
        return {"test_loss": metrics.get("test/loss", math.nan), "test_acc": metrics.get("test/acc", math.nan)}

    steps = [trainer.global_step for (_, trainer), f in zip(fitted, failed) if f < 0]
    return {"history": history, "steps": longest.steps, "failed_epoch": failed, "test": test,
            "weights": lambda k, best: {n: v for n, v in fitted[k][0].mlp.state_dict().items()},
            "global_step": max(steps, default=0)}


# ----------------------------------------------------------------------------- the selected member


def member_mlp(cli: SweepCLI, state: dict) -> MLP:
    """An MLP holding one member's weights (their dtype kept)."""
    mlp = MLP(cli.model.sizes, cli.model.activation).to(state["fc.1.weight"].dtype)
    mlp.load_state_dict(state)
    return mlp


def evaluate_on_test(cli: SweepCLI, ranks: Ranks, member: dict, state: dict) -> dict:
    """The test set's loss and accuracy of one member's weights, on one device of rank 0."""
    spec = cli.model
    model = GridClassifier(members=[member], sizes=spec.sizes, activation=spec.activation, init_seed=spec.init_seed)
    model.net.to(state["fc.1.weight"].dtype)  # load float64 weights as float64, not rounded through float32
    model.net.load_state_dict({k: v[None] for k, v in state.items()})
    model.test_member = 0
    tester = chunk_trainer(cli, ranks, enable_progress_bar=False, enable_model_summary=False)
    tester.test(model, *loaders(cli.datamodule, tester, "test"), verbose=False)
    return model.test_result


# ----------------------------------------------------------------------------- the command


def main(args: Optional[list[str]] = None, datamodule_class=CIFAR10DataModule) -> dict:
    """Run the sweep; returns {"rows", "best", "log_dir", "history", "mode", "selected_ckpt"} on rank 0 (also
    written to the log directory) and {} on the other ranks. Bad options raise :class:`HandgradError` before
    anything is written."""
    args = sys.argv[1:] if args is None else list(args)
    cli = SweepCLI(args=args, datamodule_class=datamodule_class, description=__doc__)
    check(cli, args)
    check_output_dirs(cli.trainer)
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
    ranks.log_folder_is(log_dir)
    mode = "sequential" if cli.config.sequential else "batched"
    if ranks.world > 1:
        mode += f", {ranks.world} processes"
    outcome = run_sequential(cli, ranks, log_dir) if cli.config.sequential else run_chunks(cli, ranks, log_dir)
    ranks.close()
    if ranks.rank != 0:
        return {}
    return report(cli, ranks, log_dir, outcome, mode)


def report(cli: SweepCLI, ranks: Ranks, log_dir: Path, outcome: dict, mode: str) -> dict:
    """Select by the --select rule, test the selected member once, write the tables, runs and selected.ckpt."""
    members, rule = cli.model.members, cli.config.select
    history, failed, steps = outcome["history"], outcome["failed_epoch"], outcome["steps"]
    if not history["val_acc"]:
        raise SetupError("no validation ran: the selection needs val accuracy (check --trainer.limit_val_batches / "
                         "--trainer.check_val_every_n_epoch)")
    rows = results_table(members, history, failed, None, {}, steps)
    best = select(rows, rule)
    b = rows[best]
    use_best = rule == "best_epoch"
    if outcome["test"] is not None:
        test = outcome["test"](best, use_best)
        state = outcome["weights"](best, use_best)
    else:
        state = outcome["weights"](best, use_best)
        test = evaluate_on_test(cli, ranks, members[best], state)
    b["test_acc"], b["selected"] = test.get("test_acc", math.nan), True
    config_rows = by_config(rows) if cli.model.members[0].get("seed") is not None else None
    csv_path, md_path = write_results(log_dir, rows, config_rows)
    data = cli.datamodule  # set up on rank 0: the training split's statistics travel in selected.ckpt
    data_hp = dict(getattr(data, "hparams", {}))
    acc = "best_val_acc" if use_best else "val_acc"
    sweep_info = {"member": best, **{h: members[best][h] for h in HPARAMS}, "seed": members[best].get("seed"),
                  "select": rule, "val_acc": b[acc], "test_acc": b["test_acc"], "log_dir": str(log_dir)}
    epoch, step = len(history["train_loss"]), outcome["global_step"]
    if use_best:
        epoch, step = steps["val_epoch"][b["best_row"]], steps["val_step"][b["best_row"]]
    ckpt = save_selected(log_dir, selected_checkpoint(member_mlp(cli, state), members[best], cli.model.activation,
                                                      epoch=epoch, global_step=step, data_hparams=data_hp,
                                                      sweep_info=sweep_info, input_mean=getattr(data, "mean", None),
                                                      input_std=getattr(data, "std", None),
                                                      class_names=getattr(data, "class_names", None)))
    network = {"sizes": cli.model.sizes, "activation": cli.model.activation, "seed": cli.model.init_seed}
    params = [member_params(m, network, data_hp, cli.trainer.max_epochs) for m in members]
    log_member_hparams(log_dir, members, rows, history, steps, params, trained_by_lightning=cli.config.sequential)
    print(f"\nSweep of {len(members)} members, {len(history['train_loss'])} epochs ({mode}), selected by {rule}:\n")
    print(markdown(rows) if config_rows is None else markdown(config_rows, columns=CONFIG_COLUMNS))
    print(f"\nselected: member {best} (lr {b['lr']:g}, momentum {b['momentum']:g}, weight decay {b['weight_decay']:g}"
          f"{', seed ' + str(b['seed']) if b['seed'] != '' else ''}): val acc {b[acc]:.4f}, test acc {b['test_acc']:.4f}")
    again = retest_command(ckpt, data_hp.get("data_dir", "DATA_DIR"), str(cli.trainer.precision))
    print(f"selected checkpoint: {ckpt}\n  test it again: {again}")
    print(f"results: {csv_path}, {md_path}\nTensorBoard: tensorboard --logdir {log_dir}")
    return {"rows": rows, "best": best, "log_dir": log_dir, "history": history, "mode": mode, "selected_ckpt": ckpt,
            "config_rows": config_rows}


def run_as_script() -> None:
    """``python -m handgrad.sweep.run``: :func:`main`, with a user error (bad option, missing data, a lost rank) printed
    as one line ``error: ...`` and its exit code, as ``train.py sweep`` does."""
    quiet_lightning_notices()
    with exit_on_user_error():
        main()


if __name__ == "__main__":
    run_as_script()
