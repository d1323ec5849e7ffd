"""CIFAR-10 (any subset of classes) as a LightningDataModule whose batches are slices of one normalized tensor.

    dm = CIFAR10DataModule("data", classes=("airplane", "bird"))   # the reference experiment: 8000/2000/2000
    dm.prepare_data(); dm.setup()
    x, y = next(iter(dm.train_dataloader()))                         # (256, 3, 32, 32) float32, (256,) int64

Extracting and downloading live in :mod:`handgrad.data.cifar_fetch`, reading and caching in
:mod:`handgrad.data.cifar_io`, the statistics and their formula in :mod:`handgrad.data.normalization`; this file is
the data pipeline: labels -> split -> statistics -> normalization -> batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchvision.utils import make_grid

from handgrad.data import cifar_fetch, cifar_io
from handgrad.data.cifar_io import CIFAR10_CLASSES, BadDataError, DataNotFoundError
from handgrad.data.normalization import channel_stats, normalize
from handgrad.runtime.errors import ConfigError
from handgrad.runtime.text import markdown_table

__all__ = ["CIFAR10DataModule", "TensorBatches", "stratified_split", "CIFAR10_CLASSES"]

PRECISION_DTYPES = {"64-true": torch.float64, "64": torch.float64, "16-true": torch.float16,
                    "bf16-true": torch.bfloat16}
SAMPLES_PER_CLASS = 8  # images per class in the logged example grid


def stratified_split(y: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx): a seeded permutation of range(N); in permutation order, the first
    n_val_c = round(val_fraction * n_c) images of each class c go to val, the rest to train.

    Same seed, same split on any machine (CPU generator); both index lists stay in permutation order, so an
    unshuffled epoch still mixes the classes. Stratified: every class is split exactly 80/20 (for 0.2).
    """
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    y_perm = y[perm]
    onehot = F.one_hot(y_perm, int(y.max()) + 1)  # (N, k)
    rank_in_class = (onehot.cumsum(0) - 1).gather(1, y_perm[:, None]).squeeze(1)  # 0, 1, 2, ... within each class
    n_c = onehot.sum(0)
    n_val_c = torch.round(val_fraction * n_c.double()).long()
    if bool(((n_val_c == 0) | (n_val_c == n_c)).any()):
        raise ConfigError(f"--data.val_fraction {val_fraction} leaves a class without train or val images "
                          f"(training images per class: {n_c.tolist()}); use a val_fraction nearer 0.5 or more data.")
    is_val = rank_in_class < n_val_c[y_perm]
    return perm[~is_val], perm[is_val]


class TensorBatches:
    """A dataloader without a DataLoader: batches are slices x[i:j], y[i:j] of tensors that already live on the
    training device, so there is no per-sample Python, no collate and no host-to-device copy per batch.

    Epoch order: 0..N-1, or with shuffle a permutation drawn on the data's device from a torch.Generator seeded
    with seed * 1_000_003 + epoch (reproducible per device type; CPU and CUDA orders differ). Lightning calls
    `dataloader.sampler.set_epoch(epoch)` at every epoch start (as for a DistributedSampler), so `sampler` is self.

    With world_size W > 1 and batch size B, global batch i is positions [i*W*B, (i+1)*W*B) of the epoch order
    and rank r gets its r-th chunk of B; the last, partial global batch is split into W contiguous parts like
    torch.tensor_split. Every rank has the same len() = ceil(N / (W*B)) (a rank's last batch is empty when
    fewer than W samples remain).

    state_dict/load_state_dict make a resume from a mid-epoch checkpoint continue with the next batch.
    """

    batch_sampler = None  # for Lightning's sampler inspection

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0,
                 world_size: int = 1, rank: int = 0):
        assert len(x) == len(y) and batch_size >= 1 and 0 <= rank < world_size
        self.x, self.y, self.batch_size, self.shuffle, self.seed = x, y, batch_size, shuffle, seed
        self.world_size, self.rank = world_size, rank
        self.epoch, self.consumed, self._resume = 0, 0, None

    @property
    def sampler(self) -> TensorBatches:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.x) / (self.world_size * self.batch_size))

    def bounds(self) -> list[tuple[int, int]]:
        """(start, end) positions in the epoch order of this rank's batches."""
        n, b, w, r = len(self.x), self.batch_size, self.world_size, self.rank
        out = []
        for start in range(0, n, w * b):
            if start + w * b <= n:
                out.append((start + r * b, start + (r + 1) * b))
            else:  # last partial global batch: sizes q+1 for the first m ranks, q for the others (tensor_split)
                q, m = divmod(n - start, w)
                s = start + r * q + min(r, m)
                out.append((s, s + q + (r < m)))
        return out

    def order(self) -> torch.Tensor | None:
        """This epoch's permutation of the samples (None: natural order)."""
        if not self.shuffle:
            return None
        g = torch.Generator(device=self.x.device).manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.x), generator=g, device=self.x.device)

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            if self._resume["epoch"] == self.epoch:
                skip = self._resume["consumed"]
            self._resume = None
        order = self.order()
        for i, (s, e) in enumerate(self.bounds()):
            if i < skip:
                continue
            self.consumed = i + 1
            if order is None:
                yield self.x[s:e], self.y[s:e]
            else:
                idx = order[s:e]
                yield self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 restricted to `classes` (labels 0..k-1 in that order), training images split train/val by a
    seeded stratified permutation, official test images as test; normalized once with train-split statistics.

    Args:
        data_dir: folder (not an archive file) with cifar-10-batches-py/, cifar-10-python.tar.gz, an image-folder
            tree train/<class>/, test/<class>/ (here or one folder down), or a .tar.* of such a tree.
        classes: CIFAR-10 class names, at least 2 (the default is the reference airplane-vs-bird task).
        val_fraction: fraction of each class's training images that goes to val, in (0, 1).
        split_seed: seed of the train/val split, and of the per-epoch shuffle.
        batch_size: samples per batch (per process under DDP).
        shuffle: reshuffle the training split every epoch (reproducible from split_seed and the epoch).
        download: fetch the official archive with torchvision when data_dir holds no data (creating data_dir if
            needed; a failed download leaves no folder behind).
        num_workers: threads used to decode image files (0: decode in the main thread). Batches need no workers.
        pin_memory: pin the tensors in host memory when they stay on the CPU while CUDA is available.

    Val and test are not sharded under DDP: every rank evaluates all of them (identical values on all ranks).
    """

    dims = (3, 32, 32)  # the shape of one image (C, H, W): the model's input size is their product, 3072
    SPLIT_OPTIONS = ("classes", "val_fraction", "split_seed")  # they fix which images are train, val and test
    BATCH_OPTIONS = SPLIT_OPTIONS + ("batch_size", "shuffle")  # and these, every training batch (what a resume keeps)

    def __init__(self, data_dir: str = "data", classes: Sequence[str] = ("airplane", "bird"),
                 val_fraction: float = 0.2, split_seed: int = 265, batch_size: int = 256, shuffle: bool = False,
                 download: bool = True, num_workers: int = 0, pin_memory: bool = False):
        super().__init__()
        classes = [classes] if isinstance(classes, str) else list(classes)
        if unknown := [c for c in classes if c not in CIFAR10_CLASSES]:
            raise ValueError(f"unknown class name(s) {unknown}; choose from {list(CIFAR10_CLASSES)}, "
                             f"e.g. --data.classes '[airplane, bird]'.")
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes {classes} lists a class twice; give each class once.")
        if len(classes) < 2:
            raise ValueError(f"classes={classes}: a classifier needs at least 2 classes, e.g. ['airplane', 'bird'].")
        if not 0 < val_fraction < 1:
            raise ValueError(f"--data.val_fraction={val_fraction} must be in (0, 1), e.g. 0.2 for an 80/20 train/val "
                             f"split.")
        if batch_size < 1:
            raise ValueError(f"--data.batch_size must be >= 1 (samples per batch, per process), got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"--data.num_workers must be >= 0 (0: decode in the main thread), got {num_workers}.")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        self.class_names = classes
        self.num_classes = len(classes)
        self.mean = self.std = None  # the training split's per-channel statistics (float64)
        self._given_statistics = None  # (mean, std) from use_statistics(): a checkpoint's, not recomputed
        self.train_x = self.train_y = self.val_x = self.val_y = self.test_x = self.test_y = None
        self.train_idx = self.val_idx = None
        self.class_counts: dict[str, list[int]] = {}
        self.sample_grid = None  # uint8 (3, H, W): SAMPLES_PER_CLASS training images per class, one row each

    def use_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Normalize with these per-channel statistics (a trained model's ``input_mean``/``input_std``) instead of
        recomputing them from the training split: an evaluation then sees exactly the inputs the model was trained
        on, whatever the data options. Call it before :meth:`setup`."""
        if self.train_x is not None:
            raise RuntimeError("use_statistics() must be called before setup()")
        self._given_statistics = (torch.as_tensor(mean).detach().cpu(), torch.as_tensor(std).detach().cpu())

    def prepare_data(self) -> None:
        cifar_fetch.prepare(self.data_dir, self.hparams.download)

    def _target(self) -> tuple[torch.device, torch.dtype]:
        """Where and in which dtype the batches must be: the trainer's root device (if CUDA) and precision."""
        if self.trainer is None:
            return torch.device("cpu"), torch.float32
        device = self.trainer.strategy.root_device
        device = device if device.type == "cuda" else torch.device("cpu")
        return device, PRECISION_DTYPES.get(str(self.trainer.precision), torch.float32)

    def setup(self, stage: str | None = None) -> None:
        device, dtype = self._target()
        if self.train_x is not None and self.train_x.device == device and self.train_x.dtype == dtype:
            return
        cifar_io.check_folder(self.data_dir)
        source = cifar_io.find_source(self.data_dir)
        if source is None:
            raise DataNotFoundError(f"{cifar_io.no_data(self.data_dir)}. prepare_data() (the Trainer calls it) extracts "
                                    f"a local archive or downloads. " + cifar_io.how_to_supply(self.data_dir))
        class_ids = [CIFAR10_CLASSES.index(c) for c in self.class_names]
        raw = cifar_io.load_uint8(self.data_dir, source, class_ids, self.hparams.num_workers)

        to_label = torch.full((len(CIFAR10_CLASSES),), -1, dtype=torch.int64)  # CIFAR-10 label -> position in classes
        to_label[class_ids] = torch.arange(self.num_classes)
        train_y, test_y = to_label[raw["train_y"]], to_label[raw["test_y"]]
        for split, y in (("training", train_y), ("test", test_y)):
            if missing := [c for k, c in enumerate(self.class_names) if not (y == k).any()]:
                raise BadDataError(f"{source.root} has no {split} images of class(es) {missing}; "
                                   f"supply them or drop them from --data.classes.")
        self.train_idx, self.val_idx = stratified_split(train_y, self.hparams.val_fraction, self.hparams.split_seed)

        x_all, x_test = raw["train_x"].to(device), raw["test_x"].to(device)
        x_train, x_val = x_all[self.train_idx.to(device)], x_all[self.val_idx.to(device)]
        # a model stores these (HandgradClassifier.input_mean, float64): normalizing with them gives these batches
        mean, std = self._given_statistics or channel_stats(x_train)
        self.mean, self.std = mean.to("cpu", torch.float64), std.to("cpu", torch.float64)
        self.train_x = normalize(x_train, self.mean, self.std, dtype)
        self.val_x = normalize(x_val, self.mean, self.std, dtype)
        self.test_x = normalize(x_test, self.mean, self.std, dtype)
        self.train_y, self.val_y, self.test_y = (t.to(device) for t in (train_y[self.train_idx],
                                                                        train_y[self.val_idx], test_y))
        if device.type == "cpu" and self.hparams.pin_memory and torch.cuda.is_available():
            for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
                setattr(self, name, getattr(self, name).pin_memory())

        self.class_counts = {split: torch.bincount(y, minlength=self.num_classes).tolist()
                             for split, y in (("train", self.train_y), ("val", self.val_y), ("test", self.test_y))}
        self.sample_grid = self._make_grid(x_train, self.train_y).cpu()
        if self.trainer is not None:  # in a run: say what it trains on
            rank_zero_info(f"CIFAR-10 {self.class_names} from {self.data_dir}, images per class:\n"
                           f"{self.class_counts_table()}")

    def class_counts_table(self) -> str:
        """The images per class and split, as a Markdown table (printed at setup, and in TensorBoard's Text)."""
        return markdown_table(["split", *self.class_names, "total"],
                              ([s, *c, sum(c)] for s, c in self.class_counts.items()))

    def _make_grid(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = []
        for k in range(self.num_classes):
            row = x[(y == k).nonzero()[:SAMPLES_PER_CLASS, 0]]
            rows.append(torch.cat([row, row.new_zeros(SAMPLES_PER_CLASS - len(row), 3, 32, 32)]))
        return make_grid(torch.cat(rows), nrow=SAMPLES_PER_CLASS, padding=2)

    def _batches(self, x, y, train: bool) -> TensorBatches:
        if x is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        if not train:
            return TensorBatches(x, y, self.hparams.batch_size)
        w, r = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        return TensorBatches(x, y, self.hparams.batch_size, self.hparams.shuffle, self.hparams.split_seed, w, r)

    def train_dataloader(self) -> TensorBatches:
        return self._batches(self.train_x, self.train_y, train=True)

    def val_dataloader(self) -> TensorBatches:
        return self._batches(self.val_x, self.val_y, train=False)

    def test_dataloader(self) -> TensorBatches:
        return self._batches(self.test_x, self.test_y, train=False)

    def predict_dataloader(self) -> TensorBatches:
        return self._batches(self.test_x, self.test_y, train=False)
