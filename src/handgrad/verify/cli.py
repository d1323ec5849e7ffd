"""`python train.py verify`: check the hand-written gradients and SGD step on your model, data and machine.

    python train.py verify                                   # the reference model on the configured data
    python train.py verify --data.data_dir DIR --trainer.precision 64-true --trainer.accelerator gpu
    python train.py verify --verify.steps 20                 # and 20 training steps against autograd + torch SGD
    python train.py verify --trainer.devices 2 --trainer.strategy ddp --trainer.accelerator cpu   # and data parallel
    python train.py verify --verify.model mynet.py:Net --verify.sizes '[3072, 64, 2]' \\
                           --verify.backprop mynet.py:backpropagation                  # a course-style model
    python train.py verify --verify.optimizer mysgd.py:SGD   # another SGD against torch.optim.SGD
    python train.py verify --config lightning_logs/version_0/config.yaml --ckpt_path .../last.ckpt  # a fit's run

It reads the same config and options as `fit` (the reference defaults, then --config, then flags) and runs, on the
first training batch of the configured data, the checks of :mod:`handgrad.verify.checks`: gradients against
autograd (float64 and the configured precision), finite differences, the SGD step against torch.optim.SGD
(bitwise), optionally N training steps, and on several processes the all-reduced gradient. The report is printed,
written to the run folder (verify.json, config.yaml in lightning_logs/version_N under --trainer.default_root_dir,
as for `fit`) and to TensorBoard (Text, "verify"). A line announces each check as it starts.
Exit code 0 when every check passes, 1 naming the first failing layer and parameter, 2 for bad options.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import shlex
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from tqdm import tqdm

from handgrad.core.mlp import MLP, check_sizes
from handgrad.runtime.errors import CheckpointError, ConfigError
from handgrad.train.checkpoints import load_for_checks
from handgrad.train.cli import HandgradCLI, check_config_files
from handgrad.train.model_setup import MIXED, check_sizes_fit_data
from handgrad.verify.checks import (Row, autograd_gradients, check_autograd, check_data_parallel, check_mixed,
                                    check_finite_differences, check_sgd, check_training, copy_of, course_subject,
                                    dtype_name, first_failure, json_safe, markdown_table, parameters, reference_subject,
                                    text_table)

COURSE_ATTRIBUTES = ("L", "fc", "a", "z", "df", "dL_dw", "dL_db")


@dataclass
class VerifyOptions:
    """The --verify.* options.

    Args:
        model: a course-style model class to check instead of handgrad's MLP, ``package.module:Class`` or
            ``path/to/file.py:Class``, built as ``Class(sizes)``; it exposes L, fc, a, z, df, dL_dw, dL_db.
        sizes: the layer sizes of the model under test (default: --model.sizes).
        backprop: its hand-written ``backprop(model, y_true, y_pred)`` (default with --verify.model:
            handgrad.core.backprop:backpropagation; without --verify.model it backpropagates handgrad's MLP); the loss
            is then the course's sum of squared errors to the one-hot target.
        optimizer: the SGD under test against torch.optim.SGD (built like it, with foreach=False/True).
        seed: seed of the model's initial weights and of the finite-difference sample.
        sgd_steps: N of the SGD check (one step, then N steps).
        steps: training steps against autograd + torch.optim.SGD in float64 (0: none).
        fd_samples: entries per weight matrix and per bias vector checked by finite differences.
        fd_batch: the finite differences use the first fd_batch samples of the batch (0: all of it).
        fd_eps: the step ε of the central differences (in float64).
        tol_float64: largest relative error against autograd in float64 (and of the data-parallel check).
        tol_float32: the same in float32.
        tol_fd: largest finite-difference residual.
        tol_steps: largest relative loss difference of a training step.
    """

    model: Optional[str] = None
    sizes: Optional[list[int]] = None
    backprop: Optional[str] = None
    optimizer: str = "handgrad.core.optim:SGD"
    seed: int = 265
    sgd_steps: int = 5
    steps: int = 0
    fd_samples: int = 12
    fd_batch: int = 16
    fd_eps: float = 1e-6
    tol_float64: float = 1e-10
    tol_float32: float = 1e-4
    tol_fd: float = 1e-6
    tol_steps: float = 1e-10


class VerifyCLI(HandgradCLI):
    """HandgradCLI without subcommands, plus --verify.* and --ckpt_path: the `fit` options (--trainer.*, --model.*,
    --data.*, --config over the reference defaults), parsed and checked as `fit` parses and checks them (the precision
    as typed, a malformed --config, a --ckpt_path of another architecture), logs in
    <--trainer.default_root_dir>/lightning_logs/version_N (:class:`handgrad.train.cli.RunLogger`)."""

    resumes = False  # --ckpt_path: the weights to check at
    ckpt_help = "check at the weights of this checkpoint (a fit's last.ckpt), not at initial ones"

    def __init__(self, args=None):
        super().__init__(args=args, run=False, description=__doc__)

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)  # --checkpoint.*, --last_checkpoint.*: a fit's config.yaml reads as is
        parser.add_class_arguments(VerifyOptions, "verify")
        # accepted so that a config saved by fit (lightning_logs/version_N/config.yaml) can be passed as it is;
        # verify reads --ckpt_path with weights_only=True
        parser.add_argument("--weights_only", type=Optional[bool], default=None, help="(unused by verify)")


def check_options(opts: VerifyOptions) -> None:
    """Raise :class:`ConfigError` naming the --verify flag of a value the checks cannot use."""
    for key, low in (("sgd_steps", 1), ("steps", 0), ("fd_samples", 1), ("fd_batch", 0)):
        if getattr(opts, key) < low:
            raise ConfigError(f"--verify.{key} must be an integer >= {low}, got {getattr(opts, key)}")
    for key in ("fd_eps", "tol_float64", "tol_float32", "tol_fd", "tol_steps"):
        value = getattr(opts, key)
        if not (math.isfinite(value) and value >= (0 if key.startswith("tol") else 1e-300)):
            raise ConfigError(f"--verify.{key} must be a finite number {'>= 0' if key.startswith('tol') else '> 0'}, "
                              f"got {value}")
    if opts.sizes is not None:
        try:
            check_sizes(opts.sizes)
        except ValueError as err:
            raise ConfigError(f"--verify.{err}") from None


def load_object(spec: str, flag: str):
    """``package.module:Name`` or ``path/to/file.py:Name`` -> the object; a :class:`ConfigError` when it does not
    import (the module's own error, in one line)."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"{flag} {spec!r} must be written package.module:Name or path/to/file.py:Name")
    try:
        if module_name.endswith(".py"):
            where = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(where)
            where.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, attr)
    except Exception as err:  # whatever the user's module raises, as one line
        raise ConfigError(f"{flag} {spec}: cannot import it ({type(err).__name__}: {err})") from None


def build_subject(opts: VerifyOptions, hp: dict, ckpt_path: Optional[str] = None):
    """The model under test, its weights drawn with ``opts.seed`` (or read from ``ckpt_path``): handgrad's MLP with
    the configured loss, or (--verify.model / --verify.backprop) a course-style model with its backprop on the sum
    of squared errors."""
    sizes = [int(s) for s in (opts.sizes or hp["sizes"])]
    torch.manual_seed(opts.seed)
    if opts.model is None and opts.backprop is None:
        subject = reference_subject(sizes, hp["activation"], hp["loss"])
        return load_weights(subject, ckpt_path) if ckpt_path else subject
    backprop = load_object(opts.backprop or "handgrad.core.backprop:backpropagation", "--verify.backprop")
    if opts.model is None:
        model, name = MLP(sizes, hp["activation"]), f"MLP {sizes} {hp['activation']}"
    else:
        cls = load_object(opts.model, "--verify.model")
        try:
            model = cls(sizes)
        except Exception as err:
            raise ConfigError(f"--verify.model {opts.model}({sizes}) fails: {type(err).__name__}: {err}") from None
        name = f"{opts.model} {sizes}"
        missing = [a for a in COURSE_ATTRIBUTES if not hasattr(model, a)]
        if missing or not isinstance(model, torch.nn.Module):
            what = f"has no {', '.join(missing)}" if missing else "is not a torch.nn.Module"
            raise ConfigError(f"--verify.model {opts.model} {what}: a course-style model is an nn.Module exposing "
                              f"{', '.join(COURSE_ATTRIBUTES)} (see handgrad.core.mlp.MLP)")
        try:
            parameters(model)
            with torch.no_grad():
                model(torch.zeros(2, sizes[0]))
        except Exception as err:
            raise ConfigError(f"--verify.model {opts.model}: a course-style model has fc[str(l)].weight and .bias for "
                              f"l = 1..L and takes a batch (N, sizes[0]); {type(err).__name__}: {err}") from None
    if not callable(backprop):
        raise ConfigError(f"--verify.backprop {opts.backprop} is not a function")
    subject = course_subject(model, backprop, f"{name}, {opts.backprop or 'handgrad backpropagation'}, sum of squares")
    return load_weights(subject, ckpt_path) if ckpt_path else subject


def load_weights(subject, path: str):
    """Put the weights of a checkpoint (state_dict keys ending in fc.<l>.weight / fc.<l>.bias, as a handgrad
    checkpoint holds them) into the subject's model, in the checkpoint's dtype."""
    checkpoint = load_for_checks(path)  # (HandgradCLI has read it once already: a CheckpointError came there)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} is not a handgrad checkpoint: it has no state_dict; check "
                              f"--ckpt_path")
    state = {k[k.index("fc."):]: v for k, v in checkpoint["state_dict"].items() if "fc." in k}
    try:
        subject.model.to(next(iter(state.values())).dtype if state else torch.float32).load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit the model under test ({subject.name}): "
                              f"{str(err).splitlines()[-1].strip()}; pass the --model.sizes it was trained with"
                              ) from None
    subject.name += f", weights of {path}"
    return subject


def check_setup(cli: VerifyCLI, opts: VerifyOptions) -> None:
    """What the checks would refuse, before anything is run or written: the --verify options and what they load,
    then HandgradCLI's pre-flight (output folders; the model's precision, strategy and sizes against the data; the
    data prepared and set up on the node's first process)."""
    check_options(opts)
    if opts.sizes is not None:
        check_sizes_fit_data(opts.sizes, cli.datamodule)
    load_object(opts.optimizer, "--verify.optimizer")
    build_subject(opts, dict(cli.model.hparams), cli.config.ckpt_path)
    cli.preflight()


def run_checks(trainer, datamodule, opts: VerifyOptions, hp: dict, ckpt_path: Optional[str],
               setup_seconds: float = 0.0) -> Optional[dict]:
    """On every process of the run (launched by the strategy's launcher): the data-parallel check with all
    processes, then on global rank 0 the others. Returns the report on rank 0, None on the others; its
    seconds_per_check start with "setup": ``setup_seconds`` (options, checks, data) and the batches' time."""
    started = time.perf_counter()
    trainer.strategy.setup_environment()  # the process group, on several processes
    datamodule.trainer = trainer  # the data's device, dtype and this process's shard
    trainer.strategy.barrier()  # the data was prepared by the node's first process (HandgradCLI.preflight)
    datamodule.setup("fit")
    n = max(opts.sgd_steps, opts.steps, 1)
    batches = []
    while len(batches) < n:
        batches += [(x.flatten(1), y) for _, (x, y) in zip(range(n - len(batches)), datamodule.train_dataloader())]
    subject = build_subject(opts, hp, ckpt_path)
    seconds = {"setup": setup_seconds + time.perf_counter() - started}
    x, y = batches[0]
    dtype = x.dtype  # the configured precision's: the data module delivers batches in it
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if trainer.global_rank == 0:
            print(f"verify: data parallel: the all-reduced gradient of {dist.get_world_size()} processes against "
                  f"the global batch's", flush=True)
        t = time.perf_counter()
        parallel = [row for d in dict.fromkeys([torch.float64, dtype])
                    for row in check_data_parallel(subject, x, y, d, tolerance(opts, d))]
        dist.barrier()
        dist.destroy_process_group()
        seconds["data parallel"] = time.perf_counter() - t
    else:
        parallel = [Row("data parallel", None, "-", None, None, "skipped", "one process (run with --trainer.devices "
                        "2 --trainer.strategy ddp)")]
    if trainer.global_rank != 0:
        return None
    print(f"verify: {subject.name} on the first training batch ({len(y)} images) on {x.device}, precision "
          f"{trainer.precision}")
    optimizer = load_object(opts.optimizer, "--verify.optimizer")
    sgd_hp = {k: hp[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")}
    mixed = MIXED.get(str(trainer.precision))
    rows = one_process_checks(subject, batches, dtype, optimizer, sgd_hp, opts, seconds, mixed) + parallel
    return {"subject": subject.name, "device": str(x.device), "precision": str(trainer.precision),
            "batch_size": len(y), "fd_batch": min(opts.fd_batch or len(y), len(y)),
            "sgd": f"{optimizer.__module__}.{optimizer.__name__}", "sgd_hparams": sgd_hp, "seconds_per_check": seconds,
            "rows": [r.as_dict() for r in rows]}


def tolerance(opts: VerifyOptions, dtype) -> float:
    return opts.tol_float64 if dtype == torch.float64 else opts.tol_float32


def one_process_checks(subject, batches, dtype, optimizer, sgd_hp: dict, opts: VerifyOptions, seconds: dict,
                       mixed: Optional[torch.dtype] = None):
    """Autograd (float64, ``dtype`` and, under mixed precision, the ``mixed`` products against torch.autocast),
    finite differences, SGD and (opts.steps > 0) training, on this process, each announced by a progress line (the
    training steps also by a progress bar); the time each took goes into ``seconds``."""
    x, y = batches[0]
    m = min(opts.fd_batch or len(y), len(y))
    model = copy_of(subject.model, x.device, dtype)
    dtypes = list(dict.fromkeys([torch.float64, dtype]))

    def sgd_rows():
        grads = [{k: g.detach() for k, g in autograd_gradients(subject, model, xb.to(dtype), yb).items()}
                 for xb, yb in batches[:opts.sgd_steps]]  # autograd's, fed to both optimizers
        return check_sgd(optimizer, sgd_hp, model, grads)

    def training_rows():
        def bar(steps):
            return tqdm(steps, desc="training steps", leave=False, disable=None)  # disable=None: off without a TTY

        return check_training(subject, optimizer, sgd_hp, batches[:opts.steps], opts.tol_steps, progress=bar)

    names = [*map(dtype_name, dtypes)] + ([f"{dtype_name(mixed)} products under torch.autocast"] if mixed else [])

    def autograd_rows():
        rows = [row for d in dtypes for row in check_autograd(subject, x, y, d, tolerance(opts, d))]
        return rows + (check_mixed(subject, x, y, mixed) if mixed else [])

    checks = [("autograd", f"hand-written gradients against autograd in {' and '.join(names)}", autograd_rows),
              ("finite differences", f"central differences on {opts.fd_samples} entries per weight and bias, "
               f"{m} images", lambda: check_finite_differences(subject, x[:m], y[:m], opts.fd_samples, opts.fd_eps,
                                                                 opts.tol_fd, opts.seed)),
              ("sgd", f"1 and {opts.sgd_steps} steps against torch.optim.SGD, single-tensor and foreach", sgd_rows)]
    if opts.steps:
        checks.append(("training", f"{opts.steps} steps against autograd + torch.optim.SGD in float64",
                       training_rows))
    rows = []
    for i, (name, what, check) in enumerate(checks, 1):
        print(f"verify [{i}/{len(checks)}] {name}: {what}", flush=True)
        t = time.perf_counter()
        with one_cpu_thread() if name in ("finite differences", "sgd") else nullcontext():
            rows += check()
        seconds[name] = time.perf_counter() - t
    return rows


@contextmanager
def one_cpu_thread():
    """torch on one CPU thread: for many small operations (the finite differences' forward passes of a few images,
    the element-wise SGD updates) a second thread costs more to wake than it saves, most of all on a busy machine
    (measured on 2 cores at load 9: 5 SGD steps of the reference model 0.4 s on one thread, 1.4-8.3 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the report


def write_report(cli: VerifyCLI, report: dict) -> Path:
    """verify.json and config.yaml into the run folder (lightning_logs/version_N), the table into TensorBoard."""
    trainer = cli.trainer
    run = Path(trainer.log_dir or trainer.default_root_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "verify.json").write_text(json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")
    cli.parser.save(cli.config, run / "config.yaml", skip_none=False, overwrite=True)
    verdict = "**all checks pass**" if report["passed"] else f"**FAILED** at {report['first_failure']}"
    text = (f"{report['subject']} on {report['device']}, precision {report['precision']}: {verdict}\n\n"
            + markdown_table(report["rows"]))
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("verify", text, 0)
        logger.finalize("success")  # as the Trainer ends a run: written to disk, closed (and the run folder let go)
    return run


def verify(args: Optional[list[str]] = None) -> Optional[dict]:
    """Parse the options, run the checks (on every process of a multi-process run) and, on rank 0, print and write
    the report; returns it there (None on the other processes). Bad options raise ConfigError or SetupError."""
    start = time.perf_counter()
    args = sys.argv[1:] if args is None else list(args)
    check_config_files(args)
    cli = VerifyCLI(args=args)
    opts = cli.config_init.verify
    check_setup(cli, opts)
    setup_seconds = time.perf_counter() - start
    hp = {k: cli.model.hparams[k] for k in ("sizes", "activation", "loss", "lr", "momentum", "dampening",
                                             "weight_decay", "nesterov")}
    launcher = cli.trainer.strategy.launcher
    call = (run_checks, cli.trainer, cli.datamodule, opts, hp, cli.config.ckpt_path, setup_seconds)
    report = launcher.launch(*call, trainer=None) if launcher is not None else call[0](*call[1:])
    if report is None:
        return None
    report["passed"] = all(r["verdict"] != "FAIL" for r in report["rows"])
    report["first_failure"] = first_failure(report["rows"])
    report["options"] = asdict(opts)
    report["seconds"] = time.perf_counter() - start
    run = write_report(cli, report)
    print(text_table(report["rows"]))
    failed = sum(r["verdict"] == "FAIL" for r in report["rows"])
    each = ", ".join(f"{name} {t:.1f}" for name, t in report["seconds_per_check"].items())
    print(f"\n{len(report['rows'])} checks, {failed} failed, in {report['seconds']:.1f} s ({each}); report: "
          f"{run / 'verify.json'} (and TensorBoard: tensorboard --logdir {shlex.quote(str(run.parent))})")
    return report


def main(args: Optional[list[str]] = None) -> Optional[dict]:
    """`python train.py verify ...`: exit code 0 when every check passes, 1 naming the first failure."""
    report = verify(args)
    if report is not None and not report["passed"]:
        print(f"verify: FAILED at {report['first_failure']}", file=sys.stderr)
        sys.exit(1)
    return report
