"""The GPU proof in one prepared run (bench/gpu_check.sh calls this): every device path of handgrad, checked and
measured on one CUDA GPU within a time budget, with a report ready for docs/performance.md.

    bash bench/gpu_check.sh OUT_DIR              # on a GPU machine, from the project root (8 minutes at most)
    bash bench/gpu_check.sh --dry-run OUT_DIR    # the same steps on the CPU with tiny sizes (tests/test_gpu_check.py)

Steps, each cut off at its budget and reported, never left to eat the rest:

    wheels       the packages the GPU machine lacks (jsonargparse, ...), installed from .gpu/wheels
    environment  the device, the driver, torch and CUDA
    cuda tests   every test marked `cuda` (pytest -m cuda -x)
    bench        bench/bench.py --device cuda: plain, trainer and grid in float32, TF32 and bf16-mixed
    sweep        the reference sweep with --model.compile none, cuda_graph and inductor, SWEEP_EPOCHS epochs: each
                 mode's results table must equal the eager one within TOLERANCE
    main job     `python train.py` on the GPU in bf16-mixed, a few epochs (the real images where they are found)
    verify       `python train.py verify` on the GPU, in 32-true and in bf16-mixed

Output: OUT_DIR/gpu_check.json (each step: status, seconds, figures) and OUT_DIR/gpu_check.md (a table). A step that
needs CUDA is "skipped (needs CUDA)" in the dry run; the exit code is 1 when a step failed or ran out of time.

The real images: ../shared/data/cifar10-jpeg.tar.xz, or .gpu/data/cifar10-jpeg.tar.xz (the archive copied into the
git-ignored .gpu/ folder, which travels to a GPU machine); else generated images.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / ".gpu"
ARCHIVES = [REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz", GPU / "data" / "cifar10-jpeg.tar.xz"]
NEEDED = ("jsonargparse", "docstring_parser", "typeshed_client")  # jsonargparse[signatures], which LightningCLI needs
WHEELS = ("jsonargparse==4.53.0", "docstring-parser", "typeshed-client", "importlib-resources")
TOLERANCE = {"val_acc": 0.005, "loss_rel": 1e-3}  # compile modes against eager: 10 of 2000 images, 0.1 % of a loss
SWEEP_EPOCHS = 3  # where float32 rounding has not grown yet: over 30 epochs the momentum-0.9 members of inductor and
# eager drift apart (measured on an H200: member 2's val acc 0.8125 against 0.829), the momentum-0 members do not
BUDGETS = {"wheels": 10, "environment": 40, "cuda tests": 90, "main job": 40, "sweep": 120, "verify": 40,
           "bench": 140}  # 480 s in all; measured on an H200: 1, 26, 25-36, 18, 71-91, 33 and 106-112 s


class Check:
    """The steps' shared state: where to write, the deadline, the interpreter, the records."""

    def __init__(self, out: Path, dry_run: bool, budget: float):
        self.out, self.dry, self.deadline = out, dry_run, time.monotonic() + budget
        self.python = os.environ.get("PYTHON", sys.executable)
        self.steps: list[dict] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
            [str(REPO / "src"), str(GPU / "site"), str(REPO / "bench"), os.environ.get("PYTHONPATH", "")]))
        self.data: Path | None = None
        self.data_kind = ""
        self.device = "cpu" if dry_run else "gpu"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, args: list, budget: float, log: str) -> tuple[int, str, float]:
        """Run a command with a time limit (its process group killed at the limit); returns (exit code or "timeout"
        as -9, its output, seconds); the output also goes to OUT/<log>.log."""
        limit = max(1.0, min(budget, self.left()))
        start = time.monotonic()
        proc = subprocess.Popen([str(a) for a in args], cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=limit)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            code = -9
        (self.out / f"{log}.log").write_text(output)
        return code, output, time.monotonic() - start

    def step(self, name: str, function) -> None:
        budget = BUDGETS[name]
        print(f"[gpu_check] {name} (budget {budget} s, {self.left():.0f} s left)", flush=True)
        start = time.monotonic()
        record = {"step": name, "budget_s": budget}
        if self.left() < 5:
            record.update(status="not run (out of time)", seconds=0.0)
        else:
            try:
                record.update(function(self, budget))
            except Exception as err:  # noqa: BLE001  (a step's failure is reported; the next step runs)
                record.update(status="fail", error=f"{type(err).__name__}: {err}")
        record.setdefault("seconds", round(time.monotonic() - start, 1))
        print(f"[gpu_check] {name}: {record['status']} in {record['seconds']} s "
              f"{json.dumps(record.get('figures', {}))}", flush=True)
        self.steps.append(record)


def outcome(code: int, output: str, seconds: float, **figures) -> dict:
    status = "pass" if code == 0 else "timeout" if code == -9 else "fail"
    record = {"status": status, "seconds": round(seconds, 1), "figures": figures}
    if status != "pass":
        record["error"] = output.strip()[-1500:]
    return record


# ----------------------------------------------------------------------------- the steps


def wheels(c: Check, budget: float) -> dict:
    """Install from .gpu/wheels what this Python lacks (into .gpu/site, on PYTHONPATH for every step)."""
    probe = [c.python, "-c", "import " + ", ".join(NEEDED)]
    if subprocess.run(probe, env=c.env, capture_output=True).returncode == 0:
        return {"status": "pass", "figures": {"installed": "nothing (all present)"}}
    found = sorted((GPU / "wheels").glob("*.whl"))
    how = (f"put pure-Python wheels for {', '.join(WHEELS)} into .gpu/wheels: python3 -m pip download --no-deps "
           f"--only-binary=:all: --python-version 3.12 -d .gpu/wheels {' '.join(WHEELS)}")
    if not found:
        return {"status": "fail", "error": f"{', '.join(NEEDED)} missing and no wheels found; {how}"}
    code, output, seconds = c.run([c.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                   "--target", GPU / "site", *found], budget, "wheels")
    if code == 0 and subprocess.run(probe, env=c.env, capture_output=True).returncode != 0:
        code, output = 1, f"installed, but still not importable; {how}"
    return outcome(code, output, seconds, installed=[w.name for w in found])


ENVIRONMENT = """
import platform, torch, lightning
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "lightning", lightning.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability", f"{p.major}.{p.minor}", "memory_GiB", round(p.total_memory / 2**30, 1),
          "multiprocessors", p.multi_processor_count)
else:
    print("device cpu", platform.processor() or platform.machine())
"""


def environment(c: Check, budget: float) -> dict:
    code, output, seconds = c.run([c.python, "-c", ENVIRONMENT], budget, "environment")
    figures = dict(re.findall(r"(\w+) (\S+(?: \S+)*?)(?= \w+ |$)", " ".join(output.split())))
    if not c.dry:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        figures["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        if "device cpu" in output:
            code, output = 1, output + "\nno CUDA device is visible to torch"
    print(output.strip())
    return outcome(code, output, seconds, **figures, lines=output.strip().splitlines())


def cuda_tests(c: Check, budget: float) -> dict:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "pytest.mark.cuda" in p.read_text())
    code, output, seconds = c.run([c.python, "-m", "pytest", "-m", "cuda", "-x", "-q", "-rs", "-p", "no:cacheprovider",
                                   *files], budget, "cuda_tests")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", output)}
    if c.dry and code == 0 and counts.get("passed"):
        code, output = 1, output + "\na cuda test ran without CUDA"
    if not c.dry and code == 0 and (not counts.get("passed") or counts.get("skipped")):
        code, output = 1, output + "\non a GPU every cuda test must run: none may be skipped"
    return outcome(code, output, seconds, files=files, **counts)


def data_folder(c: Check) -> tuple[Path, str]:
    """The real images extracted once into OUT/data (or found there), else generated ones."""
    if c.data is not None:
        return c.data, c.data_kind
    archive = next((a for a in ARCHIVES if a.is_file()), None)
    folder = c.out / "data"
    if archive is not None and not c.dry:
        if not (folder / "cifar10-jpeg").is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            with tarfile.open(archive) as tar:
                tar.extractall(folder, filter="data")
        c.data, c.data_kind = folder, f"real images ({archive.name})"
    else:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import write_image_folder

        if not (folder / "generated").is_dir():
            n = (20, 6) if c.dry else (400, 100)
            write_image_folder(folder / "generated", per_class_train=n[0], per_class_test=n[1],
                               classes=("airplane", "bird"))
        c.data, c.data_kind = folder, "generated images"
    return c.data, c.data_kind


def several(figures: dict, failed: list[str], **extra) -> dict:
    """The record of a step made of several runs: a fail when one failed, each failure on a line of its own."""
    record = {"status": "fail" if failed else "pass", "figures": figures, **extra}
    if failed:
        record["error"] = "\n".join(failed)
    return record


def tiny(c: Check) -> list[str]:
    """The dry run's sizes: a small network, one epoch, on the CPU."""
    return ["--model.sizes", "[3072, 16, 2]", "--trainer.max_epochs", "1"] if c.dry else []


def main_job(c: Check, budget: float) -> dict:
    data, kind = data_folder(c)
    args = [c.python, REPO / "train.py", "--data.data_dir", data, "--data.download", "false",
            "--trainer.accelerator", c.device, "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "5",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", c.out / "main", *tiny(c)]
    code, output, seconds = c.run(args, budget, "main_job")
    figures = {"data": kind, "precision": "bf16-mixed", "epochs": 1 if c.dry else 5}
    for key, pattern in (("val_acc_best", r"val acc +\(best\) +: ([\d.]+)"), ("test_acc", r"test acc \(\w+\) +: ([\d.]+)")):
        if m := re.search(pattern, output):
            figures[key] = float(m.group(1))
    return outcome(code, output, seconds, **figures)


def results(folder: Path) -> list[dict]:
    (path,) = folder.rglob("results.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def compare_tables(eager: list[dict], other: list[dict]) -> list[str]:
    """Where a compile mode's table differs from the eager one by more than TOLERANCE."""
    problems = []
    chosen = [next((r for r in table if r["selected"] == "True"), None) for table in (eager, other)]
    if None in chosen:
        problems.append("no member was selected")
    elif chosen[0]["member"] != chosen[1]["member"]:  # a tie broken the other way is fine, a worse choice is not
        mine = next(r for r in eager if r["member"] == chosen[1]["member"])
        if float(chosen[0]["val_acc"]) - float(mine["val_acc"]) > TOLERANCE["val_acc"]:
            problems.append(f"member {chosen[1]['member']} was selected, {chosen[0]['member']} in eager")
    for a, b in zip(eager, other):
        for key in ("val_acc", "train_acc", "best_val_acc"):
            if a[key] and b[key] and abs(float(a[key]) - float(b[key])) > TOLERANCE["val_acc"]:
                problems.append(f"member {a['member']} {key} {b[key]} vs {a[key]}")
        for key in ("val_loss", "train_loss"):
            if a[key] and b[key] and abs(float(a[key]) - float(b[key])) > TOLERANCE["loss_rel"] * abs(float(a[key])):
                problems.append(f"member {a['member']} {key} {b[key]} vs {a[key]}")
        if a["status"] != b["status"]:
            problems.append(f"member {a['member']} status {b['status']} vs {a['status']}")
    return problems


def sweep(c: Check, budget: float) -> dict:
    data, kind = data_folder(c)
    figures, tables, failed = {"data": kind}, {}, []
    modes = ["none", "cuda_graph", "inductor"]
    for i, mode in enumerate(modes):
        if c.dry and mode == "cuda_graph":
            figures[mode] = "skipped (needs CUDA)"
            continue
        folder = c.out / f"sweep_{mode}"
        shutil.rmtree(folder, ignore_errors=True)  # a rerun into the same OUT_DIR starts clean
        args = [c.python, REPO / "train.py", "sweep", "--config", REPO / "configs" / "grid.yaml", "--data.data_dir",
                data, "--data.download", "false", "--trainer.accelerator", c.device, "--model.compile", mode,
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", folder,
                *(tiny(c) or ["--trainer.max_epochs", str(SWEEP_EPOCHS)])]
        code, output, seconds = c.run(args, budget / (len(modes) - i), f"sweep_{mode}")  # the rest: the last's
        budget -= seconds
        if code != 0:
            failed.append(f"{mode}: {'timeout' if code == -9 else 'exit ' + str(code)}: {output.strip()[-600:]}")
            continue
        tables[mode] = results(folder)
        selected = next(r for r in tables[mode] if r["selected"] == "True")
        figures[mode] = {"seconds": round(seconds, 1), "selected": int(selected["member"]),
                         "val_acc": float(selected["val_acc"]), "test_acc": float(selected["test_acc"])}
        if mode != "none" and "none" in tables and (problems := compare_tables(tables["none"], tables[mode])):
            failed.append(f"{mode} differs from eager: {'; '.join(problems[:5])}")
    figures["tolerance"], figures["epochs"] = TOLERANCE, 1 if c.dry else SWEEP_EPOCHS
    return several(figures, failed)


def verify(c: Check, budget: float) -> dict:
    data, kind = data_folder(c)
    figures, failed = {}, []
    for precision in ("32-true", "bf16-mixed"):
        args = [c.python, REPO / "train.py", "verify", "--data.data_dir", data, "--data.download", "false",
                "--trainer.accelerator", c.device, "--trainer.precision", precision,
                "--trainer.default_root_dir", c.out / f"verify_{precision}", *tiny(c)[:2]]
        code, output, seconds = c.run(args, budget / 2, f"verify_{precision}")
        summary = re.search(r"(\d+) checks, (\d+) failed", output)
        figures[precision] = {"seconds": round(seconds, 1), "checks": summary.group(0) if summary else None}
        if code != 0:
            failed.append(f"{precision}: exit {code}: {output.strip()[-600:]}")
    return several(figures, failed)


def bench(c: Check, budget: float) -> dict:
    data, kind = data_folder(c)
    log = c.out / "bench.jsonl"
    if c.dry:
        runs = [["--device", "cpu", "--data", "synthetic", "--epochs", "1", "--members", "2", "--parts", "plain",
                 "trainer", "grid", "gemm", "--precision", "32-true", "bf16-mixed"]]
    else:  # the grid over 10 epochs, the Trainer one by one over 5
        runs = [["--device", "cuda", "--data", data, "--epochs", "10", "--members", "6", "--parts", "plain", "grid",
                 "gemm", "startup", "--precision", "32-true", "tf32", "bf16-mixed", "--grid-compile", "none",
                 "cuda_graph"],
                ["--device", "cuda", "--data", data, "--epochs", "5", "--members", "6", "--parts", "plain", "trainer",
                 "--precision", "32-true", "bf16-mixed"]]
    tables, failed = [], []
    for i, args in enumerate(runs):
        code, output, seconds = c.run([c.python, REPO / "bench" / "bench.py", "--repeats", "1", "--json", log, *args],
                                      budget / (len(runs) - i), f"bench_{i}")
        budget -= seconds
        tables.append(output[output.find("machine:"):].strip() if "machine:" in output else "")
        if code != 0:
            failed.append(f"bench run {i}: {'timeout' if code == -9 else 'exit ' + str(code)}: {output.strip()[-600:]}")
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    summary = [{k: r.get(k) for k in ("row", "part", "precision", "epoch_s", "vs_plain", "train_s", "gflops",
                                       "floor_epoch_s", "first_step_s", "import_floor_s") if k in r}
               for r in rows if r.get("event") == "summary"]
    return several({"data": kind, "summary": summary}, failed, tables=tables)


STEPS = {"wheels": wheels, "environment": environment, "cuda tests": cuda_tests, "bench": bench, "sweep": sweep,
         "main job": main_job, "verify": verify}  # in this order: what matters most first, if time runs short


def markdown(c: Check, started: str) -> str:
    lines = [f"# GPU check ({'dry run on the CPU' if c.dry else 'GPU'}), {started}", "",
             "| step | status | seconds (budget) | figures |", "|---|---|---|---|"]
    for s in c.steps:
        figures = json.dumps(s.get("figures", {}))
        figures = figures if len(figures) < 400 else figures[:400] + " ..."
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} ({s['budget_s']}) | {figures.replace('|', '/')} |")
    for s in c.steps:
        for table in s.get("tables", []):
            lines += ["", "```", table, "```"]
        if s["status"] != "pass":
            lines += ["", f"## {s['step']}: {s['status']}", "", "```", str(s.get("error", ""))[-2000:], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the folder for gpu_check.json, gpu_check.md and the logs")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny sizes")
    p.add_argument("--budget", type=float, default=480, help="seconds for all steps (default 480: 8 minutes)")
    p.add_argument("--steps", nargs="+", choices=tuple(STEPS), default=list(STEPS), help="run only these steps")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    c = Check(args.out.resolve(), args.dry_run, args.budget)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"[gpu_check] {'dry run, ' if c.dry else ''}budget {args.budget:.0f} s, output in {c.out}", flush=True)
    for name in args.steps:
        c.step(name, STEPS[name])
        report = {"dry_run": c.dry, "started": started, "host": platform.node(), "steps": c.steps}
        (c.out / "gpu_check.json").write_text(json.dumps(report, indent=1))  # after every step: a cut-off run
        (c.out / "gpu_check.md").write_text(markdown(c, started))  # still leaves what it measured
    bad = [s["step"] for s in c.steps if s["status"] != "pass"]
    print(f"[gpu_check] {'all steps passed' if not bad else 'not passed: ' + ', '.join(bad)}; "
          f"{c.out / 'gpu_check.md'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
