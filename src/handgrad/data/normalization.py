"""Normalization: the training split's per-channel statistics, the formula that applies them, and the input contract
a trained model carries so that it can be used without its training data.

    mean_c, std_c           of the training split only (:func:`channel_stats`), float64, exact
    x_hat_nchw = (x_nchw - 255 mean_c) / (255 std_c)        (:func:`normalize`, for uint8 images)

The contract:

    input_mean, input_std   buffers (3,): the per-channel mean and std of the training split, set when fit starts
    hparams.class_names     the name of each output

Both are in every checkpoint (buffers are in the state dict, hparams in ``hyper_parameters``), so a checkpoint
alone classifies a raw image:

    x_hat_nchw = (x_nchw - 255 mean_c) / (255 std_c)        (normalize)
    p_nk       = exp(a^L_nk) / Σ_j exp(a^L_nj)              (softmax of the outputs of forward(x_hat))

The statistics are float64, as the data module computes them (exactly, from the pixel histogram) and normalizes
with them: an evaluation from the checkpoint normalizes bitwise as training did, in float32 as in float64. (float32
statistics would round them, and the training images would have to be normalized with the rounded values.) They
keep float64 when the weights become bfloat16 or float16 (``*-true`` precisions); on a device without float64
(Apple's MPS) they are float32. Until fit sets them they are 0 (a std of 0 cannot normalize: "unknown").
"""

from __future__ import annotations

import torch
from torch import Tensor

from handgrad.runtime.errors import CheckpointError, ConfigError

STATISTICS = ("input_mean", "input_std")  # buffers of shape (3,): one value per channel


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of uint8 images x (N, 3, H, W) scaled to [0, 1]:

        mean_c = 1/(NHW) sum_{n,h,w} x_nchw / 255,    std_c = sqrt(1/(NHW) sum_{n,h,w} (x_nchw / 255 - mean_c)^2)

    computed exactly from the 256-bin histogram of each channel (float64), so memory stays O(1).
    """
    v = torch.arange(256, dtype=torch.float64, device=x.device) / 255
    p = torch.stack([torch.bincount(x[:, c].flatten(), minlength=256) for c in range(3)]).double()
    p = p / p.sum(1, keepdim=True)
    mean = (p * v).sum(1)
    std = (p * (v - mean[:, None]) ** 2).sum(1).sqrt()
    return mean, std


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """x_hat_nchw = (x_nchw / 255 - mean_c) / std_c = (x_nchw - 255 mean_c) / (255 std_c)  for uint8 x.

    Computed in float32 (float64 when that is the target), then cast to `dtype`; 255 mean_c and 255 std_c are
    computed in float64 and rounded once (the statistics a model stores give the data module's batches bitwise).
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    shift = (255 * mean.double()).to(x.device, work).view(1, 3, 1, 1)
    scale = (255 * std.double()).to(x.device, work).view(1, 3, 1, 1)
    return x.to(work).sub_(shift).div_(scale).to(dtype)


class InputContract:
    """Mixed into :class:`handgrad.train.module.HandgradClassifier` (which has ``mlp``, ``hparams.class_names`` and
    ``class_names``, the names used for logging)."""

    def register_input_statistics(self) -> None:
        for name in STATISTICS:
            # 0: unknown (not NaN: state dicts stay comparable)
            self.register_buffer(name, torch.zeros(3, dtype=torch.float64))

    def has_input_statistics(self) -> bool:
        """Whether the model holds the statistics of its training split (a std > 0 in every channel)."""
        return bool((self.input_std > 0).all() and torch.isfinite(self.input_std).all()
                    and torch.isfinite(self.input_mean).all())

    def take_input_contract(self, datamodule, stage: str) -> None:
        """When fit starts, store the data's class names and training-split statistics (``datamodule.mean``,
        ``.std``) in the model; at any stage refuse data of another class set than the model's, or (once the model
        has statistics) data normalized with other statistics than its own."""
        names = getattr(datamodule, "class_names", None)
        names = None if names is None else [str(n) for n in names]
        own = self.hparams.class_names
        if names is not None and own is not None and names != list(own):
            raise ConfigError(f"the model was trained on the classes {list(own)}, the data selects {names}; pass "
                              f"--data.classes '{list(own)}' (or leave --data.classes out: it is taken from the "
                              f"checkpoint)")
        if names is not None:
            self.class_names = names
            if stage == "fit":
                self.hparams.class_names = names
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if mean is None or std is None:
            return
        if stage == "fit" or not self.has_input_statistics():
            self.input_mean.copy_(mean)
            self.input_std.copy_(std)
        elif not (torch.equal(mean.to(self.input_mean), self.input_mean)
                  and torch.equal(std.to(self.input_std), self.input_std)):
            raise ConfigError(f"the data is normalized with other statistics (mean {mean.tolist()}, std "
                              f"{std.tolist()}) than the model was trained with (mean {self.input_mean.tolist()}, std "
                              f"{self.input_std.tolist()}); call datamodule.use_statistics(model.input_mean, "
                              f"model.input_std) before its setup")

    def _apply(self, fn, recurse: bool = True):
        """The statistics keep their float64 (exact) whatever dtype ``.to()``, ``.half()`` or a precision plugin gives
        the weights; only their device follows (as float32 on Apple's MPS, which has no float64). nn.Module's
        ``_apply`` is private, but every such call goes through it; tests/test_precision.py fails if it does not."""
        kept = [getattr(self, name) for name in STATISTICS]
        super()._apply(fn, recurse)
        device = next(self.parameters()).device
        for name, value in zip(STATISTICS, kept):
            setattr(self, name, value.to(device, torch.float32 if device.type == "mps" else value.dtype))
        return self

    def normalize_input(self, images: Tensor) -> Tensor:
        """uint8 images (N, 3, 32, 32) normalized with the stored statistics, in the dtype of the model's weights."""
        if not self.has_input_statistics():
            raise CheckpointError("this model holds no input statistics (it is untrained): train it, or copy the "
                                  "training data's into it: "
                                  "dm = CIFAR10DataModule(...); dm.setup(); model.input_mean.copy_(dm.mean); "
                                  "model.input_std.copy_(dm.std)")
        weight = self.mlp.fc["1"].weight
        return normalize(images.to(weight.device), self.input_mean, self.input_std, weight.dtype)

    def probabilities(self, x: Tensor) -> Tensor:
        """p_nk = exp(a^L_nk) / Σ_j exp(a^L_nj): the softmax of the outputs of normalized images x (N, k)."""
        return torch.softmax(self.mlp(x), dim=1)

    @torch.no_grad()
    def classify(self, images: Tensor) -> tuple:
        """Classify raw images: uint8 RGB (N, 3, 32, 32), or one image (3, 32, 32), values 0..255 (read and resize
        any PNG/JPEG with :func:`handgrad.data.images.read_image`).

        Returns ``(names, probabilities (N, k))`` for a batch, ``(name, probabilities (k,))`` for one image: the
        most probable class's name and the softmax of the outputs; column k is ``class_names[k]``. The images
        are normalized with the stored statistics and passed through :meth:`forward`. For a model trained with
        ``loss="mse"`` the softmax is taken all the same: it ranks the classes as the outputs do and sums to 1, but
        those outputs were fitted to one-hot targets, not trained as log-probabilities: read it as a score, not a
        calibrated probability."""
        single = images.dim() == 3
        batch = images[None] if single else images
        if batch.dtype != torch.uint8 or batch.dim() != 4 or tuple(batch.shape[1:]) != (3, 32, 32):
            raise ValueError(f"classify() takes uint8 images (N, 3, 32, 32) or (3, 32, 32), got {images.dtype} "
                             f"{tuple(images.shape)}; read and resize a file with handgrad.data.images.read_image")
        p = self.probabilities(self.normalize_input(batch))
        names = [self.class_names[k] for k in p.argmax(1).tolist()]
        return (names[0], p[0]) if single else (names, p)
