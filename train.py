"""Train, evaluate and compare handgrad MLPs on CIFAR-10 from the command line (a LightningCLI).

    python train.py                                     # the main job: fit on configs/default.yaml, then test
                                                        # the best checkpoint (by val accuracy) and print a summary
    python train.py --model.lr 0.05 --trainer.max_epochs 5   # the main job with overrides
    python train.py fit --config configs/airplane_bird.yaml [--trainer.accelerator cpu ...]
    python train.py fit --config configs/airplane_bird.yaml --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt
    python train.py validate|test|predict --config configs/airplane_bird.yaml --ckpt_path PATH.ckpt
    python train.py fit --config configs/float64.yaml --model.backprop autograd --model.optimizer torch
    python train.py fit --print_config                  # every option with its value
    python train.py sweep ...                           # grid search (handgrad.sweep)
    python train.py verify ...                          # check the hand-written gradients and SGD (handgrad.verify)

Logs and checkpoints go to lightning_logs/version_N/ (see them with `tensorboard --logdir lightning_logs`).

Several GPUs or nodes: Lightning's launchers, e.g. `python train.py fit --trainer.devices 4 --trainer.strategy ddp`
or `torchrun --nnodes 2 --nproc_per_node 4 ... train.py fit --trainer.num_nodes 2 --trainer.devices 4`; the
hand-written gradients are averaged over all processes (handgrad.distributed). Checkpoints are written atomically;
`--last_checkpoint.every_n_train_steps N` bounds what a kill loses to N steps (resume with --ckpt_path).
"""

from __future__ import annotations

import csv
import inspect
import logging
import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from pathlib import Path
from typing import Optional

import torch
import yaml
from jsonargparse import lazy_instance
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from handgrad.data import BadDataError, CIFAR10DataModule, DataNotFoundError
from handgrad.distributed import AtomicCheckpointIO, CheckpointError
from handgrad.outputs import OutputDirError, check_output_dirs
from handgrad.module import (ARCHITECTURE, ConfigError, HandgradClassifier, NonFiniteLossError, SetupError,
                             check_architecture, list_or_value)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
# ddp_spawn pickles the trainer; jsonargparse defines the class of a lazy default (LazyInstance_<Class>) in the
# module that first asks for one: ask here, at import, so that a spawned process importing this file has them too.
lazy_instance(TensorBoardLogger), lazy_instance(AtomicCheckpointIO)


class HandgradCLI(LightningCLI):
    """LightningCLI with this project's defaults: TensorBoard logs in ./lightning_logs/version_N and, beside them in
    checkpoints/, the best checkpoint by val/acc (--checkpoint.*) and last.ckpt (--last_checkpoint.*), written
    atomically (AtomicCheckpointIO). Bad option values and unwritable output folders are refused before any work."""

    def __init__(self, args=None, run: bool = True):
        with warnings.catch_warnings():  # it warns when args are given and sys.argv has some: intended here
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().__init__(
                HandgradClassifier,
                CIFAR10DataModule,
                args=args,
                run=run,
                trainer_defaults={"logger": lazy_instance(TensorBoardLogger, save_dir=".", name="lightning_logs",
                                                          default_hp_metric=False),
                                  "plugins": lazy_instance(AtomicCheckpointIO)},
                # a resumed fit writes into its own run folder (resume_in_its_run): its config.yaml is replaced there
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,  # the optimizer is a model option: --model.optimizer handgrad|torch
                # every subcommand starts from the reference job (configs/default.yaml); --config and flags override it
                parser_kwargs={"description": __doc__, "formatter_class": RawDescriptionHelpFormatter,
                               **{cmd: {"default_config_files": [str(DEFAULT_CONFIG)]}
                                  for cmd in ("fit", "validate", "test", "predict")}},
            )

    def add_arguments_to_parser(self, parser) -> None:
        # Two checkpoint callbacks: the best by val/acc, and last.ckpt rewritten after every validation (since
        # Lightning 2.6, save_last=True only refreshes last.ckpt when a new best is saved).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.filename": "best-epoch={epoch:02d}-val_acc={val/acc:.4f}",
            "checkpoint.auto_insert_metric_name": False,
            "last_checkpoint.filename": "last",  # monitor None, top 1: the latest state, overwritten each time
        })

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (DataNotFoundError, BadDataError):
            raise
        except (ValueError, MisconfigurationException) as err:  # a constructor refused an option value
            raise ConfigError(str(err)) from err

    def _parse_ckpt_path(self) -> None:
        """LightningCLI builds the model with the hyperparameters stored in --ckpt_path. First, before anything
        is built or written: a missing or unreadable checkpoint, or one whose architecture differs from the one
        the options ask for (not the default), is a clear error instead of a traceback or a silent override."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        special = ckpt_path in ("best", "last", "hpc") or str(ckpt_path).startswith("registry") \
            or "://" in str(ckpt_path)
        if ckpt_path and not special:
            if not Path(ckpt_path).is_file():
                raise CheckpointError(f"checkpoint {ckpt_path} does not exist; check --ckpt_path (e.g. "
                                      f"lightning_logs/version_N/checkpoints/last.ckpt).")
            checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
            asked = self.config[subcommand]["model"]
            defaults = inspect.signature(HandgradClassifier).parameters
            explicit = {k: asked[k] for k in ARCHITECTURE
                        if list_or_value(asked[k]) != list_or_value(defaults[k].default)}  # asked for, not default
            check_architecture(checkpoint, explicit, ckpt_path)
            if subcommand == "fit":
                check_resume(checkpoint, self.config["fit"], ckpt_path)
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        """Refuse bad input before anything is written: output folders, the model against the data."""
        if self.subcommand == "fit" and self.config["fit"].get("ckpt_path"):
            resume_in_its_run(self.trainer, self.config["fit"]["ckpt_path"])
        check_output_dirs(self.trainer)
        self.model.check_data(self.datamodule)
        if self.subcommand in (None, "fit"):
            add_lr_monitor(self.trainer)

    def before_validate(self) -> None:
        """validate, test and predict evaluate the weights of --ckpt_path: without one they would evaluate a freshly
        initialised model (and "best"/"last" find nothing in the new run's folder)."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path is None or not Path(str(ckpt_path)).is_file():
            got = "none was given" if ckpt_path is None else f"got {ckpt_path!r}, which is not a file"
            raise ConfigError(f"`{self.subcommand}` evaluates the weights of a checkpoint: pass --ckpt_path PATH.ckpt "
                              f"(e.g. lightning_logs/version_0/checkpoints/last.ckpt); {got}")
        self.before_fit()

    before_test = before_validate

    def before_predict(self) -> None:
        self.before_validate()
        self.trainer.callbacks.append(PredictionWriter())


class PredictionWriter(BasePredictionWriter):
    """`predict` writes predictions.csv into the run's log folder: per image of the predict set (the test images,
    in their order) its index, the predicted class and, where the data has labels, the true class; and prints
    where it is and the accuracy."""

    def __init__(self):
        super().__init__(write_interval="batch")
        self.rows: list[tuple[Tensor, Optional[Tensor]]] = []

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        self.rows.append((prediction.cpu(), None if target is None else target.cpu()))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.rows:
            return
        names = pl_module.class_names
        pred = torch.cat([p for p, _ in self.rows])
        target = torch.cat([t for _, t in self.rows]) if all(t is not None for _, t in self.rows) else None
        path = Path(trainer.log_dir or ".") / "predictions.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["index", "predicted", "predicted_class"] + (["target", "target_class"] if target is not None
                                                                        else []))
            for i, p in enumerate(pred.tolist()):
                row = [i, p, names[p]]
                if target is not None:
                    row += [int(target[i]), names[int(target[i])]]
                out.writerow(row)
        accuracy = f", accuracy {(pred == target).double().mean():.4f} against the labels" if target is not None else ""
        print(f"predictions of {len(pred)} images written to {path}{accuracy}")


RESUMED_MODEL = ("loss", "lr", "momentum", "dampening", "weight_decay", "nesterov", "backprop", "optimizer")
RESUMED_DATA = ("classes", "val_fraction", "split_seed", "batch_size", "shuffle")  # they fix every batch


def check_resume(checkpoint: dict, config, path) -> None:
    """`fit --ckpt_path` continues the checkpoint's run batch for batch: refuse options that differ from the run's
    own training settings (LightningCLI would silently replace the model's by the checkpoint's and keep the data's,
    so the run would go on with other batches than it started with), naming the flags that fit the checkpoint."""
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731  (YAML lists vs tuples)
    differ = []  # (flag, the checkpoint's value, the options' value)
    for section, keys, saved in (("model", RESUMED_MODEL, checkpoint.get("hyper_parameters", {})),
                                 ("data", RESUMED_DATA, checkpoint.get("datamodule_hyper_parameters", {}))):
        for key in keys:
            if key in saved and plain(saved[key]) != plain(config[section][key]):
                differ.append((f"--{section}.{key}", plain(saved[key]), plain(config[section][key])))
    if differ:
        asked = ", ".join(f"{flag} {value}" for flag, _, value in differ)
        value = lambda v: repr(yaml.safe_dump(v, default_flow_style=True).strip()) if isinstance(v, list) else v  # noqa: E731
        fix = " ".join(f"{flag} {value(saved)}" for flag, saved, _ in differ)
        raise CheckpointError(f"checkpoint {path} was trained with other settings than these options give ({asked}); "
                              f"resuming continues that run batch for batch, so pass {fix} (or leave out --ckpt_path "
                              f"to start a new run)")


def resume_in_its_run(trainer, ckpt_path) -> None:
    """A resumed fit logs into the run folder its checkpoint came from (lightning_logs/version_N, when the checkpoint
    lies in its checkpoints/ and the logger writes beside it): the TensorBoard curves go on in the same run and the
    best-checkpoint callback finds its own folder again, so it keeps the best score of the epochs before the
    interruption (in a new version_N it would start its search anew, and "best" would be the best since resuming)."""
    logger = trainer.logger
    run = Path(str(ckpt_path)).absolute().parent.parent
    if (isinstance(logger, TensorBoardLogger) and len(trainer.loggers) == 1 and run.name.startswith("version_")
            and run.parent == Path(logger.root_dir).absolute()):
        trainer.logger = TensorBoardLogger(logger.save_dir, name=logger.name, version=run.name,
                                           default_hp_metric=False)


def add_lr_monitor(trainer) -> None:
    """Log the learning rate of every epoch (lr-SGD in TensorBoard: a schedule's curve) with Lightning's
    LearningRateMonitor, when there is a logger to write to and the options did not add one already."""
    if trainer.loggers and not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks):
        trainer.callbacks.append(LearningRateMonitor(logging_interval="epoch"))


def check_config_files(args: list[str]) -> None:
    """A --config file that is not valid YAML: name the file, the line and the problem (jsonargparse would only
    say "<unicode string>"). Missing files and wrong keys or values are left to jsonargparse's messages."""
    for i, arg in enumerate(args):
        path = args[i + 1] if arg == "--config" and i + 1 < len(args) else arg[len("--config="):] \
            if arg.startswith("--config=") else None
        if path is None or not Path(path).is_file():
            continue
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--config {path} is not valid YAML: {problem}{where}. Fix the file (e.g. a missing "
                              f"bracket, quote or colon, or tabs used for indentation).") from None


def run_default(overrides: list[str]) -> HandgradCLI:
    """The main job: fit with configs/default.yaml (plus overrides), test the best checkpoint, print a summary."""
    cli = HandgradCLI(args=["--config", str(DEFAULT_CONFIG), *overrides], run=False)
    trainer = cli.trainer
    check_output_dirs(trainer)
    cli.model.check_data(cli.datamodule)
    add_lr_monitor(trainer)
    trainer.fit(cli.model, datamodule=cli.datamodule)
    best, last = trainer.checkpoint_callbacks[:2]  # see HandgradCLI.add_arguments_to_parser
    summary = {"TensorBoard logs": f"{trainer.log_dir}   (tensorboard --logdir {Path(trainer.log_dir).parent})",
               "best checkpoint": best.best_model_path, "last checkpoint": last.best_model_path}
    which = "best" if best.best_model_path else "last"  # no validation ran: no best checkpoint, test the last weights
    if best.best_model_score is not None:
        summary["val acc  (best)"] = f"{float(best.best_model_score):.4f}"
    results = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best.best_model_path or None)
    if results and "test/acc" in results[0]:
        summary[f"test acc ({which})"] = f"{results[0]['test/acc']:.4f}"
    if best.best_model_score is not None and trainer.logger is not None:
        # TensorBoard's HPARAMS tab shows the last hp/val_acc: make it the tested (best) model's, beside its hp/test_acc
        trainer.logger.log_metrics({"hp/val_acc": float(best.best_model_score)}, step=trainer.global_step)
    print("\nDone.\n" + "\n".join(f"  {key:<16} : {value}" for key, value in summary.items() if value))
    return cli


def quiet_notices_that_do_not_apply() -> None:
    """Lightning notices that say nothing about this project's runs, silenced by their exact text: an advert for a
    cloud logger; a warning that checkpoints written every N steps under manual optimization hold the state after
    the step (what resuming here needs: tests/test_faults.py checks it resumes exactly); a note that a checkpoint
    loaded for validate/test/predict came from another run folder; an internal deprecation in Lightning itself."""
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")
    warnings.filterwarnings("ignore", message="The dirpath has changed from")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "Tip: For seamless cloud logging" not in str(record.msg))


def main(args: list[str] | None = None):
    """Dispatch: no arguments or only options -> the main job; `sweep ...` -> handgrad.sweep; `verify ...` ->
    handgrad.verify; else LightningCLI."""
    args = sys.argv[1:] if args is None else list(args)
    quiet_notices_that_do_not_apply()
    try:
        if args and args[0] == "sweep":
            from handgrad.sweep import main as sweep_main  # imported only when asked for

            return sweep_main(args[1:])
        if args and args[0] == "verify":
            from handgrad.verify import main as verify_main  # imported only when asked for

            return verify_main(args[1:])
        check_config_files(args)
        if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
            return run_default(args)
        return HandgradCLI(args=args)
    except (DataNotFoundError, BadDataError, SetupError, ConfigError, CheckpointError, OutputDirError) as err:
        # a user error: say what is wrong and how to fix it, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
