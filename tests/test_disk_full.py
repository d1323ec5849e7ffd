"""A full disk under the log folder (a small tmpfs): the run ends with one `error:` line that says the disk is full
and names the last good checkpoint, which loads; no traceback, no temporary file left."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import write_image_folder
from handgrad.train.checkpoints import load_for_checks

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(REPO / "src")}


@contextmanager
def small_disk(folder: Path, size: str):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a {size} tmpfs for a full disk (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk_full") / "data"
    write_image_folder(root, per_class_train=20, per_class_test=2, classes=("airplane", "bird"))
    return root


def fit(data_dir: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--data.data_dir", str(data_dir),
                           "--data.download", "false", "--model.sizes", "[3072, 8, 2]", "--data.batch_size", "8",
                           "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                           "--trainer.enable_model_summary", "false", "--trainer.max_epochs", "30", *extra],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def the_error(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "Exception in thread" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and run.stderr.rstrip().endswith(errors[0]), run.stderr[-3000:]
    return errors[0]


def last_good(error: str, cwd: Path) -> Path:
    path = cwd / error.split("the last good checkpoint is ")[1].split(" (the checkpoints on disk are intact)")[0]
    assert load_for_checks(path)["global_step"] > 0
    return path


def test_disk_full_while_writing_a_checkpoint(data_dir, tmp_path):
    # room for the logs and two checkpoints of 0.2 MB (best, last), not for a third one being written
    with small_disk(tmp_path / "disk", "600k") as disk:
        error = the_error(fit(data_dir, disk, "--last_checkpoint.every_n_train_steps", "1"))
        assert error.startswith("error: the disk holding lightning_logs/version_0/checkpoints is full (No space left "
                                "on device) while writing checkpoint "), error
        last_good(error, disk)
        checkpoints = disk / "lightning_logs" / "version_0" / "checkpoints"
        for path in checkpoints.iterdir():  # every checkpoint on the disk is whole; no temporary file is left
            assert path.suffix == ".ckpt" and load_for_checks(path)["global_step"] > 0, path


def test_disk_full_while_writing_tensorboard_events(data_dir, tmp_path):
    # the logs on a 1 MB disk that histograms of every step fill; the checkpoints elsewhere
    checkpoints = tmp_path / "checkpoints"
    with small_disk(tmp_path / "disk", "1m") as disk:
        error = the_error(fit(data_dir, disk, "--model.log_histograms_every_n_steps", "1",
                              "--trainer.log_every_n_steps", "1", "--checkpoint.dirpath", str(checkpoints),
                              "--last_checkpoint.dirpath", str(checkpoints)))
        assert error.startswith(f"error: the disk holding {disk / 'lightning_logs' / 'version_0'} is full (No space "
                                f"left on device) while writing the run's logs"), error
        assert last_good(error, disk).parent == checkpoints


def printed_command(error: str) -> list[str]:
    """The command a disk-full error says to run once space is free (the error's last sentence)."""
    command = error.split("resume with: ")[1].rsplit(" (or write elsewhere", 1)[0]
    words = shlex.split(command)
    assert words[0] == "python"
    return [sys.executable, *words[1:]]


def test_the_printed_command_resumes_a_fit_after_space_is_freed(data_dir, tmp_path):
    """The error names the command that resumes (the same options and --ckpt_path of the last good checkpoint);
    once space is freed, that command, run as printed, finishes the run in its own folder."""
    with small_disk(tmp_path / "disk", "800k") as disk:
        filler = disk / "filler"
        filler.write_bytes(bytes(300_000))
        error = the_error(fit(data_dir, disk, "--last_checkpoint.every_n_train_steps", "1", "--trainer.max_epochs", "3"))
        last = last_good(error, disk)
        command = printed_command(error)
        assert command[1:4] == [str(REPO / "train.py"), "fit", "--data.data_dir"] and command[-2] == "--ckpt_path"
        assert disk / command[-1] == last  # (as the run named it: relative to its working folder)
        filler.unlink()
        run = subprocess.run(command, cwd=disk, env=ENV, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        done = load_for_checks(disk / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
        assert done["epoch"] == 2 and done["global_step"] == 3 * 4  # 32 training images / 8 per batch, 3 epochs
        assert sorted(p.name for p in (disk / "lightning_logs").iterdir()) == ["version_0"]


def test_the_printed_command_resumes_a_sweep_after_space_is_freed(data_dir, tmp_path):
    """A sweep that fills its disk says which command trains the rest into the same folder (not a --ckpt_path,
    which a sweep does not take); run as printed once space is freed, it trains only the missing chunks."""
    with small_disk(tmp_path / "disk", "900k") as disk:
        filler = disk / "filler"
        filler.write_bytes(bytes(450_000))
        args = ["sweep", "--config", str(REPO / "configs" / "grid.yaml"), "--data.data_dir", str(data_dir),
                "--data.download", "false", "--model.sizes", "[3072, 8, 2]", "--data.batch_size", "8",
                "--model.members_per_step", "2", "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
        first = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=disk, env=ENV,
                               capture_output=True, text=True, timeout=300)
        error = the_error(first)
        assert "is full (No space left on device) while writing" in error and "--ckpt_path" not in error
        command = printed_command(error)
        assert command[1:] == [str(REPO / "train.py"), *args, "--trainer.logger.init_args.version", "0"]
        filler.unlink()
        run = subprocess.run(command, cwd=disk, env=ENV, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "chunks are done" in run.stdout and "selected: member" in run.stdout
        log_dir = disk / "lightning_logs" / "sweep" / "version_0"
        assert (log_dir / "selected.ckpt").is_file() and len(list((log_dir / "chunks").glob("chunk_*.json"))) == 3
