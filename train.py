"""Train, evaluate and compare handgrad MLPs on CIFAR-10 from the command line (a LightningCLI).

    python train.py                                     # the main job: fit on configs/default.yaml, then test
                                                        # the best checkpoint (by val accuracy) and print a summary
    python train.py --model.lr 0.05 --trainer.max_epochs 5   # the main job with overrides
    python train.py fit --config configs/airplane_bird.yaml [--trainer.accelerator cpu ...]
    python train.py fit --config configs/airplane_bird.yaml --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt
    python train.py validate|test|predict --config configs/airplane_bird.yaml --ckpt_path PATH.ckpt
    python train.py fit --config configs/float64.yaml --model.backprop autograd --model.optimizer torch
    python train.py fit --print_config                  # every option with its value
    python train.py sweep ...                           # grid search (handgrad.sweep.run)
    python train.py verify ...                          # check the hand-written gradients and SGD (handgrad.verify.cli)

Logs and checkpoints go to lightning_logs/version_N/ under --trainer.default_root_dir (default: the working
directory); see them with `tensorboard --logdir lightning_logs`.

Several GPUs or nodes: Lightning's launchers, e.g. `python train.py fit --trainer.devices 4 --trainer.strategy ddp`
or `torchrun --nnodes 2 --nproc_per_node 4 ... train.py fit --trainer.num_nodes 2 --trainer.devices 4`; the
hand-written gradients are averaged over all processes (handgrad.core.distributed). Checkpoints are written atomically;
`--last_checkpoint.every_n_train_steps N` bounds what a kill loses to N steps (resume with --ckpt_path).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger

from handgrad.train.cli import DEFAULT_CONFIG, HandgradCLI, check_config_files, exit_on_user_error, quiet_lightning_notices

# `python train.py NAME ...` hands the rest of the command line to NAME's module's main(args)
COMMANDS = {
    "sweep": "handgrad.sweep.run",  # grid search, all members at once
    "verify": "handgrad.verify.cli",  # the hand-written gradients and SGD step checked on this machine
}


def run_default(overrides: list[str]) -> HandgradCLI:
    """The main job: fit with configs/default.yaml (plus overrides), test the best checkpoint, print a summary."""
    cli = HandgradCLI(args=["--config", str(DEFAULT_CONFIG), *overrides], run=False, description=__doc__)
    trainer = cli.trainer
    cli.before_fit()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    best, last = cli.best_checkpoint, cli.last_checkpoint
    summary = {"TensorBoard logs": f"{trainer.log_dir}   (tensorboard --logdir {Path(trainer.log_dir).parent})",
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


def main(args: list[str] | None = None):
    """Dispatch: no arguments or only options -> the main job; `sweep ...` -> handgrad.sweep.run; `verify ...` ->
    handgrad.verify.cli; else LightningCLI."""
    args = sys.argv[1:] if args is None else list(args)
    quiet_lightning_notices()
    with exit_on_user_error():
        if args and args[0] in COMMANDS:
            return importlib.import_module(COMMANDS[args[0]]).main(args[1:])  # imported only when asked for
        check_config_files(args)
        if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
            return run_default(args)
        return HandgradCLI(args=args, description=__doc__)


if __name__ == "__main__":
    main()
