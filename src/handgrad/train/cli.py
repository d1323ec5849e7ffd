"""The command line: LightningCLI with this project's defaults, and one way to end on a user error.

    HandgradCLI          fit / validate / test / predict of a HandgradClassifier on CIFAR10DataModule; every
                         subcommand starts from configs/default.yaml; logs and checkpoints under
                         --trainer.default_root_dir (default: the working directory) in lightning_logs/version_N
    exit_on_user_error   a HandgradError becomes one line `error: ...` and its exit code (2; 1 for a diverged run)

Bad input writes nothing. Before LightningCLI builds anything: the precision as typed, malformed config files, and a
--ckpt_path that is missing, unreadable, of another architecture than the options ask for or (fit) of another run.
Before the trainer runs (and its logger makes a folder): the output folders, the model's pre-flight check
(:meth:`HandgradClassifier.preflight`) and the data's preparation (extraction, decoding, split).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import threading
import warnings
from argparse import RawDescriptionHelpFormatter
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Optional, Union

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from handgrad.runtime import run_folders as run_folder
from handgrad.train.callbacks import add_lr_monitor
from handgrad.train.checkpoints import (ARCHITECTURE, check_architecture, check_resume, checkpoint_statistics, disk_full_error,
                                  evaluation_data_options, is_disk_full, load_for_checks)
from handgrad.data.datamodule import CIFAR10DataModule
from handgrad.runtime.errors import ConfigError, HandgradError, check_precision
from handgrad.train.module import HandgradClassifier
from handgrad.runtime.outputs import check_output_dirs

REPO = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"


class RunLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger with this project's defaults: runs in <save_dir>/lightning_logs/version_N, where
    save_dir None (the default) means --trainer.default_root_dir, else the working directory (Lightning's convention
    for its own default logger); and no hp_metric placeholder (HPARAMS shows the hp/* of handgrad.train.views).
    Its version_N folder is reserved and locked when the version is first asked for (:mod:`handgrad.runtime.run_folders`),
    which the CLI does after its checks: runs (and sweeps, whose default logger this is too) started together in one
    folder never share it; Lightning's would pick the same N for each."""

    def __init__(self, save_dir: Optional[str] = None, name: Optional[str] = "lightning_logs",
                 version: Optional[Union[int, str]] = None, default_hp_metric: bool = False, **kwargs):
        super().__init__(save_dir or ".", name=name, version=version, default_hp_metric=default_hp_metric, **kwargs)
        self._lock: Optional[int] = None
        self._claimed = False

    @property
    def version(self) -> Union[int, str]:
        """This run's version, its folder made and locked on first use (on global rank 0, which writes the logs):
        runs started together get a folder each; a folder another live process holds is refused (run_folder)."""
        # (_version, _get_next_version: TensorBoardLogger's own, the version asked for and 1 + the highest
        # version_* on disk; tests/test_concurrency.py fails if they change)
        if rank_zero_only.rank == 0 and not self._claimed and "://" not in str(self.root_dir):
            self._version, self._lock = run_folder.claim(Path(self.root_dir), self._version, self._get_next_version)
            self._claimed = True
        elif self._version is None:
            self._version = self._get_next_version()
        return self._version

    def planned_log_dir(self) -> str:
        """Where the run's folder is or will be, without making or locking it (the checks before a run)."""
        if self._version is None:
            return self.root_dir
        return os.path.join(self.root_dir, self._version if isinstance(self._version, str)
                            else f"version_{self._version}")

    def finalize(self, status: str) -> None:
        """Flush and close the event files and let go of the run folder. After a failure (which is what the user
        must see), a failure to flush (a full disk) is not raised over it."""
        try:
            super().finalize(status)
        except (OSError, RuntimeError):
            if status == "success":
                raise
        finally:
            run_folder.release(self._lock)  # (a later use of the logger, e.g. a test after fit, does not re-lock)
            self._lock = None


RUN_LOGGER = f"{__name__}.RunLogger"


class HandgradCLI(LightningCLI):
    """LightningCLI with this project's defaults: TensorBoard logs in <default_root_dir>/lightning_logs/version_N
    and, beside them in checkpoints/, the best checkpoint by val/acc (--checkpoint.*, :attr:`best_checkpoint`) and
    last.ckpt (--last_checkpoint.*, :attr:`last_checkpoint`), written atomically (AtomicCheckpointIO)."""

    def __init__(self, args=None, run: bool = True, description: Optional[str] = None):
        super().__init__(
            HandgradClassifier,
            CIFAR10DataModule,
            args=args,
            run=run,
            # (class paths, not lazy_instance: its generated classes cannot be unpickled by ddp_spawn's processes)
            trainer_defaults={"logger": {"class_path": RUN_LOGGER},
                              "plugins": {"class_path": "handgrad.train.checkpoints.AtomicCheckpointIO"}},
            # a resumed fit writes into its own run folder: its config.yaml is replaced there
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the optimizer is a model option: --model.optimizer handgrad|torch
            # every subcommand starts from the reference job (configs/default.yaml); --config and flags override it
            parser_kwargs={"description": description, "formatter_class": RawDescriptionHelpFormatter,
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

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            # `predict` alone takes --predict.images; LightningCLI keeps each subcommand's parser in
            # _subcommand_parsers (2.6; tests/test_standalone.py fails if that changes), add_arguments_to_parser is
            # called for all of them alike
            self._subcommand_parsers["predict"].add_argument(
                "--predict.images", type=Optional[str], default=None,
                help="predict these images instead of the test split: a PNG/JPEG file, a folder of them or a glob "
                     "pattern; written to predictions.csv in the run folder (no CIFAR-10 data needed)")

    # ---------------------------------------------------------------- before anything is built

    def parse_arguments(self, parser, args) -> None:
        """Parse (as LightningCLI does, without its warning that args were given while sys.argv has some: intended
        here), then check what needs no built object: the precision as typed, where logs go, and --ckpt_path."""
        self.config = parser.parse_args(args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        check_precision(config.trainer.precision)  # as typed: Lightning turns 16-mixed on a CPU into bf16-mixed
        logs_under_default_root_dir(config)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and not (ckpt_path in ("best", "last", "hpc") or "://" in str(ckpt_path)
                              or str(ckpt_path).startswith("registry")):
            checkpoint = load_for_checks(ckpt_path)
            typed = typed_options(parser, args, subcommand)
            check_architecture(checkpoint, {k: config.model[k] for k in ARCHITECTURE if k in typed.get("model", {})},
                               ckpt_path)
            if subcommand == "fit":
                check_resume(checkpoint, config, ckpt_path)
                resume_in_its_run(config.trainer.logger, ckpt_path)
            else:
                evaluation_data_options(checkpoint, config, typed.get("data", {}), ckpt_path)
            self.checkpoint_statistics = checkpoint_statistics(checkpoint)
            if self.checkpoint_statistics is None:
                print(f"notice: checkpoint {ckpt_path} holds no input statistics (written before handgrad stored "
                      f"them): normalizing with statistics recomputed from the training split", file=sys.stderr)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except HandgradError:
            raise
        except (ValueError, MisconfigurationException) as err:  # a constructor refused an option value
            raise ConfigError(str(err)) from err
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        self.best_checkpoint: ModelCheckpoint = config["checkpoint"]  # these two, whatever --trainer.callbacks adds
        self.last_checkpoint: ModelCheckpoint = config["last_checkpoint"]

    # ---------------------------------------------------------------- before the trainer runs

    checkpoint_statistics = None  # (mean, std) of --ckpt_path, if it holds them (parse_arguments)

    def preflight(self) -> None:
        """Refuse bad input before anything is written: the output folders, the model against the trainer and
        the data, then the data itself (prepared and set up here, once: the trainer's setup finds it done). With
        a --ckpt_path that holds its training split's statistics, the data is normalized with those."""
        trainer, data = self.trainer, self.datamodule
        check_output_dirs(trainer)
        if self.checkpoint_statistics is not None and hasattr(data, "use_statistics"):
            data.use_statistics(*self.checkpoint_statistics)
        self.model.preflight(trainer, data)
        if trainer.local_rank == 0:  # other ranks prepare inside the trainer, after rank 0 (its barrier)
            data.trainer = trainer  # the device and dtype the batches need
            data.prepare_data()
            data.setup(self.subcommand or "fit")
        for logger in trainer.loggers:  # all checked: the run's folder is made and locked now (RunLogger.version)
            logger.version

    def before_fit(self) -> None:
        self.preflight()
        add_lr_monitor(self.trainer)

    def before_validate(self) -> None:
        """validate, test and predict evaluate the weights of --ckpt_path: without one they would evaluate a freshly
        initialised model (and "best"/"last" find nothing in the new run's folder)."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path is None or not Path(str(ckpt_path)).is_file():
            got = "none was given" if ckpt_path is None else f"got {ckpt_path!r}, which is not a file"
            raise ConfigError(f"`{self.subcommand}` evaluates the weights of a checkpoint: pass --ckpt_path PATH.ckpt "
                              f"(e.g. lightning_logs/version_0/checkpoints/last.ckpt); {got}")
        self.preflight()

    before_test = before_validate

    def before_predict(self) -> None:
        images = (self.config["predict"].get("predict") or {}).get("images")
        if images:
            self.before_predict_images(images)
            return
        self.before_validate()
        self.trainer.callbacks.append(PredictionWriter())

    def before_predict_images(self, spec: str) -> None:
        """`predict --predict.images PATH`: the images replace the data module; the model normalizes them with
        its checkpoint's statistics (no CIFAR-10 data is read), or, for a checkpoint without them, with those
        recomputed from --data.* as for any other evaluation."""
        from handgrad.data.images import ImageFiles, ImagePredictionWriter, load

        x, files = load(spec)
        names = self.model.class_names
        if self.checkpoint_statistics is None:
            self.before_validate()  # the CIFAR-10 training split, for its statistics (and its class names)
            self.model.input_mean.copy_(self.datamodule.mean)
            self.model.input_std.copy_(self.datamodule.std)
            names = self.datamodule.class_names
        self.datamodule = ImageFiles(x, files, names, batch_size=self.config["predict"].data.batch_size)
        self.before_validate()
        self.trainer.callbacks.append(ImagePredictionWriter(files))


def logs_under_default_root_dir(config: Namespace, under: str = "") -> None:
    """A RunLogger without a save_dir writes under --trainer.default_root_dir (else the working directory), in its
    folder ``under`` if given, as Lightning's own default logger does; filled in the parsed config (``config``: the
    subcommand's section), so the saved config.yaml shows it."""
    logger = config.trainer.logger
    if isinstance(logger, Namespace) and logger.class_path == RUN_LOGGER and logger.init_args.save_dir is None:
        logger.init_args.save_dir = str(Path(config.trainer.default_root_dir or ".") / under) if under else \
            config.trainer.default_root_dir or "."


def typed_options(parser, args, subcommand) -> dict:
    """The options the command line sets, itself or through --config files, without the defaults (nor
    configs/default.yaml): what the user asked for, even where it equals the default. If they cannot be parsed
    without the defaults (a class option given without a required argument that a default supplies), every
    model option counts as asked for: a checkpoint is then refused rather than silently preferred."""
    parser.exit_on_error = False  # (argparse's documented switch: raise instead of printing usage and exiting)
    try:
        typed = parser.parse_args(args, defaults=False)
    except argparse.ArgumentError:
        return {"model": dict.fromkeys(ARCHITECTURE)}
    finally:
        parser.exit_on_error = True
    section = typed.get(subcommand) if subcommand else typed
    return section.as_dict() if section else {}


def resume_in_its_run(logger, ckpt_path) -> None:
    """A resumed fit logs into the run folder its checkpoint came from (<save_dir>/lightning_logs/version_N, when
    the checkpoint lies in its checkpoints/ and the logger writes there): the TensorBoard curves go on in the same
    run and the best-checkpoint callback finds its own folder again, so it keeps the best score of the epochs
    before the interruption (in a new version_N it would start its search anew)."""
    run = Path(str(ckpt_path)).absolute().parent.parent
    if (isinstance(logger, Namespace) and logger.class_path == RUN_LOGGER
            and logger.init_args.get("version") is None and run.name.startswith("version_")
            and run.parent == (Path(logger.init_args.save_dir) / logger.init_args.name).absolute()):
        logger.init_args.version = run.name


class PredictionWriter(BasePredictionWriter):
    """`predict` writes predictions.csv into the run's log folder: per image of the predict set (the test images,
    in their order) its index, the predicted class, where the data has labels the true class, and the probability
    of each class (p_<class>, :meth:`HandgradClassifier.classify`); and prints where it is and the accuracy."""

    def __init__(self):
        super().__init__(write_interval="batch")
        self.rows: list[tuple[Tensor, Optional[Tensor]]] = []

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        self.rows.append((prediction.float().cpu(), None if target is None else target.cpu()))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.rows:
            return
        names = pl_module.class_names
        probs = torch.cat([p for p, _ in self.rows])
        pred = probs.argmax(1)
        target = torch.cat([t for _, t in self.rows]) if all(t is not None for _, t in self.rows) else None
        path = Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["index", "predicted", "predicted_class"] + (["target", "target_class"] if target is not None
                                                                        else []) + [f"p_{n}" for n in names])
            for i, p in enumerate(pred.tolist()):
                row = [i, p, names[p]]
                if target is not None:
                    row += [int(target[i]), names[int(target[i])]]
                out.writerow(row + [f"{v:.6f}" for v in probs[i].tolist()])
        accuracy = f", accuracy {(pred == target).double().mean():.4f} against the labels" if target is not None else ""
        print(f"predictions of {len(pred)} images written to {path}{accuracy}")


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


@contextmanager
def exit_on_user_error():
    """A :class:`HandgradError` (bad option, missing data, unusable checkpoint, diverged run) ends the program with
    one line ``error: ...`` on stderr and the error's exit code (2; 1 for a diverged run), without a traceback."""
    hook = threading.excepthook
    threading.excepthook = partial(quiet_disk_full_in_threads, hook)
    try:
        yield
    except HandgradError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:  # noqa: BLE001 (a full disk, whatever wrapped its OSError: Lightning's loggers do)
        if not is_disk_full(err):
            raise
        where = Path(err.filename).parent if getattr(err, "filename", None) else run_folder.last_claimed
        err = disk_full_error(where, "writing the run's logs (TensorBoard events, config.yaml, hparams.yaml)")
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    finally:
        threading.excepthook = hook


def quiet_disk_full_in_threads(hook, args) -> None:
    """TensorBoard writes its event files in a thread: when the disk is full, the thread dies with a traceback and
    the next write in the main thread raises the same OSError, which becomes the one `error:` line. Other
    exceptions in threads go to ``hook`` (printed as usual)."""
    if not is_disk_full(args.exc_value):
        hook(args)


# Lightning notices that say nothing about this project's runs, silenced by their text (the only handle Python's
# warnings and logging filters give; tests/test_cli.py checks that each text is still in Lightning's (or torch's)
# source, so that a filter which no longer matches anything is noticed):
QUIET_WARNINGS = (
    # checkpoints written every N steps under manual optimization hold the state after the step: what resuming
    # needs (tests/test_faults.py resumes from them bitwise)
    "Using ModelCheckpoint with manual optimization and every_n_train_steps",
    # validate/test/predict load a checkpoint from another run folder than their own: intended
    "The dirpath has changed from",
    # torch deprecates a pytree call that Lightning 2.6 makes on every batch; nothing a user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # predict's writers take each row's index from the batch itself (TensorBatches has no sampler indices)
    "Couldn't infer the batch indices fetched from your dataloader",
)
QUIET_LOG_LINES = ("Tip: For seamless cloud",)  # adverts for cloud services


def quiet_lightning_notices() -> None:
    for text in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=text)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not any(text in str(record.msg) for text in QUIET_LOG_LINES))
