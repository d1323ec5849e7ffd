"""Shared test fixtures: small generated CIFAR-like data, and the real JPEG archive when it is there."""

from __future__ import annotations

import io
import pathlib
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
REPO = pathlib.Path(__file__).resolve().parents[1]
REAL_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


def write_image_folder(root: pathlib.Path, per_class_train: int = 20, per_class_test: int = 6,
                       classes=CIFAR10_CLASSES, seed: int = 0) -> dict:
    """Write ``root/{train,test}/<class>/NNNN.png`` with random 32x32 RGB images (lossless PNG).

    The class shifts the mean brightness so that a model can learn something. Returns
    ``{split: (uint8 images (N, 3, 32, 32), class names list)}`` in the order the files were written
    (sorted by class, then file name).
    """
    g = torch.Generator().manual_seed(seed)
    written = {}
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        imgs, names = [], []
        for k, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.int64)
                img = ((img + 20 * k) % 256).to(torch.uint8)
                save_image(img, d / f"{i:04d}.png")
                imgs.append(img)
                names.append(c)
        written[split] = (torch.stack(imgs), names)
    return written


def save_image(img: torch.Tensor, path, **options) -> None:
    """Write uint8 (3, H, W) pixels with Pillow, in the format of the file name (PNG, JPEG: ``options`` such as
    quality)."""
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path, **options)


def png_pixels(data: bytes) -> torch.Tensor:
    """An encoded PNG's pixels as uint8 (C, H, W), its channels as stored (Pillow)."""
    a = np.array(Image.open(io.BytesIO(data)))
    return torch.from_numpy(a if a.ndim == 3 else a[:, :, None]).permute(2, 0, 1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with that reason, where no CUDA device is (``pytest -m cuda`` selects
    them: bench/gpu_check.sh runs them first on a GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="cuda: needs a CUDA device (bench/gpu_check.sh runs it on a GPU)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def image_folder(tmp_path):
    """A generated CIFAR-10-like image-folder tree (10 classes, 20 train + 6 test images each)."""
    root = tmp_path / "cifar"
    written = write_image_folder(root)
    return root, written


@pytest.fixture(scope="session")
def real_cifar(tmp_path_factory):
    """The real CIFAR-10 JPEGs from ../shared/data, extracted once per session; skips when absent."""
    if not REAL_ARCHIVE.exists():
        pytest.skip(f"real CIFAR-10 archive not found at {REAL_ARCHIVE}")
    d = tmp_path_factory.mktemp("real_cifar")
    with tarfile.open(REAL_ARCHIVE) as tar:
        tar.extractall(d, filter="data")
    return d / "cifar10-jpeg"
