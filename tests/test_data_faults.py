"""The data folder under stress: several processes preparing it at once, SIGKILL mid-extraction and mid-cache-write,
a full disk (a small tmpfs), and a forged cache file."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import write_image_folder
from handgrad.data import cifar_fetch
from handgrad.data import cifar_io
from handgrad.runtime import disk as disk_space
from handgrad.runtime import locks
from handgrad.data.datamodule import CIFAR10DataModule
from handgrad.runtime.errors import DataNotFoundError
from test_data import write_pickle_batches

CLASSES = ("airplane", "bird")


def ready(data_dir, **kw):
    dm = CIFAR10DataModule(str(data_dir), download=False, **kw)
    dm.prepare_data()
    dm.setup()
    return dm


def fingerprint(dm) -> str:
    """sha256 of everything setup() produced: the normalized splits and their labels."""
    h = hashlib.sha256()
    for t in (dm.train_x, dm.train_y, dm.val_x, dm.val_y, dm.test_x, dm.test_y):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def make_archive(tmp_path, per_class_train=10, per_class_test=3, classes=CLASSES) -> Path:
    """tmp_path/src/cifar10-jpeg/ (a generated tree) and tmp_path/cifar10-jpeg.tar.xz of it, like the shared one."""
    src = tmp_path / "src" / "cifar10-jpeg"
    if not src.exists():
        write_image_folder(src, per_class_train=per_class_train, per_class_test=per_class_test, classes=classes)
    archive = tmp_path / "cifar10-jpeg.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(src, arcname="cifar10-jpeg")
    return archive


def leftovers(data_dir: Path) -> list[str]:
    """What a writer may leave behind: temp folders, temp files, the lock file."""
    cache = data_dir / cifar_io.CACHE_DIR
    names = [p.name for p in data_dir.iterdir() if p.name.startswith((".extract", ".download", ".handgrad-lock"))]
    return sorted(names + ([p.name for p in cache.iterdir() if p.name.endswith(".tmp")] if cache.is_dir() else []))


# ------------------------------------------------------------------ several processes at once

RACER = r"""
import hashlib, json, os, sys, time
from pathlib import Path
from handgrad.data import cifar_io
from handgrad.data.datamodule import CIFAR10DataModule

decoded = []
real_decode = cifar_io.decode
cifar_io.decode = lambda *a, **k: decoded.append(1) or real_decode(*a, **k)
sync, me, dirs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
for trial, d in enumerate(dirs):
    (sync / f"ready-{trial}-{me}").touch()
    while not (sync / f"go-{trial}").exists():
        time.sleep(0.002)
    decoded.clear()
    try:
        dm = CIFAR10DataModule(d, classes=["airplane", "bird"], download=False)
        dm.prepare_data()
        dm.setup()
    except Exception as e:
        print(json.dumps({"trial": trial, "error": f"{type(e).__name__}: {e}"}), flush=True)
        continue
    h = hashlib.sha256()
    for t in (dm.train_x, dm.train_y, dm.val_x, dm.val_y, dm.test_x, dm.test_y):
        h.update(t.contiguous().numpy().tobytes())
    print(json.dumps({"trial": trial, "decoded": len(decoded), "fingerprint": h.hexdigest()}), flush=True)
"""


def race(tmp_path, dirs: list[Path], n: int) -> list[list[dict]]:
    """Start n processes; in each trial t they all prepare_data() + setup() dirs[t] at the same moment (each waits
    for the others to be ready). Returns per trial the n results."""
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(sync), str(i), *map(str, dirs)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    try:
        for trial in range(len(dirs)):
            deadline = time.monotonic() + 120
            while len(list(sync.glob(f"ready-{trial}-*"))) < n:
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a racer died"
                time.sleep(0.005)
            (sync / f"go-{trial}").touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * n, [err[-2000:] for _, err in outs]
    results = [[json.loads(line) for line in out.splitlines()] for out, _ in outs]
    return [[r[t] for r in results] for t in range(len(dirs))]


def test_three_first_runs_at_once_extract_and_decode_once(tmp_path, monkeypatch):
    """3 processes start on a folder holding only the archive, 3 times: none fails, one of them extracts and decodes,
    the others wait and use its tree and its cache; all get the same data; nothing is left behind."""
    archive = make_archive(tmp_path)
    reference = fingerprint(ready(tmp_path / "src", classes=CLASSES))
    dirs = []
    for t in range(3):
        d = tmp_path / f"data{t}"
        d.mkdir()
        (d / archive.name).symlink_to(archive)
        dirs.append(d)
    for trial, results in enumerate(race(tmp_path, dirs, n=3)):
        assert [r.get("error") for r in results] == [None] * 3, results
        assert [r["fingerprint"] for r in results] == [reference] * 3
        assert sorted(r["decoded"] for r in results) == [0, 0, 1]  # decoded once, by one of them
        d = dirs[trial]
        assert sorted(p.name for p in d.iterdir()) == [".handgrad_cache", "cifar10-jpeg", archive.name]
        assert leftovers(d) == [] and len(list((d / ".handgrad_cache").iterdir())) == 1
    monkeypatch.setattr(cifar_io, "decode", lambda *a, **k: pytest.fail("decoded although the cache fits"))
    assert [fingerprint(ready(d, classes=CLASSES)) for d in dirs] == [reference] * 3  # the caches they left


# ------------------------------------------------------------------ SIGKILL mid-write

KILLED = r"""
import sys, time
from pathlib import Path
import torch
from handgrad.data import cifar_fetch
from handgrad.data.datamodule import CIFAR10DataModule

marker, where, data_dir = sys.argv[1:]
if where == "extraction":  # stop after 5 files of the archive
    members = cifar_fetch._members_with_progress
    def slow(*args):
        for n, member in enumerate(members(*args)):
            if n == 5:
                Path(marker).touch()
                time.sleep(600)
            yield member
    cifar_fetch._members_with_progress = slow
else:  # stop after 100 kB of the cache file
    def slow_save(obj, f):
        f.write(b"PK" + bytes(100_000))
        f.flush()
        Path(marker).touch()
        time.sleep(600)
    torch.save = slow_save
dm = CIFAR10DataModule(data_dir, classes=["airplane", "bird"], download=False)
dm.prepare_data()
dm.setup()
"""


def test_debris_of_killed_writers_is_removed_and_only_theirs(tmp_path, caplog):
    """SIGKILL one run mid-extraction and one mid-cache-write: the next run removes their temp folder and file (named
    with their host and PID) and works; temp names of a live writer, of another host, or of an older handgrad stay."""
    archive = make_archive(tmp_path)
    reference = fingerprint(ready(tmp_path / "src", classes=CLASSES))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / archive.name).symlink_to(archive)
    write_image_folder(b / "cifar10-jpeg", per_class_train=10, per_class_test=3, classes=CLASSES)
    procs = {d: subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path / f"{where}.started"), where, str(d)],
                                 stderr=subprocess.PIPE, text=True)
             for d, where in ((a, "extraction"), (b, "cache"))}
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"{w}.started").exists() for w in ("extraction", "cache")):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), \
                [p.stderr.read()[-2000:] for p in procs.values() if p.poll() is not None]
            time.sleep(0.01)
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGKILL)
            p.wait()
    host, me = locks.HOST, os.getpid()
    (dead_dir,) = [p for p in a.iterdir() if p.name.startswith(".extract-")]
    (dead_tmp,) = (b / ".handgrad_cache").glob("*.tmp")
    assert dead_dir.name.startswith(f".extract-{host}-{procs[a].pid}-") and len(list(dead_dir.rglob("*.png"))) > 0
    assert dead_tmp.name.startswith(".cifar10-folder-v1-") and f"-{host}-{procs[b].pid}-" in dead_tmp.name
    kept = [a / f".extract-{host}-{me}-live1234", a / f".extract-otherhost-{procs[a].pid}-abcd1234",
            a / ".extract-k2j4h1x0", b / ".handgrad_cache" / f".cifar10-folder-v1-0.pt-{host}-{me}-live1234.tmp"]
    for p in kept[:3]:
        p.mkdir()
    kept[3].write_bytes(b"being written")

    with caplog.at_level(logging.INFO):
        assert fingerprint(ready(a, classes=CLASSES)) == reference
        assert fingerprint(ready(b, classes=CLASSES)) == reference
    assert not dead_dir.exists() and not dead_tmp.exists()
    assert all(p.exists() for p in kept) and kept[3].read_bytes() == b"being written"
    assert sorted(leftovers(a) + leftovers(b)) == sorted(p.name for p in kept)
    removed = [r.getMessage() for r in caplog.records if "leftover" in r.getMessage()]
    assert len(removed) == 2 and dead_dir.name in removed[0] and dead_tmp.name in removed[1]


# ------------------------------------------------------------------ a full disk

@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a new folder on a tmpfs of that size (needs root, as in CI); unmounted afterwards."""
    mounts = []

    def mount(size: str) -> Path:
        d = tmp_path / f"disk{len(mounts)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill a disk ({r.stderr.strip()}): needs root")
        mounts.append(d)
        return d
    yield mount
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Write a filler file until the disk is full, then give back `leave` bytes."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(4096))
        except OSError:
            pass
    os.truncate(disk / "filler", max(0, (disk / "filler").stat().st_size - leave))


def assert_free_space(disk: Path, said_kb: int) -> None:
    """The free space a message gave equals what is free now, give or take the lock file's one 4 kB page (held
    while the message was made)."""
    free = disk_space.free_bytes(disk)
    assert free - 4096 <= said_kb * 1000 + 500 and said_kb * 1000 - 500 <= free, (said_kb, free)


def test_cache_on_a_full_disk_is_one_notice_and_training_data_is_intact(tmp_path, small_disk):
    """torch.save raises RuntimeError (not OSError) when the disk fills up: one notice, no temp file left."""
    disk = small_disk("1m")
    write_image_folder(disk / "cifar10-jpeg", per_class_train=10, per_class_test=3, classes=CLASSES)
    write_image_folder(tmp_path / "copy", per_class_train=10, per_class_test=3, classes=CLASSES)
    fill(disk, leave=16 * 1024)  # the cache needs 26 * 3072 bytes
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        dm = ready(disk)
    notices = [str(w.message) for w in warned if "cache" in str(w.message)]
    assert len(notices) == 1, notices
    assert notices[0].startswith(f"cannot write the decoded-image cache {disk / '.handgrad_cache'}/cifar10-folder-")
    m = re.search(f"\\(the disk holding {disk / '.handgrad_cache'} is full \\(No space left on device\\) while "
                  f"writing it: (\\d+) kB free, about (\\d+) kB needed\\); continuing without it", notices[0])
    assert m and int(m[2]) == round(26 * (3072 + 8) / 1e3)  # uint8 images and int64 labels
    assert_free_space(disk, int(m[1]))
    assert leftovers(disk) == [] and list((disk / ".handgrad_cache").iterdir()) == []
    assert fingerprint(dm) == fingerprint(ready(tmp_path / "copy"))


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7 vs 5"),
                                   OSError(5, "Input/output error")])
def test_any_cache_write_failure_is_one_notice(image_folder, monkeypatch, error):
    root, _ = image_folder

    def failing_save(obj, f):
        f.write(b"PK partial")
        raise error
    monkeypatch.setattr(cifar_io.torch, "save", failing_save)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        dm = ready(root, classes=CLASSES)
    notices = [str(w.message) for w in warned if "cache" in str(w.message)]
    assert len(notices) == 1 and f"({type(error).__name__}: {str(error).splitlines()[0]})" in notices[0]
    assert list((root / ".handgrad_cache").iterdir()) == []
    monkeypatch.undo()
    assert fingerprint(ready(root, classes=CLASSES)) == fingerprint(dm)


def test_extraction_on_a_full_disk_says_the_disk_is_full(tmp_path, small_disk):
    disk = small_disk("64k")
    archive = make_archive(tmp_path)
    (disk / archive.name).symlink_to(archive)
    with tarfile.open(archive) as tar:  # the reference: each file rounded up to 4 kB blocks, each folder one block
        needed = sum(-(-m.size // 4096) * 4096 if m.isfile() else 4096 for m in tar.getmembers())
    with pytest.raises(DataNotFoundError) as err:
        ready(disk)
    m = re.fullmatch(f"the disk holding {disk} is full \\(No space left on device\\) while extracting "
                     f"{archive.name}: (\\d+) kB free, about {disk_space.size_text(needed)} needed; free some space "
                     f"there, or extract the archive on another disk and pass --data.data_dir pointing there.",
                     str(err.value))
    assert m, str(err.value)
    assert_free_space(disk, int(m[1]))
    assert [p.name for p in disk.iterdir()] == [archive.name]  # no partial tree, no temp folder, no lock


# ------------------------------------------------------------------ a forged cache

def forged(good: dict, how: str) -> dict:
    if how == "no listing":  # well-formed, this version, but every training image labelled airplane
        return {"version": good["version"], **{k: good[k] for k in cifar_io.CACHE_KEYS},
                "train_y": torch.zeros_like(good["train_y"])}
    if how == "other listing":  # e.g. copied from another data folder
        return {**good, "listing": hashlib.sha256(b"other files").hexdigest()}
    if how == "labels shuffled":
        return {**good, "train_y": good["train_y"].flip(0)}
    if how == "one image less":
        return {**good, "test_x": good["test_x"][:-1], "test_y": good["test_y"][:-1]}
    return {**good, "class_ids": [0, 1]}


@pytest.mark.parametrize("how, why", [
    ("no listing", "it records no source listing: written by an older handgrad, or not by handgrad"),
    ("other listing", "made from another listing of files, sizes and times"),
    ("labels shuffled", "its train labels are not those of the 20 train files"),
    ("one image less", "its test labels are not those of the 6 test files"),
    ("other classes", "classes [0, 1] instead of [0, 2]"),
])
def test_forged_cache_is_rebuilt_with_one_notice(tmp_path, caplog, how, why):
    write_image_folder(tmp_path / "d", per_class_train=10, per_class_test=3, classes=CLASSES)
    first = fingerprint(ready(tmp_path / "d"))
    (cache,) = (tmp_path / "d" / ".handgrad_cache").glob("*.pt")
    good = torch.load(cache, weights_only=True)
    torch.save(forged(good, how), cache)
    with caplog.at_level(logging.INFO):
        assert fingerprint(ready(tmp_path / "d")) == first
    notices = [r.getMessage() for r in caplog.records if "cache" in r.getMessage() and "decoding" not in r.getMessage()]
    assert notices == [f"decoded-image cache {cache} does not fit the files it is named after ({why}); rebuilding it"]
    rebuilt = torch.load(cache, weights_only=True)
    assert all(torch.equal(rebuilt[k], good[k]) for k in cifar_io.CACHE_KEYS)


def test_forged_pickle_cache_with_a_missing_class_is_rebuilt(tmp_path, caplog):
    write_pickle_batches(tmp_path)
    first = fingerprint(ready(tmp_path))
    (cache,) = (tmp_path / ".handgrad_cache").glob("*.pt")
    good = torch.load(cache, weights_only=True)
    keep = good["train_y"] == 0
    torch.save({**good, "train_x": good["train_x"][keep], "train_y": good["train_y"][keep]}, cache)
    with caplog.at_level(logging.INFO):
        assert fingerprint(ready(tmp_path)) == first
    assert f"decoded-image cache {cache} does not fit the files it is named after (train labels [0] instead of " \
           f"[0, 2]); rebuilding it" in caplog.text


def test_download_on_a_full_disk_says_the_disk_is_full(tmp_path, monkeypatch):
    """torchvision's download fails with ENOSPC: the error says so, and the partial download is removed."""
    def download_and_extract_archive(url, download_root, filename, md5):
        (Path(download_root) / filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cifar_fetch, "download_and_extract_archive", download_and_extract_archive)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataNotFoundError, match=f"^the disk holding {tmp_path / 'data'} is full \\(No space left on "
                                                f"device\\) while downloading {cifar_fetch.CIFAR10_URL}: .* free, about "
                                                f"350.0 MB needed; free some space there"):
        CIFAR10DataModule(str(tmp_path / "data"), download=True).prepare_data()
    assert list((tmp_path / "data").iterdir()) == []
