"""Predict on your own images: ``python train.py predict --ckpt_path X --predict.images PATH``.

    select_images(spec)     PATH: a file, a folder (its .png/.jpg/.jpeg files, subfolders included, sorted) or a
                            glob pattern (``'photos/*.jpg'``, ``'photos/**/*.png'``)
    read_image(path)        one image as the model takes it: torchvision.io.decode_image in RGB (grayscale and
                            alpha are converted, EXIF orientation applied), then resized to 32x32 with
                            torchvision.transforms.v2.functional.resize (bilinear, antialias): the whole picture,
                            squeezed, its aspect ratio not kept
    read_images(paths)      uint8 (N, 3, 32, 32) of those that can be read; the others with the reason
    ImageFiles              a LightningDataModule whose predict batches are these raw images (no CIFAR-10 needed:
                            the model normalizes them with its stored statistics, HandgradClassifier.predict_step)
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch import Tensor

from handgrad.data.datamodule import TensorBatches
from handgrad.runtime.errors import ConfigError

EXTENSIONS = (".png", ".jpg", ".jpeg")  # what a folder contributes
SIZE = (32, 32)


def select_images(spec: str) -> list[Path]:
    """The files ``spec`` names: itself, a folder's PNG/JPEG files, or a glob's matches. Raises ConfigError
    when it names none."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
                       and not p.name.startswith("."))
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        what = f"folder {spec} holds no {'/'.join(EXTENSIONS)} files" if path.is_dir() else \
            f"{spec} is no file, folder or glob pattern that matches a file"
        raise ConfigError(f"--predict.images: {what}; give a PNG/JPEG file, a folder of them or a pattern such "
                          f"as 'photos/*.jpg'")
    return files


def read_image(path) -> Tensor:
    """The image at ``path`` as uint8 RGB (3, 32, 32): decoded with torchvision, resized (bilinear, antialias,
    aspect ratio not kept)."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import resize, to_dtype

    img = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = to_dtype(img, torch.uint8, scale=True)
    return resize(img, list(SIZE), antialias=True)


def read_images(paths: Sequence[Path]) -> tuple[Tensor, list[Path], list[tuple[Path, str]]]:
    """(uint8 images (N, 3, 32, 32), their files, [(unreadable file, why)])."""
    images, kept, skipped = [], [], []
    for p in paths:
        try:
            images.append(read_image(p))
            kept.append(p)
        except (RuntimeError, OSError, ValueError) as err:  # torchvision's decoders raise RuntimeError
            why = (str(err).strip().splitlines() or [type(err).__name__])[0]
            skipped.append((p, re.sub(r"^.*?\.(cpp|h):\d+, *", "", why)))  # (torchvision's source location)
    x = torch.stack(images) if images else torch.empty(0, 3, *SIZE, dtype=torch.uint8)
    return x, kept, skipped


def load(spec: str) -> tuple[Tensor, list[Path]]:
    """Select and read the images of ``--predict.images``; list the unreadable ones (skipped). Raises
    ConfigError when none is left."""
    x, files, skipped = read_images(select_images(spec))
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s) of --predict.images:")
        for p, why in skipped:
            print(f"  {p}: {why}")
    if not files:
        raise ConfigError(f"--predict.images {spec}: none of its {len(skipped)} file(s) could be read as an image")
    return x, files


class ImageFiles(L.LightningDataModule):
    """Raw uint8 images as the predict set: batches (images, index); the model normalizes them."""

    dims = (3, *SIZE)

    def __init__(self, images: Tensor, files: Sequence[Path], class_names: Sequence[str], batch_size: int = 256):
        super().__init__()
        self.images, self.files, self.class_names, self.batch_size = images, list(files), list(class_names), batch_size

    def predict_dataloader(self) -> TensorBatches:
        return TensorBatches(self.images, torch.arange(len(self.images)), self.batch_size)
