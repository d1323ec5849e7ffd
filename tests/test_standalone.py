"""A trained model stands on its own (issue 17): its checkpoint carries the training split's statistics and the class
names; evaluation uses them; `classify` and `predict --predict.images` take raw images without CIFAR-10 data.

References: statistics recomputed here from the generated uint8 images (float64), the run's own printed test
accuracy, the test loop's predictions, and images decoded with PIL.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from handgrad.sweep.selected import selected_checkpoint
from handgrad.data.datamodule import CIFAR10DataModule
from handgrad.runtime.errors import ConfigError
from handgrad.core.mlp import MLP
from handgrad.train.module import HandgradClassifier

from conftest import CIFAR10_CLASSES

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

QUIET = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]
CLASSES = ["cat", "ship", "bird"]  # not the default set, not in CIFAR-10's order
TASK = ["--data.classes", "[cat, ship, bird]", "--data.val_fraction", "0.25", "--data.split_seed", "7",
        "--model.sizes", "[3072, 8, 3]", "--data.batch_size", "8", "--trainer.log_every_n_steps", "1"]


def select(x: torch.Tensor, names: list[str], classes) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of ``classes`` in stored order, labels = position of the class in ``classes``."""
    keep = [i for i, n in enumerate(names) if n in classes]
    return x[keep], torch.tensor([list(classes).index(names[i]) for i in keep])


@pytest.fixture
def trained(image_folder, tmp_path, monkeypatch, capsys):
    """The main job (fit, then test the best checkpoint) on a 3-class task with its own split: (data root, the
    written images, the CLI, the best checkpoint, the printed test accuracy)."""
    monkeypatch.chdir(tmp_path)
    root, written = image_folder
    cli = train.main(["--data.data_dir", str(root), *TASK, "--trainer.max_epochs", "2", *QUIET])
    out = capsys.readouterr().out
    best = cli.trainer.checkpoint_callbacks[0].best_model_path
    printed = float(out.split("test acc (best)  : ")[1].split()[0])
    return root, written, cli, Path(best), printed


def csv_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("precision", ["32-true", "64-true"])
def test_checkpoint_holds_the_training_split_statistics_and_class_names(image_folder, tmp_path, monkeypatch,
                                                                        precision):
    monkeypatch.chdir(tmp_path)
    root, written = image_folder
    cli = train.main(["fit", "--data.data_dir", str(root), *TASK, "--trainer.max_steps", "2",
                      "--trainer.limit_val_batches", "0", "--trainer.precision", precision, *QUIET])
    ckpt = torch.load(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["class_names"] == CLASSES
    mean, std = ckpt["state_dict"]["input_mean"], ckpt["state_dict"]["input_std"]
    assert mean.dtype == std.dtype == torch.float64 and mean.shape == std.shape == (3,)  # whatever the precision
    # independent reference: the generated uint8 images of the training split, float64
    x, _ = select(*written["train"], CLASSES)
    ref_std, ref_mean = torch.std_mean(x[cli.datamodule.train_idx].double() / 255, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(std, ref_std, rtol=1e-12, atol=0)
    # other statistics than those of the whole training set (train + val): the split's
    assert not torch.allclose(mean, (x.double() / 255).mean((0, 2, 3)), rtol=1e-6, atol=0)


def test_test_with_the_checkpoint_and_only_the_data_dir_gives_the_runs_accuracy(trained, tmp_path, capsys):
    root, _, cli, best, printed = trained
    test = train.main(["test", "--ckpt_path", str(best), "--data.data_dir", str(root), *QUIET])
    metrics = test.trainer.callback_metrics
    assert test.datamodule.class_names == CLASSES and test.datamodule.hparams.split_seed == 7
    assert f"{float(metrics['test/acc']):.4f}" == f"{printed:.4f}"
    run = cli.trainer.callback_metrics  # the main job's own test of its best checkpoint: bitwise the same numbers
    assert float(metrics["test/acc"]) == float(run["test/acc"])
    assert float(metrics["test/loss"]) == float(run["test/loss"])
    assert torch.equal(test.datamodule.test_x, cli.datamodule.test_x)  # normalized exactly as in training
    assert "holds no input statistics" not in capsys.readouterr().err
    # another split typed: its training images have other statistics, the checkpoint's are used all the same
    other = train.main(["test", "--ckpt_path", str(best), "--data.data_dir", str(root), "--data.val_fraction", "0.5",
                        "--data.split_seed", "1", *QUIET])
    assert other.datamodule.hparams.val_fraction == 0.5
    assert torch.equal(other.datamodule.test_x, cli.datamodule.test_x)
    assert float(other.trainer.callback_metrics["test/acc"]) == float(run["test/acc"])


@pytest.mark.parametrize("classes", ["[cat, ship]", "[cat, ship, dog]", "[bird, ship, cat]"])
def test_a_checkpoint_is_refused_for_another_class_set(trained, tmp_path, capsys, classes):
    root, _, _, best, _ = trained
    runs = sorted((tmp_path / "lightning_logs").iterdir())
    with pytest.raises(SystemExit) as exit_info:
        train.main(["test", "--ckpt_path", str(best), "--data.data_dir", str(root), "--data.classes", classes, *QUIET])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    asked = [c.strip() for c in classes.strip("[]").split(",")]
    assert err.startswith("error: ") and "Traceback" not in err
    assert str(CLASSES) in err and str(asked) in err
    assert sorted((tmp_path / "lightning_logs").iterdir()) == runs  # nothing written


class LoopPredictions(L.Callback):
    def __init__(self):
        self.pred = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.pred.append(outputs.cpu())


def read_jpeg_folder(root: Path, classes) -> torch.Tensor:
    """The test images of ``classes`` in the data module's order (by CIFAR-10 class, then file name), with PIL."""
    files = [f for c in sorted(classes, key=CIFAR10_CLASSES.index) for f in sorted((root / "test" / c).iterdir())]
    return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])


@pytest.mark.parametrize("data", ["generated", "real"])
def test_classify_on_raw_test_images_gives_the_test_loops_predictions(data, image_folder, request, tmp_path):
    root, written = image_folder
    classes = ["airplane", "bird"]
    if data == "real":
        root = request.getfixturevalue("real_cifar")  # skips when the archive is absent
    dm = CIFAR10DataModule(str(root), classes=classes, batch_size=256, download=False)
    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path)
    trainer = L.Trainer(max_steps=5, limit_val_batches=0, **kw)
    trainer.fit(HandgradClassifier(sizes=[3072, 8, 2], lr=0.05), dm)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    recorder = LoopPredictions()
    L.Trainer(callbacks=[recorder], **kw).test(HandgradClassifier(sizes=[3072, 8, 2]), dm, ckpt_path=ckpt)
    loop = torch.cat(recorder.pred)

    model = HandgradClassifier.load_from_checkpoint(ckpt, map_location="cpu")  # no data module from here on
    raw = select(*written["test"], classes)[0] if data == "generated" else read_jpeg_folder(root, classes)
    assert raw.dtype == torch.uint8 and raw.shape == (len(loop), 3, 32, 32)
    names, probs = model.classify(raw)
    assert probs.shape == (len(loop), 2) and torch.allclose(probs.sum(1), torch.ones(len(loop)))
    assert torch.equal(probs.argmax(1), loop) and names == [classes[k] for k in loop.tolist()]
    assert 0 < int(loop.sum()) < len(loop)  # both classes predicted: a comparison that can fail
    name, p = model.classify(raw[0])
    assert name == names[0] and torch.allclose(p, probs[0], rtol=1e-6, atol=0)  # (a batch of one: another matmul)


def test_python_api_refuses_data_normalized_otherwise_or_of_other_classes(image_folder, tmp_path):
    """trainer.validate/test(model, dm) with a trained model: the data module must use the model's statistics
    (dm.use_statistics) and classes; with them it gives the training run's inputs bitwise."""
    root, _ = image_folder
    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path)
    dm = CIFAR10DataModule(str(root), classes=["airplane", "bird"], batch_size=8, download=False)
    model = HandgradClassifier(sizes=[3072, 8, 2])
    L.Trainer(max_steps=2, limit_val_batches=0, **kw).fit(model, dm)
    other = CIFAR10DataModule(str(root), classes=["airplane", "bird"], val_fraction=0.5, download=False)
    with pytest.raises(ConfigError, match="normalized with other statistics"):
        L.Trainer(**kw).test(model, other)
    same = CIFAR10DataModule(str(root), classes=["airplane", "bird"], val_fraction=0.5, download=False)
    same.use_statistics(model.input_mean, model.input_std)
    L.Trainer(**kw).test(model, same)
    assert torch.equal(same.test_x, dm.test_x)
    with pytest.raises(ConfigError, match=r"trained on the classes \['airplane', 'bird'\], the data selects"):
        L.Trainer(**kw).test(model, CIFAR10DataModule(str(root), classes=["bird", "airplane"], download=False))


def write_own_images(folder: Path) -> dict:
    """PNG and JPEG files of other sizes and modes, a corrupt JPEG and a text file; {name: the PIL image}."""
    folder.mkdir()
    g = np.random.default_rng(0)
    images = {"wide.png": Image.fromarray(g.integers(0, 256, (48, 64, 3), dtype=np.uint8)),  # 64 x 48
              "small.jpg": Image.fromarray(g.integers(0, 256, (20, 20, 3), dtype=np.uint8)),
              "gray.png": Image.fromarray(g.integers(0, 256, (40, 30), dtype=np.uint8), mode="L"),
              "sub/rgba.png": Image.fromarray(g.integers(0, 256, (33, 33, 4), dtype=np.uint8), mode="RGBA")}
    for name, img in images.items():
        (folder / name).parent.mkdir(exist_ok=True)
        img.save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(100))
    (folder / "notes.txt").write_text("not an image")
    return {name: Image.open(folder / name).convert("RGB") for name in images}


def test_predict_own_images_without_cifar_data(trained, tmp_path, capsys):
    _, _, _, best, _ = trained
    folder = tmp_path / "photos"
    images = write_own_images(folder)
    # no --data.data_dir: the default data/ does not exist here, and nothing may be downloaded
    pred = train.main(["predict", "--ckpt_path", str(best), "--predict.images", str(folder),
                       "--data.download", "false", *QUIET])
    out = capsys.readouterr().out
    assert not (tmp_path / "data").exists()
    assert "skipped 1 unreadable file(s)" in out and f"{folder / 'broken.jpg'}: " in out
    log_dir = Path(pred.trainer.log_dir)
    rows = csv_rows(log_dir / "predictions.csv")
    assert [Path(r["file"]).relative_to(folder).as_posix() for r in rows] == sorted(images)
    assert list(rows[0]) == ["file", "predicted_class", "p_cat", "p_ship", "p_bird"]
    # reference: decoded with PIL, resized as documented (handgrad.data.image_decoder), classified by the checkpoint
    model = HandgradClassifier.load_from_checkpoint(best, map_location="cpu")
    for r in rows:
        img = images[Path(r["file"]).relative_to(folder).as_posix()].resize((32, 32), Image.BILINEAR, reducing_gap=None)
        name, p = model.classify(torch.from_numpy(np.array(img)).permute(2, 0, 1))
        assert r["predicted_class"] == name
        assert [float(r[f"p_{c}"]) for c in CLASSES] == pytest.approx(p.tolist(), abs=1e-6)
        assert Path(r["file"]).name in out  # the printed table
    ev = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    ev.Reload()
    assert "~predict/images" in ev.Tags()["images"]


@pytest.mark.parametrize("what", ["empty folder", "no match", "all unreadable"])
def test_predict_with_no_readable_image_is_an_error(trained, tmp_path, capsys, what):
    _, _, _, best, _ = trained
    spec = tmp_path / "photos"
    spec.mkdir()
    if what == "no match":
        spec = spec / "*.jpg"
    if what == "all unreadable":
        (spec / "a.png").write_bytes(b"garbage")
    runs = sorted((tmp_path / "lightning_logs").iterdir())
    with pytest.raises(SystemExit) as exit_info:
        train.main(["predict", "--ckpt_path", str(best), "--predict.images", str(spec), *QUIET])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --predict.images") and "Traceback" not in err
    assert sorted((tmp_path / "lightning_logs").iterdir()) == runs


def test_a_checkpoint_without_statistics_is_refused(trained, tmp_path, capsys):
    """A checkpoint without the training split's statistics (not written by this handgrad's fit) is refused with one
    error line before anything is written: its inputs could not be normalized as in training."""
    root, _, cli, best, _ = trained
    old = torch.load(best, weights_only=True)
    for key in ("input_mean", "input_std"):
        del old["state_dict"][key]
    torch.save(old, tmp_path / "old.ckpt")
    (tmp_path / "work").mkdir()
    for command in (["test"], ["predict", "--predict.images", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_info:
            train.main([*command, "--ckpt_path", str(tmp_path / "old.ckpt"), "--data.data_dir", str(root), *QUIET,
                        "--trainer.default_root_dir", str(tmp_path / "work")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"error: checkpoint {tmp_path / 'old.ckpt'} holds no input "
                                                            f"statistics"), err
        assert list((tmp_path / "work").iterdir()) == []


def test_selected_checkpoint_carries_the_statistics_and_class_names(tmp_path):
    """The sweep's selected.ckpt: the statistics and class names it is given, in the weights' dtype."""
    mlp = MLP([3072, 8, 3], "relu").double()
    mean, std = torch.tensor([0.5, 0.4, 0.3], dtype=torch.float64), torch.tensor([0.25, 0.2, 0.1],
                                                                                  dtype=torch.float64)
    member = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "dampening": 0.0, "nesterov": False}
    ckpt = selected_checkpoint(mlp, member, "relu", 1, 4, {"classes": CLASSES}, {}, input_mean=mean,
                               input_std=std, class_names=CLASSES)
    assert ckpt["hyper_parameters"]["class_names"] == CLASSES
    assert torch.equal(ckpt["state_dict"]["input_mean"], mean) and torch.equal(ckpt["state_dict"]["input_std"], std)
