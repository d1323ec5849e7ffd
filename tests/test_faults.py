"""Faults and bad input: a SIGKILL during training, a kill while a checkpoint is written, and every kind of bad
input answered with a clear message (exit code 2) before anything is trained, written or overwritten.

References: an uninterrupted run (bitwise), the checkpoint bytes before and after, and the images as written.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import importlib.util
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import write_image_folder
from handgrad.data import cifar_io
from handgrad.runtime import locks
from handgrad.train.checkpoints import AtomicCheckpointIO
from handgrad.runtime.errors import CheckpointError, OutputDirError

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)


class Throttle(L.Callback):
    """Sleeps after every training step, so that a kill from outside lands in the middle of training."""

    def __init__(self, seconds: float = 0.1):
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Airplane and bird, 20 training images each: 32 train, 8 val; batch 8 gives 4 steps per epoch."""
    root = tmp_path_factory.mktemp("faults") / "data"
    write_image_folder(root, per_class_train=20, per_class_test=3, classes=("airplane", "bird"))
    return root


def fit_args(data_dir: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs" / "airplane_bird.yaml"), "--data.data_dir", str(data_dir),
            "--data.download", "false", "--model.sizes", "[3072, 16, 2]", "--data.batch_size", "8",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1", *extra]


def snapshot(*roots: Path) -> dict[Path, str]:
    """Every file under the roots with a hash of its bytes."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(root.rglob("*"))
            if p.is_file()}


# ------------------------------------------------------------------ SIGKILL during training, then resume

# shuffled epochs, momentum, a StepLR schedule stepped per epoch (after its last batch): 5 epochs of 4 steps, last.ckpt after every step
RESUMABLE = ("--data.shuffle", "true", "--trainer.max_epochs", "5", "--last_checkpoint.every_n_train_steps", "1",
             "--model.lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--model.lr_scheduler.step_size", "1",
             "--model.lr_scheduler.gamma", "0.5")


def train_in(folder: Path, args: list[str]):
    """train.main(args) run from ``folder`` (its lightning_logs/ lands there), for module-scoped fixtures, which
    cannot use monkeypatch.chdir."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return train.main(args)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """The reference run; it keeps the checkpoint of every step (step=N.ckpt) as well."""
    run = tmp_path_factory.mktemp("uninterrupted")
    cli = train_in(run, fit_args(data_dir, *RESUMABLE, "--last_checkpoint.save_top_k", "-1",
                                 "--last_checkpoint.filename", "{step}"))
    assert cli.trainer.global_step == 20
    return cli, run / "lightning_logs" / "version_0" / "checkpoints"


def assert_same_final_state(a, b) -> None:
    assert a.trainer.global_step == b.trainer.global_step == 20
    for name, w in a.model.state_dict().items():
        assert torch.equal(w, b.model.state_dict()[name]), name
    opt_a, opt_b = a.trainer.optimizers[0], b.trainer.optimizers[0]
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] == 0.01 * 0.5**5
    for p_a, p_b in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(opt_a.state[p_a]["momentum_buffer"], opt_b.state[p_b]["momentum_buffer"])


def test_sigkill_during_training_then_resume_gives_the_same_weights(data_dir, uninterrupted, tmp_path, monkeypatch):
    """train.py in a subprocess, SIGKILLed after a few steps; every read of last.ckpt while it runs succeeds (atomic
    writes); resuming with --ckpt_path last.ckpt ends bitwise where the uninterrupted run ends."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(REPO / "train.py"), *fit_args(data_dir, *RESUMABLE),
           "--trainer.callbacks+=test_faults.Throttle"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    reads, deadline = 0, time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, f"the run ended before it was killed:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no last.ckpt with global_step >= 6 after 120 s"
            if last.exists():
                step = torch.load(last, weights_only=False)["global_step"]  # must never see a partial file
                reads += 1
                if step >= 6:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and proc.returncode is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    killed = torch.load(last, weights_only=False)
    assert reads >= 1 and 6 <= killed["global_step"] < 20

    monkeypatch.chdir(tmp_path)
    resumed = train.main(fit_args(data_dir, *RESUMABLE, "--ckpt_path", str(last)))  # goes on in version_0
    full, _ = uninterrupted
    assert_same_final_state(full, resumed)
    # the checkpoint held a mid-training state: resuming did the remaining steps
    assert not torch.equal(killed["state_dict"]["mlp.fc.1.weight"], full.model.state_dict()["mlp.fc.1.weight"])


@pytest.mark.parametrize("step", [4, 10])
def test_resume_at_an_epoch_end_and_mid_epoch_is_exact(data_dir, uninterrupted, tmp_path, monkeypatch, step):
    """step=4.ckpt was written after epoch 0's last batch, before its validation (which a resume skips in Lightning);
    the schedule was stepped in that batch's training step, so the checkpoint holds it. step=10.ckpt in the middle
    of epoch 2."""
    full, checkpoints = uninterrupted
    monkeypatch.chdir(tmp_path)
    resumed = train.main(fit_args(data_dir, *RESUMABLE, "--ckpt_path", str(checkpoints / f"step={step}.ckpt")))
    assert_same_final_state(full, resumed)


def test_a_run_stopped_by_max_steps_resumes_its_epoch_where_it_stopped(data_dir, uninterrupted, tmp_path, monkeypatch):
    """--trainer.max_steps 6 stops in the middle of epoch 1 (4 steps per epoch); resumed with max_epochs 5 it does
    the 2 remaining batches of epoch 1, then epochs 2-4: 20 steps, bitwise the uninterrupted run (Lightning alone
    would start epoch 2 and end at step 18: handgrad.train.checkpoints.StoppedMidEpoch)."""
    monkeypatch.chdir(tmp_path)
    # last.ckpt only after validation or, as here, when the run stops (not after every step: that one is exact)
    stopped = train.main(fit_args(data_dir, *RESUMABLE, "--trainer.max_steps", "6",
                                  "--last_checkpoint.every_n_train_steps", "null"))
    assert stopped.trainer.global_step == 6
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    resumed = train.main(fit_args(data_dir, *RESUMABLE, "--ckpt_path", str(last)))
    full, _ = uninterrupted
    assert_same_final_state(full, resumed)


# ------------------------------------------------------------------ atomic checkpoint writes

def test_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(10.0)}, last)
    before = last.read_bytes()

    def half_then_fail(obj, f, *args, **kwargs):
        f.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OutputDirError, match=f"is full \\(No space left on device\\) while writing checkpoint "
                                             f"last.ckpt: .* the last good checkpoint is {last} "):
        io.save_checkpoint({"step": 2, "w": torch.zeros(10)}, last)
    assert last.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    monkeypatch.undo()
    io.save_checkpoint({"step": 2, "w": torch.zeros(10)}, last)
    assert io.load_checkpoint(last)["step"] == 2


def test_sigkill_while_writing_never_leaves_a_partial_checkpoint(tmp_path):
    """A child process is SIGKILLed in the middle of writing last.ckpt: the old last.ckpt is still there and
    readable; the next save replaces it and clears the dead writer's temporary file."""
    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, last)
    before = last.read_bytes()
    pid = os.fork()
    if pid == 0:  # the child: write half of a checkpoint, then hang until killed
        try:
            def half_then_hang(obj, f, *args, **kwargs):
                f.write(b"PK\x03\x04" + bytes(1 << 20))
                f.flush()
                time.sleep(60)

            torch.save = half_then_hang
            io.save_checkpoint({"step": 2}, last)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while not [p for p in tmp_path.glob(".last.ckpt-*.tmp") if p.stat().st_size > 0]:
        assert time.monotonic() < deadline, "the child never started writing"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL
    assert last.read_bytes() == before and io.load_checkpoint(last) == {"step": 1}
    assert len(list(tmp_path.glob(".last.ckpt-*.tmp"))) == 1  # the dead writer's partial file, beside it
    io.save_checkpoint({"step": 3}, last)
    assert io.load_checkpoint(last) == {"step": 3} and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ------------------------------------------------------------------ bad input: exit 2, a clear message, nothing written

def run_cli(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("yaml_text, extra, message", [
    ("model:\n  lr: [0.1\n", [], "is not valid YAML: "),  # malformed YAML
    # unknown key in a config file, and on the command line (jsonargparse's words since 4.44 and 4.48 | before)
    ("model:\n  lrr: 0.1\n", [], ("does not accept option 'model.lrr'", "does not accept nested key 'model.lrr'")),
    ("", ["--model.lrr", "0.1"],
     ("unrecognized arguments: --model.lrr 0.1", "Unrecognized arguments: --model.lrr 0.1")),
    # wrong types
    ("model:\n  lr: fast\n", [], 'Parser key "model.lr": Expected a <class \'float\'>. Got value: fast'),
    ("", ["--data.batch_size", "2.5"], 'Parser key "data.batch_size"'),
    ("", ["--model.sizes", "3072"], 'Parser key "model.sizes"'),
    ("model:\n  lr: .nan\n", [], "--model.lr must be a finite number >= 0, got nan"),  # NaN
    ("", ["--model.lr", "-0.1"], "--model.lr must be a finite number >= 0, got -0.1"),  # negative
    ("", ["--model.momentum", "-0.9"], "--model.momentum must be a finite number >= 0, got -0.9"),
    ("", ["--model.weight_decay", ".inf"], "--model.weight_decay must be a finite number >= 0, got inf"),
    ("", ["--model.dampening", "1.5"], "--model.dampening must be a number in [0, 1], got 1.5"),
    ("", ["--data.batch_size", "-8"], "--data.batch_size must be >= 1 (samples per batch, per process), got -8"),
    ("", ["--data.val_fraction", ".nan"], "--data.val_fraction=nan must be in (0, 1)"),
    ("", ["--model.sizes", "[1024, 16, 2]"],  # CIFAR images have 3*32*32 values
     "the model's input size sizes[0] = 1024 does not match the data: CIFAR10DataModule gives 3x32x32 = 3072 "
     "values per image; set --model.sizes '[3072, 16, 2]'"),
])
def test_bad_options_are_refused_before_anything_is_written(data_dir, tmp_path, monkeypatch, capsys, yaml_text,
                                                           extra, message):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "my.yaml"
    config.write_text(yaml_text)
    before = snapshot(tmp_path, data_dir)
    err = run_cli([*fit_args(data_dir, *extra), *(["--config", str(config)] if yaml_text else [])], capsys)
    assert any(m in err for m in ((message,) if isinstance(message, str) else message)), err
    if "YAML" in message:
        assert f"--config {config} is not valid YAML: " in err and "line 3, column 1" in err
    assert snapshot(tmp_path, data_dir) == before  # not a file added, changed or removed


@pytest.fixture(scope="module")
def trained_checkpoint(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained")
    train_in(run, fit_args(data_dir, "--trainer.max_epochs", "1"))
    return run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("extra, message", [
    (["--model.sizes", "[3072, 32, 2]"],
     "this model has sizes [3072, 32, 2] and activation 'relu'; pass --model.sizes '[3072, 16, 2]' to use it"),
    (["--model.activation", "tanh"],
     "this model has sizes [3072, 16, 2] and activation 'tanh'; pass --model.activation 'relu' to use it"),
])
def test_checkpoint_of_another_architecture(data_dir, trained_checkpoint, tmp_path, monkeypatch, capsys, extra,
                                            message):
    """Options that ask for another architecture than the checkpoint's (LightningCLI would silently build the
    checkpoint's instead) are refused before anything is written."""
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path, data_dir, trained_checkpoint.parent)
    for subcommand in ("fit", "validate"):
        args = fit_args(data_dir, *extra, "--ckpt_path", str(trained_checkpoint))
        err = run_cli([subcommand, *args[1:]], capsys)
        assert (f"error: checkpoint {trained_checkpoint} was trained with sizes [3072, 16, 2] and activation "
                f"'relu', {message}") in err
    assert snapshot(tmp_path, data_dir, trained_checkpoint.parent) == before


def test_resume_with_other_training_settings_is_refused(data_dir, trained_checkpoint, tmp_path, monkeypatch, capsys):
    """LightningCLI would take the model's settings from the checkpoint (dropping --model.lr 0.2 without a word) and
    the data's from the options (other batches than the run started with): fit --ckpt_path names both instead."""
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path, data_dir, trained_checkpoint.parent)
    args = fit_args(data_dir, "--model.lr", "0.2", "--data.batch_size", "4", "--data.classes", "[bird, airplane]",
                    "--ckpt_path", str(trained_checkpoint))
    err = run_cli(args, capsys)
    assert (f"error: checkpoint {trained_checkpoint} was trained with other settings than these options give "
            f"(--model.lr 0.2, --data.classes ['bird', 'airplane'], --data.batch_size 4); resuming continues that "
            f"run batch for batch, so pass --model.lr 0.01 --data.classes '[airplane, bird]' --data.batch_size 8") in err
    assert snapshot(tmp_path, data_dir, trained_checkpoint.parent) == before
    # the same settings resume (and validate/test take any: they only evaluate the weights)
    train.main(fit_args(data_dir, "--trainer.max_epochs", "2", "--ckpt_path", str(trained_checkpoint)))
    train.main(["test", *fit_args(data_dir, "--data.batch_size", "4", "--ckpt_path", str(trained_checkpoint))[1:]])


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_needs_a_checkpoint_file(data_dir, tmp_path, monkeypatch, capsys, subcommand):
    """Without --ckpt_path, validate/test/predict would evaluate a freshly initialised model and report it."""
    monkeypatch.chdir(tmp_path)
    err = run_cli([subcommand, *fit_args(data_dir)[1:]], capsys)
    assert f"error: `{subcommand}` evaluates the weights of a checkpoint: pass --ckpt_path PATH.ckpt" in err
    # `last` is the newest run's last.ckpt (tests/test_faults.py::test_ckpt_path_last...): here there is none
    err = run_cli([subcommand, *fit_args(data_dir, "--ckpt_path", "last")[1:]], capsys)
    assert "error: --ckpt_path last: no last.ckpt in the runs of lightning_logs (version_*/checkpoints/); pass the " \
           "path of a checkpoint" in err
    assert not (tmp_path / "lightning_logs").exists()


def test_checkpoint_of_another_architecture_python_api(data_dir, trained_checkpoint, tmp_path):
    """Trainer.fit(model, ckpt_path=...) with a model of other sizes: the same message, not a state-dict traceback."""
    from handgrad.data.datamodule import CIFAR10DataModule
    from handgrad.train.module import HandgradClassifier

    model = HandgradClassifier([3072, 32, 2])
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    data = CIFAR10DataModule(str(data_dir), batch_size=8, download=False)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {trained_checkpoint} was trained with sizes "
                                              rf"\[3072, 16, 2\].*this model has sizes \[3072, 32, 2\].*pass "
                                              rf"--model.sizes '\[3072, 16, 2\]' to use it"):
        trainer.fit(model, data, ckpt_path=trained_checkpoint)


def test_truncated_or_missing_checkpoint(data_dir, trained_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    truncated = tmp_path / "truncated.ckpt"
    data = trained_checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):  # the checkpoint really is unreadable
        AtomicCheckpointIO().load_checkpoint(truncated)
    before = snapshot(tmp_path, data_dir)
    for subcommand in ("fit", "test"):
        err = run_cli([subcommand, *fit_args(data_dir, "--ckpt_path", str(truncated))[1:]], capsys)
        assert f"error: checkpoint {truncated} cannot be read (" in err and "it is truncated or corrupt" in err
    err = run_cli(fit_args(data_dir, "--ckpt_path", str(tmp_path / "nope.ckpt")), capsys)
    assert f"error: checkpoint {tmp_path / 'nope.ckpt'} does not exist" in err
    assert snapshot(tmp_path, data_dir) == before


def _drop_dac_capabilities() -> None:
    """In the child, before exec: without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH in the bounding set, even root
    obeys file permissions after exec (PR_CAPBSET_DROP = 24; the capabilities are numbers 1 and 2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            os._exit(77)


def test_read_only_log_directory(data_dir, tmp_path):
    """Logs go to ./lightning_logs: from a read-only working directory train.py stops before training."""
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        root = os.geteuid() == 0
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *fit_args(data_dir)], cwd=ro,
                              capture_output=True, text=True, timeout=120,
                              preexec_fn=_drop_dac_capabilities if root else None)
        if proc.returncode == 77:
            pytest.skip("cannot drop CAP_DAC_OVERRIDE here, and as root a read-only folder is writable")
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert (f"error: cannot write to ./lightning_logs (Permission denied: {ro}); nothing was run."
                in proc.stderr), proc.stderr[-3000:]
        assert "--trainer.logger.init_args.save_dir" in proc.stderr and "Traceback" not in proc.stderr
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------ a data cache written by another version

def test_cache_of_another_version_is_rebuilt_not_misread(tmp_path, monkeypatch, caplog):
    """An older handgrad version cached the images in another layout (HWC): under another version number (another
    file name) the file is never read; under this version's file name it is recognized and rebuilt."""
    root = tmp_path / "data"
    written = write_image_folder(root, per_class_train=4, per_class_test=2, classes=("airplane", "bird"))
    source, class_ids = cifar_io.find_source(root), [0, 2]
    files = cifar_io.list_files(source, class_ids)
    truth = {"train_x": written["train"][0], "test_x": written["test"][0]}

    def old_layout_cache(version):
        old = {k: v.permute(0, 2, 3, 1).contiguous() for k, v in truth.items()}  # (N, 32, 32, 3)
        old.update(train_y=torch.zeros(8, dtype=torch.int64), test_y=torch.zeros(4, dtype=torch.int64),
                   version=version)
        return old

    with monkeypatch.context() as m:
        m.setattr(cifar_io, "CACHE_VERSION", 0)
        old_path = cifar_io.cache_path(root, source, files, class_ids)
    old_path.parent.mkdir()
    torch.save(old_layout_cache(0), old_path)
    old_bytes = old_path.read_bytes()
    data = cifar_io.load_uint8(root, source, class_ids)
    assert torch.equal(data["train_x"], truth["train_x"]) and torch.equal(data["test_x"], truth["test_x"])
    assert torch.equal(data["train_y"], torch.tensor([0] * 4 + [2] * 4))
    assert old_path.read_bytes() == old_bytes  # the other version's file is left alone
    path = cifar_io.cache_path(root, source, files, class_ids)
    assert path != old_path and cifar_io.is_current_cache(torch.load(path, weights_only=True))

    torch.save(old_layout_cache(cifar_io.CACHE_VERSION - 1), path)  # this name, another version's content
    with caplog.at_level(logging.INFO):
        data = cifar_io.load_uint8(root, source, class_ids)
    assert f"decoded-image cache {path} is not in this version's format" in caplog.text
    assert torch.equal(data["train_x"], truth["train_x"]) and torch.equal(data["test_x"], truth["test_x"])
    assert cifar_io.is_current_cache(torch.load(path, weights_only=True))  # rebuilt


# ------------------------------------------------------------------ bad data or checkpoints found late: still nothing written

def test_explicit_default_sizes_on_a_checkpoint_of_other_sizes_are_refused(data_dir, trained_checkpoint, tmp_path,
                                                                          monkeypatch, capsys):
    """Regression: --model.sizes typed equal to the default was taken for "not given", and the checkpoint's
    architecture silently replaced it. What the user typed counts, also when it equals the default."""
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path, data_dir, trained_checkpoint.parent)
    for subcommand in ("fit", "validate"):
        args = fit_args(data_dir, "--model.sizes", "[3072, 512, 128, 32, 2]", "--ckpt_path", str(trained_checkpoint))
        err = run_cli([subcommand, *args[1:]], capsys)
        assert (f"error: checkpoint {trained_checkpoint} was trained with sizes [3072, 16, 2] and activation 'relu', "
                f"this model has sizes [3072, 512, 128, 32, 2] and activation 'relu'; pass --model.sizes "
                f"'[3072, 16, 2]' to use it") in err
    assert snapshot(tmp_path, data_dir, trained_checkpoint.parent) == before


def test_a_hostile_checkpoint_is_refused_without_unsafe_advice(data_dir, tmp_path, monkeypatch, capsys):
    """A checkpoint holding an object torch's safe loader refuses (it could run code): one error line, no advice to
    load it with weights_only=False, no warning about the safe loader (a plain pickle of protocol 4 made torch warn
    that its "weights_only Unpickler" might not support it)."""
    monkeypatch.chdir(tmp_path)
    saved, pickled = tmp_path / "hostile.ckpt", tmp_path / "plain-pickle.ckpt"
    torch.save({"state_dict": {}, "payload": Throttle(0.0)}, saved)  # any class: unpickling would import it
    pickled.write_bytes(pickle.dumps({"state_dict": {}, "payload": Throttle(0.0)}, protocol=4))
    for hostile in (saved, pickled):
        for subcommand in ("fit", "test"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                err = run_cli([subcommand, *fit_args(data_dir, "--ckpt_path", str(hostile))[1:]], capsys)
            assert (f"error: checkpoint {hostile} is not a handgrad checkpoint: it holds objects that are not "
                    f"allowed") in err
            assert "weights_only" not in err + " ".join(str(w.message) for w in caught)
    assert not (tmp_path / "lightning_logs").exists()


def corrupt_jpeg(root: Path) -> None:
    next((root / "train" / "bird").glob("*.png")).write_bytes(b"\xff\xd8\xff\xe0 not an image")


def drop_test_birds(root: Path) -> None:
    for p in (root / "test" / "bird").iterdir():
        p.unlink()
    (root / "test" / "bird").rmdir()


@pytest.mark.parametrize("damage, extra, message", [
    (None, ["--data.val_fraction", "0.9999"], "error: --data.val_fraction 0.9999 leaves a class without train or val"),
    (corrupt_jpeg, [], "error: "),
    (drop_test_birds, [], "error: "),
])
def test_bad_data_found_during_setup_writes_nothing(tmp_path, monkeypatch, capsys, damage, extra, message):
    """Regression: errors found while the data is set up (a split that leaves a class empty, a corrupt image, a
    missing class folder) left lightning_logs/version_0 behind, and --data.val_fraction 0.9999 was a traceback."""
    root = tmp_path / "data"
    write_image_folder(root, per_class_train=20, per_class_test=3, classes=("airplane", "bird"))
    if damage:
        damage(root)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for args in (fit_args(root, *extra), fit_args(root, *extra)[1:]):  # fit, and the main job
        err = run_cli(args, capsys)
        assert message in err, err
        assert list(work.iterdir()) == [], err


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    """Two processes writing the same checkpoint name (two resumes of one run): a save removes only the temporary
    files of writers that are dead, never one another live process is still writing."""
    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f".last.ckpt-{locks.HOST}-{live.pid}-abc123.tmp"
        theirs.write_bytes(b"half a checkpoint")
        dead = tmp_path / f".last.ckpt-{locks.HOST}-999999999-def456.tmp"  # no such process
        dead.write_bytes(b"left by a killed writer")
        io.save_checkpoint({"step": 1}, last)
        assert theirs.read_bytes() == b"half a checkpoint" and not dead.exists()
        assert io.load_checkpoint(last) == {"step": 1}
    finally:
        live.kill()
        live.wait()
