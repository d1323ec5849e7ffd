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
    ImagePredictionWriter   predictions.csv (file, predicted class, probability of each class) in the run folder,
                            a printed table, and a TensorBoard image grid of the inputs titled with their predictions
"""

from __future__ import annotations

import csv
import glob
import re
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from handgrad.train.callbacks import tensorboard
from handgrad.data.datamodule import TensorBatches
from handgrad.runtime.errors import ConfigError

EXTENSIONS = (".png", ".jpg", ".jpeg")  # what a folder contributes
SIZE = (32, 32)
SHOWN_ROWS = 20  # rows of the printed table; predictions.csv has them all
GRID_IMAGES = 64  # images in the TensorBoard grid


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


class ImagePredictionWriter(BasePredictionWriter):
    """predictions.csv in the run folder (file, predicted class, p_<class> for each class), the first rows printed,
    and the inputs as an image grid (``predict/images``) in TensorBoard, each titled with its prediction."""

    def __init__(self, files: Sequence[Path]):
        super().__init__(write_interval="batch")
        self.files = list(files)
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.parts = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        self.parts.append((prediction.float().cpu(), batch[1].cpu(), batch[0].cpu()))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.parts:
            return
        probs, index, images = (torch.cat(t) for t in zip(*self.parts))
        names = pl_module.class_names
        files = [str(self.files[i]) for i in index.tolist()]
        predicted = [names[k] for k in probs.argmax(1).tolist()]
        path = Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["file", "predicted_class"] + [f"p_{n}" for n in names])
            out.writerows([file, pred] + [f"{p:.6f}" for p in row] for file, pred, row in
                          zip(files, predicted, probs.tolist()))
        print(table(files, predicted, probs, names))
        print(f"predictions of {len(files)} images written to {path}")
        if (tb := tensorboard(trainer)) is not None:
            tb.add_image("predict/images", prediction_grid(images[:GRID_IMAGES], [
                f"{n} {p:.2f}" for n, p in zip(predicted, probs.max(1).values.tolist())]), 0)


def table(files: list[str], predicted: list[str], probs: Tensor, names: Sequence[str]) -> str:
    """The first SHOWN_ROWS predictions as aligned columns: file, predicted class, probability of each class."""
    head = ["file", "predicted"] + list(names)
    rows = [[f, p] + [f"{v:.4f}" for v in row] for f, p, row in
            zip(files[:SHOWN_ROWS], predicted, probs[:SHOWN_ROWS].tolist())]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    if len(files) > SHOWN_ROWS:
        lines.append(f"... and {len(files) - SHOWN_ROWS} more in predictions.csv")
    return "\n".join(lines)


def prediction_grid(images: Tensor, titles: Sequence[str], scale: int = 3, per_row: int = 8) -> Tensor:
    """The uint8 images (N, 3, 32, 32), each enlarged ``scale`` times (nearest: the model's pixels) with its title
    written under it, in rows of ``per_row``: one RGB uint8 image (3, H, W)."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image

    font = ImageFont.load_default()
    side, text_h, pad = SIZE[0] * scale, 14, 4
    cols, rows = min(per_row, len(images)), -(-len(images) // per_row)
    cell_w = max(side, *(int(font.getlength(t)) + 2 for t in titles)) + pad
    canvas = Image.new("RGB", (cols * cell_w + pad, rows * (side + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, title) in enumerate(zip(images, titles)):
        x0, y0 = pad + (i % per_row) * cell_w, pad + (i // per_row) * (side + text_h + pad)
        canvas.paste(to_pil_image(img).resize((side, side), Image.NEAREST), (x0, y0))
        draw.text((x0, y0 + side + 1), title, fill="black", font=font)
    return pil_to_tensor(canvas)
