"""What `predict` writes: predictions.csv in the run folder, a printed table, and (own images) a TensorBoard grid.

    PredictionWriter        the test split: index, predicted class, true class, probability of each class
    ImagePredictionWriter   ``--predict.images``: file, predicted class, probability of each class; the inputs as an
                            image grid (``~predict/images``) titled with their predictions
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from handgrad.data.images import SIZE
from handgrad.train.callbacks import tensorboard
from handgrad.train.views import tensorboard_tag

SHOWN_ROWS = 20  # rows of the printed table; predictions.csv has them all
GRID_IMAGES = 64  # images in the TensorBoard grid


class PredictionWriter(BasePredictionWriter):
    """`predict` writes predictions.csv into the run's log folder: per image of the predict set (the test images,
    in their order) its index, the predicted class, where the data has labels the true class, and the probability
    of each class (p_<class>, :meth:`HandgradClassifier.classify`); and prints where it is and the accuracy."""

    def __init__(self):
        super().__init__(write_interval="batch")
        self.rows: list[tuple[Tensor, Optional[Tensor]]] = []

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        self.rows.append((prediction.float().cpu(), None if target is None else target.cpu()))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.rows:
            return
        names = pl_module.class_names
        probs = torch.cat([p for p, _ in self.rows])
        pred = probs.argmax(1)
        target = torch.cat([t for _, t in self.rows]) if all(t is not None for _, t in self.rows) else None
        path = Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["index", "predicted", "predicted_class"] + (["target", "target_class"] if target is not None
                                                                        else []) + [f"p_{n}" for n in names])
            for i, p in enumerate(pred.tolist()):
                row = [i, p, names[p]]
                if target is not None:
                    row += [int(target[i]), names[int(target[i])]]
                out.writerow(row + [f"{v:.6f}" for v in probs[i].tolist()])
        accuracy = f", accuracy {(pred == target).double().mean():.4f} against the labels" if target is not None else ""
        print(f"predictions of {len(pred)} images written to {path}{accuracy}")


class ImagePredictionWriter(BasePredictionWriter):
    """predictions.csv in the run folder (file, predicted class, p_<class> for each class), the first rows printed,
    and the inputs as an image grid (``~predict/images``) in TensorBoard, each titled with its prediction."""

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
            tb.add_image(tensorboard_tag("predict/images"), prediction_grid(images[:GRID_IMAGES], [
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
