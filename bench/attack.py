"""The reliability attack, rerun as a script: ten areas, each tried many times from the outside (train.py in
subprocesses, on generated images), with a table of what held. The tests cover each area once, in CI time; this
script repeats them at the attack's scale, which does not fit there.

    python bench/attack.py                 # every area, the attack's counts (several minutes on 2 cores)
    python bench/attack.py --areas bad_options hostile_checkpoints --out /tmp/attack.md

Areas: concurrent fits in one folder, concurrent first runs on one archive, kills during extraction, full disks (a
small tmpfs: needs root), hostile checkpoints, hostile archives, hostile images, bad options, SIGKILL and SIGINT
then resume (bitwise), a killed sweep rank. docs/reliability.md holds the counts of the last run.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import write_image_folder  # noqa: E402
from test_hostile_images import write_hostile  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests"),
                                                    os.environ.get("PYTHONPATH", "")])}
SMALL = ["--model.sizes", "[3072, 4, 2]", "--data.batch_size", "8", "--data.download", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def train(*args, cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


FAILED: list[str] = []  # what did not hold, printed after the table


def held_if(ok: bool, what: str, code: int, err: str) -> bool:
    """ok, remembering what did not hold (the trial, its exit code, the end of its stderr)."""
    if not ok:
        FAILED.append(f"{what}: exit {code}: " + " / ".join(err.strip().splitlines()[-3:])[-400:])
    return ok


def one_error_line(err: str) -> bool:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    return len(errors) == 1 and "Traceback" not in err


def loads(path: Path) -> bool:
    from handgrad.train.checkpoints import load_for_checks

    try:
        return load_for_checks(path)["global_step"] >= 0
    except Exception:  # noqa: BLE001  (counted as not held)
        return False


# ----------------------------------------------------------------------------- the areas


def concurrent_fits(work: Path, data: Path, scale: int) -> dict:
    """N fits started at once in one folder: N run folders, each with its best and last checkpoint, all loadable."""
    n = 32 if scale else 4
    together = work / "barrier.yaml"  # each waits in its callbacks' construction until all have come that far
    together.write_text(f"trainer:\n  callbacks:\n  - class_path: barrier.Barrier\n    init_args: {{folder: "
                        f"{work / 'barrier'}, parties: {n}, timeout: 600}}\n")
    procs = [train("fit", "--config", together, "--data.data_dir", data, "--trainer.max_epochs", "1", *SMALL,
                   cwd=work) for _ in range(n)]
    codes = [finish(p)[0] for p in procs]
    runs = sorted((work / "lightning_logs").glob("version_*"))
    ckpts = [c for r in runs for c in (r / "checkpoints").glob("*.ckpt")]
    held = sum(code == 0 for code in codes) == n and len(runs) == n and len(ckpts) == 2 * n and all(map(loads, ckpts))
    return {"trials": n, "held": n if held else sum(code == 0 for code in codes),
            "detail": f"{len(runs)} run folders, {sum(map(loads, ckpts))} of {2 * n} checkpoints load"}


def archive_of(data: Path, folder: Path) -> Path:
    archive = folder / "cifar10-jpeg.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(data / "cifar", arcname="cifar10-jpeg")
    return archive


PREPARE = ("import sys; from handgrad.data.datamodule import CIFAR10DataModule as D; d = D(sys.argv[1], "
           "download=False); d.prepare_data(); d.setup(); print(float(d.train_x.sum()))")


def prepare(folder: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PREPARE, str(folder)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def concurrent_extractions(work: Path, data: Path, scale: int) -> dict:
    """K first runs at once on one archive: one extracts and decodes, the others wait and reuse; the same data."""
    trials, held = (5 if scale else 2), 0
    for t in range(trials):
        folder = work / f"shared{t}"
        folder.mkdir()
        archive_of(data, folder)
        results = [finish(p) for p in [prepare(folder) for _ in range(3)]]
        sums = {out.strip() for code, out, _ in results if code == 0}
        held += all(code == 0 for code, _, _ in results) and len(sums) == 1
    return {"trials": trials, "held": held, "detail": "3 processes each, one archive"}


def kill_extraction(work: Path, data: Path, scale: int) -> dict:
    """A first run killed (SIGKILL) at a random moment of extraction or decoding; the next run recovers."""
    trials, held = (10 if scale else 3), 0
    rng = random.Random(0)
    for t in range(trials):
        folder = work / f"killed{t}"
        folder.mkdir()
        archive_of(data, folder)
        p = prepare(folder)
        time.sleep(rng.uniform(0.3, 3.0))
        p.kill()
        p.communicate()
        code, _, err = finish(prepare(folder))
        debris = [e for e in os.listdir(folder) if e.startswith((".extract-", ".download-"))]
        held += code == 0 and not debris
    return {"trials": trials, "held": held, "detail": "killed at 0.3-3 s, then a fresh run"}


def full_disks(work: Path, data: Path, scale: int) -> dict:
    """Fits on small tmpfs disks: one error line naming the command that resumes, which works once space is free."""
    sizes = ["400k", "600k", "900k", "1200k"] if scale else ["600k"]
    held = trials = 0
    unfilled = []
    for size in sizes:
        disk = work / f"disk{size}"
        disk.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]).returncode:
            return {"trials": 0, "held": 0, "detail": "not run: mounting a tmpfs needs root"}
        try:
            filler = disk / "filler"
            filler.write_bytes(bytes(150_000))
            code, _, err = finish(train("fit", "--data.data_dir", data, "--trainer.max_epochs", "3", *SMALL,
                                        "--last_checkpoint.every_n_train_steps", "1",
                                        "--model.log_histograms_every_n_steps", "1", cwd=disk))
            if code == 0:  # the run fitted on this disk: nothing to resume, not a trial
                unfilled.append(size)
                continue
            trials += 1
            ok = code == 2 and one_error_line(err) and "resume with: " in err
            if ok:
                command = err.split("resume with: ")[1].rsplit(" (or write elsewhere", 1)[0]
                filler.unlink()
                rerun = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=disk, env=ENV,
                                       capture_output=True, text=True)
                ok = rerun.returncode == 0 or (rerun.returncode == 2 and one_error_line(rerun.stderr))
                code, err = rerun.returncode, "the printed command: " + rerun.stderr
            held += held_if(ok, f"full disk {size}", code, err)
        finally:
            subprocess.run(["umount", str(disk)])
    filled = f"; the run fitted on {', '.join(unfilled)}" if unfilled else ""
    return {"trials": trials, "held": held, "detail": f"tmpfs of {', '.join(sizes)}{filled}; the printed command rerun"}


class RunsCode:
    """A pickle that would run a command when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_checkpoints(work: Path, data: Path, scale: int) -> dict:
    """Random bytes, a truncated checkpoint, a pickle that would run code, an empty file, a folder: refused with one
    line (exit 2), nothing loaded, no code run, for test, fit and verify."""
    marker = work / "code-ran"
    real = next((work.parent / "concurrent_fits").rglob("last.ckpt"), None)
    files = {"random": os.urandom(5000), "empty": b""}
    if real is not None:
        files["truncated"] = real.read_bytes()[:4000]
    for name, content in files.items():
        (work / f"{name}.ckpt").write_bytes(content)
    torch.save({"state_dict": {}, "hyper_parameters": RunsCode(marker)}, work / "pickle.ckpt")
    with open(work / "plain-pickle.ckpt", "wb") as f:
        pickle.dump(RunsCode(marker), f)
    held = trials = 0
    for path in sorted(work.glob("*.ckpt")):
        for command in (["test"], ["fit"], ["verify"]):
            trials += 1
            code, _, err = finish(train(*command, "--ckpt_path", path, "--data.data_dir", data, *SMALL[:2], cwd=work))
            held += held_if(code == 2 and one_error_line(err) and not marker.exists() and "weights_only" not in err,
                            f"{command[0]} {path.name}", code, err)
    return {"trials": trials, "held": held, "detail": f"{len(list(work.glob('*.ckpt')))} files x test, fit, verify"}


def hostile_archives(work: Path, data: Path, scale: int) -> dict:
    """Archives with a path that climbs out, an absolute path, a link out, a device file: refused with one line;
    nothing is written outside the data folder."""
    outside = work / "outside"
    outside.mkdir()
    kinds = {"climbs": ("../outside/escaped.txt", tarfile.REGTYPE, None), "absolute": (str(outside / "abs.txt"),
             tarfile.REGTYPE, None), "symlink": ("cifar10-jpeg/link", tarfile.SYMTYPE, str(outside)),
             "device": ("cifar10-jpeg/dev", tarfile.CHRTYPE, None)}
    held = 0
    for name, (member, kind, target) in kinds.items():
        folder = work / name
        folder.mkdir()
        with tarfile.open(folder / "evil.tar.xz", "w:xz") as tar:
            tar.add(data / "cifar", arcname="cifar10-jpeg")
            info = tarfile.TarInfo(member)
            info.type = kind
            if target:
                info.linkname = target
            tar.addfile(info, None if kind != tarfile.REGTYPE else __import__("io").BytesIO(b""))
        before = sorted(os.listdir(outside))
        code, _, err = finish(train("fit", "--data.data_dir", folder, "--trainer.max_epochs", "1", *SMALL, cwd=folder))
        held += held_if(code == 2 and one_error_line(err) and sorted(os.listdir(outside)) == before,
                        f"archive {name}", code, err)
    return {"trials": len(kinds), "held": held, "detail": ", ".join(kinds)}


def hostile_images(work: Path, data: Path, scale: int) -> dict:
    """predict on a folder of hostile files (crafted PNG, bombs, truncated, not an image) and one good image:
    exit 0, every bad file listed on one line, the good one predicted."""
    ckpt = next((work.parent / "concurrent_fits").rglob("last.ckpt"), None)
    if ckpt is None:
        return {"trials": 0, "held": 0, "detail": "not run: needs the checkpoints of concurrent_fits"}
    bad = write_hostile(work / "photos")
    trials = 3 if scale else 1
    held = 0
    for _ in range(trials):
        code, out, err = finish(train("predict", "--ckpt_path", ckpt, "--predict.images", work / "photos", cwd=work))
        listed = [line for line in out.splitlines() if line.startswith("  ") and ": " in line]
        held += code == 0 and len(listed) >= len(bad) and "Traceback" not in err
    return {"trials": trials, "held": held, "detail": f"{len(bad)} hostile files and good ones, each run"}


BAD = [["--model.lrr", "0.1"], ["--model.lr", "nan"], ["--model.lr", "-1"], ["--model.momentum", "-0.9"],
       ["--model.dampening", "1.5"], ["--data.batch_size", "0"], ["--data.val_fraction", "1.5"],
       ["--model.sizes", "[100, 2]"], ["--model.sizes", "[3072, 8, 3]"], ["--trainer.precision", "transformer-engine"],
       ["--model.activation", "swish"], ["--data.classes", "[airplane, plane]"], ["--ckpt_path", "missing.ckpt"],
       ["--config", "missing.yaml"], ["--model.backprop", "numpy"], ["--trainer.max_epochs", "two"]]


def bad_options(work: Path, data: Path, scale: int) -> dict:
    """Bad options: exit 2, one error line, nothing written."""
    held = 0
    for i, bad in enumerate(BAD):
        folder = work / str(i) / "w"
        folder.mkdir(parents=True)
        code, _, err = finish(train("fit", "--data.data_dir", data, *SMALL, *bad, cwd=folder))
        held += held_if(code == 2 and one_error_line(err) and not os.listdir(folder), f"fit {' '.join(bad)}", code,
                        err)
    return {"trials": len(BAD), "held": held, "detail": "fit with each; the main job takes the same checks"}


def kill_resume(work: Path, data: Path, scale: int) -> dict:
    """SIGKILL or SIGINT at a random step, then resume from last.ckpt: bitwise the uninterrupted run's weights."""
    args = ["fit", "--data.data_dir", data, "--trainer.max_epochs", "4", *SMALL, "--data.shuffle", "true",
            "--last_checkpoint.every_n_train_steps", "1", "--trainer.callbacks+=test_faults.Throttle"]
    reference = work / "reference"
    reference.mkdir()
    if finish(train(*args, cwd=reference))[0] != 0:
        return {"trials": 0, "held": 0, "detail": "the reference run failed"}
    expected = torch.load(next(reference.rglob("last.ckpt")), weights_only=True)["state_dict"]
    kills, held, early, rng = (10 if scale else 2), 0, 0, random.Random(1)
    for t in range(kills):
        folder = work / f"run{t}"
        folder.mkdir()
        p = train(*args, cwd=folder)
        time.sleep(rng.uniform(4, 9))
        p.send_signal(signal.SIGKILL if t % 2 == 0 else signal.SIGINT)
        p.communicate()
        last = next(folder.rglob("last.ckpt"), None)
        if last is None:  # stopped before its first step: nothing to resume, not a trial
            early += 1
            continue
        code, _, err = finish(train(*args, "--ckpt_path", last, cwd=folder))
        got = torch.load(next(folder.rglob("last.ckpt")), weights_only=True)["state_dict"]
        held += held_if(code == 0 and all(torch.equal(got[k], v) for k, v in expected.items()),
                        f"resume {t} ({'SIGKILL' if t % 2 == 0 else 'SIGINT'})", code, err)
    stopped = f"; {early} stopped before their first checkpoint" if early else ""
    return {"trials": kills - early, "held": held, "detail": f"half SIGKILL, half SIGINT, at 4-9 s{stopped}"}


def killed_sweep_rank(work: Path, data: Path, scale: int) -> dict:
    """A 2-process sweep whose rank 0 is killed after its first chunk: the other ends within 60 s with one error
    line, and the same command trains the rest."""
    args = ["sweep", "--config", REPO / "configs" / "grid.yaml", "--data.data_dir", data, *SMALL,
            "--trainer.max_epochs", "3", "--model.members_per_step", "1", "--trainer.accelerator", "cpu",
            "--trainer.logger.init_args.version", "0"]
    trials, held = (3 if scale else 1), 0
    for t in range(trials):
        folder = work / f"sweep{t}"
        folder.mkdir()
        p = train(*args, "--trainer.devices", "2", "--trainer.strategy", "ddp", cwd=folder)
        chunks = folder / "lightning_logs" / "sweep" / "version_0" / "chunks"
        deadline = time.monotonic() + 300
        while not (chunks / "chunk_0000.json").exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        p.kill()
        killed = time.monotonic()
        _, err = p.communicate(timeout=120)
        fast = time.monotonic() - killed < 60 and "lost contact" in err
        code = finish(train(*args, cwd=folder))[0]
        held += fast and code == 0
    return {"trials": trials, "held": held, "detail": "rank 0 killed; the rerun on one process"}


AREAS = {f.__name__: f for f in (concurrent_fits, concurrent_extractions, kill_extraction, full_disks,
                                 hostile_checkpoints, hostile_archives, hostile_images, bad_options, kill_resume,
                                 killed_sweep_rank)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--areas", nargs="+", choices=tuple(AREAS), default=list(AREAS))
    p.add_argument("--small", action="store_true", help="a few trials of each (a quick look), not the attack's scale")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="handgrad-attack-"))
    data = root / "data"
    write_image_folder(data / "cifar", per_class_train=20, per_class_test=4, classes=("airplane", "bird"))
    rows = ["| area | trials | held | seconds | detail |", "|---|---|---|---|---|"]
    for name in args.areas:
        work = root / name
        work.mkdir()
        start = time.monotonic()
        result = AREAS[name](work, data / "cifar" if name not in ("concurrent_extractions", "kill_extraction",
                                                                    "hostile_archives") else data, 0 if args.small else 1)
        rows.append(f"| {name.replace('_', ' ')} | {result['trials']} | {result['held']} | "
                    f"{time.monotonic() - start:.0f} | {result['detail']} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print("\n" + table)
    for line in FAILED:
        print("did not hold:", line)
    if args.out:
        args.out.write_text(table + "\n")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
