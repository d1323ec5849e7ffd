"""A sweep as TensorBoard shows it (read back from its event files), and its selected.ckpt used on its own: the
member runs named by what varies, and no other run (nothing at the log root), TIME SERIES opening on the train and
val curves, each member with its HPARAMS row (no NaN; hp/selected, hp/test_acc on the selected member only) and
the CUSTOM SCALARS layout; the experiment in the first member's run, its columns what varies and lr; the selected
member's test confusion matrix in its run; `train.py test --ckpt_path selected.ckpt --data.data_dir D` gives the
sweep's test accuracy (issue 13 part 3, issue 17)."""

from __future__ import annotations

import importlib.util
import math
import shlex
from pathlib import Path

import pytest
import torch

from handgrad.sweep import run as sweep
from handgrad.data.datamodule import CIFAR10DataModule
from handgrad.train.views import SWEEP_METRICS, tensorboard_tag

from test_tensorboard import events, first_screen, hparams_data, image, layout, values

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

MEMBERS = "[{lr: 0.05}, {lr: 0.05, momentum: 0.9, weight_decay: 0.001}]"
TASK = ["--data.classes", "[cat, ship, bird]", "--data.val_fraction", "0.25", "--data.split_seed", "7",
        "--model.sizes", "[3072, 8, 3]", "--data.batch_size", "8"]


def sweep_args(root, *extra):
    return ["--config", str(REPO / "configs" / "grid.yaml"), "--trainer.max_epochs", "2", "--data.data_dir",
            str(root), "--data.download", "false", "--model.members", MEMBERS, *TASK,
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_a_sweep_in_tensorboard(image_folder, tmp_path, monkeypatch, mode):
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    extra = ["--model.seeds", "[1, 2]"] if mode == "batched" else ["--sequential"]
    result = sweep.main(sweep_args(root, *extra))
    log_dir, rows, best = Path(result["log_dir"]), result["rows"], result["best"]
    # run names: what varies (seeds repeat: _s<seed>), led by the index where alphabetical order would not be theirs
    names = (["00_m0_wd0_s1", "01_m0_wd0_s2", "02_m0.9_wd0.001_s1", "03_m0.9_wd0.001_s2"] if mode == "batched"
             else ["00_m0_wd0", "01_m0.9_wd0.001"])
    assert sorted(p.name for p in log_dir.iterdir() if p.is_dir() and p.name != "chunks") == names
    # no run `.`: nothing for TensorBoard at the log root, the member runs are all its runs
    assert not list(log_dir.glob("events.out.tfevents.*"))
    runs = {name: events(log_dir / name) for name in names}
    # TIME SERIES opens on the train and val curves (of every member), nothing else in their groups
    assert first_screen(*runs.values()) == {"train": ["train/acc", "train/loss"], "val": ["val/acc", "val/loss"]}

    # the experiment, once, in the first member's run: the columns are what varies and lr (TensorBoard ticks the
    # first five: a constant would be ticked), all marked; then the sweep's metrics
    assert [name for name in names if "experiment" in hparams_data(runs[name])] == [names[0]]
    experiment = hparams_data(runs[names[0]])["experiment"].experiment
    varying = {"momentum", "weight_decay"} | ({"seed"} if mode == "batched" else set())
    assert {h.name for h in experiment.hparam_infos if h.differs} == varying | {"lr"}
    assert {h.name for h in experiment.hparam_infos} == varying | {"lr"}  # lr is 0.05 in both: shown all the same
    assert [m.display_name for m in experiment.metric_infos] == list(SWEEP_METRICS)
    assert [m.name.tag for m in experiment.metric_infos] == [tensorboard_tag(m) for m in SWEEP_METRICS]

    for k, name in enumerate(names):
        ev = runs[name]
        data = hparams_data(ev)
        # its row; the columns in the first run only
        assert set(data) == {"session_start_info", "session_end_info"} | ({"experiment"} if k == 0 else set())
        start = data["session_start_info"].session_start_info.hparams
        # the constants: no columns, but in every row
        assert {"lr", "batch_size", "max_epochs", "sizes", "classes"} <= set(start)
        assert start["classes"].string_value == "cat-ship-bird" and start["sizes"].string_value == "3072-8-3"
        assert start["momentum"].number_value == rows[k]["momentum"]
        assert start["weight_decay"].number_value == rows[k]["weight_decay"]
        if mode == "batched":
            assert start["seed"].number_value == rows[k]["seed"]
        assert {c.title for c in layout(ev).category[0].chart} == {"loss", "accuracy"}
        tags = set(ev.Tags()["scalars"])
        assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= tags and len(values(ev, "val/acc")) == 2
        assert {"~hp/val_acc_last", "~hp/val_acc_best", "~hp/best_epoch", "~hp/train_acc_last", "~hp/val_loss_last",
                "~hp/selected"} <= tags
        assert "epoch" not in tags and all(t in {"train/loss", "train/acc", "val/loss", "val/acc"} or t[0] == "~"
                                           for t in tags)
        assert ("~hp/test_acc" in tags) == (k == best)  # only the selected member was tested
        assert all(math.isfinite(v) for tag in tags for v in values(ev, tag))
        assert values(ev, "hp/selected") == [float(k == best)]
        assert values(ev, "hp/val_acc_last") == pytest.approx([rows[k]["val_acc"]], abs=1e-6)
        assert values(ev, "hp/val_acc_best") == pytest.approx([rows[k]["best_val_acc"]], abs=1e-6)
        assert values(ev, "hp/val_loss_last") == pytest.approx([rows[k]["val_loss"]], abs=1e-6)
        if k == best:
            assert values(ev, "hp/test_acc") == pytest.approx([rows[k]["test_acc"]], abs=1e-6)
        assert not {"~test/acc", "~test/loss"} & tags or k == best
        # the selected member's test confusion matrix, as the main job's test writes it: picture and table
        assert ("~test/confusion_matrix" in ev.Tags()["images"]) == (k == best)
        if k == best:
            assert image(ev, "~test/confusion_matrix").shape[2] >= 400
            text = ev.Tensors("~test/confusion_matrix/text_summary")[-1].tensor_proto.string_val[0].decode()
            lines = text.splitlines()
            assert lines[0].split("|")[2:5] == [" cat ", " ship ", " bird "]
            counts = [[int(c) for c in line.strip("|").split("|")[1:]] for line in lines[2:]]
            assert sum(map(sum, counts)) == 18  # the test split: 6 images of each class
            assert sum(counts[i][i] for i in range(3)) / 18 == pytest.approx(rows[k]["test_acc"], abs=1e-6)


def test_selected_checkpoint_stands_on_its_own(image_folder, tmp_path, monkeypatch, capsys):
    """The printed command, with only --ckpt_path and --data.data_dir, gives the sweep's test accuracy: the
    checkpoint carries the class names, the split and the training split's statistics, equal to the data
    module's."""
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    result = sweep.main(sweep_args(root))
    ckpt = result["selected_ckpt"]
    command = capsys.readouterr().out.split("test it again: ")[1].splitlines()[0]
    assert command == f"python train.py test --ckpt_path {ckpt} --data.data_dir {root}"

    saved = torch.load(ckpt, weights_only=True, map_location="cpu")
    data = CIFAR10DataModule(str(root), classes=["cat", "ship", "bird"], val_fraction=0.25, split_seed=7,
                             batch_size=8, download=False)
    data.setup("fit")
    assert torch.equal(saved["state_dict"]["input_mean"], data.mean)
    assert torch.equal(saved["state_dict"]["input_std"], data.std)
    assert saved["hyper_parameters"]["class_names"] == ["cat", "ship", "bird"]

    test = train.main(shlex.split(command)[2:])
    assert test.datamodule.class_names == ["cat", "ship", "bird"]
    n_test = len(test.datamodule.test_y)  # the same count of right answers (torchmetrics: a float32 ratio)
    sweep_acc = result["rows"][result["best"]]["test_acc"]
    assert float(test.trainer.callback_metrics["test/acc"]) == torch.tensor(sweep_acc, dtype=torch.float32).item()
    assert round(float(test.trainer.callback_metrics["test/acc"]) * n_test) == round(sweep_acc * n_test)
