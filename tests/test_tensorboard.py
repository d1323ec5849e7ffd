"""What TensorBoard shows, read back from the event files as TensorBoard reads them: one tag scheme for the main job
and `fit`, whose TIME SERIES opens on the train and val curves alone, the HPARAMS columns and values (no NaN), the
CUSTOM SCALARS charts, and pictures people can read."""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from handgrad.train.views import (CURVES, KEY_HPARAMS, METRICS, SWEEP_METRICS, add_layout, confusion_matrix_image,
                                  final_metrics, log_hparams, run_hparams, tensorboard_tag, write_experiment)

from conftest import png_pixels

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

EPOCH_TAGS = {"train/loss", "train/acc", "val/loss", "val/acc", "~lr-SGD"}
STEP_TAGS = {"~train/loss_step", "~train/grad_norm"}


def events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def hparams_data(ev: EventAccumulator) -> dict:
    """The hparams plugin's messages of a run, by tag (experiment, session_start_info, session_end_info)."""
    return {tag.split("/")[-1]: plugin_data_pb2.HParamsPluginData.FromString(content)
            for tag, content in ev.PluginTagToContent("hparams").items()}


def layout(ev: EventAccumulator) -> layout_pb2.Layout:
    tensor = ev.Tensors("custom_scalars__config__")[0].tensor_proto
    return layout_pb2.Layout.FromString(tensor.string_val[0])


def image(ev: EventAccumulator, tag: str) -> torch.Tensor:
    return png_pixels(ev.Images(tag)[-1].encoded_image_string)


def values(ev: EventAccumulator, name: str) -> list[float]:
    """The values of metric ``name`` (``hp/val_acc_best``: under its tag ``~hp/val_acc_best``)."""
    return [e.value for e in ev.Scalars(tensorboard_tag(name))]


def tag_order(a: str, b: str) -> int:
    """TensorBoard 2.21's order of tags in TIME SERIES (its compareTagNames): character by character, "/" and
    digits before anything else, runs of digits compared as numbers."""
    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if a[i].isdigit() and b[j].isdigit():
            m = re.match(r"\d+(\.\d*)?", a[i:]).group()
            n = re.match(r"\d+(\.\d*)?", b[j:]).group()
            if float(m) != float(n):
                return -1 if float(m) < float(n) else 1
            i, j = i + len(m), j + len(n)
            continue
        special_a, special_b = a[i] == "/" or a[i].isdigit(), b[j] == "/" or b[j].isdigit()
        if special_a != special_b:
            return -1 if special_a else 1
        if not special_a and a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i, j = i + 1, j + 1


def first_screen(*runs: EventAccumulator) -> dict[str, list[str]]:
    """The groups TIME SERIES opens (the first two, in its order) and their cards: the scalar, image and histogram
    tags of all the runs, sorted as TensorBoard sorts them, grouped by their part before the first "/"."""
    tags = {t for ev in runs for kind in ("scalars", "images", "histograms") for t in ev.Tags()[kind]}
    groups: dict[str, list[str]] = {}
    for tag in sorted(tags, key=functools.cmp_to_key(tag_order)):
        groups.setdefault(tag.split("/", 1)[0], []).append(tag)
    return dict(list(groups.items())[:2])


def test_tag_order_is_tensorboards():
    tags = ["val/loss", "~hp/x", "train/loss", "data/samples", "epoch", "test/acc", "~test/acc", "val/acc",
            "lr-SGD", "train/acc", "w10", "w9"]
    assert sorted(tags, key=functools.cmp_to_key(tag_order)) == [
        "data/samples", "epoch", "lr-SGD", "test/acc", "train/acc", "train/loss", "val/acc", "val/loss", "w9", "w10",
        "~hp/x", "~test/acc"]
    assert tensorboard_tag("test/acc") == "~test/acc" and tensorboard_tag("~test/acc") == "~test/acc"
    assert [tensorboard_tag(t) for t in CURVES] == list(CURVES)


@pytest.fixture
def runs(image_folder, tmp_path, monkeypatch):
    """A main job (fit, then test of the best checkpoint) and a `fit`, 3 epochs each, in one lightning_logs."""
    monkeypatch.chdir(tmp_path)
    root, _ = image_folder
    args = ["--data.data_dir", str(root), "--model.sizes", "[3072, 16, 2]", "--data.batch_size", "8",
            "--trainer.max_epochs", "3", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "2"]
    main = train.main(args)
    fit = train.main(["fit", "--config", str(REPO / "configs" / "airplane_bird.yaml"), *args, "--model.lr", "0.05"])
    return main, fit, events(tmp_path / "lightning_logs" / "version_0"), events(tmp_path / "lightning_logs" / "version_1")


def test_main_job_and_fit_write_the_same_tags_and_hparams_columns(runs):
    main, fit, ev_main, ev_fit = runs
    tags_main, tags_fit = set(ev_main.Tags()["scalars"]), set(ev_fit.Tags()["scalars"])
    assert EPOCH_TAGS | STEP_TAGS <= tags_main & tags_fit
    assert not {"train/loss_epoch", "hp/val_acc"} & (tags_main | tags_fit)  # the old names
    assert tags_main - tags_fit == {"~test/loss", "~test/acc", "~test/acc_airplane", "~test/acc_bird", "~hp/test_acc"}
    # TIME SERIES opens on the train and val curves, alone: no Lightning `epoch`, every other tag after them
    for runs in ((ev_main,), (ev_fit,), (ev_main, ev_fit)):
        assert first_screen(*runs) == {"train": ["train/acc", "train/loss"], "val": ["val/acc", "val/loss"]}
    for ev in (ev_main, ev_fit):
        shown = {t for kind in ("scalars", "images", "histograms") for t in ev.Tags()[kind]}
        assert "epoch" not in shown and all(t in CURVES or t.startswith("~") for t in shown), shown
    assert len(values(ev_main, "val/acc")) == len(values(ev_main, "train/loss")) == 3
    for ev in (ev_main, ev_fit):
        assert all(math.isfinite(e.value) for tag in ev.Tags()["scalars"] for e in ev.Scalars(tag))

        # HPARAMS: the same columns in both runs; the key hyperparameters shown first; no paths; no domains
        data = hparams_data(ev)
        experiment, start = data["experiment"].experiment, data["session_start_info"].session_start_info
        names = [h.name for h in experiment.hparam_infos]
        assert names == list(run_hparams(main.model.hparams, main.datamodule.hparams, 3))
        assert {"lr", "momentum", "weight_decay", "sizes", "activation", "classes"} <= set(names)
        assert not {"data_dir", "_instantiator", "download", "log_histograms_every_n_steps"} & set(names)
        assert [h.name for h in experiment.hparam_infos if h.differs] == [n for n in names if n in KEY_HPARAMS]
        assert not any(h.HasField("domain_interval") or h.domain_discrete for h in experiment.hparam_infos)
        assert [m.display_name for m in experiment.metric_infos] == list(METRICS)  # HPARAMS's column names
        assert [m.name.tag for m in experiment.metric_infos] == [tensorboard_tag(m) for m in METRICS]
        assert list(METRICS).index("hp/test_acc") >= 5  # not shown by default: every run has the five shown
        assert set(start.hparams) == set(names) and start.hparams["sizes"].string_value == "3072-16-2"
        assert start.hparams["classes"].string_value == "airplane-bird"

        # CUSTOM SCALARS: train and val on one chart per metric, each regex matching exactly its tag
        charts = {c.title: c.multiline.tag for c in layout(ev).category[0].chart}
        assert set(charts) == {"loss", "accuracy"}
        for title, stem in (("loss", "loss"), ("accuracy", "acc")):
            matched = {t for t in tags_main for rx in charts[title] if re.search(rx, t)}
            assert matched == {f"train/{stem}", f"val/{stem}", f"~test/{stem}"}

        # hp/*: only the values that exist, each what its name says
        val = values(ev, "val/acc")
        assert values(ev, "hp/val_acc_last") == [val[-1]] and values(ev, "hp/val_acc_best") == [max(val)]
        assert values(ev, "hp/best_epoch") == [val.index(max(val))]
        assert values(ev, "hp/train_acc_last") == [values(ev, "train/acc")[-1]]
        assert values(ev, "hp/val_loss_last") == [values(ev, "val/loss")[-1]]
    assert values(ev_main, "hp/val_acc_best") == [pytest.approx(float(main.best_checkpoint.best_model_score))]
    assert values(ev_main, "hp/test_acc") == values(ev_main, "test/acc")  # the best checkpoint's: the one tested
    text = ev_main.Tensors("job/summary/text_summary")[0].tensor_proto.string_val[0].decode()  # and it says so
    assert f"| test acc (best) | {values(ev_main, 'test/acc')[0]:.4f} |" in text
    assert f"| best checkpoint | {main.best_checkpoint.best_model_path} |" in text
    assert hparams_data(ev_fit)["session_start_info"].session_start_info.hparams["lr"].number_value == 0.05

    # pictures: at least 400 px wide, after the curves
    assert set(ev_main.Tags()["images"]) == {"~data/samples", "~val/confusion_matrix", "~test/confusion_matrix"}
    for tag in ("~data/samples", "~val/confusion_matrix", "~test/confusion_matrix"):
        assert image(ev_main, tag).shape[2] >= 400, tag


def test_confusion_matrix_names_both_axes_and_counts_read_black_on_light():
    cm = torch.tensor([[865, 135], [172, 828]])
    a, b = confusion_matrix_image(cm, ["airplane", "bird"]), confusion_matrix_image(cm, ["ship", "truck"])
    assert a.shape[0] == 3 and a.shape[1] >= 400 and a.shape[2] >= 400
    gray = a.min(0).values
    # the grid: the cells are the light-shaded box in the lower right; the names are left of it and above it
    shaded = (a[2] == 255) & (a[0] < 250)  # blue shades: the cells' backgrounds
    rows, cols = shaded.any(1).nonzero()[:, 0], shaded.any(0).nonzero()[:, 0]
    top, left, bottom, right = int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])
    assert right - left >= 300 and bottom - top >= 300
    assert int(a[:, top:bottom, left:right].min(0).values.flatten().kthvalue(1).values) < 60  # black counts
    background = a[:, top:bottom, left:right][:, shaded[top:bottom, left:right]]
    assert int(background.min()) >= 130  # every shade light enough for black text
    half = (bottom - top) // 2
    for band in (slice(top, top + half), slice(top + half, bottom)):  # a row name beside each row
        assert (gray[band, :left] < 100).sum() > 30
    for band in (slice(left, left + half), slice(left + half, right)):  # a column name above each column
        assert (gray[top - 30:top, band] < 100).sum() > 30
    assert not torch.equal(a[:, :top], b[:, :top]) and not torch.equal(a[:, :, :left], b[:, :, :left])  # the names
    # the counts: glyphs about 14 px or more tall
    cell = gray[top:top + half, left:left + half]
    dark_rows = (cell < 60).any(1).nonzero()[:, 0]
    assert 12 <= int(dark_rows[-1] - dark_rows[0]) <= 40


def test_final_metrics_last_best_and_best_epoch():
    assert final_metrics([0.5, 0.8, 0.8, 0.7], 0.9, 0.4) == {
        "hp/val_acc_last": 0.7, "hp/val_acc_best": 0.8, "hp/best_epoch": 1.0, "hp/train_acc_last": 0.9,
        "hp/val_loss_last": 0.4}
    assert final_metrics({1: 0.6, 3: 0.7, 5: 0.65}) == {"hp/val_acc_last": 0.65, "hp/val_acc_best": 0.7,
                                                        "hp/best_epoch": 3.0}
    # resumed: the best was before the resume, its epoch unknown here
    assert final_metrics({4: 0.6, 5: 0.65}, best_score=0.9) == {"hp/val_acc_last": 0.65, "hp/val_acc_best": 0.9}
    assert final_metrics({4: 0.6, 5: 0.95}, best_score=0.9)["hp/best_epoch"] == 5
    assert final_metrics([], float("nan"), None) == {}  # no validation: nothing, not NaN


def test_run_hparams_names_the_schedule_and_leaves_out_paths():
    from functools import partial

    from torch.optim.lr_scheduler import StepLR

    model = {"sizes": [3072, 8, 2], "lr": 0.1, "nesterov": True, "log_histograms_every_n_steps": 5,
             "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 3}}}
    data = {"data_dir": "/home/me/data", "classes": ["cat", "dog"], "batch_size": 8, "_instantiator": "x"}
    assert run_hparams(model, data, 30) == {"classes": "cat-dog", "batch_size": 8.0, "sizes": "3072-8-2", "lr": 0.1,
                                            "nesterov": True, "lr_scheduler": "StepLR(step_size=3)",
                                            "max_epochs": 30.0}
    assert run_hparams({"lr_scheduler": partial(StepLR, step_size=2)}, {}, None)["lr_scheduler"] == "StepLR(step_size=2)"
    assert run_hparams({"lr_scheduler": None}, {}, 1)["lr_scheduler"] == "none"


def test_a_sweeps_experiment_and_member_rows(tmp_path):
    """What the sweep writes through the same functions: the experiment at its log root (the varying
    hyperparameters marked, with their domains), and per member its row, hp/test_acc only for the selected one."""
    from torch.utils.tensorboard import SummaryWriter

    members = [{"momentum": m, "weight_decay": wd, "lr": 0.01, "nesterov": False, "sizes": [3072, 8, 2]}
               for m in (0.0, 0.9) for wd in (0.0, 0.001)]
    write_experiment(tmp_path, {k: [m[k] for m in members] for k in members[0]}, SWEEP_METRICS)
    for k, params in enumerate(members):
        with SummaryWriter(str(tmp_path / f"m{params['momentum']}_wd{params['weight_decay']}")) as writer:
            add_layout(writer)
            metrics = {**final_metrics([0.5, 0.6 + k / 10]), "hp/selected": float(k == 3),
                       "hp/test_acc": 0.8 if k == 3 else None, "hp/val_loss_last": float("nan")}
            log_hparams(writer, params, metrics, step=7)
    experiment = hparams_data(events(tmp_path))["experiment"].experiment
    infos = {h.name: h for h in experiment.hparam_infos}
    assert {n for n, h in infos.items() if h.differs} == {"momentum", "weight_decay"}
    assert set(infos) == set(members[0])  # constants=True (the default): the constants are columns too
    assert (infos["momentum"].domain_interval.min_value, infos["momentum"].domain_interval.max_value) == (0.0, 0.9)
    assert list(infos["sizes"].domain_discrete) == ["3072-8-2"] and list(infos["nesterov"].domain_discrete) == [False]
    # shown by default (the first five): whether selected, and what every member has; hp/test_acc is not
    assert [m.display_name for m in experiment.metric_infos] == ["hp/selected", "hp/val_acc_last", "hp/val_acc_best",
                                                                 "hp/best_epoch", "hp/train_acc_last",
                                                                 "hp/val_loss_last", "hp/test_acc"]
    assert [m.name.tag for m in experiment.metric_infos] == [tensorboard_tag(m.display_name)
                                                             for m in experiment.metric_infos]
    for k, params in enumerate(members):
        ev = events(tmp_path / f"m{params['momentum']}_wd{params['weight_decay']}")
        start = hparams_data(ev)["session_start_info"].session_start_info
        assert start.hparams["momentum"].number_value == params["momentum"]
        assert hparams_data(ev)["session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS
        assert "experiment" not in hparams_data(ev)  # one experiment, at the root
        scalars = {t: values(ev, t) for t in ev.Tags()["scalars"]}
        expected = {"~hp/val_acc_last", "~hp/val_acc_best", "~hp/best_epoch", "~hp/selected"} | \
            ({"~hp/test_acc"} if k == 3 else set())
        assert set(scalars) == expected  # the NaN and None left out
        assert scalars["~hp/selected"] == [float(k == 3)] and [e.step for e in ev.Scalars("~hp/selected")] == [7]
        assert {c.title for c in layout(ev).category[0].chart} == {"loss", "accuracy"}


def test_a_sweeps_columns_are_what_varies_and_lr(tmp_path):
    """constants=False: TensorBoard ticks the first five hyperparameters (those with ``differs`` first), so a
    constant is no column: what varies and the ``shown`` (lr) are the columns, all ticked, all marked."""
    params = [{"lr": 0.01, "momentum": m, "weight_decay": 0.0, "activation": "relu", "batch_size": 256.0}
              for m in (0.0, 0.9)]
    write_experiment(tmp_path, {k: [p[k] for p in params] for k in params[0]}, SWEEP_METRICS, ("lr",),
                     constants=False)
    infos = hparams_data(events(tmp_path))["experiment"].experiment.hparam_infos
    assert [(h.name, h.differs) for h in infos] == [("lr", True), ("momentum", True)]


def test_a_callers_hparams_logger_replaces_the_models(image_folder, tmp_path):
    """A sweep's member runs (under its log root, which holds the one experiment) pass HparamsLogger(experiment=False):
    the model's own is then left out, and the run has its row (hyperparameters, hp/*) but no columns of its own."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from handgrad.train.callbacks import HparamsLogger
    from handgrad.data.datamodule import CIFAR10DataModule
    from handgrad.train.module import HandgradClassifier

    root, _ = image_folder
    ours = HparamsLogger(experiment=False)
    # (default_hp_metric=False: else Lightning writes HPARAMS columns of its own, an hp_metric of -1)
    logger = TensorBoardLogger(tmp_path, name="", version="m0", default_hp_metric=False)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=logger,
                        callbacks=[ours], enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(HandgradClassifier([3072, 8, 2]), CIFAR10DataModule(str(root), batch_size=8, download=False))
    assert [c for c in trainer.callbacks if isinstance(c, HparamsLogger)] == [ours]
    ev = events(tmp_path / "m0")
    assert set(hparams_data(ev)) == {"session_start_info", "session_end_info"}
    assert "~hp/val_acc_best" in ev.Tags()["scalars"]  # under the tag HPARAMS's columns name, with any logger
    assert values(ev, "hp/val_acc_best") == [max(values(ev, "val/acc"))] and len(values(ev, "val/acc")) == 2
