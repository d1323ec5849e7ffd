"""The sweep's command line: the ``--model`` options of a search (:class:`SweepModel`), LightningCLI for them
(:class:`SweepCLI`, with the reference job's defaults), and the checks run before anything is written."""

from __future__ import annotations

import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from typing import Optional, Sequence

from jsonargparse import ActionYesNo, lazy_instance
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from handgrad.core.activations import Activation
from handgrad.core.mlp import check_sizes
from handgrad.data.datamodule import CIFAR10DataModule
from handgrad.runtime.errors import ConfigError, HandgradError, SetupError
from handgrad.sweep.fused import Compile, check_compile
from handgrad.sweep.search import expand_grid
from handgrad.sweep.select import RULES
from handgrad.train.cli import SEED, TRAINER_DEFAULTS, HandgradArgumentParser, RunLogger, logs_under_default_root_dir
from handgrad.train.model_setup import check_precision, preflight

class SweepLogger(RunLogger):
    """The sweep's run folder (lightning_logs/sweep/version_N), refused while another live process holds it."""

    in_use = ("that sweep is still running, or another rerun of it is; nothing was run. Wait until it ends (its "
              "finished chunks are kept in {folder}/chunks), or run the sweep into a new folder (leave out "
              "--trainer.logger.init_args.version).")


class SweepModel:
    """The ``--model`` options of a sweep: the search (:func:`handgrad.sweep.search.expand_grid`) and the network.

    Args:
        grid: lists per hyperparameter (cartesian product), or distributions with ``samples``.
        members: or an explicit list of members, e.g. ``[{lr: 0.01, momentum: 0.9, weight_decay: 0.001}]``.
        samples: random search: this many members drawn from ``grid``'s distributions (seeded by ``sample_seed``).
        seeds: repeat every configuration with each of these initial-weight seeds (mean ± std in the table).
        sample_seed: seed of the random search's draws.
        sizes: layer widths [n_0, ..., n_L] (n_0 = 3072 for CIFAR, n_L = number of classes).
        activation: hidden activation (see :mod:`handgrad.core.activations`); the output is linear.
        init_seed: every member starts from ``MLP(sizes)`` built right after ``torch.manual_seed(init_seed)``
            (a member's own seed from ``seeds`` replaces it).
        compile: ``none`` (eager, also null), ``inductor`` or ``cuda_graph``: see :class:`handgrad.sweep.fused.FusedStep`.
        members_per_step: members trained at once as one batched model (peak memory grows with it, not with the
            number of members); null: 16 on a CPU, on a GPU as many as half the free memory holds.
    """

    def __init__(self, grid: Optional[dict] = None, members: Optional[list[dict]] = None,
                 samples: Optional[int] = None, seeds: Optional[list[int]] = None, sample_seed: int = 0,
                 sizes: Sequence[int] = (3072, 512, 128, 32, 2), activation: Activation = "relu",
                 init_seed: Optional[int] = 265, compile: Compile = None,
                 members_per_step: Optional[int] = None):
        self.members = expand_grid(grid, members, samples, seeds, sample_seed)
        self.sizes = check_sizes(sizes)
        if members_per_step is not None and members_per_step < 1:
            raise ValueError(f"--model.members_per_step must be >= 1 (or null: chosen for the device), got "
                             f"{members_per_step}")
        self.activation, self.init_seed, self.compile = activation, init_seed, compile
        self.members_per_step = members_per_step


class SweepCLI(LightningCLI):
    """The usual LightningCLI options (``--trainer.*``, ``--model.*``, ``--data.*``, ``--config``) with
    :class:`SweepModel` as the model options, the reference job's defaults, plus ``--sequential`` and
    ``--select``."""

    def __init__(self, args=None, datamodule_class=CIFAR10DataModule, description: str = __doc__):
        with warnings.catch_warnings():  # LightningCLI warns when args are given while sys.argv has some
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().__init__(
                None, datamodule_class, args=args, run=False, auto_configure_optimizers=False,
                save_config_callback=None,
                trainer_defaults={"logger": lazy_instance(SweepLogger, name="sweep"), **TRAINER_DEFAULTS},
                seed_everything_default=SEED, parser_class=HandgradArgumentParser,
                parser_kwargs={"description": description, "formatter_class": RawDescriptionHelpFormatter})

    def add_core_arguments_to_parser(self, parser) -> None:
        """As LightningCLI's, with the model options of :class:`SweepModel` (a search, not one LightningModule)."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items()})
        parser.add_class_arguments(SweepModel, "model")
        parser.add_lightning_class_args(self.datamodule_class, "data")

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--sequential", action=ActionYesNo, default=False,
                            help="train the members one by one (HandgradClassifier each), to compare with the batched run")
        parser.add_argument("--select", choices=RULES, default="last",
                            help="last: the final validation's accuracy (the course's rule); best_epoch: each "
                                 "member's best validation, whose weights selected.ckpt then holds")

    def before_instantiate_classes(self) -> None:
        """``--trainer.default_root_dir DIR``: the sweep logs under DIR/lightning_logs/sweep/ (as Lightning's own
        default logger writes under default_root_dir), unless a logger save_dir is given. The precision is checked
        as typed, before Lightning builds a Trainer with it."""
        check_precision(self.config.trainer.precision)
        logs_under_default_root_dir(self.config, "lightning_logs")

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a constructor that refuses an option value (a member's lr < 0, an empty
        or unknown grid key, batch_size 0, ...) becomes a :class:`ConfigError` with the constructor's message."""
        try:
            super().instantiate_classes()
        except HandgradError:
            raise
        except (ValueError, TypeError, MisconfigurationException) as err:
            raise ConfigError(str(err)) from err


# ----------------------------------------------------------------------------- checks before anything is written


def check(cli: SweepCLI, args: list[str]) -> None:
    """Refuse what the sweep cannot run, before anything is written, naming the option that fixes it: precision,
    sizes against the data, the strategy (one device, or Lightning's ddp / torchrun / srun), the compile mode."""
    trainer, model = cli.trainer, cli.model
    if cli.config.sequential and model.init_seed is None:
        raise ConfigError("--sequential needs --model.init_seed (an int): every member must start from the same "
                          "weights; e.g. --model.init_seed 265")
    if cli.config.sequential and cli.config.select == "best_epoch":
        raise ConfigError("--select best_epoch keeps each member's best-epoch weights in the batched grid; "
                          "--sequential keeps only the last ones: leave out one of the two")
    preflight(trainer, cli.datamodule, model.sizes)
    strategy, name = trainer.strategy, str(cli.config.trainer.strategy)
    ddp = type(strategy) is DDPStrategy and not any(word in name for word in ("spawn", "fork", "notebook"))
    if not (isinstance(strategy, SingleDeviceStrategy) or ddp):
        raise SetupError(f"the sweep runs on one device or on Lightning's ddp strategy, not "
                         f"{cli.config.trainer.strategy}: use --trainer.strategy ddp --trainer.devices N "
                         f"(or torchrun / srun with --trainer.num_nodes M)")
    if strategy.world_size > 1 and cli.config.sequential:
        raise SetupError("--sequential trains the members one after the other on one device: leave out "
                         "--trainer.devices / --trainer.num_nodes / --trainer.strategy")
    launches = strategy.world_size > 1 and not strategy.cluster_environment.creates_processes_externally
    if launches and sys.argv[len(sys.argv) - len(args):] != list(args):
        raise SetupError("a sweep over several processes is started from the command line (Lightning runs the "
                         "same command once per device): python train.py sweep ... --trainer.devices N")
    check_compile(model.compile, strategy.root_device)
