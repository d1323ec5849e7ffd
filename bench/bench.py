"""Benchmark: plain PyTorch against handgrad, in one process, on the same device-resident data.

    python bench/bench.py --data ../shared/data/cifar10-jpeg.tar.xz --device cpu --epochs 3 --members 6 --repeats 3
    python bench/bench.py --data synthetic --device cuda --epochs 30 --grid-compile none cuda_graph
    python bench/bench.py --parts startup --data ../shared/data/cifar10-jpeg.tar.xz
    python bench/bench.py --precision 32-true bf16-mixed --parts plain raw trainer grid    # the precision axis
    python bench/bench.py --device cuda --precision 32-true tf32 bf16-mixed --grid-compile none cuda_graph

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

Every part runs in every ``--precision`` (bench/runs.py says how each runs), and ``gemm`` measures the rate of the
reference step's matrix products in each precision's dtype in the same run: its time is the floor a step cannot beat.

Output: one JSON line per measurement (also appended to ``--json`` if given), then a table of medians over the
repeats ("vs plain": against plain PyTorch in float32, the first precision), the products' rates and floors, and the
targets with the measured values.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runs import (DEFAULT_DATA, PRECISIONS, load_data, reference_members, run_gemm, run_grid, run_plain,  # noqa: E402
                  run_startup, run_trainer)

DTYPE = {"float32": torch.float32, "float64": torch.float64}


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
             f"{args.dtype} data, precisions {' '.join(args.precision)}, {env['threads']} threads; {K} members, "
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

    for precision in args.precision:
        at = "" if precision in ("32-true", "64-true") else f"@{precision}"
        parts = [("plain PyTorch (autograd + torch.optim.SGD), one by one", "plain"),
                 ("handgrad's step with no framework (raw), one by one", "raw"),
                 ("handgrad HandgradClassifier + Trainer, one by one", "trainer")]
        parts += [(f"handgrad GridClassifier (batched, compile={p[5:-1]}) + Trainer", p) for p in
                  dict.fromkeys(p.split("@")[0] for p in by_part if p.startswith("grid["))]
        for name, part in parts:
            s = stats(part + at)
            if s:
                row(f"{name}, {precision}" if at else name, part + at, K, s)
    one = [(part, stats(part)) for part in ("raw", "trainer") if plain and stats(part)]
    lines += [""] if one else []
    for part, t in one:
        lines.append(f"one member (median over members): plain {plain['one']:.3f} s/epoch, {part} "
                     f"{t['one']:.3f} s/epoch ({t['one'] / plain['one']:.2f}x)")
    lines += gemm_lines(records, plain, args, rows)
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


def gemm_lines(records: list[dict], plain, args, rows: list[dict]) -> list[str]:
    """The products' rate per precision (median GFLOP/s) and their floor: the seconds per epoch of the members'
    products alone, also against the plain float32 loop."""
    gemm = [r for r in records if r.get("part") == "gemm"]
    if not gemm:
        return []
    steps = -(-8000 // args.batch_size) * args.members  # training steps per epoch, all members
    lines = ["", "| products of one reference step | GFLOP/s (median) | floor s/epoch (all members) | floor vs plain |",
             "|---|---|---|---|"]
    for precision in args.precision:
        mine = [r for r in gemm if r["precision"] == precision]
        if not mine:
            continue
        rate = statistics.median(r["gflops"] for r in mine)
        floor = steps * mine[0]["step_flops"] / (rate * 1e9)
        ratio = floor / plain["epoch"] if plain else math.nan
        lines.append(f"| {precision} | {rate:.0f} | {floor:.3f} | {ratio:.2f}x |")
        rows.append({"row": f"gemm {precision}", "part": "gemm", "precision": precision, "gflops": rate,
                     "floor_epoch_s": floor, "floor_vs_plain": ratio})
    return lines


def targets(rows: list[dict], plain, args) -> list[str]:
    out = []
    mark = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    grids = [r for r in rows if r.get("part", "").startswith("grid[")]
    mixed = [g for g in grids if g["part"].endswith("@bf16-mixed")]
    trainers = [r for r in rows if r.get("part", "").startswith("trainer")]
    where = "GPU" if args.device == "cuda" else "CPU"
    for g in grids:
        if args.device == "cuda":
            fit30 = g["train_s"] * 30 / args.epochs  # scaled: the first epoch's warm-up counted 30/epochs times
            scaled = "" if args.epochs == 30 else f" (its {args.epochs} epochs' time x {30 / args.epochs:g})"
            out.append(f"  GPU: {g['part']}, {g['members']} members, 30 epochs{scaled}: {fit30:.2f} s of training "
                       f"(<= 1.0 s): {mark(fit30 <= 1.0)}")
            if plain:
                out.append(f"  GPU: {g['part']}: {1 / g['vs_plain']:.1f}x faster than the plain loop training the "
                           f"same members (>= 10x): {mark(1 / g['vs_plain'] >= 10)}")
        elif plain:
            out.append(f"  CPU: {g['part']} per epoch: {g['vs_plain']:.2f}x the plain loop's time "
                       f"(<= 1.0): {mark(g['vs_plain'] <= 1.0)}")
    for g in mixed:
        if plain and args.device != "cuda":
            out.append(f"  CPU: {g['part']} per epoch: {g['vs_plain']:.2f}x the float32 plain loop's time "
                       f"(<= 0.5): {mark(g['vs_plain'] <= 0.5)}")
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
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPE), help="the data's dtype (float64: 64-true)")
    p.add_argument("--precision", nargs="+", default=None, choices=PRECISIONS,
                   help="precisions to run every part in (default: 32-true, or 64-true with --dtype float64)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--members", type=int, default=6, help="the first N members of configs/grid.yaml's grid")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--parts", nargs="+", default=["plain", "raw", "trainer", "grid", "gemm", "startup"],
                   choices=("plain", "raw", "trainer", "grid", "gemm", "startup"))
    p.add_argument("--grid-compile", nargs="+", default=["none"], choices=("none", "inductor", "cuda_graph"),
                   help="GridClassifier(compile=...) modes to run the grid with (each is one more grid run)")
    p.add_argument("--val-every-epoch", action="store_true",
                   help="every part also evaluates the validation set at the end of each epoch (inside the timing)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    if "cuda_graph" in args.grid_compile and args.device != "cuda":
        p.error("--grid-compile cuda_graph needs --device cuda")
    if min(args.epochs, args.members, args.repeats, args.batch_size) < 1:
        p.error("--epochs, --members, --repeats and --batch-size must be >= 1")
    args.precision = args.precision or ["64-true" if args.dtype == "float64" else "32-true"]
    if ("64-true" in args.precision) != (args.dtype == "float64") or ("64-true" in args.precision
                                                                        and len(args.precision) > 1):
        p.error("--precision 64-true goes with --dtype float64, alone; the others with float32 data")
    if args.device != "cuda" and {"tf32", "16-mixed"} & set(args.precision):
        p.error("--precision tf32 and 16-mixed need --device cuda (on a CPU Lightning runs 16-mixed as bf16-mixed)")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
        def done(runs: list[dict]) -> None:  # each part's records as soon as it ends (a cut-off run keeps them)
            for r in runs:
                if "epoch_s" in r:
                    r["steady_epoch_s"] = steady(r["epoch_s"])
                emit({"repeat": rep, **r})

        for precision in args.precision:
            if "plain" in args.parts:
                done(run_plain(args, data, members, device, precision))
            if "raw" in args.parts:
                done(run_plain(args, data, members, device, precision, part="raw"))
            if "trainer" in args.parts:
                done(run_trainer(args, data, members, device, precision))
            if "grid" in args.parts:
                for mode in args.grid_compile:
                    done(run_grid(args, data, members, device, mode, precision))
        if "gemm" in args.parts:
            done(run_gemm(args, device, args.precision))
        if "startup" in args.parts:
            done(run_startup(args, data_dir))
    table, rows = summarize(records, members, args, env)
    for r in rows:
        emit({"event": "summary", **r})
    print("\n" + table)
    return records


if __name__ == "__main__":
    main()
