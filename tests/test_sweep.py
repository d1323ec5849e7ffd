"""The sweep command end to end (handgrad.sweep): generated image folders, few epochs, CPU."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
import yaml

from handgrad import sweep
from handgrad.grid import expand_grid, member_name

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "grid.yaml"
REFERENCE = [(0.01, 0.0, 0.0), (0.01, 0.0, 0.01), (0.01, 0.9, 0.0), (0.01, 0.9, 0.01), (0.01, 0.9, 0.001), (0.01, 0.8, 0.01)]


def sweep_args(root, *extra, epochs=2):
    """The reference config on the generated images, with a small network and batch for speed."""
    return ["--config", str(CONFIG), "--trainer.max_epochs", str(epochs), "--data.data_dir", str(root),
            "--data.download", "false", "--model.sizes", "[3072, 16, 2]", "--data.batch_size", "8",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def scalars(run_dir: Path) -> dict:
    """Every scalar of a TensorBoard run: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_grid_config_is_the_reference_grid():
    cfg = yaml.safe_load(CONFIG.read_text())
    members = [(m["lr"], m["momentum"], m["weight_decay"]) for m in cfg["model"]["members"]]
    assert members == REFERENCE
    assert cfg["trainer"]["max_epochs"] == 30 and cfg["data"]["batch_size"] == 256
    assert isinstance(cfg["model"]["init_seed"], int) and cfg["data"]["classes"] == ["airplane", "bird"]


def test_sweep_batched_equals_sequential_and_writes_results(image_folder, tmp_path, monkeypatch, capsys):
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    args = sweep_args(root, "--trainer.precision", "64-true")
    batched = sweep.main(args)
    out = capsys.readouterr().out
    sequential = sweep.main(args + ["--sequential"])
    assert batched["mode"] == "batched" and sequential["mode"] == "sequential"
    assert batched["log_dir"] != sequential["log_dir"]

    # every epoch of every member: the batched grid == HandgradClassifier trained alone. The training
    # loss is summed in float64 from each step's loss; the module's own epoch metrics (val loss,
    # accuracies) are torchmetrics states, kept in float32 even under 64-true.
    for e, (b, s) in enumerate(zip(batched["history"]["train_loss"], sequential["history"]["train_loss"], strict=True)):
        assert b == pytest.approx(s, rel=1e-9), e
    for name in ("val_loss", "train_acc", "val_acc"):
        for b, s in zip(batched["history"][name], sequential["history"][name], strict=True):
            assert b == pytest.approx(s, rel=1e-6, abs=1e-6), name
    assert len(batched["history"]["train_loss"]) == 2

    for result in (batched, sequential):
        log_dir = Path(result["log_dir"])
        rows = read_csv(log_dir / "results.csv")
        assert list(rows[0]) == list(sweep.COLUMNS) and len(rows) == 6
        assert [(float(r["lr"]), float(r["momentum"]), float(r["weight_decay"])) for r in rows] == REFERENCE
        assert all(r["status"] == "ok" for r in rows)
        # the selection, recomputed from the file: highest val acc, then lowest val loss, then first
        key = [(-float(r["val_acc"]), float(r["val_loss"]), i) for i, r in enumerate(rows)]
        best = min(range(6), key=lambda i: key[i])
        assert [r["selected"] for r in rows] == ["True" if i == best else "False" for i in range(6)]
        assert result["best"] == best
        assert [r["test_acc"] != "" for r in rows] == [i == best for i in range(6)]  # only the selected one
        assert 0.0 <= float(rows[best]["test_acc"]) <= 1.0
        md = (log_dir / "results.md").read_text()
        assert md.count("\n") == 8 and "| yes |" in md
        # one TensorBoard run per member, with epoch curves and its final metrics for the HPARAMS tab
        for i, r in enumerate(rows):
            run = log_dir / member_name(i, expand_grid(members=[{
                "lr": float(r["lr"]), "momentum": float(r["momentum"]), "weight_decay": float(r["weight_decay"])}])[0])
            assert (run / "hparams.yaml").exists()
            s = scalars(run)
            assert s["hp/val_acc"][-1][1] == pytest.approx(float(r["val_acc"]), abs=1e-6)
            assert s["hp/selected"][-1][1] == float(i == best)
            assert len(s["val/acc"]) == 2
    b_rows, s_rows = read_csv(Path(batched["log_dir"]) / "results.csv"), read_csv(Path(sequential["log_dir"]) / "results.csv")
    assert float(b_rows[batched["best"]]["test_acc"]) == pytest.approx(float(s_rows[sequential["best"]]["test_acc"]), abs=1e-6)
    assert "selected: member" in out and "| member | lr |" in out


def test_diverging_member_is_reported_failed_and_the_others_finish(image_folder, tmp_path, monkeypatch):
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    members = '[{lr: 0.01}, {lr: 1000.0, momentum: 0.9}, {lr: 0.01, momentum: 0.9}]'
    statuses = []
    for extra in ([], ["--sequential"]):
        result = sweep.main(sweep_args(root, "--model.members", members, *extra, epochs=3))
        rows = read_csv(Path(result["log_dir"]) / "results.csv")
        statuses.append([r["status"] for r in rows])
        assert statuses[-1][0] == statuses[-1][2] == "ok" and statuses[-1][1].startswith("failed (epoch "), extra
        assert rows[1]["val_acc"] == "" and rows[1]["selected"] == "False"
        assert all(math.isfinite(float(rows[k][c])) for k in (0, 2) for c in ("train_loss", "val_acc"))
        assert len(result["history"]["train_loss"]) == 3 and result["best"] in (0, 2)
        assert statuses[-1][1] in (Path(result["log_dir"]) / "results.md").read_text()
    assert statuses[0] == statuses[1]  # batched and one-by-one agree on when it failed


def test_members_split_over_two_devices_match_one_device(image_folder, tmp_path, monkeypatch):
    """--trainer.devices 2 on CPU: two worker processes with 2 + 1 members, merged here."""
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    members = '[{lr: 0.01}, {lr: 0.01, momentum: 0.9}, {lr: 0.02, momentum: 0.8, weight_decay: 0.01}]'
    args = sweep_args(root, "--model.members", members, "--trainer.precision", "64-true",
                      "--trainer.accelerator", "cpu")
    one = sweep.main(args)
    two = sweep.main(args + ["--trainer.devices", "2"])
    assert two["mode"] == "batched, split over 2 devices"
    assert sorted(p.name for p in Path(two["log_dir"]).glob("worker_*.pt")) == ["worker_0.pt", "worker_1.pt"]
    for name in one["history"]:
        for a, b in zip(one["history"][name], two["history"][name], strict=True):
            assert a == pytest.approx(b, rel=1e-12)
    assert one["best"] == two["best"]
    assert one["rows"][one["best"]]["test_acc"] == pytest.approx(two["rows"][two["best"]]["test_acc"], abs=1e-12)


def test_bad_grid_is_explained(image_folder, tmp_path, monkeypatch):
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        sweep.main(sweep_args(root, "--model.grid", "{lr: [0.1]}"))
    with pytest.raises(ValueError, match="momentun"):
        sweep.main(sweep_args(root, "--model.members", "[{lr: 0.1, momentun: 0.9}]"))


@pytest.mark.skipif(not os.environ.get("HANDGRAD_SLOW"), reason="30 epochs x 6 members on real CIFAR-10 "
                    "(several minutes on a CPU); set HANDGRAD_SLOW=1 to run it")
def test_reference_grid_on_real_images(real_cifar, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = sweep.main(["--config", str(CONFIG), "--data.data_dir", str(real_cifar), "--data.download", "false",
                         "--trainer.enable_progress_bar", "false"])
    best = result["rows"][result["best"]]
    assert best["val_acc"] >= 0.84 and best["test_acc"] >= 0.845
