"""The commands, by name: `python train.py [COMMAND] [options]` (or `python -m handgrad ...`).

    (none)       the main job: fit the reference experiment, test the best checkpoint, print a summary
    fit, validate, test, predict     LightningCLI's subcommands (handgrad.train.cli.HandgradCLI)
    sweep        model selection over SGD hyperparameters, all members batched (handgrad.sweep)
    verify       the hand-written gradients and SGD step checked on this machine (handgrad.verify)

Every command ends a user error with one line `error: ...` and exit code 2 (1 for a diverged run or a lost rank).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Callable, Optional

from lightning.pytorch.loggers import TensorBoardLogger

from handgrad.runtime.errors import ConfigError
from handgrad.runtime.exits import exit_on_user_error, quiet_lightning_notices
from handgrad.sweep.run import main as sweep
from handgrad.train.cli import HandgradCLI, check_config_files
from handgrad.verify.cli import main as verify

LIGHTNING = ("fit", "validate", "test", "predict")


def lightning(args: list[str]) -> HandgradCLI:
    """fit / validate / test / predict, as LightningCLI runs them."""
    check_config_files(args)
    return HandgradCLI(args=args, description=__doc__)


def main_job(overrides: list[str]) -> HandgradCLI:
    """Fit with the reference defaults (plus ``overrides``), test the best checkpoint, print a summary."""
    check_config_files(overrides)
    cli = HandgradCLI(args=overrides, run=False, description=__doc__)
    trainer = cli.trainer
    cli.before_fit()
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    best, last = cli.best_checkpoint, cli.last_checkpoint
    logs = shlex.quote(str(Path(trainer.log_dir).parent))
    summary = {"TensorBoard logs": f"{trainer.log_dir}   (tensorboard --logdir {logs})",
               "best checkpoint": best.best_model_path, "last checkpoint": last.best_model_path}
    which = "best" if best.best_model_path else "last"  # no validation ran: no best checkpoint, test the last weights
    if best.best_model_score is not None:
        summary["val acc  (best)"] = f"{float(best.best_model_score):.4f}"
    results = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best.best_model_path or None)
    if results and "test/acc" in results[0]:
        summary[f"test acc ({which})"] = f"{results[0]['test/acc']:.4f}"
    print("\nDone.\n" + "\n".join(f"  {key:<16} : {value}" for key, value in summary.items() if value))
    if isinstance(trainer.logger, TensorBoardLogger):  # the same, under TensorBoard's Text: which model was tested
        rows = [f"| {key.replace('  ', ' ')} | {value} |" for key, value in summary.items() if value]
        trainer.logger.experiment.add_text("job/summary", "\n".join(["| | |", "|---|---|", *rows]), trainer.global_step)
        trainer.logger.finalize("success")  # written and closed, as after fit and test
    return cli


COMMANDS: dict[str, Callable[[list[str]], object]] = {
    **{name: (lambda args, name=name: lightning([name, *args])) for name in LIGHTNING},
    "sweep": sweep,
    "verify": verify,
}


def main(args: Optional[list[str]] = None):
    """Dispatch: no arguments or only options -> the main job; a command name -> that command with the rest."""
    args = sys.argv[1:] if args is None else list(args)
    quiet_lightning_notices()
    with exit_on_user_error():
        if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
            return main_job(args)
        if args[0] in ("-h", "--help"):
            print(__doc__ + "\nOptions of a command: python train.py COMMAND --help (the main job: python train.py "
                  "--trainer.max_epochs 30 --help).")
            return None
        if args[0] not in COMMANDS:
            raise ConfigError(f"unknown command {args[0]!r}: use one of {', '.join(COMMANDS)}, or options alone for "
                              f"the main job (see: python train.py --help)")
        return COMMANDS[args[0]](args[1:])
