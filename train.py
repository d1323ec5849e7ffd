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

Logs and checkpoints go to lightning_logs/version_N/ (see them with `tensorboard --logdir lightning_logs`).
"""

from __future__ import annotations

import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from pathlib import Path

from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from handgrad.data import BadDataError, CIFAR10DataModule, DataNotFoundError
from handgrad.module import HandgradClassifier, NonFiniteLossError, SetupError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


class HandgradCLI(LightningCLI):
    """LightningCLI with this project's defaults: TensorBoard logs in ./lightning_logs/version_N and, beside them in
    checkpoints/, the best checkpoint by val/acc (--checkpoint.*) and last.ckpt (--last_checkpoint.*)."""

    def __init__(self, args=None, run: bool = True):
        with warnings.catch_warnings():  # it warns when args are given and sys.argv has some: intended here
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().__init__(
                HandgradClassifier,
                CIFAR10DataModule,
                args=args,
                run=run,
                trainer_defaults={"logger": lazy_instance(TensorBoardLogger, save_dir=".", name="lightning_logs",
                                                          default_hp_metric=False)},
                auto_configure_optimizers=False,  # the optimizer is a model option: --model.optimizer handgrad|torch
                parser_kwargs={"description": __doc__, "formatter_class": RawDescriptionHelpFormatter},
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


def run_default(overrides: list[str]) -> HandgradCLI:
    """The main job: fit with configs/default.yaml (plus overrides), test the best checkpoint, print a summary."""
    cli = HandgradCLI(args=["--config", str(DEFAULT_CONFIG), *overrides], run=False)
    trainer = cli.trainer
    trainer.fit(cli.model, datamodule=cli.datamodule)
    best, last = trainer.checkpoint_callbacks[:2]  # see HandgradCLI.add_arguments_to_parser
    summary = {"TensorBoard logs": f"{trainer.log_dir}   (tensorboard --logdir {Path(trainer.log_dir).parent})",
               "best checkpoint": best.best_model_path, "last checkpoint": last.best_model_path}
    if best.best_model_score is not None:
        summary["val acc  (best)"] = f"{float(best.best_model_score):.4f}"
    results = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best.best_model_path or None)
    if results and "test/acc" in results[0]:
        summary["test acc (best)"] = f"{results[0]['test/acc']:.4f}"
    print("\nDone.\n" + "\n".join(f"  {key:<16} : {value}" for key, value in summary.items() if value))
    return cli


def main(args: list[str] | None = None):
    """Dispatch: no arguments or only options -> the main job; `sweep ...` -> handgrad.sweep; else LightningCLI."""
    args = sys.argv[1:] if args is None else list(args)
    try:
        if args and args[0] == "sweep":
            from handgrad.sweep import main as sweep_main  # imported only when asked for

            return sweep_main(args[1:])
        if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
            return run_default(args)
        return HandgradCLI(args=args)
    except (DataNotFoundError, BadDataError, SetupError) as err:  # say what is wrong and how to fix it, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
