"""Benchmark: plain PyTorch against handgrad, in one process, on the same device-resident data.

    python bench/bench.py --data ../shared/data/cifar10-jpeg.tar.xz --device cpu --epochs 3 --members 6 --repeats 3
    python bench/bench.py --data synthetic --device cuda --epochs 30 --grid-compile none cuda_graph
    python bench/bench.py --parts startup --data ../shared/data/cifar10-jpeg.tar.xz

What runs (each ``--repeats`` times, interleaved, so a change of background load hits every part alike):

  plain     the baseline (bench/baseline.py): nn.Sequential + autograd + torch.optim.SGD over slices of the
            device-resident tensors, one member after the other;
  raw       handgrad's hand-written step with no framework around it: the same loop as plain, with MLP.forward,
            losses.cross_entropy, backprop.backward and handgrad.core.optim.SGD (what the math costs, without Lightning);
  trainer   handgrad's HandgradClassifier (hand-written backward and SGD) through a Lightning Trainer, one
            member after the other;
  grid      handgrad's GridClassifier: all members as one batched model through one Trainer (once per
            ``--grid-compile`` mode);
  startup   ``python train.py fit --trainer.max_steps 1`` in a fresh process: seconds from the command to the
            first training step (printed by bench/startup_clock.py) and to the end of the process.

Like with like: every part trains the same members (the reference grid of configs/grid.yaml) from the same
initial weights (seed 265) on the same tensors, batch 256, no shuffling, and none validates during training
(the Trainer runs have limit_val_batches=0; with ``--val-every-epoch`` all of them validate every epoch).
Epochs are timed between device synchronisations (Trainer runs: a callback at each epoch start and at the end
of training, so the module's epoch-end work is counted). The
final val accuracy of every member is computed afterwards, the same way for all parts.

Output: one JSON line per measurement (also appended to ``--json`` if given), then a table of medians over the
repeats and the targets of issue 6 with the measured values.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from baseline import sync, timed_epochs, train_plain  # noqa: E402
from handgrad.core import losses  # noqa: E402
from handgrad.core.backprop import backward  # noqa: E402
from handgrad.data.datamodule import CIFAR10DataModule, TensorBatches  # noqa: E402
from handgrad.sweep.module import GridClassifier  # noqa: E402
from handgrad.core.mlp import MLP  # noqa: E402
from handgrad.train.module import HandgradClassifier  # noqa: E402
from handgrad.core.optim import SGD  # noqa: E402

SIZES = [3072, 512, 128, 32, 2]
SEED = 265
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
PRECISION = {"float32": "32-true", "float64": "64-true"}
DTYPE = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------- data


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


def trainer_for(args, clock: EpochClock) -> L.Trainer:
    return L.Trainer(max_epochs=args.epochs, accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                     precision=PRECISION[args.dtype], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=1.0 if args.val_every_epoch else 0, callbacks=[clock])


@torch.no_grad()
def val_accuracy(logits: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Accuracy per member of logits (K, N, C) or (N, C)."""
    logits = logits if logits.dim() == 3 else logits[None]
    return ((logits.argmax(-1) == y).sum(-1).double() / y.shape[0]).tolist()


def train_raw(train_x, train_y, *, sizes, lr, momentum, dampening=0.0, weight_decay=0.0, nesterov=False,
              epochs, batch_size, seed, val=None) -> dict:
    """bench/baseline.py's train_plain with handgrad's hand-written step in place of autograd + torch.optim.SGD."""
    torch.manual_seed(seed)
    model = MLP(sizes).to(device=train_x.device, dtype=train_x.dtype)
    opt = SGD(model.parameters(), lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov)

    @torch.no_grad()
    def step(xb, yb):
        loss, grad_out = losses.cross_entropy(model(xb), yb)
        backward(model, grad_out)
        opt.step()
        return loss

    summed_loss = lambda out, y: losses.cross_entropy(out, y, "sum")[0]  # noqa: E731
    return {**timed_epochs(step, model, summed_loss, train_x, train_y, epochs=epochs, batch_size=batch_size,
                           val=val), "model": model}


def run_plain(args, data, members, device, part: str = "plain") -> list[dict]:
    train = train_plain if part == "plain" else train_raw
    out = []
    for k, m in enumerate(members):
        reset_peak(device)
        t0 = time.perf_counter()
        r = train(data.train_x, data.train_y, sizes=SIZES, epochs=args.epochs, batch_size=args.batch_size,
                  seed=SEED, val=(data.val_x, data.val_y) if args.val_every_epoch else None, **m)
        fit_s = time.perf_counter() - t0
        acc = val_accuracy(r["model"](data.val_x), data.val_y)[0]
        out.append({"part": part, "member": k, "epoch_s": r["epoch_s"], "epoch_cpu_s": r["epoch_cpu_s"],
                    "fit_s": fit_s, "val_acc": [acc], "peak_mem_mb": peak_memory_mb(device)})
    return out


def run_trainer(args, data, members, device, part: str = "trainer") -> list[dict]:
    cls = HandgradClassifier
    out = []
    for k, m in enumerate(members):
        torch.manual_seed(SEED)  # the same initial weights as the baseline's and the grid's
        model = cls(sizes=SIZES, **m)
        clock = EpochClock()
        reset_peak(device)
        t0 = time.perf_counter()
        trainer_for(args, clock).fit(model, datamodule=data)
        fit_s = time.perf_counter() - t0
        acc = val_accuracy(model.to(device).mlp(data.val_x), data.val_y)[0]  # (the Trainer's teardown moved it)
        out.append({"part": part, "member": k, "epoch_s": clock.epoch_s, "epoch_cpu_s": clock.epoch_cpu_s,
                    "fit_s": fit_s,
                    "val_acc": [acc], "peak_mem_mb": peak_memory_mb(device)})
    return out


def run_grid(args, data, members, device, mode: str) -> list[dict]:
    model = GridClassifier(members=members, sizes=SIZES, init_seed=SEED, compile=None if mode == "none" else mode)
    clock = EpochClock()
    reset_peak(device)
    t0 = time.perf_counter()
    trainer_for(args, clock).fit(model, datamodule=data)
    fit_s = time.perf_counter() - t0
    acc = val_accuracy(model.to(device).net(data.val_x), data.val_y)  # (the Trainer's teardown moved it to the CPU)
    return [{"part": f"grid[{mode}]", "member": "all", "epoch_s": clock.epoch_s, "epoch_cpu_s": clock.epoch_cpu_s,
             "fit_s": fit_s, "val_acc": acc,
             "peak_mem_mb": peak_memory_mb(device)}]


def run_startup(args, data_dir) -> list[dict]:
    """`python train.py fit --trainer.max_steps 1` in a fresh process, the data's decode cache already warm."""
    if data_dir is None:
        return [{"part": "startup", "skipped": "needs image data on disk (--data PATH), not --data synthetic"}]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "airplane_bird.yaml"),
               "--data.data_dir", str(data_dir), "--data.download", "false", "--trainer.max_steps", "1",
               "--trainer.accelerator", "gpu" if args.device == "cuda" else "cpu", "--trainer.devices", "1",
               "--trainer.precision", PRECISION[args.dtype], "--trainer.enable_progress_bar", "false",
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


# ----------------------------------------------------------------------------- summary


def steady(epoch_s: list[float]) -> float:
    """Seconds per epoch of one run: the median over the epochs after the first (the first also pays for
    allocation, warm-up and compilation), or the only epoch."""
    return statistics.median(epoch_s[1:] if len(epoch_s) > 1 else epoch_s)


def member_order(r: dict) -> int:
    return r["member"] if isinstance(r["member"], int) else -1


def summarize(records: list[dict], members: list[dict], args, env: dict) -> tuple[str, list[dict]]:
    K = len(members)
    rows, by_part = [], {}
    for r in records:
        if "epoch_s" in r:
            by_part.setdefault(r["part"], {}).setdefault(r["repeat"], []).append(r)

    def stats(part):
        """Per repeat: seconds per epoch summed over the part's runs (members one by one: their sum), first
        epoch, training seconds and fit seconds (all epochs), peak memory; then median/min/max over repeats."""
        reps = by_part.get(part)
        if not reps:
            return None
        per = []
        for runs in reps.values():
            per.append({"epoch": sum(steady(r["epoch_s"]) for r in runs),
                        "cpu": sum(steady(r["epoch_cpu_s"]) for r in runs),
                        "one": statistics.median(steady(r["epoch_s"]) for r in runs),
                        "first": sum(r["epoch_s"][0] for r in runs),
                        "train": sum(sum(r["epoch_s"]) for r in runs),
                        "fit": sum(r["fit_s"] for r in runs),
                        "mem": max(r["peak_mem_mb"] for r in runs),
                        "acc": [a for r in sorted(runs, key=member_order) for a in r["val_acc"]]})
        med = {key: statistics.median(p[key] for p in per)
               for key in ("epoch", "cpu", "one", "first", "train", "fit", "mem")}
        med["min"], med["max"] = min(p["epoch"] for p in per), max(p["epoch"] for p in per)
        med["single"], med["acc"], med["n"] = per[0]["epoch"], per[-1]["acc"], len(per)
        return med

    plain = stats("plain")
    lines = [f"machine: {env['machine']}; torch {env['torch']}, lightning {env['lightning']}; device {args.device}, "
             f"{args.dtype}{', TF32' if args.tf32 else ''}, {env['threads']} threads; {K} members, "
             f"{args.epochs} epochs, "
             f"batch {args.batch_size}, {'validation every epoch' if args.val_every_epoch else 'no validation'}, "
             f"data {args.data}; medians over {args.repeats} repeats", "",
             "| run | members | s/epoch (median) | single run | min - max | vs plain | CPU s/epoch | first epoch s | "
             f"train s ({args.epochs} ep.) | fit s | peak mem MB | final val acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(name, part, count, s):
        ratio = s["epoch"] / plain["epoch"] if plain else math.nan
        acc = " ".join(f"{a:.4f}" for a in s["acc"])
        lines.append(f"| {name} | {count} | {s['epoch']:.3f} | {s['single']:.3f} | {s['min']:.3f} - {s['max']:.3f} | "
                     f"{ratio:.2f}x | {s['cpu']:.3f} | {s['first']:.3f} | {s['train']:.2f} | {s['fit']:.2f} | "
                     f"{s['mem']:.0f} | {acc} |")
        rows.append({"row": name, "part": part, "members": count, "epoch_s": s["epoch"],
                     "single_run_epoch_s": s["single"], "min_epoch_s": s["min"], "max_epoch_s": s["max"],
                     "vs_plain": ratio, "cpu_epoch_s": s["cpu"], "first_epoch_s": s["first"],
                     "train_s": s["train"], "fit_s": s["fit"], "peak_mem_mb": s["mem"], "val_acc": s["acc"]})

    if plain:
        row("plain PyTorch (autograd + torch.optim.SGD), one by one", "plain", K, plain)
    parts = [("handgrad's step with no framework (raw), one by one", "raw"),
             ("handgrad HandgradClassifier + Trainer, one by one", "trainer")]
    parts += [(f"handgrad GridClassifier (batched, compile={p[5:-1]}) + Trainer", p) for p in by_part
              if p.startswith("grid[")]
    for name, part in parts:
        s = stats(part)
        if s:
            row(name, part, K, s)
    one = [(part, stats(part)) for part in ("raw", "trainer") if plain and stats(part)]
    lines += [""] if one else []
    for part, t in one:
        lines.append(f"one member (median over members): plain {plain['one']:.3f} s/epoch, {part} "
                     f"{t['one']:.3f} s/epoch ({t['one'] / plain['one']:.2f}x)")
    starts = [r for r in records if r.get("part") == "startup" and "first_step_s" in r]
    if starts:
        fs = statistics.median(r["first_step_s"] for r in starts)
        ps = statistics.median(r["process_s"] for r in starts)
        imp = statistics.median(r["import_floor_s"] for r in starts)
        lines.append(f"start-up (`train.py fit --trainer.max_steps 1`, warm data cache, median of {len(starts)}): "
                     f"{fs:.2f} s to the first training step, {ps:.2f} s for the whole process; "
                     f"`python -c 'import torch, lightning'` alone: {imp:.2f} s")
        rows.append({"row": "startup", "first_step_s": fs, "process_s": ps, "import_floor_s": imp,
                     "runs": len(starts)})
    lines += ["", "targets (issue 6; 'vs plain' compares the same members' summed seconds per epoch):"]
    lines += targets(rows, plain, args)
    return "\n".join(lines), rows


def targets(rows: list[dict], plain, args) -> list[str]:
    out = []
    mark = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    grids = [r for r in rows if r.get("part", "").startswith("grid[")]
    trainers = [r for r in rows if r.get("part", "").startswith("trainer")]
    where = "GPU" if args.device == "cuda" else "CPU"
    for g in grids:
        if args.device == "cuda":
            fit30 = g["train_s"] * 30 / args.epochs
            out.append(f"  GPU: {g['part']}, {g['members']} members, 30 epochs: {fit30:.2f} s of training "
                       f"(<= 1.0 s): {mark(fit30 <= 1.0)}")
            if plain:
                out.append(f"  GPU: {g['part']}: {1 / g['vs_plain']:.1f}x faster than the plain loop training the "
                           f"same members (>= 10x): {mark(1 / g['vs_plain'] >= 10)}")
        elif plain:
            out.append(f"  CPU: {g['part']} per epoch: {g['vs_plain']:.2f}x the plain loop's time "
                       f"(<= 1.0): {mark(g['vs_plain'] <= 1.0)}")
    for t in trainers:
        if plain:
            out.append(f"  {where}: {t['part']} (one member at a time through the Trainer) per epoch: "
                       f"{t['vs_plain']:.2f}x the plain loop's time (<= 1.0): {mark(t['vs_plain'] <= 1.0)}")
    start = next((r for r in rows if r.get("row") == "startup"), None)
    if start:
        out.append(f"  start-up to the first step: {start['first_step_s']:.2f} s (<= 3 s): "
                   f"{mark(start['first_step_s'] <= 3.0)}")
    return out or ["  (nothing measured that a target applies to)"]


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = f"{name}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (host: {cpu})"
    return cpu


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="the CIFAR-10 JPEG archive (extracted once to a temp folder), a data folder, or 'synthetic'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPE))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--members", type=int, default=6, help="the first N members of configs/grid.yaml's grid")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--parts", nargs="+", default=["plain", "raw", "trainer", "grid", "startup"],
                   choices=("plain", "raw", "trainer", "grid", "startup"))
    p.add_argument("--grid-compile", nargs="+", default=["none"], choices=("none", "inductor", "cuda_graph"),
                   help="GridClassifier(compile=...) modes to run the grid with (each is one more grid run)")
    p.add_argument("--val-every-epoch", action="store_true",
                   help="every part also evaluates the validation set at the end of each epoch (inside the timing)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matrix products on the GPU for every part "
                   "(torch.set_float32_matmul_precision('high')); off by default: full float32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    if "cuda_graph" in args.grid_compile and args.device != "cuda":
        p.error("--grid-compile cuda_graph needs --device cuda")
    if min(args.epochs, args.members, args.repeats, args.batch_size) < 1:
        p.error("--epochs, --members, --repeats and --batch-size must be >= 1")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    device = torch.device(args.device)
    env = {"machine": machine(), "torch": torch.__version__, "lightning": L.__version__,
           "threads": torch.get_num_threads()}
    members = reference_members(args.members)
    records: list[dict] = []

    def emit(rec: dict) -> None:
        rec = {"bench": "handgrad", **rec}
        line = json.dumps(rec)
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")
        records.append(rec)

    emit({"event": "config", **vars(args), **env, "members_hp": members})
    t0 = time.perf_counter()
    data, data_dir = load_data(args.data, device, DTYPE[args.dtype], args.batch_size)
    emit({"event": "data", "seconds": time.perf_counter() - t0, "train": list(data.train_x.shape),
          "val": list(data.val_x.shape), "device": str(data.train_x.device), "dtype": str(data.train_x.dtype)})
    for rep in range(args.repeats):
        runs = []
        if "plain" in args.parts:
            runs += run_plain(args, data, members, device)
        if "raw" in args.parts:
            runs += run_plain(args, data, members, device, part="raw")
        if "trainer" in args.parts:
            runs += run_trainer(args, data, members, device)
        if "grid" in args.parts:
            for mode in args.grid_compile:
                runs += run_grid(args, data, members, device, mode)
        if "startup" in args.parts:
            runs += run_startup(args, data_dir)
        for r in runs:
            if "epoch_s" in r:
                r["steady_epoch_s"] = steady(r["epoch_s"])
            emit({"repeat": rep, **r})
    table, rows = summarize(records, members, args, env)
    for r in rows:
        emit({"event": "summary", **r})
    print("\n" + table)
    return records


if __name__ == "__main__":
    main()
