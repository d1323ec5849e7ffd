"""CIFAR-10 on disk: find it, extract or download it, decode it once to uint8 tensors, cache the result.

Two source formats are read:

- ``pickle``: the official python version, ``cifar-10-batches-py/{data_batch_1..5,test_batch}``;
- ``folder``: an image-folder tree ``train/<class>/*.{png,jpg}`` and ``test/<class>/*`` (e.g. the extracted
  ``cifar10-jpeg.tar.xz``), found in ``data_dir`` itself or one folder below it.

Images come back in a canonical order that depends only on the *set* of chosen classes (official order for
the pickle batches; class in CIFAR-10 label order, then file name, for folders), with CIFAR-10 label indices
0..9. Remapping labels to the user's class order is the DataModule's job.

Long one-time work (extracting an archive, decoding the images) is announced with log lines on rank 0
(Lightning's logger, INFO), and so is a decoded-image cache that cannot be read and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import socket
import tarfile
import tempfile
import time
import urllib.error
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity, download_and_extract_archive, extract_archive
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

from handgrad.errors import BadDataError, DataNotFoundError  # noqa: F401  (re-exported)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL, CIFAR10_TGZ, CIFAR10_TGZ_MD5 = CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5
PICKLE_DIR = "cifar-10-batches-py"
PICKLE_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FOLDER_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")
CACHE_DIR = ".handgrad_cache"
DOWNLOAD_TIMEOUT_S = 30  # seconds without an answer before the download counts as failed
CACHE_VERSION = 1  # bump when the cached layout changes: old cache files are then ignored, not misread
CACHE_KEYS = ("train_x", "train_y", "test_x", "test_y")
EXTRACT_PROGRESS_STEPS = 4  # log lines while extracting a folder archive: at 25%, 50%, 75% of its bytes


def how_to_supply(data_dir: Path) -> str:
    return (f"Put the official {CIFAR10_TGZ} (or its extracted {PICKLE_DIR}/), or an image-folder tree "
            f"train/<class>/*.png|jpg and test/<class>/* (or a .tar.xz/.tar.gz of such a tree, like "
            f"cifar10-jpeg.tar.xz), into {data_dir}, or pass --data.data_dir PATH pointing at a folder that holds one.")


def no_data(data_dir: Path) -> str:
    """The start of a no-data message; says so when data_dir does not exist, so that a mistyped path is obvious."""
    if data_dir.exists():
        return f"No CIFAR-10 data found in {data_dir}"
    return f"No CIFAR-10 data found in {data_dir.absolute()}: that folder does not exist (a typo in --data.data_dir?)"


def check_folder(data_dir: Path) -> None:
    """Raise DataNotFoundError when data_dir is a file (e.g. the archive itself) or lies under a file: it must be
    a folder, or a path where a folder can be created."""
    existing = next((p for p in (data_dir, *data_dir.parents) if p.exists()), None)
    if existing is None or existing.is_dir():
        return
    if existing == data_dir:
        raise DataNotFoundError(
            f"data_dir {data_dir} is a file, not a folder. Pass the folder that holds it (--data.data_dir "
            f"{data_dir.parent}; an archive in it is extracted there, once), or link it into a folder of your "
            f"own: mkdir -p data && ln -s {data_dir.absolute()} data/ (then --data.data_dir data).")
    raise DataNotFoundError(f"data_dir {data_dir} cannot be a folder: {existing} is a file. Pass a folder, "
                            f"e.g. --data.data_dir {existing.parent}.")


def missing_folders(data_dir: Path) -> list[Path]:
    """data_dir and those of its parents that do not exist, deepest first: what `mkdir -p data_dir` would create."""
    missing = []
    for p in (data_dir, *data_dir.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """rmdir each folder, deepest first, stopping at the first that is gone or not empty: never removes a file."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return


@dataclass(frozen=True)
class Source:
    kind: str  # "pickle" or "folder"
    root: Path


def _is_tree(d: Path) -> bool:
    return (d / "train").is_dir() and (d / "test").is_dir()


def find_source(data_dir: Path) -> Source | None:
    """The data in data_dir: cifar-10-batches-py/ (or data_dir is it), a train/+test/ tree here or one folder down."""
    if not data_dir.is_dir():
        return None
    if (data_dir / PICKLE_DIR).is_dir():
        return Source("pickle", data_dir / PICKLE_DIR)
    if (data_dir / "data_batch_1").is_file():
        return Source("pickle", data_dir)
    if _is_tree(data_dir):
        return Source("folder", data_dir)
    trees = [d for d in sorted(data_dir.iterdir()) if d.is_dir() and not d.name.startswith(".") and _is_tree(d)]
    if len(trees) > 1:
        raise BadDataError(f"{data_dir} holds several image-folder trees ({', '.join(d.name for d in trees)}); "
                           f"pass --data.data_dir pointing at the one to use.")
    return Source("folder", trees[0]) if trees else None


# ----------------------------------------------------------------------------- getting the data onto disk

def prepare(data_dir: Path, download: bool) -> Source:
    """Make data_dir hold a source: use what is there, else extract a local archive, else download (torchvision).

    Nothing already on disk is overwritten: archives are extracted only into names that do not exist yet. A missing
    data_dir is created only by a download that succeeds: a failed one leaves no folder behind.
    """
    check_folder(data_dir)
    if (source := find_source(data_dir)) is not None:
        return source
    tgz = data_dir / CIFAR10_TGZ
    if tgz.is_file():
        if not check_integrity(str(tgz), CIFAR10_TGZ_MD5):
            raise BadDataError(f"{tgz} fails its md5 check (expected {CIFAR10_TGZ_MD5}): the file is incomplete or "
                               f"corrupt. Replace it with a good copy, or move it away to download again.")
        try:
            rank_zero_info(f"extracting {tgz} into {data_dir} (once)...")
            extract_archive(str(tgz), str(data_dir))
        except OSError as e:
            raise DataNotFoundError(f"Cannot extract {tgz} into {data_dir} ({e}). Extract it into a writable folder "
                                    f"and pass --data.data_dir pointing there.") from e
        return find_source(data_dir)
    if data_dir.is_dir():
        for archive in sorted(data_dir.iterdir()):
            if archive.name.endswith(FOLDER_ARCHIVE_SUFFIXES) and archive.is_file():
                if (source := _extract_folder_archive(archive, data_dir)) is not None:
                    return source
    if not download:
        raise DataNotFoundError(f"{no_data(data_dir)} and download=False. " + how_to_supply(data_dir))
    created = missing_folders(data_dir)  # torchvision creates them: removed again when the download fails
    existed, timeout = tgz.exists(), socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a firewalled network fails in seconds, not minutes
        download_and_extract_archive(CIFAR10_URL, str(data_dir), filename=CIFAR10_TGZ, md5=CIFAR10_TGZ_MD5)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        if not existed and tgz.exists():
            tgz.unlink()  # our own partial download, nothing of the user's
        remove_empty_folders(created)
        typo = f"The folder {data_dir.absolute()} did not exist (a typo in --data.data_dir?). " if created else ""
        raise DataNotFoundError(f"Could not download CIFAR-10 from {CIFAR10_URL} ({type(e).__name__}: {e}). {typo}"
                                f"Without network: " + how_to_supply(data_dir)) from None
    finally:
        socket.setdefaulttimeout(timeout)
    return find_source(data_dir)


def _extract_folder_archive(archive: Path, data_dir: Path) -> Source | None:
    """Extract a tar of an image-folder tree next to it (via a temp folder, never over existing names)."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=data_dir))
    except OSError as e:
        raise DataNotFoundError(f"Cannot extract {archive} into {data_dir} ({e}). Link it into a writable folder "
                                f"and pass that: mkdir -p data && ln -s {archive.absolute()} data/ (then "
                                f"--data.data_dir data).") from e
    try:
        try:
            rank_zero_info(f"extracting {archive} into {data_dir} (once)...")
            start = time.perf_counter()
            with open(archive, "rb") as raw, tarfile.open(fileobj=raw) as tar:
                tar.extractall(tmp, members=_members_with_progress(tar, raw, archive.stat().st_size), filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BadDataError(f"{archive} cannot be extracted ({e}); replace it with a good copy or remove it.") from e
        found = find_source(tmp)
        if found is None or found.kind != "folder":
            return None  # some other archive: leave it alone
        entries = list(tmp.iterdir())
        if clash := [e.name for e in entries if (data_dir / e.name).exists()]:
            raise BadDataError(f"{archive} would extract over existing {clash} in {data_dir}, which is not a complete "
                               f"image-folder tree; fix or move {clash} away.")
        for e in entries:
            e.rename(data_dir / e.name)
        rank_zero_info(f"extracted {archive.name} in {time.perf_counter() - start:.0f} s")
        return find_source(data_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _members_with_progress(tar: tarfile.TarFile, raw, size: int):
    """The archive's members, in order, logging how far through the (compressed) file the reading is at every
    1/EXTRACT_PROGRESS_STEPS of it: a long extraction shows that it is moving."""
    step = 1
    for n, member in enumerate(tar, start=1):
        if step < EXTRACT_PROGRESS_STEPS and raw.tell() >= size * step / EXTRACT_PROGRESS_STEPS:
            rank_zero_info(f"  extracting: {100 * step // EXTRACT_PROGRESS_STEPS}% ({n} files)")
            step += 1
        yield member


# ----------------------------------------------------------------------------- listing and decoding

def list_files(source: Source, class_ids: list[int]) -> dict:
    """Per split, the files to read as (path, CIFAR-10 label or -1 for a pickle batch, size, mtime_ns), in
    canonical order. Uses os.scandir (12 000 files in ~0.05 s)."""
    if source.kind == "pickle":
        files = {}
        for split, names in PICKLE_FILES.items():
            paths = [source.root / n for n in names]
            if missing := [str(p) for p in paths if not p.is_file()]:
                raise BadDataError(f"{missing} missing: {source.root} must hold data_batch_1..5 and test_batch. "
                                   f"Re-extract {CIFAR10_TGZ} into a fresh folder.")
            files[split] = [(str(p), -1, p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
        return files
    files = {}
    for split in ("train", "test"):
        files[split] = []
        for c in sorted(class_ids):
            d = source.root / split / CIFAR10_CLASSES[c]
            if not d.is_dir():
                raise BadDataError(f"The image-folder tree {source.root} has no {split}/{CIFAR10_CLASSES[c]}/ folder. "
                                   f"It needs train/<class>/ and test/<class>/ for every class in `classes`; add the "
                                   f"folder or drop the class (--data.classes).")
            with os.scandir(d) as it:
                entries = sorted((e for e in it if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file()),
                                 key=lambda e: e.name)
            if not entries:
                raise BadDataError(f"{d} holds no {'/'.join(IMAGE_SUFFIXES)} images.")
            files[split] += [(e.path, c, e.stat().st_size, e.stat().st_mtime_ns) for e in entries]
    return files


def read_pickle_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One official batch: a pickled dict, 'data' (N, 3072) uint8 rows (1024 R, 1024 G, 1024 B values, each a
    row-major 32x32 plane) and 'labels' (N,) in 0..9."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
    except Exception as e:  # truncated, not a pickle, wrong keys, ...
        raise BadDataError(f"{path} is not a readable CIFAR-10 batch ({type(e).__name__}: {e}). "
                           f"Re-extract {CIFAR10_TGZ} into a fresh folder.") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise BadDataError(f"{path}: images must be 32x32 RGB, stored as uint8 rows of 3072 values; "
                           f"got {data.dtype} array of shape {data.shape}.")
    if labels.shape != (len(data),) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise BadDataError(f"{path}: expected {len(data)} labels in 0..9, got shape {labels.shape}.")
    return torch.from_numpy(data.copy()).view(-1, 3, 32, 32), torch.from_numpy(labels)


def _decode_chunk(paths: list[str]) -> list[torch.Tensor]:
    """Read the bytes, decode all JPEGs in one batched call; on failure decode one by one to name the bad file."""
    datas = [read_file(p) for p in paths]
    try:
        if all(p.lower().endswith((".jpg", ".jpeg")) for p in paths):
            return decode_jpeg(datas, mode=ImageReadMode.UNCHANGED)
    except (RuntimeError, TypeError):  # a bad file, or a torchvision < 0.19 without batched decoding
        pass
    images = []
    for p, d in zip(paths, datas):
        try:
            images.append(decode_image(d, mode=ImageReadMode.UNCHANGED))
        except RuntimeError as e:
            raise BadDataError(f"{p} cannot be decoded ({str(e).splitlines()[-1]}); replace or remove it.") from e
    return images


def decode_files(paths: list[str], workers: int = 0) -> torch.Tensor:
    """Decode image files to one uint8 tensor (N, 3, 32, 32); `workers` > 1 decodes in that many threads."""
    workers = min(workers, len(paths))  # no empty chunks
    if workers > 1 and len(paths) > 1:
        chunks = [paths[i::workers] for i in range(workers)]
        with ThreadPoolExecutor(workers) as ex:
            decoded = list(ex.map(_decode_chunk, chunks))
        images = [None] * len(paths)
        for i, chunk in enumerate(decoded):
            images[i::workers] = chunk
    else:
        images = _decode_chunk(paths)
    for p, img in zip(paths, images):
        if img.shape != (3, 32, 32):
            raise BadDataError(f"{p} is {'x'.join(map(str, img.shape[1:]))} with {img.shape[0]} channel(s); "
                               f"CIFAR-10 images must be 32x32 RGB. Convert or remove it.")
    return torch.stack(images)


def decode(source: Source, files: dict, class_ids: list[int], workers: int = 0) -> dict:
    """{train_x, train_y, test_x, test_y}: uint8 images and CIFAR-10 labels of the chosen classes, canonical order."""
    out = {}
    for split in ("train", "test"):
        if source.kind == "pickle":
            xs, ys = zip(*(read_pickle_batch(Path(f[0])) for f in files[split]))
            x, y = torch.cat(xs), torch.cat(ys)
            keep = torch.isin(y, torch.tensor(class_ids))
            x, y = x[keep], y[keep]
        else:
            x = decode_files([f[0] for f in files[split]], workers)
            y = torch.tensor([f[1] for f in files[split]], dtype=torch.int64)
        out[f"{split}_x"], out[f"{split}_y"] = x.contiguous(), y
    return out


# ----------------------------------------------------------------------------- cache

def cache_path(data_dir: Path, source: Source, files: dict, class_ids: list[int]) -> Path:
    """data_dir/.handgrad_cache/<key>.pt, key = sha256 of (format version, source, classes, every file's
    relative path, size and mtime): any change to the files or the code's layout gives a new key."""
    root = len(str(source.root)) + 1
    entries = [(path[root:], size, mtime) for split in ("train", "test") for path, _, size, mtime in files[split]]
    key = json.dumps([CACHE_VERSION, source.kind, str(source.root.relative_to(data_dir)), sorted(class_ids), entries])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return data_dir / CACHE_DIR / f"cifar10-{source.kind}-v{CACHE_VERSION}-{digest}.pt"


def load_uint8(data_dir: Path, source: Source, class_ids: list[int], workers: int = 0) -> dict:
    """Decoded uint8 images of the chosen classes: from the cache when its key matches, else decoded and cached."""
    files = list_files(source, class_ids)
    path = cache_path(data_dir, source, files, class_ids)
    if path.is_file():
        if (cached := load_cache(path)) is not None:
            return cached
    n_files = len(files["train"]) + len(files["test"])
    rank_zero_info(f"decoding {n_files} files of {source.root} (once: the images are cached in {path.parent})...")
    start = time.perf_counter()
    data = decode(source, files, class_ids, workers)
    rank_zero_info(f"decoded {len(data['train_x']) + len(data['test_x'])} images in "
                   f"{time.perf_counter() - start:.1f} s")
    save_cache(path, data)
    return data


def load_cache(path: Path) -> dict | None:
    """The cached {train_x, train_y, test_x, test_y}, or None (with a one-line notice) when the file cannot be
    read or holds another layout: the caller then decodes again and overwrites it."""
    try:
        cached = torch.load(path, weights_only=True)
    except Exception as e:  # truncated, garbage, ...: torch's message is a page long, the type name is enough
        rank_zero_info(f"decoded-image cache {path} is unreadable ({type(e).__name__}); rebuilding it")
        return None
    if not is_current_cache(cached):
        rank_zero_info(f"decoded-image cache {path} is not in this version's format (v{CACHE_VERSION}); rebuilding it")
        return None
    return {k: cached[k] for k in CACHE_KEYS}


def is_current_cache(cached) -> bool:
    """Whether a loaded cache file holds this version's layout: its format version, and per split uint8 images
    (N, 3, 32, 32) with int64 labels (N,)."""
    if not isinstance(cached, dict) or cached.get("version") != CACHE_VERSION:
        return False
    for split in ("train", "test"):
        x, y = cached.get(f"{split}_x"), cached.get(f"{split}_y")
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == torch.uint8
                and x.dim() == 4 and tuple(x.shape[1:]) == (3, 32, 32) and y.dtype == torch.int64
                and tuple(y.shape) == (len(x),)):
            return False
    return True


def save_cache(path: Path, data: dict) -> None:
    """torch.save (with the format version) to a temp file in the cache folder, then os.replace: readers never
    see a partial file."""
    tmp = None
    try:
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save({"version": CACHE_VERSION, **{k: data[k] for k in CACHE_KEYS}}, f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"cannot write the decoded-image cache {path} ({e}); continuing without it, "
                      f"the next run decodes the images again")
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
