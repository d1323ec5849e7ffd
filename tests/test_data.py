"""handgrad.data.datamodule.CIFAR10DataModule: both source formats, labels, split, statistics, batches, errors, cache,
Lightning integration, and the real airplane/bird JPEGs."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
import shutil
import tarfile
import urllib.error
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from conftest import CIFAR10_CLASSES, png_pixels, save_image, write_image_folder
from handgrad.data import cifar_fetch
from handgrad.data import cifar_io
from handgrad.runtime import atomic
from handgrad.data.datamodule import CIFAR10DataModule, TensorBatches, stratified_split
from handgrad.data.normalization import channel_stats
from handgrad.runtime.errors import BadDataError, DataNotFoundError
from handgrad.train.callbacks import DataSamples

TRAINER_KW = dict(logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                  num_sanity_val_steps=0, accelerator="cpu", devices=1)


def write_pickle_batches(root, per_batch=30, n_test=40, seed=0):
    """root/cifar-10-batches-py/ in the official format: pickled dicts with 'data' (N, 3072) uint8 rows
    (R, G, B planes, row-major) and 'labels'. Returns {split: (uint8 (N, 3, 32, 32), CIFAR-10 labels (N,))}."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    xs = {"train": [], "test": []}
    ys = {"train": [], "test": []}
    names = [(f"data_batch_{i}", "train", per_batch) for i in range(1, 6)] + [("test_batch", "test", n_test)]
    for name, split, n in names:
        x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        y = torch.randperm(n, generator=g) % 10  # balanced: every class in every batch
        batch = {"batch_label": name, "labels": y.tolist(), "data": x.reshape(n, 3072).numpy(),
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
        xs[split].append(x)
        ys[split].append(y)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return {s: (torch.cat(xs[s]), torch.cat(ys[s])) for s in xs}


def select(x, cifar_labels, classes):
    """Reference: keep the images of `classes` in stored order, labels = position of the class in `classes`."""
    ids = [CIFAR10_CLASSES.index(c) for c in classes]
    keep = torch.tensor([int(v) in ids for v in cifar_labels])
    return x[keep], torch.tensor([ids.index(int(v)) for v in cifar_labels[keep]])


def denormalize(dm, x):
    """uint8 pixels back from normalized images: round((x_hat * std_c + mean_c) * 255)."""
    x = x.double().cpu() * dm.std.double().view(1, 3, 1, 1) + dm.mean.double().view(1, 3, 1, 1)
    return torch.round(x * 255).to(torch.uint8)


def assert_matches(dm, train_x, train_y, test_x, test_y):
    """The DataModule's splits equal the reference images/labels indexed by its split indices."""
    assert torch.equal(denormalize(dm, dm.train_x), train_x[dm.train_idx])
    assert torch.equal(denormalize(dm, dm.val_x), train_x[dm.val_idx])
    assert torch.equal(denormalize(dm, dm.test_x), test_x)
    assert torch.equal(dm.train_y, train_y[dm.train_idx])
    assert torch.equal(dm.val_y, train_y[dm.val_idx])
    assert torch.equal(dm.test_y, test_y)


def ready(data_dir, **kw):
    dm = CIFAR10DataModule(str(data_dir), download=False, **kw)
    dm.prepare_data()
    dm.setup()
    return dm


# ------------------------------------------------------------------ loading both formats

def test_pickle_batches_pixels_and_labels(tmp_path):
    written = write_pickle_batches(tmp_path)
    classes = ("cat", "airplane", "truck")  # not in CIFAR-10 order: labels follow this order
    dm = ready(tmp_path, classes=classes, batch_size=7)
    assert dm.class_names == list(classes) and dm.num_classes == 3
    assert_matches(dm, *select(*written["train"], classes), *select(*written["test"], classes))
    assert dm.train_x.dtype == torch.float32 and dm.train_y.dtype == torch.int64
    assert dm.class_counts == {"train": [12, 12, 12], "val": [3, 3, 3], "test": [4, 4, 4]}


def test_image_folder_pixels_and_labels(image_folder):
    root, written = image_folder
    classes = ("bird", "airplane")
    dm = ready(root, classes=classes)
    labels = {s: torch.tensor([CIFAR10_CLASSES.index(n) for n in written[s][1]]) for s in written}
    assert_matches(dm, *select(written["train"][0], labels["train"], classes),
                   *select(written["test"][0], labels["test"], classes))
    assert dm.class_counts == {"train": [16, 16], "val": [4, 4], "test": [6, 6]}


def test_image_folder_one_level_down_and_decode_threads(tmp_path):
    write_image_folder(tmp_path / "data" / "cifar10-jpeg", per_class_train=10, per_class_test=3)
    a = ready(tmp_path / "data", classes=("deer", "dog", "frog"))
    shutil.rmtree(tmp_path / "data" / ".handgrad_cache")
    b = ready(tmp_path / "data", classes=("deer", "dog", "frog"), num_workers=3)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_x, b.test_x)


# ------------------------------------------------------------------ split and statistics

def test_split_is_disjoint_complete_stratified_and_stable():
    y = torch.arange(103) % 3  # 35/34/34 images per class
    train_idx, val_idx = stratified_split(y, 0.2, seed=265)
    assert torch.equal(torch.cat([train_idx, val_idx]).sort().values, torch.arange(103))
    assert torch.bincount(y[val_idx]).tolist() == [7, 7, 7]  # round(0.2 * 35) = round(6.8), round(6.8)
    again = stratified_split(y, 0.2, seed=265)
    assert torch.equal(again[0], train_idx) and torch.equal(again[1], val_idx)
    other = stratified_split(y, 0.2, seed=266)
    assert not torch.equal(other[1].sort().values, val_idx.sort().values)
    # pinned: the split must not change across machines or refactors (CPU torch.randperm is portable)
    assert stratified_split(torch.arange(10) % 2, 0.2, seed=265)[1].tolist() == PINNED_VAL_IDX


PINNED_VAL_IDX = [5, 4]


def test_datamodule_split_stable_for_seed(image_folder):
    root, _ = image_folder
    a, b = ready(root, classes=CIFAR10_CLASSES), ready(root, classes=CIFAR10_CLASSES)
    c = ready(root, classes=CIFAR10_CLASSES, split_seed=1)
    assert torch.equal(a.train_idx, b.train_idx) and torch.equal(a.val_idx, b.val_idx)
    assert not torch.equal(a.val_idx.sort().values, c.val_idx.sort().values)
    assert len(set(a.train_idx.tolist()) & set(a.val_idx.tolist())) == 0
    assert len(a.train_idx) + len(a.val_idx) == 200 and a.class_counts["val"] == [4] * 10


def test_normalized_train_has_zero_mean_unit_std(image_folder):
    root, written = image_folder
    dm = ready(root, classes=("airplane", "cat", "ship"))
    x = dm.train_x.double()
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), correction=0), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    labels = torch.tensor([CIFAR10_CLASSES.index(n) for n in written["train"][1]])
    raw = select(written["train"][0], labels, ("airplane", "cat", "ship"))[0][dm.train_idx].double() / 255
    std, mean = torch.std_mean(raw, dim=(0, 2, 3), correction=0)  # independent recompute, train split only
    torch.testing.assert_close(dm.mean.double(), mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(dm.std.double(), std, atol=1e-6, rtol=0)
    mean_h, std_h = channel_stats((raw * 255).round().to(torch.uint8))
    torch.testing.assert_close(mean_h, mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(std_h, std, atol=1e-12, rtol=0)


def test_stats_ignore_val_and_test_images(tmp_path):
    write_image_folder(tmp_path / "a", per_class_train=10, per_class_test=3, classes=("airplane", "bird"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a = ready(tmp_path / "a")
    for i in a.val_idx.tolist():  # canonical order: airplane/0000..0009, bird/0000..0009
        cls = ("airplane", "bird")[i // 10]
        save_image(torch.full((3, 32, 32), 255 - i, dtype=torch.uint8), tmp_path / "b" / "train" / cls / f"{i % 10:04d}.png")
    for cls in ("airplane", "bird"):
        save_image(torch.zeros(3, 32, 32, dtype=torch.uint8), tmp_path / "b" / "test" / cls / "0000.png")
    b = ready(tmp_path / "b")
    assert torch.equal(a.val_idx, b.val_idx) and not torch.equal(a.val_x, b.val_x)
    assert not torch.equal(a.test_x, b.test_x)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std) and torch.equal(a.train_x, b.train_x)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kw, match", [
    (dict(classes=("airplane", "plane")), "unknown class"),
    (dict(classes=("airplane",)), "at least 2"),
    (dict(classes="airplane"), "at least 2"),
    (dict(classes=("bird", "bird")), "twice"),
    (dict(val_fraction=0.0), r"val_fraction.*\(0, 1\)"),
    (dict(val_fraction=1.0), r"val_fraction.*\(0, 1\)"),
    (dict(val_fraction=-0.1), r"val_fraction.*\(0, 1\)"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule(**kw)


def test_missing_data_dir_without_download(tmp_path):
    dm = CIFAR10DataModule(str(tmp_path / "nope"), download=False)
    with pytest.raises(DataNotFoundError, match=r"download=False.*cifar-10-python\.tar\.gz.*--data\.data_dir"):
        dm.prepare_data()
    with pytest.raises(DataNotFoundError, match="--data.data_dir") as err:
        dm.setup()
    assert str(err.value).startswith(f"No CIFAR-10 data found in {tmp_path / 'nope'}: that folder does not exist "
                                     f"(a typo in --data.data_dir?). prepare_data() (the Trainer calls it) ")
    assert not (tmp_path / "nope").exists()
    (tmp_path / "nope").mkdir()  # an existing, empty folder: no typo to point at
    with pytest.raises(DataNotFoundError, match=f"No CIFAR-10 data found in {tmp_path / 'nope'} and download=False"):
        dm.prepare_data()


def fake_download(monkeypatch, fail: bool):
    """Replace torchvision's download like it behaves: it creates the folder (mkdir -p) and writes the archive,
    then fails offline (a partial file left) or 'extracts' a small official-format cifar-10-batches-py/."""
    def download_and_extract_archive(url, download_root, filename, md5):
        os.makedirs(download_root, exist_ok=True)
        (Path(download_root) / filename).write_bytes(b"partial")
        if fail:
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        write_pickle_batches(Path(download_root))
    monkeypatch.setattr(cifar_fetch, "download_and_extract_archive", download_and_extract_archive)


def test_download_failure_says_how_to_supply_data(tmp_path, monkeypatch):
    fake_download(monkeypatch, fail=True)
    (tmp_path / "data").mkdir()
    dm = CIFAR10DataModule(str(tmp_path / "data"), download=True)
    with pytest.raises(DataNotFoundError) as err:
        dm.prepare_data()
    assert isinstance(err.value, RuntimeError) and err.value.__cause__ is None
    for text in ("Could not download", "Name or service not known", "cifar-10-python.tar.gz", "cifar-10-batches-py/",
                 "train/<class>/", "--data.data_dir PATH"):
        assert text in str(err.value)
    assert "did not exist" not in str(err.value) and "\n" not in str(err.value)
    assert list((tmp_path / "data").iterdir()) == []  # the user's folder stays, without our partial download


def test_failed_download_into_missing_folder_leaves_no_folders(tmp_path, monkeypatch):
    fake_download(monkeypatch, fail=True)
    (tmp_path / "work").mkdir()
    typo = tmp_path / "work" / "dtaa" / "cifar"
    with pytest.raises(DataNotFoundError) as err:
        CIFAR10DataModule(str(typo), download=True).prepare_data()
    assert f"Could not download CIFAR-10 from {cifar_fetch.CIFAR10_URL} (URLError" in str(err.value)
    assert f"The folder {typo} did not exist (a typo in --data.data_dir?). Without network: " in str(err.value)
    assert list((tmp_path / "work").iterdir()) == []  # neither dtaa/ nor dtaa/cifar/ is left behind


def test_successful_download_creates_the_folder(tmp_path, monkeypatch):
    fake_download(monkeypatch, fail=False)
    data = tmp_path / "new" / "data"
    dm = CIFAR10DataModule(str(data), download=True)
    dm.prepare_data()
    dm.setup()
    assert (data / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert dm.class_counts == {"train": [12, 12], "val": [3, 3], "test": [4, 4]}


@pytest.mark.parametrize("download", [False, True])
def test_data_dir_that_is_a_file_says_pass_its_folder(tmp_path, monkeypatch, download):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download into a file path")
    monkeypatch.setattr(cifar_fetch, "download_and_extract_archive", no_download)
    write_image_folder(tmp_path / "src" / "cifar10-jpeg", per_class_train=5, per_class_test=2,
                       classes=("airplane", "bird"))
    shared = tmp_path / "shared"
    shared.mkdir()
    archive = shared / "cifar10-jpeg.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tmp_path / "src" / "cifar10-jpeg", arcname="cifar10-jpeg")
    dm = CIFAR10DataModule(str(archive), download=download)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DataNotFoundError) as err:
            step()
        assert str(err.value) == (
            f"data_dir {archive} is a file, not a folder. Pass the folder that holds it (--data.data_dir {shared}; "
            f"an archive in it is extracted there, once), or link it into a folder of your own: mkdir -p data && "
            f"ln -s {archive} data/ (then --data.data_dir data).")
    with pytest.raises(DataNotFoundError, match=f"data_dir {archive / 'sub'} cannot be a folder: {archive} is a file"):
        CIFAR10DataModule(str(archive / "sub"), download=download).prepare_data()
    assert [p.name for p in shared.iterdir()] == ["cifar10-jpeg.tar.xz"]  # nothing extracted or created
    # both suggested fixes work
    assert ready(shared).class_counts["test"] == [2, 2]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / archive.name).symlink_to(archive)
    assert torch.equal(ready(tmp_path / "data").test_x, ready(shared).test_x)


def test_corrupt_png_is_named(image_folder):
    root, _ = image_folder
    bad = root / "train" / "bird" / "0003.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(BadDataError, match=r"bird/0003\.png cannot be decoded"):
        ready(root)
    assert bad.read_bytes() == b"this is not a png"


def test_truncated_jpeg_is_named(tmp_path):
    for cls in ("airplane", "bird"):
        for split, n in (("train", 5), ("test", 2)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                save_image(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), tmp_path / split / cls / f"{i}.jpg")
    ready(tmp_path)  # readable
    bad = tmp_path / "train" / "bird" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(BadDataError, match=r"bird/2\.jpg cannot be decoded"):
        ready(tmp_path)


@pytest.mark.parametrize("shape", [(16, 16, 3), (32, 32), (32, 32, 4)])  # too small, grayscale, RGBA
def test_image_not_32x32_rgb(image_folder, shape):
    from PIL import Image
    root, _ = image_folder
    Image.fromarray(np.zeros(shape, dtype=np.uint8)).save(root / "test" / "airplane" / "0001.png")
    with pytest.raises(BadDataError, match=r"airplane/0001\.png .* must be 32x32 RGB"):
        ready(root)


def test_pickle_wrong_shape_and_corrupt(tmp_path):
    write_pickle_batches(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    with open(path, "rb") as f:
        batch = pickle.load(f)
    batch["data"] = batch["data"][:, :1024]  # one channel only
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(BadDataError, match=r"data_batch_3: images must be 32x32 RGB"):
        ready(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BadDataError, match=r"data_batch_3 is not a readable CIFAR-10 batch"):
        ready(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(BadDataError, match="test_batch"):
        ready(tmp_path)


def test_folder_tree_missing_a_class(image_folder):
    root, _ = image_folder
    shutil.rmtree(root / "test" / "bird")
    with pytest.raises(BadDataError, match=r"no test/bird/ folder"):
        ready(root)
    ready(root, classes=("airplane", "cat"))  # classes that are there still work


# ------------------------------------------------------------------ archives in data_dir

def test_local_official_archive_is_checked_and_extracted(tmp_path, monkeypatch):
    written = write_pickle_batches(tmp_path / "src")
    data = tmp_path / "data"
    data.mkdir()
    tgz = data / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    content = tgz.read_bytes()
    with pytest.raises(BadDataError, match="fails its md5 check"):  # not the official md5
        ready(data)
    assert tgz.read_bytes() == content and not (data / "cifar-10-batches-py").exists()
    monkeypatch.setattr(cifar_fetch, "CIFAR10_TGZ_MD5", hashlib.md5(content).hexdigest())
    dm = ready(data, classes=("dog", "horse"))
    assert_matches(dm, *select(*written["train"], ("dog", "horse")), *select(*written["test"], ("dog", "horse")))
    assert tgz.read_bytes() == content


def test_image_folder_archive_is_extracted(tmp_path, caplog):
    write_image_folder(tmp_path / "src" / "cifar10-jpeg", per_class_train=10, per_class_test=3)
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar10-jpeg.tar.xz", "w:xz") as tar:  # like the shared archive
        tar.add(tmp_path / "src" / "cifar10-jpeg", arcname="cifar10-jpeg")
    with caplog.at_level(logging.INFO):
        dm = ready(data)
    assert (data / "cifar10-jpeg" / "train" / "bird").is_dir()
    assert [p.name for p in data.iterdir() if p.name.startswith(".extract")] == []
    assert torch.equal(dm.test_x, ready(tmp_path / "src").test_x)
    logged = [r.getMessage() for r in caplog.records]
    start = logged.index(f"extracting {data / 'cifar10-jpeg.tar.xz'} into {data} (once)...")
    assert [m.split(" (")[0] for m in logged[start + 1:start + 4]] == [f"  extracting: {p}%" for p in (25, 50, 75)]
    assert logged[start + 4].startswith("extracted cifar10-jpeg.tar.xz in ")
    assert logged[start + 5] == (f"decoding 26 files of {data / 'cifar10-jpeg'} (once: the images are cached in "
                                 f"{data / '.handgrad_cache'})...")
    assert logged[start + 6].startswith("decoded 26 images in ")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert torch.equal(ready(data).test_x, dm.test_x)
    assert not [r for r in caplog.records if "extract" in r.getMessage() or "decod" in r.getMessage()]  # once


@pytest.mark.parametrize("kind", ["climbs", "absolute", "link out", "device"])
def test_a_hostile_archive_is_refused_and_writes_nothing_outside(tmp_path, kind):
    """A good image folder plus one hostile member: refused with the archive's name, nothing written outside
    data_dir, nothing left inside but the archive (the extraction's temp folder removed)."""
    write_image_folder(tmp_path / "src" / "cifar10-jpeg", per_class_train=4, per_class_test=2)
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir(), outside.mkdir()
    member, type_, link = {"climbs": ("../outside/escaped.txt", tarfile.REGTYPE, ""),
                           "absolute": (str(outside / "abs.txt"), tarfile.REGTYPE, ""),
                           "link out": ("cifar10-jpeg/link", tarfile.SYMTYPE, str(outside)),
                           "device": ("cifar10-jpeg/dev", tarfile.CHRTYPE, "")}[kind]
    archive = data / "cifar10-jpeg.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tmp_path / "src" / "cifar10-jpeg", arcname="cifar10-jpeg")
        info = tarfile.TarInfo(member)
        info.type, info.linkname = type_, link
        tar.addfile(info, io.BytesIO(b"") if type_ == tarfile.REGTYPE else None)
    with pytest.raises(BadDataError, match=rf"{re.escape(str(archive))} cannot be extracted"):
        ready(data)
    assert list(outside.iterdir()) == [] and [p.name for p in data.iterdir()] == ["cifar10-jpeg.tar.xz"]


# ------------------------------------------------------------------ cache

def test_cache_is_used_invalidated_and_optional(image_folder, monkeypatch):
    root, _ = image_folder
    first = ready(root)
    cached = list((root / ".handgrad_cache").glob("*.pt"))
    assert len(cached) == 1 and not list((root / ".handgrad_cache").glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")
    monkeypatch.setattr(cifar_io, "decode", no_decoding)
    assert torch.equal(ready(root).train_x, first.train_x)  # served from the cache

    f = root / "test" / "bird" / "0002.png"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded although"):  # a changed file changes the key
        ready(root)
    monkeypatch.undo()
    ready(root)
    assert len(list((root / ".handgrad_cache").glob("*-v1-*.pt"))) == 2
    monkeypatch.setattr(cifar_io, "CACHE_VERSION", cifar_io.CACHE_VERSION + 1)
    ready(root)  # another format version never reads the v1 files
    assert len(list((root / ".handgrad_cache").glob("*-v2-*.pt"))) == 1

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")
    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    shutil.rmtree(root / ".handgrad_cache")
    with pytest.warns(UserWarning, match="continuing without it"):
        assert torch.equal(ready(root).train_x, first.train_x)


@pytest.mark.parametrize("damage, notice", [
    ("garbage", "is unreadable (UnpicklingError)"),
    ("truncated", "is unreadable (RuntimeError)"),
    ("other layout", f"is not in this version's format (v{cifar_io.CACHE_VERSION})"),
])
def test_unreadable_cache_is_one_notice_and_rebuilt(image_folder, caplog, capfd, damage, notice):
    root, _ = image_folder
    first = ready(root)
    (cache,) = (root / ".handgrad_cache").glob("*.pt")
    good = cache.read_bytes()
    if damage == "other layout":
        torch.save({"version": cifar_io.CACHE_VERSION, "train_x": torch.zeros(3)}, cache)
    else:
        cache.write_bytes(b"garbage" if damage == "garbage" else good[:len(good) // 2])
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as warned, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        assert torch.equal(ready(root).train_x, first.train_x)
    notices = [r for r in caplog.records if "cache" in r.getMessage() and "decoding" not in r.getMessage()]
    assert [r.getMessage() for r in notices] == [f"decoded-image cache {cache} {notice}; rebuilding it"]
    assert [str(w.message) for w in warned if "cache" in str(w.message) or "weights_only" in str(w.message)] == []
    out = capfd.readouterr()
    assert "weights_only" not in caplog.text + out.out + out.err and "file an issue" not in caplog.text + out.err
    assert cache.read_bytes()[:2] == b"PK"  # rewritten: a torch.save zip again
    rebuilt, before = torch.load(cache, weights_only=True), torch.load(io.BytesIO(good), weights_only=True)
    assert all(torch.equal(rebuilt[k], before[k]) for k in cifar_io.CACHE_KEYS)


# ------------------------------------------------------------------ batches

def test_tensor_batches_are_slices_in_order():
    x, y = torch.arange(23.0).view(23, 1, 1, 1).expand(23, 3, 32, 32), torch.arange(23)
    tb = TensorBatches(x, y, batch_size=5)
    batches = list(tb)
    assert len(tb) == len(batches) == 5 and [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    assert batches[1][0].data_ptr() == x[5:].data_ptr()  # a view, no copy


def test_tensor_batches_shuffle_reproducible_per_epoch():
    y = torch.arange(50)
    tb = TensorBatches(y.float(), y, batch_size=8, shuffle=True, seed=265)
    epoch0 = torch.cat([b for _, b in tb])
    assert torch.equal(epoch0, torch.cat([b for _, b in tb]))  # same epoch, same order
    assert torch.equal(epoch0.sort().values, y) and not torch.equal(epoch0, y)
    tb.set_epoch(1)
    epoch1 = torch.cat([b for _, b in tb])
    assert torch.equal(epoch1.sort().values, y) and not torch.equal(epoch1, epoch0)
    again = TensorBatches(y.float(), y, batch_size=8, shuffle=True, seed=265)
    again.set_epoch(1)
    assert torch.equal(torch.cat([b for _, b in again]), epoch1)


@pytest.mark.parametrize("world_size, n, batch_size", [(2, 23, 4), (3, 23, 4), (3, 24, 4), (4, 6, 4)])
def test_tensor_batches_distributed_sharding(world_size, n, batch_size):
    y = torch.arange(n)
    for shuffle in (False, True):
        ranks = [TensorBatches(y.float(), y, batch_size, shuffle, seed=3, world_size=world_size, rank=r)
                 for r in range(world_size)]
        order = ranks[0].order() if shuffle else y
        per_rank = [[b for _, b in tb] for tb in ranks]
        assert all(len(tb) == len(p) == -(-n // (world_size * batch_size)) for tb, p in zip(ranks, per_rank))
        for i in range(len(ranks[0])):
            global_batch = order[i * world_size * batch_size:(i + 1) * world_size * batch_size]
            expected = (global_batch.split(batch_size) if len(global_batch) == world_size * batch_size
                        else torch.tensor_split(global_batch, world_size))
            for r in range(world_size):
                assert torch.equal(per_rank[r][i], expected[r])


def test_datamodule_shards_train_by_trainer_rank(image_folder):
    root, _ = image_folder
    dm = ready(root, batch_size=3, shuffle=True)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    tb = dm.train_dataloader()
    assert (tb.world_size, tb.rank, tb.seed, tb.shuffle, len(tb)) == (2, 1, 265, True, 6)
    assert dm.val_dataloader().world_size == 1  # val/test are not sharded: every rank evaluates all


# ------------------------------------------------------------------ Lightning

class Recorder(L.LightningModule):
    """A linear model that records, per training step, (epoch, batch index, the batch's labels and pixel sums)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3 * 32 * 32, 10)
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.current_epoch, batch_idx, x.dtype, x.device.type, y.tolist(), x.sum((1, 2, 3)).tolist()))
        return torch.nn.functional.cross_entropy(self.lin(x.flatten(1).to(self.lin.weight.dtype)), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def expected_epoch(dm, epoch):
    tb = TensorBatches(dm.train_x, dm.train_y, dm.hparams.batch_size, dm.hparams.shuffle, dm.hparams.split_seed)
    tb.set_epoch(epoch)
    return [y.tolist() for _, y in tb]


def test_trainer_fit_epochs_shuffle_and_resume(tmp_path):
    write_image_folder(tmp_path / "d", per_class_train=20, per_class_test=3, classes=("airplane", "bird"))
    dm = CIFAR10DataModule(str(tmp_path / "d"), batch_size=5, shuffle=True, download=False)
    a = Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=3, filename="{epoch}-{step}")
    trainer = L.Trainer(max_epochs=3, **{**TRAINER_KW, "enable_checkpointing": True}, callbacks=[ckpt])
    trainer.fit(a, dm)
    assert trainer.num_training_batches == 7  # ceil(32 / 5)
    by_epoch = [[s[4] for s in a.seen if s[0] == e] for e in range(3)]
    assert [expected_epoch(dm, e) for e in range(3)] == by_epoch
    assert by_epoch[0] != by_epoch[1] != by_epoch[2]

    # resume mid-epoch: step 9 = epoch 1 after its 2nd batch; the rest must be exactly what run `a` saw
    b = Recorder()
    dm_b = CIFAR10DataModule(str(tmp_path / "d"), batch_size=5, shuffle=True, download=False)
    L.Trainer(max_epochs=3, **TRAINER_KW).fit(b, dm_b, ckpt_path=tmp_path / "ckpt" / "epoch=1-step=9.ckpt")
    assert [(s[0], s[1], s[4]) for s in b.seen] == [(s[0], s[1], s[4]) for s in a.seen][9:]


def test_trainer_precision_64_gives_float64_batches(image_folder):
    root, _ = image_folder
    dm = CIFAR10DataModule(str(root), batch_size=50, download=False)
    model = Recorder().double()
    L.Trainer(max_steps=2, limit_val_batches=0, precision="64-true", **TRAINER_KW).fit(model, dm)
    assert dm.train_x.dtype == torch.float64 and {s[2] for s in model.seen} == {torch.float64}
    x = dm.train_x
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.cuda
def test_data_lives_on_the_gpu(image_folder):
    root, _ = image_folder
    dm = CIFAR10DataModule(str(root), batch_size=8, shuffle=True, download=False)
    model = Recorder()
    L.Trainer(max_epochs=2, **{**TRAINER_KW, "accelerator": "gpu"}).fit(model, dm)
    assert dm.train_x.is_cuda and dm.train_y.is_cuda and dm.test_x.is_cuda
    assert {s[3] for s in model.seen} == {"cuda"}
    assert [[s[4] for s in model.seen if s[0] == e] for e in range(2)] == [expected_epoch(dm, e) for e in range(2)]


def test_look_at_the_data_tensorboard_and_print(image_folder, tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    root, _ = image_folder
    dm = CIFAR10DataModule(str(root), classes=("cat", "dog", "ship"), download=False)
    logger = TensorBoardLogger(tmp_path / "tb", name="", version=0)
    with caplog.at_level(logging.INFO):
        L.Trainer(max_steps=1, limit_val_batches=0, callbacks=[DataSamples()],  # (HandgradClassifier adds it itself)
                  **{**TRAINER_KW, "logger": logger}).fit(Recorder(), dm)
    assert dm.class_counts == {"train": [16, 16, 16], "val": [4, 4, 4], "test": [6, 6, 6]}
    assert "| train | 16 | 16 | 16 | 48 |" in caplog.text and "| test | 6 | 6 | 6 | 18 |" in caplog.text
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path / "tb" / "version_0")).Reload()
    assert "~data/samples" in events.Tags()["images"]  # (after the curves in TIME SERIES: views.tensorboard_tag)
    image = events.Images("~data/samples")[0]
    logged = png_pixels(image.encoded_image_string)
    # the grid, each pixel drawn 2x2, right of a column of class names: at least 400 px wide
    h, w = 2 * (3 * 34 + 2), 2 * (8 * 34 + 2)
    assert (image.height, image.width) == (h, logged.shape[2]) and logged.shape[2] - w >= 40 and image.width >= 400
    assert torch.equal(logged[:, :, -w:], dm.sample_grid.repeat_interleave(2, 1).repeat_interleave(2, 2))
    names = logged[:, :, :-w].min(0).values  # the label column: dark text on white, in each class's row band only
    assert [int((names[2 * (34 * k + 2):2 * 34 * (k + 1)] < 100).sum()) > 20 for k in range(3)] == [True] * 3
    assert (names[:4] == 255).all() and (names[2 * 34 - 2:2 * 34 + 6] == 255).all()  # the padding between rows
    # the grid's row k, column j is the j-th training image of class k
    raw = denormalize(dm, dm.train_x)
    for k in range(3):
        for j in (0, 7):
            tile = dm.sample_grid[:, 2 + 34 * k:34 * (k + 1), 2 + 34 * j:34 * (j + 1)]
            assert torch.equal(tile, raw[dm.train_y == k][j])


# ------------------------------------------------------------------ the real images

def test_real_airplane_bird(real_cifar):
    from PIL import Image
    dm = ready(real_cifar)
    assert (len(dm.train_x), len(dm.val_x), len(dm.test_x)) == (8000, 2000, 2000)
    assert dm.class_counts == {"train": [4000, 4000], "val": [1000, 1000], "test": [1000, 1000]}
    assert dm.class_names == ["airplane", "bird"]
    x = dm.train_x.double()
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), correction=0), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)

    def pil(path):  # an independent decoder
        return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    i = int(dm.train_idx[0])  # canonical order: train/airplane/0000..4999, then train/bird/0000..4999
    cls = ("airplane", "bird")[i // 5000]
    assert torch.equal(denormalize(dm, dm.train_x[:1])[0], pil(real_cifar / "train" / cls / f"{i % 5000:04d}.jpg"))
    assert int(dm.train_y[0]) == i // 5000
    assert torch.equal(denormalize(dm, dm.test_x[-1:])[0], pil(real_cifar / "test" / "bird" / "0999.jpg"))
    assert int(dm.test_y[0]) == 0 and int(dm.test_y[-1]) == 1


def test_more_decode_workers_than_files(tmp_path):
    """num_workers larger than a split's file count must not produce empty decode chunks."""
    from PIL import Image

    paths = [str(tmp_path / f"{i}.jpg") for i in range(2)]
    for i, path in enumerate(paths):
        save_image(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)),
                   path)
    out = cifar_io.decode_files(paths, workers=4)
    expected = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in paths])
    assert torch.equal(out, expected) and torch.equal(cifar_io.decode_files(paths), expected)
