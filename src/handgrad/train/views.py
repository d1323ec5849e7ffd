"""What TensorBoard shows, as plain functions on a run's SummaryWriter: one tag scheme, one comparison, pictures.

The main job, `fit` and every sweep member write the same tags, so that their runs line up in one card:

    per epoch     train/loss  train/acc  val/loss  val/acc  ~test/loss  ~test/acc  (and ~val|~test/acc_<class>)
    per step      ~train/loss_step  ~train/grad_norm                              (every log_every_n_steps)
    per epoch     ~lr-SGD                                                         (Lightning's LearningRateMonitor)
    once          ~hp/val_acc_last  ~hp/val_acc_best  ~hp/best_epoch  ~hp/train_acc_last  ~hp/val_loss_last
                  [~hp/selected] (sweep)  [~hp/test_acc] (where a test ran)    (the HPARAMS tab's metrics)

TensorBoard's TIME SERIES groups the tags by their first part, sorts them by name and opens the first two groups:
those are ``train`` and ``val`` holding the four epoch curves alone (its first screen). Every other tag is written
after them with a ``~`` in front (:func:`tensorboard_tag`: ``~`` sorts after every letter), and Lightning's
``epoch`` counter is not written (:class:`TensorBoardRun`, the logger of the main job and of a sweep's members).
In code, and in what ``trainer.test`` returns, the names stay without the ``~`` (``test/acc``, ``val/acc_bird``,
``hp/val_acc_best``); HPARAMS shows its metrics under those names (their display name).

    add_layout(w)              the CUSTOM SCALARS tab: train and val loss on one chart, train and val accuracy on another
    run_hparams(...)           the hyperparameters worth a column in HPARAMS (no paths, no switches of logging)
    final_metrics(...)         a run's hp/* values from its val accuracy of each epoch (last, best, best epoch)
    write_experiment(w, ...)   HPARAMS's columns: the hyperparameters (those that vary shown first) and the metrics
    log_hparams(w, ...)        one run's row in HPARAMS: its hyperparameters, and the metrics it has
    log_confusion_matrix(...)  a confusion matrix as a picture and a Markdown table, under one tag
    confusion_matrix_image     class names on both axes, counts in black on light shades
    labelled_grid              the example images, each row led by its class name

``w`` is a TensorBoardLogger, a ``torch.utils.tensorboard.SummaryWriter`` or (write_experiment) a log folder.
A sweep calls, per member run: ``add_layout(w)`` and ``log_hparams(w, params, metrics)`` with
``params = run_hparams(...)`` and ``metrics = {**final_metrics(...), "hp/selected": 0. or 1.}`` (plus hp/test_acc
for the selected member only); and once, into its first member's run, ``write_experiment(run, {name: the members'
values}, SWEEP_METRICS, SWEEP_SHOWN, constants=False)``: the columns are what varies and lr, in no run of its
own (TensorBoard would show it as an empty run ``.`` at the log root); a member trained by a Lightning Trainer (HandgradClassifier) gets its row
and hp/* from ``callbacks=[HparamsLogger(experiment=False)]`` and a :class:`TensorBoardRun` with
``default_hp_metric=False``, and its hp/selected (hp/test_acc) as plain scalars. The main job and `fit` write the
same through :class:`handgrad.train.callbacks.HparamsLogger`. TensorBoard takes the first experiment it finds under
its --logdir: open a sweep at its own log root.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image, ImageDraw, ImageFont
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from handgrad.runtime.text import markdown_table

# TIME SERIES sorts the tags by name, groups them by their part before the first "/" and opens the first two groups:
# these four curves, alone, so that they are its first screen. Every other tag is written after them: LATER in front
# of its name ("~" sorts after every letter and digit).
CURVES = ("train/loss", "train/acc", "val/loss", "val/acc")
LATER = "~"


def tensorboard_tag(name: str) -> str:
    """The tag TensorBoard gets for a metric or picture ``name``: the epoch curves (:data:`CURVES`) as they are,
    anything else after them (``test/acc`` -> ``~test/acc``, ``val/acc_bird`` -> ``~val/acc_bird``, ``lr-SGD`` ->
    ``~lr-SGD``); a tag already so is kept."""
    return name if name in CURVES or name.startswith(LATER) else LATER + name

# The HPARAMS tab's metrics, in the order of its columns, each with what it means. TensorBoard shows the first five
# by default, and its parallel coordinates draw only the runs that have a value in every shown column: hp/test_acc
# comes sixth, so every run is drawn (a model is chosen by val accuracy; the test set is for the chosen one).
METRICS = {
    "hp/val_acc_last": "val accuracy of the last epoch",
    "hp/val_acc_best": "val accuracy of the best epoch (the checkpoint kept as best)",
    "hp/best_epoch": "the epoch of hp/val_acc_best, counted from 0 (as in the best checkpoint's name)",
    "hp/train_acc_last": "train accuracy of the last epoch (beside hp/val_acc_last: the overfitting gap)",
    "hp/val_loss_last": "val loss of the last epoch",
    "hp/test_acc": "test accuracy of the tested weights, where a test ran: the best checkpoint in the main job "
                   "(python train.py), the selected member in a sweep, --ckpt_path in `test`",
}
SWEEP_METRICS = {"hp/selected": "1 for the member the sweep selected (best val accuracy), else 0", **METRICS}
# The hyperparameters a single run shows first (TensorBoard shows five by default; in a sweep: those that vary).
KEY_HPARAMS = ("lr", "momentum", "weight_decay", "batch_size", "max_epochs")
# The CUSTOM SCALARS tab: one chart per metric, train and val (and the single test point) together.
LAYOUT = {"train vs val": {
    title: ["Multiline", [f"^{re.escape(tensorboard_tag(f'{split}/{stem}'))}$" for split in ("train", "val", "test")]]
    for title, stem in (("loss", "loss"), ("accuracy", "acc"))
}}
# A sweep's HPARAMS columns: the hyperparameters that vary, and these even where they do not.
SWEEP_SHOWN = ("lr",)

Target = Union[TensorBoardLogger, SummaryWriter]
HparamValue = Union[str, float, int, bool]


class TensorBoardRun(TensorBoardLogger):
    """Lightning's TensorBoardLogger writing this tag scheme: each metric under :func:`tensorboard_tag` of its
    name, and without Lightning's ``epoch`` (its logger connector adds the epoch counter to every ``self.log``; the
    steps already place each point, and a TIME SERIES group of its own would open before the curves)."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        metrics = {tensorboard_tag(k): v for k, v in metrics.items() if k != "epoch"}
        if metrics:
            super().log_metrics(metrics, step)


def writer_of(target: Target) -> SummaryWriter:
    return target.experiment if isinstance(target, TensorBoardLogger) else target


def add_summary(target: Target, summary, step: int = 0) -> None:
    """Write a ready Summary proto. SummaryWriter has no public method for it: its own add_hparams and
    add_custom_scalars do this very call (tests/test_tensorboard.py fails if it goes away)."""
    writer_of(target)._get_file_writer().add_summary(summary, step)


def hparams_summary(tag: str, **plugin_data) -> Summary:
    """A Summary holding one message of TensorBoard's hparams plugin (as torch.utils.tensorboard's add_hparams
    writes them; tensorboard's own helpers need TensorFlow)."""
    data = plugin_data_pb2.HParamsPluginData(**plugin_data)
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data))])


def add_layout(target: Target) -> None:
    """The CUSTOM SCALARS tab's charts (:data:`LAYOUT`): once per run; runs with the same layout share it."""
    writer_of(target).add_custom_scalars(LAYOUT)


def run_hparams(model_hparams: Mapping, data_hparams: Mapping, max_epochs: Optional[int]) -> dict:
    """The hyperparameters of a run worth a column in HPARAMS, as TensorBoard takes them (str, float, bool):
    the model's and the data's options and max_epochs, without paths and logging switches; lists as "a-b-c"."""
    skip = {"_instantiator", "data_dir", "download", "num_workers", "pin_memory", "log_histograms_every_n_steps",
            "nan_check_every_n_steps"}
    params = {k: v for k, v in {**data_hparams, **model_hparams}.items() if k not in skip}
    params["max_epochs"] = max_epochs if max_epochs is not None else -1
    if "lr_scheduler" in params:
        params["lr_scheduler"] = scheduler_name(params["lr_scheduler"])
    return {k: hparam_value(v) for k, v in params.items()}


def scheduler_name(scheduler) -> str:
    """"StepLR(step_size=3)" for the CLI's {class_path, init_args} or a functools.partial; "none" for None."""
    if scheduler is None:
        return "none"
    if isinstance(scheduler, Mapping):
        name, args = str(scheduler.get("class_path", "?")).rsplit(".", 1)[-1], scheduler.get("init_args") or {}
    else:
        func = getattr(scheduler, "func", scheduler)
        name, args = getattr(func, "__name__", type(func).__name__), getattr(scheduler, "keywords", {})
    return f"{name}({', '.join(f'{k}={v}' for k, v in args.items())})"


def hparam_value(value) -> HparamValue:
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return "-".join(map(str, value))
    return str(value)


def write_experiment(target: Union[Target, str, Path], hparams: Mapping[str, Sequence[HparamValue]],
                     metrics: Mapping[str, str] = METRICS, shown: Sequence[str] = (), domains: bool = True,
                     constants: bool = True) -> None:
    """HPARAMS's columns: ``hparams`` maps each hyperparameter to the values it takes over the runs, ``metrics``
    each metric's name to its meaning (its tag: :func:`tensorboard_tag`, its display name: the name). TensorBoard
    reads the first such summary it finds under its --logdir, sorts the hyperparameters with ``differs`` set first
    (each part by name), ticks the first five of them and the first five metrics; without one it would guess its
    columns from every scalar. ``differs`` is set where the values differ, and for the names in ``shown`` (a single
    run, where nothing differs; lr in a sweep). ``constants=False``: a hyperparameter with one value over all the
    runs, not in ``shown``, is no column (TensorBoard would tick it where fewer than five differ; each run's row and
    hparams.yaml still hold it). ``domains``: the values given are all there are (a sweep); else (one run among
    others in the same folder) only their type is written, since a domain hides the runs outside it (a value
    unticked, or off the axis). A folder as ``target``: written in a run of its own there."""
    infos = []
    for name, values in hparams.items():
        values = [hparam_value(v) for v in values]
        differs = len(set(values)) > 1
        if not (constants or differs or name in shown):
            continue
        info = api_pb2.HParamInfo(name=name, differs=differs or name in shown)
        if all(isinstance(v, bool) for v in values):
            info.type = api_pb2.DATA_TYPE_BOOL
            if domains:
                info.domain_discrete.extend(sorted(set(values)))
        elif all(isinstance(v, float) for v in values):
            info.type = api_pb2.DATA_TYPE_FLOAT64
            if domains:
                info.domain_interval.min_value, info.domain_interval.max_value = min(values), max(values)
        else:
            info.type = api_pb2.DATA_TYPE_STRING
            if domains:
                info.domain_discrete.extend(sorted({str(v) for v in values}))
        infos.append(info)
    metric_infos = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tensorboard_tag(name)), display_name=name,
                                       description=text) for name, text in metrics.items()]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metric_infos, time_created_secs=time.time())
    summary = hparams_summary(metadata.EXPERIMENT_TAG, experiment=experiment)
    if isinstance(target, (str, Path)):
        with SummaryWriter(str(target)) as writer:
            add_summary(writer, summary)
    else:
        add_summary(target, summary)


def final_metrics(val_acc: Union[Sequence[float], Mapping[int, float]], train_acc_last: Optional[float] = None,
                  val_loss_last: Optional[float] = None, best_score: Optional[float] = None) -> dict:
    """A training run's hp/* values, only those that exist: ``val_acc`` is its val accuracy of each epoch (a list
    from epoch 0, or {epoch: accuracy}); last, best and the best's epoch (the first of equals, as ModelCheckpoint
    keeps). ``best_score``: the best over more epochs than these (a resumed run's ModelCheckpoint), when greater
    the best epoch is unknown."""
    metrics = {"hp/train_acc_last": train_acc_last, "hp/val_loss_last": val_loss_last}
    epochs = dict(val_acc) if isinstance(val_acc, Mapping) else dict(enumerate(val_acc))
    if epochs:
        best_epoch = max(epochs, key=lambda e: (epochs[e], -e))
        metrics.update({"hp/val_acc_last": epochs[max(epochs)], "hp/val_acc_best": epochs[best_epoch],
                        "hp/best_epoch": best_epoch})
        if best_score is not None and best_score > epochs[best_epoch]:
            metrics.update({"hp/val_acc_best": best_score, "hp/best_epoch": None})
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def log_hparams(target: Target, params: Mapping[str, HparamValue], metrics: Mapping[str, float] = {},
                step: int = 0, group: str = "") -> None:
    """One run's row in HPARAMS: its hyperparameters (session start, ended at once as Lightning does) and, as
    scalars at ``step``, those ``metrics`` that exist: a None or NaN is left out (a cell left empty), never logged.
    Metrics known later are logged later as plain scalars of the same tags; a sweep passes all of its at the end."""
    start = plugin_data_pb2.SessionStartInfo(group_name=group, start_time_secs=time.time())
    for name, value in params.items():
        value = hparam_value(value)
        field = "bool_value" if isinstance(value, bool) else "string_value" if isinstance(value, str) else "number_value"
        setattr(start.hparams[name], field, value)
    add_summary(target, hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=start))
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    add_summary(target, hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end))
    writer = writer_of(target)
    for name, value in metrics.items():
        if value is not None and math.isfinite(float(value)):
            writer.add_scalar(tensorboard_tag(name), float(value), step)


def log_confusion_matrix(target: Target, stage: str, cm: Tensor, class_names: Sequence[str], step: int) -> None:
    """The confusion matrix ``cm`` (rows: true class) of ``stage`` (val, test) at ``step``: the picture (IMAGES,
    TIME SERIES) and the Markdown table (TEXT), both under the tag ``tensorboard_tag(f"{stage}/confusion_matrix")``."""
    writer, tag = writer_of(target), tensorboard_tag(f"{stage}/confusion_matrix")
    writer.add_image(tag, confusion_matrix_image(cm, class_names), step)
    writer.add_text(tag, confusion_matrix_markdown(cm, class_names), step)


def confusion_matrix_markdown(cm: Tensor, class_names: Sequence[str]) -> str:
    """The confusion matrix as a Markdown table (rows: true class, columns: predicted)."""
    return markdown_table(["true \\ predicted", *class_names],
                          ([name, *(int(v) for v in row)] for name, row in zip(class_names, cm.cpu().tolist())))


# ---------------------------------------------------------------------------------------------------- pictures

def font(size: int):
    """A TrueType font at ``size`` px: Pillow's bundled one (Pillow >= 10.1), so text stays sharp at any size."""
    return ImageFont.load_default(size=size)


def confusion_matrix_image(cm: Tensor, class_names: Sequence[str]) -> Tensor:
    """The confusion matrix as an RGB uint8 image (3, H, W), at least 400 px wide: rows are the true class and
    columns the predicted one, both named; each cell holds its count (black) and its share of the row, shaded from
    white to light blue by that share."""
    cm = cm.cpu().long()
    k = cm.shape[0]
    share = cm.double() / cm.sum(1, keepdim=True).clamp_min(1)
    big, small = font(20), font(15)
    name_w = max(int(small.getlength(n)) for n in class_names)
    cell = max(name_w + 12, 340 // k, 64)
    left, top = name_w + 44, 62
    img = Image.new("RGB", (max(400, left + k * cell + 12), top + k * cell + 12), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left + k * cell / 2, 6), "predicted", fill="black", font=small, anchor="mt")
    draw.text((8, top + k * cell / 2), "true", fill="black", font=small, anchor="lm")
    for i, name in enumerate(class_names):
        draw.text((left + i * cell + cell / 2, top - 8), name, fill="black", font=small, anchor="mb")
        draw.text((left - 8, top + i * cell + cell / 2), name, fill="black", font=small, anchor="rm")
        for j in range(k):
            s = float(share[i, j])
            color = (int(255 - 120 * s), int(255 - 80 * s), 255)  # white -> light blue (140, 175, 255): black reads
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=color, outline=(150, 150, 150))
            draw.text((x0 + cell / 2, y0 + cell / 2), str(int(cm[i, j])), fill="black", font=big, anchor="mb")
            draw.text((x0 + cell / 2, y0 + cell / 2 + 4), f"{100 * s:.1f}%", fill=(60, 60, 60), font=small, anchor="mt")
    return pil_to_tensor(img)


def labelled_grid(grid: Tensor, class_names: Sequence[str], scale: int = 2, padding: int = 2) -> Tensor:
    """The example grid (3, H, W) uint8, one row of images per class (torchvision's make_grid with ``padding``),
    enlarged ``scale`` times (each pixel a block: no blur) behind a column holding each row's class name."""
    image = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    f = font(20)  # (TensorBoard's cards show the image about 0.6 times its size)
    left = max(int(f.getlength(n)) for n in class_names) + 16
    row = (grid.shape[1] - padding) / len(class_names) * scale  # a row: padding, then the images
    img = Image.new("RGB", (left + image.shape[2], image.shape[1]), "white")
    img.paste(to_pil_image(image), (left, 0))
    draw = ImageDraw.Draw(img)
    for k, name in enumerate(class_names):
        draw.text((left - 8, k * row + (row + padding * scale) / 2), name, fill="black", font=f, anchor="rm")
    return pil_to_tensor(img)
