"""CIFAR-10 on disk: find it, decode it once to uint8 tensors, cache the result (handgrad.data.cifar_fetch puts it there).

Two source formats are read:

- ``pickle``: the official python version, ``cifar-10-batches-py/{data_batch_1..5,test_batch}``;
- ``folder``: an image-folder tree ``train/<class>/*.{png,jpg}`` and ``test/<class>/*`` (e.g. the extracted
  ``cifar10-jpeg.tar.xz``), found in ``data_dir`` itself or one folder below it.

Images come back in a canonical order that depends only on the *set* of chosen classes (official order for
the pickle batches; class in CIFAR-10 label order, then file name, for folders), with CIFAR-10 label indices
0..9. Remapping labels to the user's class order is the DataModule's job.

Image files are decoded with Pillow (libjpeg-turbo for JPEGs: the pixels torchvision's decode_jpeg gave), each
file's header checked first (32x32 RGB, else refused before decoding), in ``--data.num_workers`` threads.

Decoding is announced with log lines on rank 0 (Lightning's logger, INFO), and so is a decoded-image cache that does
not fit and is rebuilt. Several processes may load one data_dir at once: one decodes and writes the cache, holding
handgrad.runtime.locks, the others wait for it and read the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torchvision.datasets import CIFAR10

from handgrad.data.image_decoder import FORMATS, reason
from handgrad.runtime import disk, locks
from handgrad.runtime.atomic import atomic_write
from handgrad.runtime.errors import BadDataError, DataNotFoundError, OutputDirError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_TGZ = CIFAR10.filename
PICKLE_DIR = "cifar-10-batches-py"
PICKLE_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_DIR = ".handgrad_cache"
CACHE_VERSION = 1  # bump when the cached layout changes: old cache files are then ignored, not misread
CACHE_KEYS = ("train_x", "train_y", "test_x", "test_y")


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


def decode_file(path: str) -> bytes:
    """One image file as 32x32 RGB bytes (row-major, height x width x 3), decoded with Pillow (libjpeg-turbo for a
    JPEG, as torchvision's decode_jpeg: the same pixels). Its header is checked first: an image that is not 32x32 RGB
    (a palette is expanded) is refused before it is decoded. Raises BadDataError naming the file."""
    try:
        with open(path, "rb") as f:  # one read, not Pillow's many small ones (each lets go of the GIL)
            data = io.BytesIO(f.read())
        with Image.open(data, formats=FORMATS) as img:
            rgb = img.mode == "RGB" or (img.mode == "P" and "transparency" not in img.info)
            if img.size != (32, 32) or not rgb:
                raise BadDataError(f"{path} is {img.width}x{img.height} in mode {img.mode}; CIFAR-10 images must be "
                                   f"32x32 RGB. Convert or remove it.")
            img.load()
            return img.tobytes() if img.mode == "RGB" else img.convert("RGB").tobytes()
    except BadDataError:
        raise
    except Exception as e:  # Pillow's exceptions: UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise BadDataError(f"{path} cannot be decoded ({reason(e)}); replace or remove it.") from e


def rgb_tensor(pixels: Union[bytes, bytearray]) -> torch.Tensor:
    """32x32 RGB bytes of N images, one after the other (height x width x 3 each), as uint8 (N, 3, 32, 32)."""
    if not pixels:
        return torch.empty(0, 3, 32, 32, dtype=torch.uint8)
    return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(-1, 32, 32, 3).permute(0, 3, 1, 2).contiguous()


def decode_files(paths: list[str], workers: int = 0) -> torch.Tensor:
    """Decode image files to one uint8 tensor (N, 3, 32, 32); `workers` > 1 decodes in that many threads (Pillow
    lets go of the GIL while it decodes; its header parsing holds it)."""
    workers = min(workers, len(paths))  # no empty chunks
    if workers < 2:
        return rgb_tensor(b"".join(map(decode_file, paths)))
    with ThreadPoolExecutor(workers) as ex:  # one chunk a thread: paths[i::workers]
        chunks = list(ex.map(lambda i: [decode_file(p) for p in paths[i::workers]], range(workers)))
    pixels = [None] * len(paths)
    for i, chunk in enumerate(chunks):
        pixels[i::workers] = chunk
    return rgb_tensor(b"".join(pixels))


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

def listing_digest(data_dir: Path, source: Source, files: dict, class_ids: list[int]) -> str:
    """sha256 (hex) of what a cache is made from: format version, source, classes, and every file's relative path,
    size and mtime (a stat of each file, not its bytes)."""
    root = len(str(source.root)) + 1
    entries = [(path[root:], size, mtime) for split in ("train", "test") for path, _, size, mtime in files[split]]
    key = json.dumps([CACHE_VERSION, source.kind, str(source.root.relative_to(data_dir)), sorted(class_ids), entries])
    return hashlib.sha256(key.encode()).hexdigest()


def cache_path(data_dir: Path, source: Source, files: dict, class_ids: list[int]) -> Path:
    """data_dir/.handgrad_cache/cifar10-<kind>-v<version>-<digest>.pt, digest = the first 20 hex digits of
    listing_digest: any change to the files or the code's layout gives a new name."""
    digest = listing_digest(data_dir, source, files, class_ids)[:20]
    return data_dir / CACHE_DIR / f"cifar10-{source.kind}-v{CACHE_VERSION}-{digest}.pt"


def load_uint8(data_dir: Path, source: Source, class_ids: list[int], workers: int = 0) -> dict:
    """Decoded uint8 images of the chosen classes: from the cache when it fits the files, else decoded and cached.

    Several processes at once (the ranks of a sweep): the first decodes and writes the cache while holding
    folder_lock, the others wait for it and read its cache; the images are decoded once per data_dir.
    """
    files = list_files(source, class_ids)
    meta = {"listing": listing_digest(data_dir, source, files, class_ids), "class_ids": sorted(class_ids)}
    labels = None if source.kind == "pickle" else {s: torch.tensor([f[1] for f in files[s]]) for s in files}
    path = cache_path(data_dir, source, files, class_ids)
    seen = _identity(path)
    if seen is not None and (cached := load_cache(path, meta, labels)) is not None:
        return cached
    with locks.locked(data_dir):
        locks.remove_debris(path.parent)
        if _identity(path) not in (None, seen) and (cached := load_cache(path, meta, labels)) is not None:
            return cached  # written by the process this one waited for
        n_files = len(files["train"]) + len(files["test"])
        rank_zero_info(f"decoding {n_files} files of {source.root} (once: the images are cached in {path.parent})...")
        start = time.perf_counter()
        data = decode(source, files, class_ids, workers)
        rank_zero_info(f"decoded {len(data['train_x']) + len(data['test_x'])} images in "
                       f"{time.perf_counter() - start:.1f} s")
        save_cache(path, data, meta)
    return data


def _identity(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def load_cache(path: Path, meta: dict | None = None, labels: dict | None = None) -> dict | None:
    """The cached {train_x, train_y, test_x, test_y}, or None (with a one-line notice) when the file cannot be
    read, holds another layout, or does not fit `meta` and `labels` (see misfit): the caller then decodes again and
    overwrites it."""
    try:
        cached = torch.load(path, weights_only=True)
    except Exception as e:  # truncated, garbage, ...: torch's message is a page long, the type name is enough
        rank_zero_info(f"decoded-image cache {path} is unreadable ({type(e).__name__}); rebuilding it")
        return None
    if not is_current_cache(cached):
        rank_zero_info(f"decoded-image cache {path} is not in this version's format (v{CACHE_VERSION}); rebuilding it")
        return None
    if meta is not None and (why := misfit(cached, meta, labels)) is not None:
        rank_zero_info(f"decoded-image cache {path} does not fit the files it is named after ({why}); rebuilding it")
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


def misfit(cached: dict, meta: dict, labels: dict | None) -> str | None:
    """Why a well-formed cache was not made from these files, or None: another source listing or class set; labels
    that differ from those of the image files (one per file, in order), or, for pickle batches, labels outside the
    classes or a class without images."""
    if "listing" not in cached:
        return "it records no source listing: written by an older handgrad, or not by handgrad"
    if cached["listing"] != meta["listing"]:
        return "made from another listing of files, sizes and times"
    if cached.get("class_ids") != meta["class_ids"]:
        return f"classes {cached.get('class_ids')} instead of {meta['class_ids']}"
    for split in ("train", "test"):
        y = cached[f"{split}_y"]
        if labels is not None and (len(y) != len(labels[split]) or not torch.equal(y, labels[split])):
            return f"its {split} labels are not those of the {len(labels[split])} {split} files"
        present = set(torch.unique(y).tolist())
        if present != set(meta["class_ids"]):
            return f"{split} labels {sorted(present)} instead of {meta['class_ids']}"
    return None


def save_cache(path: Path, data: dict, meta: dict | None = None) -> None:
    """torch.save (with the format version and `meta`), written atomically: readers never see a partial file. Any
    failure (a full disk, ...) is one notice and the caller goes on without the cache."""
    try:
        atomic_write(path, lambda f: torch.save({"version": CACHE_VERSION, **(meta or {}),
                                                 **{k: data[k] for k in CACHE_KEYS}}, f))
    except Exception as e:
        warnings.warn(f"cannot write the decoded-image cache {path} ({_why_not_written(e, path, data)}); "
                      f"continuing without it, the next run decodes the images again")


def _why_not_written(e: Exception, path: Path, data: dict) -> str:
    needed = sum(data[k].nbytes for k in CACHE_KEYS)
    free = disk.free_bytes(path.parent if path.parent.is_dir() else path.parent.parent)
    if disk.is_disk_full(e) or isinstance(e, OutputDirError) or (free is not None and free < needed + 2**20):
        return disk.disk_full(path.parent, "writing it", needed)
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
