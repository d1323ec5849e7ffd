"""The benchmark's runs (bench/bench.py prints their table): the same members trained by plain PyTorch, by handgrad's
hand-written step alone, through a Lightning Trainer one by one, and as one batched grid; the start-up; and the rate
of the reference step's matrix products in each dtype (the floor a training step cannot beat).

A precision is one of PRECISIONS: ``32-true`` (float32), ``tf32`` (float32 with TF32 matrix products, CUDA),
``bf16-mixed`` and ``16-mixed`` (the products in bfloat16 / float16: torch.autocast for plain PyTorch, handgrad's
compute dtype for its own runs; 16-mixed with a loss scaler: torch.amp.GradScaler for plain PyTorch, handgrad's
LossScaler for the raw step and Lightning's plugin for the Trainer runs), ``64-true`` (float64 data).
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from baseline import sync, timed_epochs, train_plain
from handgrad.core import losses
from handgrad.core.backprop import backward
from handgrad.core.loss_scale import LossScaler
from handgrad.core.mlp import MLP
from handgrad.core.optim import SGD
from handgrad.data.datamodule import CIFAR10DataModule, TensorBatches
from handgrad.sweep.module import GridClassifier
from handgrad.train.module import HandgradClassifier

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SIZES = [3072, 512, 128, 32, 2]
SEED = 265
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
PRECISIONS = ("32-true", "tf32", "bf16-mixed", "16-mixed", "64-true")
LOW = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def lightning_precision(precision: str) -> str:
    return "32-true" if precision == "tf32" else precision


@contextlib.contextmanager
def matmul_precision(precision: str):
    """TF32 matrix products for the ``tf32`` runs only (torch.set_float32_matmul_precision), full float32 else."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def part_name(part: str, precision: str) -> str:
    """"plain", "trainer", "grid[none]", ... for 32-true and 64-true; "plain@bf16-mixed", ... for the others."""
    return part if precision in ("32-true", "64-true") else f"{part}@{precision}"


class DeviceData(L.LightningDataModule):
    """The benchmark's tensors, already on the device, as the CIFAR10DataModule serves them (TensorBatches)."""

    dims = (3, 32, 32)

    def __init__(self, train_x, train_y, val_x, val_y, batch_size: int, class_names):
        super().__init__()
        self.train_x, self.train_y, self.val_x, self.val_y = train_x, train_y, val_x, val_y
        self.batch_size, self.class_names = batch_size, list(class_names)

    def train_dataloader(self):
        return TensorBatches(self.train_x, self.train_y, self.batch_size)

    def val_dataloader(self):
        return TensorBatches(self.val_x, self.val_y, self.batch_size)


def extracted(archive: Path) -> Path:
    """The archive extracted once into <tmp>/handgrad_bench/<name>/ (kept: later runs find the data and its
    decoded-image cache there, as a user's data folder would be)."""
    root = Path(tempfile.gettempdir()) / "handgrad_bench" / archive.name.split(".")[0]
    done = root / ".extracted"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        print(f"extracting {archive} to {root} (once)", file=sys.stderr)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        done.touch()
    return root


def load_data(spec: str, device: torch.device, dtype: torch.dtype, batch_size: int):
    """(DeviceData, data folder or None): airplane vs bird through CIFAR10DataModule (8000 train / 2000 val), or
    generated tensors of the same shapes (a class-dependent mean, so that there is something to learn)."""
    if spec == "synthetic":
        g = torch.Generator().manual_seed(0)
        center = torch.randn(2, 3072, generator=g) * 0.3  # learned, not at once (no momentum: ~0.6 after 1 epoch)
        split = {}
        for name, n in (("train", 8000), ("val", 2000)):
            y = torch.arange(n) % 2
            x = center[y] + torch.randn(n, 3072, generator=g)
            split[name] = (x.view(n, 3, 32, 32).to(device, dtype), y.to(device))
        return DeviceData(*split["train"], *split["val"], batch_size, ["a", "b"]), None
    path = Path(spec).expanduser()
    data_dir = extracted(path) if path.is_file() else path
    dm = CIFAR10DataModule(str(data_dir), classes=("airplane", "bird"), batch_size=batch_size, download=False,
                           num_workers=max(1, os.cpu_count() or 1))
    dm.prepare_data()
    dm.setup("fit")
    move = lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
    data = DeviceData(move(dm.train_x), move(dm.train_y), move(dm.val_x), move(dm.val_y), batch_size, dm.class_names)
    return data, data_dir


def reference_members(k: int) -> list[dict]:
    """The first k members of configs/grid.yaml's reference grid (repeated cyclically beyond 6)."""
    ref = yaml.safe_load((REPO / "configs" / "grid.yaml").read_text())["model"]["members"]
    return [dict(ref[i % len(ref)]) for i in range(k)]


# ----------------------------------------------------------------------------- measuring


def peak_memory_mb(device: torch.device) -> float:
    """GPU: the peak of allocated memory since the last reset (torch.cuda.max_memory_allocated). CPU: the
    process's peak resident size so far (ru_maxrss): it cannot be reset, so it only grows over a run."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class EpochClock(L.Callback):
    """Times each training epoch from one epoch start to the next (the last one to the end of training), with a
    device synchronisation at each mark: the module's own epoch-end work is inside its epoch."""

    def __init__(self):
        self.marks: list[tuple[float, float]] = []  # (wall clock, CPU time of this process)

    def _mark(self, trainer) -> None:
        sync(trainer.strategy.root_device)
        self.marks.append((time.perf_counter(), time.process_time()))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._mark(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._mark(trainer)

    @property
    def epoch_s(self) -> list[float]:
        return [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:])]

    @property
    def epoch_cpu_s(self) -> list[float]:
        return [b[1] - a[1] for a, b in zip(self.marks, self.marks[1:])]


def trainer_for(args, clock: EpochClock, precision: str) -> L.Trainer:
    return L.Trainer(max_epochs=args.epochs, accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                     precision=lightning_precision(precision), logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=1.0 if args.val_every_epoch else 0, callbacks=[clock])


@torch.no_grad()
def val_accuracy(logits: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Accuracy per member of logits (K, N, C) or (N, C)."""
    logits = logits if logits.dim() == 3 else logits[None]
    return ((logits.argmax(-1) == y).sum(-1).double() / y.shape[0]).tolist()


def train_raw(train_x, train_y, *, sizes, lr, momentum, dampening=0.0, weight_decay=0.0, nesterov=False,
              epochs, batch_size, seed, val=None, low=None) -> dict:
    """bench/baseline.py's train_plain with handgrad's hand-written step in place of autograd + torch.optim.SGD;
    ``low``: the products in that dtype (the model's compute dtype), float16 with the hand-written loss scaler."""
    torch.manual_seed(seed)
    model = MLP(sizes).to(device=train_x.device, dtype=train_x.dtype)
    model.compute_dtype = low
    opt = SGD(model.parameters(), lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov)
    scaler = LossScaler() if low == torch.float16 else None

    @torch.no_grad()
    def step(xb, yb):
        loss, grad_out = losses.cross_entropy(model(xb).float(), yb)
        backward(model, grad_out if scaler is None else scaler.scale(grad_out))
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        return loss

    summed_loss = lambda out, y: losses.cross_entropy(out.float(), y, "sum")[0]  # noqa: E731
    return {**timed_epochs(step, model, summed_loss, train_x, train_y, epochs=epochs, batch_size=batch_size,
                           val=val), "model": model}


def run_plain(args, data, members, device, precision: str, part: str = "plain") -> list[dict]:
    train = train_plain if part == "plain" else train_raw
    out = []
    for k, m in enumerate(members):
        reset_peak(device)
        t0 = time.perf_counter()
        with matmul_precision(precision):
            r = train(data.train_x, data.train_y, sizes=SIZES, epochs=args.epochs, batch_size=args.batch_size,
                      seed=SEED, val=(data.val_x, data.val_y) if args.val_every_epoch else None,
                      low=LOW.get(precision), **m)
            fit_s = time.perf_counter() - t0
            acc = val_accuracy(r["model"](data.val_x).float(), data.val_y)[0]
        out.append({"part": part_name(part, precision), "precision": precision, "member": k, "epoch_s": r["epoch_s"], "epoch_cpu_s": r["epoch_cpu_s"],
                    "fit_s": fit_s, "val_acc": [acc], "peak_mem_mb": peak_memory_mb(device)})
    return out


def fit_timed(args, model, data, device, precision: str) -> dict:
    """One Trainer fit of ``model``: its part of a record (epoch times, fit seconds, peak memory) and the model's
    validation logits, computed after the fit (the teardown moved the model: it goes back to the device)."""
    clock = EpochClock()
    reset_peak(device)
    t0 = time.perf_counter()
    with matmul_precision(precision):
        trainer_for(args, clock, precision).fit(model, datamodule=data)
        fit_s = time.perf_counter() - t0
        logits = model.to(device)(data.val_x).float()
    return {"epoch_s": clock.epoch_s, "epoch_cpu_s": clock.epoch_cpu_s, "fit_s": fit_s,
            "peak_mem_mb": peak_memory_mb(device), "logits": logits}


def run_trainer(args, data, members, device, precision: str) -> list[dict]:
    out = []
    for k, m in enumerate(members):
        torch.manual_seed(SEED)  # the same initial weights as the baseline's and the grid's
        fit = fit_timed(args, HandgradClassifier(sizes=SIZES, **m), data, device, precision)
        acc = val_accuracy(fit.pop("logits"), data.val_y)
        out.append({"part": part_name("trainer", precision), "precision": precision, "member": k, **fit,
                    "val_acc": acc})
    return out


def run_grid(args, data, members, device, mode: str, precision: str) -> list[dict]:
    model = GridClassifier(members=members, sizes=SIZES, init_seed=SEED, compile=None if mode == "none" else mode)
    fit = fit_timed(args, model, data, device, precision)
    acc = val_accuracy(fit.pop("logits"), data.val_y)
    return [{"part": part_name(f"grid[{mode}]", precision), "precision": precision, "member": "all", **fit,
             "val_acc": acc}]


def run_gemm(args, device, precisions) -> list[dict]:
    """The rate of the matrix products of one reference training step (batch B, MLP SIZES), in the dtype of each
    precision: forward a^{l-1} W^T (l = 1..L), backward delta^T a^{l-1} (l = 1..L) and delta W (l = 2..L). A
    training step cannot be faster than these products: their time is its floor."""
    B = args.batch_size
    shapes = [(B, i, o) for i, o in zip(SIZES[:-1], SIZES[1:])]  # (m, k, n) of a @ W^T: (B, k) x (k, n)
    shapes += [(o, B, i) for i, o in zip(SIZES[:-1], SIZES[1:])]  # delta^T a: (n, B) x (B, k)
    shapes += [(B, o, i) for i, o in list(zip(SIZES[:-1], SIZES[1:]))[1:]]  # delta W: (B, n) x (n, k)
    flops = sum(2 * m * k * n for m, k, n in shapes)
    out = []
    for precision in precisions:
        dtype = LOW.get(precision, torch.float64 if precision == "64-true" else torch.float32)
        mats = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
                for m, k, n in shapes]
        with matmul_precision(precision):
            for _ in range(3):  # warm-up
                for a, b in mats:
                    a @ b
            sync(device)
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.5 or reps < 5:
                for a, b in mats:
                    a @ b
                reps += 1
                sync(device)
            seconds = (time.perf_counter() - t0) / reps
        out.append({"part": "gemm", "precision": precision, "step_flops": flops, "step_gemm_s": seconds,
                    "gflops": flops / seconds / 1e9})
    return out


def run_startup(args, data_dir) -> list[dict]:
    """`python train.py fit --trainer.max_steps 1` in a fresh process, the data's decode cache already warm."""
    if data_dir is None:
        return [{"part": "startup", "skipped": "needs image data on disk (--data PATH), not --data synthetic"}]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "airplane_bird.yaml"),
               "--data.data_dir", str(data_dir), "--data.download", "false", "--trainer.max_steps", "1",
               "--trainer.accelerator", "gpu" if args.device == "cuda" else "cpu", "--trainer.devices", "1",
               "--trainer.precision", "64-true" if args.dtype == "float64" else "32-true",
               "--trainer.enable_progress_bar", "false",
               "--trainer.limit_val_batches", "0", "--trainer.callbacks+=startup_clock.FirstStepClock"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")])))
        env["HANDGRAD_BENCH_T0"] = repr(time.time())
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        total = time.perf_counter() - t0
    first = [line.split("=", 1)[1] for line in p.stdout.splitlines() if line.startswith("HANDGRAD_FIRST_STEP_S=")]
    if p.returncode != 0 or not first:
        return [{"part": "startup", "error": f"exit {p.returncode}", "stderr_tail": p.stderr[-2000:]}]
    t0 = time.perf_counter()  # the floor: a process that only imports torch and lightning
    subprocess.run([sys.executable, "-c", "import torch, lightning"], check=True)
    floor = time.perf_counter() - t0
    return [{"part": "startup", "first_step_s": float(first[0]), "process_s": total, "import_floor_s": floor}]
