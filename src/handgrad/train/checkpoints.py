"""Checkpoints: written atomically, read safely, and checked before they are used.

Writing. Lightning's TorchCheckpointIO (2.6) serializes to memory and writes through an fsspec transaction whose
temporary file lives in the system temp folder: when that is another file system than the checkpoint's, the
"commit" is a copy onto the final name, and a kill during it leaves a truncated last.ckpt. :class:`AtomicCheckpointIO`
writes with :func:`handgrad.runtime.atomic.atomic_write` (a temporary file beside the target, fsync, os.replace), so
a kill at any moment leaves either the old or the new checkpoint, never a mix.

Reading. Local checkpoints go through torch's safe loader (tensors and plain values only): a pickle that would run
code is refused as "not a handgrad checkpoint", never loaded, and torch's advice to disable the safe loader is never
passed on.

Checking. A checkpoint made for another architecture (sizes, activation) or, for ``fit --ckpt_path``, another run
(other SGD settings or another data order) is refused with the flags that fit it, before anything is written.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from handgrad.data.datamodule import CIFAR10DataModule
from handgrad.data.normalization import STATISTICS
from handgrad.runtime.atomic import atomic_write
from handgrad.runtime.errors import CheckpointError

ARCHITECTURE = ("sizes", "activation")  # the hyperparameters a checkpoint's weights depend on
RESUMED_MODEL = ("loss", "lr", "momentum", "dampening", "weight_decay", "nesterov", "backprop", "optimizer")
RESUMED_DATA = CIFAR10DataModule.BATCH_OPTIONS  # they fix every batch
WHERE = "lightning_logs/version_N/checkpoints/last.ckpt"
# Lightning < 2.6: TorchCheckpointIO.load_checkpoint takes no `weights_only` (it loads with weights_only=False);
# delete once the floor in pyproject.toml is 2.6
CHECKPOINT_IO_TAKES_WEIGHTS_ONLY = "weights_only" in inspect.signature(TorchCheckpointIO.load_checkpoint).parameters


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, fsync, then os.replace over the target; loading
    errors name the file and say what to do. Remote paths (s3://, ...) keep Lightning's behaviour."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f), what="checkpoint")
        AtomicCheckpointIO.last_written = Path(path)

    last_written: Optional[Path] = None  # the checkpoint this process wrote last: the last good one

    def load_checkpoint(self, path, map_location=None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        kwargs = {} if map_location is None else {"map_location": map_location}
        try:
            if _is_local(path):  # torch's safe loader unless weights_only=False is asked for, on every Lightning
                with open(path, "rb") as f, warnings.catch_warnings():  # release (before 2.6 its
                    # TorchCheckpointIO takes no weights_only); a pickle of another protocol than torch.save's
                    # makes torch warn about its safe loader: the file is refused below, or loads, either way
                    warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                    return torch.load(f, weights_only=weights_only is not False, **kwargs)
            if CHECKPOINT_IO_TAKES_WEIGHTS_ONLY:
                kwargs["weights_only"] = weights_only
            return super().load_checkpoint(path, **kwargs)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} does not exist; check --ckpt_path (e.g. {WHERE}).") from None
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            if "weights_only" in str(e) or "Weights only" in str(e):  # an object torch's safe loader refuses
                raise CheckpointError(f"checkpoint {path} is not a handgrad checkpoint: it holds objects that are not "
                                      f"allowed in one (only tensors and plain values are); it was not loaded. Use "
                                      f"a checkpoint written by handgrad.") from None
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(e).__name__}: {first}); it is truncated or corrupt. Resume "
                f"from another checkpoint (e.g. a best-*.ckpt beside it) or start without --ckpt_path.") from None


def _is_local(path) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)


class StoppedMidEpoch(Callback):
    """A run stopped inside an epoch (``--trainer.max_steps`` reached, or ``trainer.should_stop``) resumes that
    epoch where it stopped, as after a kill, instead of going on with the next one.

    Lightning ends the epoch loop when it stops early, so the checkpoints written then (in ``on_train_epoch_end``:
    last.ckpt) record the epoch as processed, and a resume starts the next epoch: the rest of the stopped one is
    skipped (10 of 32 batches done, resumed with max_epochs 2: 42 steps instead of 64). Not documented by Lightning,
    so treated as a defect here. This hook writes the loop state a step checkpoint of the same batch has (written in
    ``on_train_batch_end``: epoch not processed, the batch not completed, one batch fewer counted for the loggers);
    the sampler's position (``TensorBatches.state_dict``) already says how many batches were used. The keys are
    Lightning 2.6's loop state (``_FitLoop`` / ``_TrainingEpochLoop.state_dict``): tests/test_faults.py checks that
    such a resume equals an uninterrupted run, and fails if they change."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        fit = trainer.fit_loop
        epochs, batches = fit.epoch_progress.total, fit.epoch_loop.batch_progress
        in_epoch_end = trainer.training and epochs.processed == epochs.started == epochs.completed + 1
        if not in_epoch_end or batches.is_last_batch or batches.current.completed >= trainer.num_training_batches:
            return
        loops = checkpoint["loops"]["fit_loop"]
        for part in ("total", "current"):
            loops["epoch_progress"][part]["processed"] -= 1
            loops["epoch_loop.batch_progress"][part]["completed"] -= 1
        loops["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1


# ----------------------------------------------------------------------------- checks


def load_for_checks(path) -> dict:
    """The checkpoint at ``path`` on the CPU, safely (tensors and plain values only), or a clear CheckpointError."""
    if Path(path).is_dir():
        inside = sorted(str(p) for p in Path(path).rglob("*.ckpt"))[:3]
        raise CheckpointError(f"--ckpt_path {path} is a folder, not a checkpoint file; pass a .ckpt file "
                              f"({', '.join(inside) if inside else f'e.g. {WHERE}'}).")
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check --ckpt_path (e.g. {WHERE}).")
    return AtomicCheckpointIO().load_checkpoint(path, map_location="cpu", weights_only=True)


def named_checkpoint(name: str, runs: Path, fit: bool) -> Path:
    """``--ckpt_path last`` (and, to evaluate, ``best``): the checkpoint of that name in the newest run of the log
    folder ``runs`` (its version_N with the highest N that has one): what a user of Lightning means by them in a
    new process, where Lightning would find no checkpoint of the run it just started and train from scratch."""
    if name == "best" and fit:
        raise CheckpointError("--ckpt_path best: a fit resumes from the latest state, --ckpt_path last (or a path)")
    pattern = "last.ckpt" if name == "last" else "best-*.ckpt"
    found = [p for version in sorted(runs.glob("version_*"), key=lambda d: _number(d.name), reverse=True)
             for p in sorted((version / "checkpoints").glob(pattern))]
    if not found:
        raise CheckpointError(f"--ckpt_path {name}: no {pattern} in the runs of {runs} (version_*/checkpoints/); "
                              f"pass the path of a checkpoint")
    return found[0]


def _number(name: str) -> int:
    return int(name[8:]) if name[8:].isdigit() else -1


def prune_unknown_checkpoints(checkpoint: dict, folder: Path) -> list[Path]:
    """Before a fit resumes in its own run: remove the ``best-*.ckpt`` and ``last*.ckpt`` in ``folder`` that the
    checkpoint's callbacks do not know (written after it by the run being resumed, before it was interrupted):
    the resumed run redoes those steps and writes its own, so it ends with exactly one best and one last (no
    stale best beside the real one, no ``-v1`` copy)."""
    known = {Path(p).name for state in checkpoint.get("callbacks", {}).values() if isinstance(state, dict)
             for p in (*state.get("best_k_models", {}), state.get("best_model_path") or "",
                       state.get("last_model_path") or "")}
    removed = [p for pattern in ("best-*.ckpt", "last*.ckpt") for p in folder.glob(pattern) if p.name not in known]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def plain(v):
    """YAML lists and tuples compare equal; ints in a sizes list stay ints."""
    return [int(x) if isinstance(x, int) else x for x in v] if isinstance(v, (list, tuple)) else v


def check_architecture(checkpoint: dict, asked: dict, path=None) -> None:
    """Raise :class:`CheckpointError` when a handgrad checkpoint was trained with another value of a key of
    ``asked`` (sizes, activation): say what it was trained with, what was asked for, and the flags that fit it."""
    theirs = checkpoint.get("hyper_parameters", {})
    if "sizes" not in theirs:  # not a handgrad checkpoint: the state-dict shapes will tell
        return
    arch = {"sizes": plain(theirs["sizes"]), "activation": theirs.get("activation", "relu")}
    differ = [k for k in asked if plain(asked[k]) != arch[k]]
    if not differ:
        return
    shown = {**arch, **{k: plain(v) for k, v in asked.items()}}
    where = f"checkpoint {path}" if path else "the checkpoint"
    fix = " ".join(f"--model.{k} '{arch[k]}'" for k in differ)
    raise CheckpointError(f"{where} was trained with sizes {arch['sizes']} and activation {arch['activation']!r}, "
                          f"this model has sizes {shown['sizes']} and activation {shown['activation']!r}; pass {fix} "
                          f"to use it (or leave out --ckpt_path to start anew).")


def check_state_dict_fits(checkpoint: dict, model, path=None) -> None:
    """The checkpoint's architecture and tensor shapes against ``model`` (a HandgradClassifier): Lightning would
    fail on the first tensor whose shape differs, or silently load weights trained with another activation."""
    check_architecture(checkpoint, {"sizes": model.mlp.n_l, "activation": model.hparams.activation}, path)
    state = checkpoint.get("state_dict", {})
    if bad := [f"{k}: {tuple(state[k].shape) if k in state else 'missing'} there, {tuple(v.shape)} here"
               for k, v in model.state_dict().items() if k not in state or state[k].shape != v.shape]:
        where = f"checkpoint {path}" if path else "the checkpoint"
        raise CheckpointError(f"{where} does not fit this model ({'; '.join(bad[:4])}); "
                              f"is it a handgrad checkpoint of the same --model.sizes?")


def check_resume(checkpoint: dict, config, path) -> None:
    """`fit --ckpt_path` continues the checkpoint's run batch for batch: refuse options that differ from the run's
    own training settings (LightningCLI would silently replace the model's by the checkpoint's and keep the data's,
    so the run would go on with other batches than it started with), naming the flags that fit the checkpoint."""
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


def checkpoint_statistics(checkpoint: dict, path) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split's (mean, std) a handgrad checkpoint holds (:mod:`handgrad.data.normalization`)."""
    state = checkpoint.get("state_dict", {})
    mean, std = (state.get(name) for name in STATISTICS)
    if not (isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor) and mean.shape == std.shape == (3,)
            and bool(torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all())):
        raise CheckpointError(f"checkpoint {path} holds no input statistics (input_mean, input_std): it was not "
                              f"written by this version of handgrad's fit; use one that was")
    return mean, std


def evaluation_data_options(checkpoint: dict, config, typed_data: dict, path) -> None:
    """validate/test/predict --ckpt_path evaluate the checkpoint's task: the data options the user did not type
    (``typed_data``: the typed ``data`` section) are taken from the checkpoint (its class names, in their order,
    and its train/val split: val_fraction, split_seed); typed classes other than the checkpoint's are refused
    (another class set would give its outputs other names, silently)."""
    data = checkpoint.get("datamodule_hyper_parameters", {})
    classes = checkpoint.get("hyper_parameters", {}).get("class_names") or data.get("classes")
    if classes is not None:
        classes = [str(c) for c in classes]
        asked = config.data.classes
        asked = [asked] if isinstance(asked, str) else [str(c) for c in asked]
        if "classes" not in typed_data:
            config.data.classes = classes
        elif asked != classes:
            raise CheckpointError(
                f"checkpoint {path} was trained on the classes {classes} (outputs 0..{len(classes) - 1} in this "
                f"order), the options select {asked}; leave --data.classes out (the checkpoint's are then used) or "
                f"pass --data.classes '[{', '.join(classes)}]'")
    for key in CIFAR10DataModule.SPLIT_OPTIONS:
        if key != "classes" and key in data and key not in typed_data:
            config.data[key] = data[key]
