"""Several real `train.py fit` processes at once in one folder: each run gets its own version_N (config.yaml, event
files and checkpoints of its own learning rate), and two resumes of one last.ckpt do not write into one run folder
together (the second is refused with one `error:` line while the first runs).

The processes are started together and meet at a barrier (tests/barrier.py) just before the run's checks and its
choice of folder: without the reservation of runtime/run_folders.py they pick the same version_N every time.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_image_folder
from handgrad.runtime import run_folders as run_folder
from handgrad.train.cli import RunLogger
from handgrad.train.checkpoints import load_for_checks
from handgrad.runtime.errors import OutputDirError

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH") or str(REPO / "src"),
                                                    str(REPO / "tests")])}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Airplane and bird, 20 training images each: 32 train, 8 val; batch 8 gives 4 steps per epoch."""
    root = tmp_path_factory.mktemp("concurrency") / "data"
    write_image_folder(root, per_class_train=20, per_class_test=2, classes=("airplane", "bird"))
    return root


def fit_command(data_dir: Path, barrier: Path, parties: int, *extra: str) -> list[str]:
    config = barrier.with_suffix(".yaml")
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "barrier.Barrier", "init_args": {
        "folder": str(barrier), "parties": parties}}]}}))
    return [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config), "--data.data_dir", str(data_dir),
            "--data.download", "false", "--model.sizes", "[3072, 8, 2]", "--data.batch_size", "8",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
            "--last_checkpoint.every_n_train_steps", "1", *extra]


def run_together(commands: list[list[str]], cwd: Path) -> list[tuple[int, str]]:
    """Start every command at once; (exit code, stderr) of each."""
    procs = [subprocess.Popen(c, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in commands]
    return [(p.wait(timeout=300), p.stderr.read()) for p in procs]


@pytest.mark.parametrize("lrs", [[0.01, 0.02, 0.03, 0.04], [0.05, 0.06]], ids=["4 runs", "2 runs"])
def test_runs_started_together_get_a_folder_each(data_dir, tmp_path, lrs):
    barrier = tmp_path / "barrier"
    results = run_together([fit_command(data_dir, barrier, len(lrs), "--model.lr", str(lr), "--trainer.max_steps",
                                        "3") for lr in lrs], tmp_path)
    for rc, err in results:
        assert rc == 0, err[-3000:]
    runs = sorted((tmp_path / "lightning_logs").iterdir())
    assert [r.name for r in runs] == [f"version_{i}" for i in range(len(lrs))]
    seen = []
    for run in runs:
        lr = yaml.safe_load((run / "config.yaml").read_text())["model"]["lr"]
        assert len(list(run.glob("events.out.tfevents.*"))) == 1  # one run's events only
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # no last-v1, no debris
        ckpt = load_for_checks(run / "checkpoints" / "last.ckpt")
        assert ckpt["hyper_parameters"]["lr"] == lr and ckpt["global_step"] == 3
        assert not (run / ".handgrad-lock").exists()  # released at the end of the run
        seen.append(lr)
    assert sorted(seen) == lrs


def test_two_resumes_of_one_checkpoint_at_once(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = fit_command(data_dir, tmp_path / "b1", 1, "--trainer.max_steps", "2")
    assert train.main(first[first.index("fit"):]).trainer.global_step == 2  # (in this process: no imports to wait for)
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    resume = fit_command(data_dir, tmp_path / "b2", 2, "--trainer.max_steps", "6", "--ckpt_path", str(last))
    results = run_together([resume, resume], tmp_path)
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], [err[-3000:] for _, err in results]
    err = next(err for rc, err in results if rc == 2)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: the run folder {last.parent.parent} is in use by "
                                                     f"process "), err
    assert err.strip().endswith("in a new run folder."), err
    assert "Traceback" not in err
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]  # the refused one wrote nothing
    assert load_for_checks(last)["global_step"] == 6  # the resumed run's end, intact


def test_a_held_run_folder_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
    root = tmp_path / "lightning_logs"
    version, fd = run_folder.claim(root, None)
    assert version == 0 and (root / "version_0" / ".handgrad-lock").read_text().split()[0] == str(os.getpid())
    run_folder.release(fd)
    assert not (root / "version_0" / ".handgrad-lock").exists()
    # a live process holds it: refused, naming the process
    lock = root / "version_0" / ".handgrad-lock"  # another process holds it (as folder_lock does, without imports)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | "
                               "os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'{os.getpid()} vm\\n'"
                               ".encode()); print('held', flush=True); sys.stdin.read()", str(lock)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(OutputDirError, match=f"version_0 is in use by process {holder.pid} on vm: "):
            run_folder.claim(root, "version_0")
    finally:
        holder.kill()  # SIGKILL: its lock file stays, with its PID
        holder.wait()
    assert (root / "version_0" / ".handgrad-lock").read_text().split()[0] == str(holder.pid)
    version, fd = run_folder.claim(root, "version_0")  # a dead process's lock is taken over
    assert (root / "version_0" / ".handgrad-lock").read_text().split()[0] == str(os.getpid())
    run_folder.release(fd)
    # a new run never takes an existing folder
    version, fd = run_folder.claim(root, None)
    assert version == 1
    run_folder.release(fd)


def test_two_run_loggers_in_one_folder_never_share_a_version(tmp_path):
    """The logger of fit and of the sweep: its folder is made when its version is first asked for, so a second
    logger in the same place (another process, or here another run of this one) takes the next number, also before
    the first has written anything. Lightning's TensorBoardLogger gives both version 0."""
    first, second = RunLogger(str(tmp_path)), RunLogger(str(tmp_path))
    assert first.planned_log_dir() == second.planned_log_dir() == str(tmp_path / "lightning_logs")  # nothing made
    assert not (tmp_path / "lightning_logs").exists()
    assert (first.version, second.version) == (0, 1)
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    assert (Path(first.log_dir) / ".handgrad-lock").is_file()
    first.finalize("success"), second.finalize("success")
    assert not (Path(first.log_dir) / ".handgrad-lock").exists()
