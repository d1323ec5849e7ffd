"""What the command line says when a user gets something wrong, and that its advice works: one `error:` line on a
line of its own (never after usage text, never glued to a progress bar), a "did you mean" for a mistyped option,
the commands listed, `--ckpt_path last` resuming the newest run, a folder given as a checkpoint named as such,
pasteable paths, and exactly one best checkpoint after a resume."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_faults import data_dir, fit_args  # noqa: F401  (the module's generated images, 4 steps per epoch)

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)
ENV = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(REPO / "src")}


def error_of(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    return err


@pytest.mark.parametrize("typo, hint", [("--model.lrr", "did you mean `--model.lr`?"),
                                        ("--data.batchsize", "did you mean `--data.batch_size`?"),
                                        ("--trainer.max_epocs", "did you mean `--trainer.max_epochs`?")])
def test_a_typo_is_one_line_with_the_option_meant(data_dir, tmp_path, monkeypatch, capsys, typo, hint):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    err = error_of(fit_args(data_dir, typo, "0.1"), capsys)
    assert err.count("\n") == 1 and err.startswith("error: ") and hint in err, err  # no usage text before it
    assert err.rstrip().endswith("(see: python train.py fit --help)") and f"arguments: {typo} 0.1" in err.lower(), err
    assert not (tmp_path / "lightning_logs").exists()


def test_a_bad_value_is_one_line(data_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    err = error_of(fit_args(data_dir, "--model.lr", "nan"), capsys)
    assert err.startswith('error: Parser key "model.lr": Expected a <class \'float\'>. Got value: nan') and \
        err.count("\n") == 1, err


def test_an_unknown_command_lists_every_command(capsys):
    err = error_of(["bogus"], capsys)
    assert err == ("error: unknown command 'bogus': use one of fit, validate, test, predict, sweep, verify, or options "
                   "alone for the main job (see: python train.py --help)\n")


def test_a_folder_given_as_a_checkpoint_is_named_as_such(data_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"")
    err = error_of(["test", *fit_args(data_dir, "--ckpt_path", str(folder.parent))[1:]], capsys)
    assert err == f"error: --ckpt_path {folder.parent} is a folder, not a checkpoint file; pass a .ckpt file " \
                  f"({folder / 'last.ckpt'}).\n"


def test_ckpt_path_last_resumes_the_newest_run(data_dir, tmp_path, monkeypatch):  # noqa: F811
    """`--ckpt_path last`: the last.ckpt of the newest run in the log folder, resumed in its own run folder, as the
    explicit path would be (Lightning alone would start a new run from scratch)."""
    monkeypatch.chdir(tmp_path)
    one_epoch = fit_args(data_dir, "--trainer.max_epochs", "1")
    train.main(one_epoch)  # version_0
    train.main([*one_epoch, "--model.lr", "0.02"])  # version_1: the newest
    resumed = train.main(fit_args(data_dir, "--trainer.max_epochs", "2", "--model.lr", "0.02", "--ckpt_path", "last"))
    assert Path(resumed.trainer.log_dir) == Path("lightning_logs/version_1") and resumed.trainer.global_step == 8
    shutil.copytree(tmp_path / "lightning_logs", tmp_path / "copy")
    os.chdir(tmp_path / "copy")  # the same resume from the explicit path, in a copy of the folder
    explicit = train.main(fit_args(data_dir, "--trainer.max_epochs", "2", "--model.lr", "0.02", "--ckpt_path",
                                   "version_1/checkpoints/last.ckpt", "--trainer.default_root_dir", str(tmp_path / "x")))
    for name, w in resumed.model.state_dict().items():
        assert torch.equal(w, explicit.model.state_dict()[name]), name


def test_a_resumed_run_keeps_one_best_and_one_last(data_dir, tmp_path, monkeypatch):  # noqa: F811
    """Killed after it wrote a new best but before last.ckpt recorded it: resumed from that last.ckpt, the run ends with
    exactly one best-*.ckpt and one last.ckpt (no stale best beside the real one, no -v1 copy). The best here is by
    train/loss, which improves every epoch, so every epoch writes a new best."""
    monkeypatch.chdir(tmp_path)
    by_loss = ("--checkpoint.monitor", "train/loss", "--checkpoint.mode", "min")
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    train.main(fit_args(data_dir, "--trainer.max_epochs", "2", *by_loss))
    snapshot = (folder / "last.ckpt").read_bytes()  # the state after epoch 1
    train.main(fit_args(data_dir, "--trainer.max_epochs", "4", *by_loss, "--ckpt_path", str(folder / "last.ckpt")))
    (folder / "last.ckpt").write_bytes(snapshot)  # as if killed before last.ckpt recorded epochs 2 and 3
    known = torch.load(folder / "last.ckpt", weights_only=True)["callbacks"]
    unknown = [p.name for p in folder.glob("best-*.ckpt") if not any(p.name in str(s) for s in known.values())]
    assert len(unknown) == 1 and unknown[0].startswith("best-epoch=03-"), unknown  # the premise
    train.main(fit_args(data_dir, "--trainer.max_epochs", "4", *by_loss, "--ckpt_path", str(folder / "last.ckpt")))
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and names[1] == "last.ckpt" and names[0].startswith("best-epoch=03-"), names
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 16


def test_an_error_after_the_progress_bar_starts_its_own_line(data_dir, tmp_path):  # noqa: F811
    """A run that diverges while Lightning's progress bar is drawn, its output and errors in one stream (2>&1):
    the error line starts a line of its own."""
    args = fit_args(data_dir, "--model.lr", "1e12")
    del args[args.index("--trainer.enable_progress_bar"):args.index("--trainer.enable_progress_bar") + 2]
    run = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert run.returncode == 1
    errors = [line for line in run.stdout.splitlines() if line.startswith("error: the training loss became NaN")]
    assert len(errors) == 1, run.stdout[-3000:]
    assert "Epoch 0" in run.stdout  # the bar was there


def test_the_summary_s_tensorboard_command_pastes_with_spaces(data_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    work = tmp_path / "my runs"
    work.mkdir()
    monkeypatch.chdir(work)
    train.main(fit_args(data_dir, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(work))[1:])
    line = next(line for line in capsys.readouterr().out.splitlines() if "tensorboard --logdir" in line)
    words = shlex.split(line.split("(", 1)[1].rstrip(")"))
    assert words == ["tensorboard", "--logdir", str(work / "lightning_logs")]


def test_a_version_number_given_as_text_names_the_same_run_folder(tmp_path):
    """The printed resume commands pass --trainer.logger.init_args.version N; whether the parser hands N over as
    an int or as the text "N" (it did both, depending on what it had parsed before), it is version_N."""
    from handgrad.train.cli import RunLogger

    for version in (3, "3"):
        assert Path(RunLogger(str(tmp_path), version=version).planned_log_dir()) == tmp_path / "lightning_logs" / "version_3"
    assert Path(RunLogger(str(tmp_path), version="eager").planned_log_dir()) == tmp_path / "lightning_logs" / "eager"
