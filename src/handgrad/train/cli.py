"""`fit`, `validate`, `test`, `predict`: LightningCLI with the reference job's defaults, checked before anything runs.

    HandgradCLI   a HandgradClassifier on a CIFAR10DataModule; the defaults are the reference experiment's (the
                  constructors' defaults, :data:`TRAINER_DEFAULTS` and :data:`SEED`: configs/default.yaml shows them);
                  logs and checkpoints in <--trainer.default_root_dir>/lightning_logs/version_N
    RunLogger     Lightning's TensorBoardLogger (writing the tag scheme: TensorBoardRun) whose run folder is
                  reserved and locked for one process

Bad input writes nothing. Before LightningCLI builds anything: the precision as typed, and a --ckpt_path that is
missing, unreadable, of another architecture than the options ask for or (fit) of another run. Before the trainer
runs (and its logger makes a folder): the output folders, the model's pre-flight check
(:meth:`HandgradClassifier.preflight`) and the data's preparation (extraction, decoding, split).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import shlex
import sys
from argparse import RawDescriptionHelpFormatter
from pathlib import Path
from typing import Optional, Union

import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from handgrad.data.datamodule import CIFAR10DataModule
from handgrad.data.image_decoder import MAX_PIXELS
from handgrad.data.images import ImageFiles, load
from handgrad.runtime import disk, run_folders
from handgrad.runtime.errors import ConfigError, HandgradError
from handgrad.train.callbacks import add_lr_monitor
from handgrad.runtime.exits import command_line
from handgrad.train.checkpoints import (ARCHITECTURE, AtomicCheckpointIO, check_architecture, check_resume,
                                        checkpoint_statistics, evaluation_data_options, load_for_checks,
                                        named_checkpoint, prune_unknown_checkpoints)
from handgrad.train.model_setup import check_precision
from handgrad.train.module import HandgradClassifier
from handgrad.train.predict import ImagePredictionWriter, PredictionWriter
from handgrad.train.views import TensorBoardRun

SEED = 265  # seed_everything: the same seed, the same initial weights
TRAINER_DEFAULTS = {"max_epochs": 30, "precision": "32-true", "log_every_n_steps": 10}  # the reference job's


class RunLogger(TensorBoardRun):
    """Lightning's TensorBoardLogger with this project's defaults: runs in <save_dir>/<name>/version_N, where
    save_dir None (the default) means --trainer.default_root_dir, else the working directory (Lightning's convention
    for its own default logger); no hp_metric placeholder (HPARAMS shows the hp/* of handgrad.train.views); the
    tags of :class:`handgrad.train.views.TensorBoardRun` (no ``epoch``; all but the four epoch curves after them).

    Its ``version`` (the documented property every logger defines) reserves and locks the run folder when first
    asked for (:func:`handgrad.runtime.run_folders.claim`), which the CLI does after its checks: runs started together
    in one folder never share it (Lightning's would pick the same N for each), and a folder another live process
    holds is refused."""

    in_use = run_folders.IN_USE  # what to do when another live process holds the folder

    def __init__(self, save_dir: Optional[str] = None, name: Optional[str] = "lightning_logs",
                 version: Optional[Union[int, str]] = None, default_hp_metric: bool = False, **kwargs):
        # `--trainer.logger.init_args.version 0` is the resume commands' way to name version_0; the parser may hand
        # it over as the string "0" (a folder named "0" for Lightning), depending on how it resolved the Union
        if isinstance(version, str) and version.isdigit():
            version = int(version)
        super().__init__(save_dir or ".", name=name, version=version, default_hp_metric=default_hp_metric, **kwargs)
        self.asked_version = version
        self._run: Optional[tuple] = None  # (version, lock) once claimed

    @property
    def version(self) -> Union[int, str]:
        if self._run is None:
            root = Path(self.root_dir)
            if rank_zero_only.rank == 0 and "://" not in str(root):  # rank 0 writes the logs
                self._run = run_folders.claim(root, self.asked_version, self.in_use)
            else:
                version = self.asked_version
                self._run = (run_folders.next_version(root) if version is None else version, None)
        return self._run[0]

    def planned_log_dir(self) -> str:
        """Where the run's folder is or will be, without making or locking it (the checks before a run)."""
        if self.asked_version is None:
            return self.root_dir
        version = self.asked_version
        return os.path.join(self.root_dir, version if isinstance(version, str) else f"version_{version}")

    def finalize(self, status: str) -> None:
        """Flush and close the event files and let go of the run folder. After a failure (which is what the user
        must see), a failure to flush (a full disk) is not raised over it."""
        try:
            super().finalize(status)
        except (OSError, RuntimeError):
            if status == "success":
                raise
        finally:
            if self._run is not None:
                run_folders.release(self._run[1])  # (a later use of the logger, e.g. a test after fit, keeps it open)
                self._run = (self._run[0], None)


RUN_LOGGER = f"{__name__}.RunLogger"


class HandgradArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one line: ``error: <what>`` with a "did you mean" for a mistyped option
    and a pointer to --help, instead of the usage text first."""

    def error(self, message: str, ex: Optional[Exception] = None):
        if not self.exit_on_error:  # (a caller that catches the error: typed_options)
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        text = " ".join(str(message).split())
        if hint := did_you_mean(text, parser):
            text += f"; did you mean {hint}?"
        words = parser.prog.replace(" [options]", "").split()[1:]  # the subcommand, if any
        print(f"error: {text} (see: {command_line([*words, '--help'])})", file=sys.stderr)
        sys.exit(2)


def did_you_mean(message: str, parser) -> Optional[str]:
    """The option nearest to the one a message rejects (an unknown ``--model.lrr``: ``--model.lr``), if one is close."""
    found = re.search(r"(--[\w.\-]+)", message)
    if not found:
        return None
    options = [f"--{key}" for key in parser.get_defaults().keys()] + ["--config", "--print_config", "--ckpt_path"]
    close = difflib.get_close_matches(found.group(1), [o for o in options if o != found.group(1)], n=1, cutoff=0.8)
    return f"`{close[0]}`" if close else None


class HandgradCLI(LightningCLI):
    """LightningCLI with this project's defaults: TensorBoard logs in <default_root_dir>/lightning_logs/version_N
    and, beside them in checkpoints/, the best checkpoint by val/acc (--checkpoint.*, :attr:`best_checkpoint`) and
    last.ckpt (--last_checkpoint.*, :attr:`last_checkpoint`), written atomically (AtomicCheckpointIO)."""

    checkpoint_statistics = None  # (mean, std) of --ckpt_path (parse_arguments)
    resumed = None  # the checkpoint a fit resumes from, and its path (parse_arguments)
    ckpt_help = "the main job resumes the fit from this checkpoint (then tests), as `fit --ckpt_path` does"

    def __init__(self, args=None, run: bool = True, description: Optional[str] = None):
        self.words = list(sys.argv[1:] if args is None else args)  # the command line, for the resume advice
        disk.set_resume_advice(self.resume_advice)
        super().__init__(
            HandgradClassifier,
            CIFAR10DataModule,
            args=args,
            run=run,
            # (class paths, not lazy_instance: its generated classes cannot be unpickled by ddp_spawn's processes)
            trainer_defaults={"logger": {"class_path": RUN_LOGGER},
                              "plugins": {"class_path": "handgrad.train.checkpoints.AtomicCheckpointIO"},
                              **TRAINER_DEFAULTS},
            seed_everything_default=SEED,
            # a resumed fit writes into its own run folder: its config.yaml is replaced there
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the optimizer is a model option: --model.optimizer handgrad|torch
            parser_kwargs={"description": description, "formatter_class": RawDescriptionHelpFormatter},
            parser_class=HandgradArgumentParser,
        )

    def resume_advice(self, folder: Optional[Path]) -> str:
        """After a full disk: the checkpoint this process wrote last (else the newest under the folder), and the
        command that resumes from it."""
        last = AtomicCheckpointIO.last_written
        last = last if last is not None and last.is_file() else disk.newest_checkpoint(folder)
        if last is None:
            return disk.checkpoint_advice(None)
        words = self.words if self.words[:1] in (["fit"], []) or self.words[0].startswith("-") else ["fit"]
        command = command_line(words, drop=("--ckpt_path",)) + " " + shlex.join(["--ckpt_path", str(last)])
        return f"the last good checkpoint is {last} (the checkpoints on disk are intact); free some space, then " \
               f"resume with: {command}"

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
        if not add_subcommands:  # the main job (and verify) take --ckpt_path as fit does
            self.parser.add_argument("--ckpt_path", type=Optional[str], default=None, help=self.ckpt_help)
        else:
            # `predict` alone takes --predict.images and --predict.max_pixels. No public hook tells
            # add_arguments_to_parser which subcommand it is building; LightningCLI keeps each subcommand's parser
            # in _subcommand_parsers (2.5-2.6; tests/test_standalone.py fails if that changes)
            predict = self._subcommand_parsers["predict"]
            predict.add_argument(
                "--predict.images", type=Optional[str], default=None,
                help="predict these images instead of the test split: a PNG/JPEG file, a folder of them or a glob "
                     "pattern; written to predictions.csv in the run folder (no CIFAR-10 data needed)")
            predict.add_argument(
                "--predict.max_pixels", type=int, default=MAX_PIXELS,
                help=f"--predict.images: an image whose header declares more pixels (width x height) than this is "
                     f"skipped, with one line, before it is decoded (default {MAX_PIXELS}: Pillow's MAX_IMAGE_PIXELS)")

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
        fit = subcommand == "fit" or (subcommand is None and self.resumes)
        if ckpt_path in ("last", "best") and isinstance(config.trainer.logger, Namespace):
            logger = config.trainer.logger.init_args
            config.ckpt_path = ckpt_path = str(named_checkpoint(ckpt_path, Path(logger.save_dir) / logger.name, fit))
        if ckpt_path and not ("://" in str(ckpt_path) or str(ckpt_path).startswith(("registry", "hpc"))):
            checkpoint = load_for_checks(ckpt_path)
            typed = typed_options(parser, args, subcommand)
            check_architecture(checkpoint, {k: config.model[k] for k in ARCHITECTURE if k in typed.get("model", {})},
                               ckpt_path)
            if fit:
                check_resume(checkpoint, config, ckpt_path)
                resume_in_its_run(config.trainer.logger, ckpt_path)
                self.resumed = (checkpoint, Path(ckpt_path))
            elif subcommand:
                evaluation_data_options(checkpoint, config, typed.get("data", {}), ckpt_path)
            if subcommand or fit:  # (verify only reads the weights)
                self.checkpoint_statistics = checkpoint_statistics(checkpoint, ckpt_path)

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

    def preflight(self) -> None:
        """Refuse bad input before anything is written: the output folders, the model against the trainer and
        the data, then the data itself (prepared and set up here, once: the trainer's setup finds it done). With
        a --ckpt_path, the data is normalized with its training split's statistics."""
        trainer, data = self.trainer, self.datamodule
        run_folders.check_output_dirs(trainer)
        if self.checkpoint_statistics is not None and hasattr(data, "use_statistics"):
            data.use_statistics(*self.checkpoint_statistics)
        self.model.preflight(trainer, data)
        if trainer.local_rank == 0:  # other ranks prepare inside the trainer, after rank 0 (its barrier)
            data.trainer = trainer  # the device and dtype the batches need
            data.prepare_data()
            data.setup(self.subcommand or "fit")
        for logger in trainer.loggers:  # all checked: the run's folder is made and locked now (RunLogger.version)
            logger.version

    resumes = True  # without a subcommand (the main job), --ckpt_path resumes a fit

    def before_fit(self) -> None:
        self.preflight()
        add_lr_monitor(self.trainer)
        if self.resumed is not None and Path(self.trainer.log_dir or "").absolute() == \
                self.resumed[1].absolute().parent.parent:  # resumed in its own run folder (resume_in_its_run)
            prune_unknown_checkpoints(self.resumed[0], self.resumed[1].parent)

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
        """`predict --predict.images PATH`: the images replace the data module (the model normalizes them with its
        checkpoint's statistics: no CIFAR-10 data is read); else the test split, written to predictions.csv."""
        options = self.config["predict"].get("predict") or {}
        images = options.get("images")
        if not images:
            self.before_validate()
            self.trainer.callbacks.append(PredictionWriter())
            return
        x, files = load(images, options.get("max_pixels", MAX_PIXELS))
        self.datamodule = ImageFiles(x, files, self.model.class_names, batch_size=self.config["predict"].data.batch_size)
        self.before_validate()
        self.trainer.callbacks.append(ImagePredictionWriter(files))


def logs_under_default_root_dir(config: Namespace, under: str = "") -> None:
    """A RunLogger without a save_dir writes under --trainer.default_root_dir (else the working directory), in its
    folder ``under`` if given, as Lightning's own default logger does; filled in the parsed config (``config``: the
    subcommand's section), so the saved config.yaml shows it."""
    logger = config.trainer.logger
    if is_run_logger(logger) and logger.init_args.save_dir is None:
        root = config.trainer.default_root_dir or "."
        logger.init_args.save_dir = str(Path(root) / under) if under else root


def is_run_logger(logger) -> bool:
    """Whether a parsed ``--trainer.logger`` is a :class:`RunLogger` (or a subclass of it: the sweep's)."""
    if not isinstance(logger, Namespace) or "." not in str(logger.get("class_path")):
        return False
    module, _, name = logger.class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, RunLogger)


def typed_options(parser, args, subcommand) -> dict:
    """The options the command line sets, itself or through --config files, without the defaults: what the user
    asked for, even where it equals the default. If they cannot be parsed without the defaults (a class option
    given without a required argument that a default supplies), every model option counts as asked for: a
    checkpoint is then refused rather than silently preferred."""
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
    if (is_run_logger(logger) and logger.init_args.get("version") is None and run.name.startswith("version_")
            and run.parent == (Path(logger.init_args.save_dir) / logger.init_args.name).absolute()):
        logger.init_args.version = run.name


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
