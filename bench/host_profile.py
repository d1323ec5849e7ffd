"""Where the host's time goes in one Trainer epoch of HandgradClassifier, and which calls make the host wait for the
GPU. On a GPU the host only queues work: a step costs the host's Python time unless it synchronizes, and the plain
loop's is the floor.

    python bench/host_profile.py [--device cuda] [--data synthetic|ARCHIVE|FOLDER] [--epochs 3] [--top 25]

Prints (1) every call that synchronized with the device during one epoch (torch.cuda.set_sync_debug_mode), with
where it came from, and (2) cProfile's top functions by own time and by cumulative time over --epochs epochs.
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import io
import pstats
import sys
import time
import traceback
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from runs import SEED, SIZES, load_data  # noqa: E402

from handgrad.train.module import HandgradClassifier  # noqa: E402


def trainer(device: str, epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0)


def model() -> HandgradClassifier:
    torch.manual_seed(SEED)
    return HandgradClassifier(sizes=SIZES, lr=0.01, momentum=0.9)


def syncs(data, device: str) -> collections.Counter:
    """The calls that synchronized during one epoch, counted by the first frame of this project or of Lightning."""
    if device != "cuda":
        return collections.Counter()
    found = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
            ours = [f for f in frames if "handgrad" in f.filename or "lightning" in f.filename]
            where = ours[-1] if ours else frames[-1]
            found[f"{where.filename.split('site-packages/')[-1]}:{where.lineno} {where.line}"] += 1

    m = model()
    trainer(device, 1).fit(m, datamodule=data)  # warm: the first epoch's one-off work is not counted
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        saved, warnings.showwarning = warnings.showwarning, record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer(device, 1).fit(m, datamodule=data)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = saved
    return found


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default="synthetic")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    data, _ = load_data(args.data, device, torch.float32, 256)
    steps = -(-len(data.train_x) // 256)
    found = syncs(data, args.device)
    print(f"host waits for the device in one epoch of {steps} steps: {sum(found.values())} calls")
    for where, n in found.most_common():
        print(f"  {n:5d}  {where}")
    m = model()
    trainer(args.device, 1).fit(m, datamodule=data)
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.runcall(trainer(args.device, args.epochs).fit, m, datamodule=data)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(f"\n{args.epochs} epochs in {seconds:.3f} s: {1000 * seconds / (args.epochs * steps):.3f} ms per step "
          f"(profiled: slower than unprofiled)")
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(order).print_stats(args.top)
        text = out.getvalue()
        print(f"\n--- by {order} ---\n" + text[text.find("ncalls"):])


if __name__ == "__main__":
    main()
