"""The sweep over several processes (handgrad.sweep.ranks, handgrad.sweep.chunks): Lightning's ddp launcher and
torchrun against one process, bounded memory over many members, a killed rank, the heartbeat, resuming."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from handgrad.sweep import run as sweep
from handgrad.sweep import report as report
from handgrad.sweep.search import expand_grid, member_names
from test_sweep import REPO, read_csv, scalars, selected_weights, sweep_args


def sweep_command(*args) -> list[str]:
    """``python -m handgrad.sweep.run ARGS`` as a user starts it (Lightning's ddp launcher runs it again per device)."""
    return [sys.executable, "-m", "handgrad", "sweep", *args]


def torchrun_command(*args) -> list[str]:
    """``torchrun --standalone --nproc_per_node 2 train.py sweep ARGS``."""
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node", "2", str(REPO / "train.py"), "sweep", *args]


def run_processes(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_give_the_one_process_results(image_folder, tmp_path, monkeypatch):
    """Members spread over 2 ranks (Lightning's ddp launcher; torchrun), 2 members per step: the same table, every
    member's numbers equal to 1e-12 (float64), the same selected member and weights as one process with one chunk."""
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    members = '[{lr: 0.01}, {lr: 0.01, momentum: 0.9}, {lr: 0.02, momentum: 0.8, weight_decay: 0.01}]'
    args = sweep_args(root, "--model.members", members, "--trainer.precision", "64-true", "--trainer.accelerator", "cpu")
    one = sweep.main(args)
    two = [*args, "--model.members_per_step", "2", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    run_processes(sweep_command(*two, "--trainer.logger.init_args.version", "ddp"), tmp_path)
    run_processes(torchrun_command(*two, "--trainer.logger.init_args.version", "torchrun"), tmp_path)
    expected = read_csv(Path(one["log_dir"]) / "results.csv")
    w_one = selected_weights(one["log_dir"])
    for version in ("ddp", "torchrun"):
        log_dir = tmp_path / "lightning_logs" / "sweep" / version
        assert sorted(p.name for p in (log_dir / "chunks").glob("chunk_*.json")) == ["chunk_0000.json",
                                                                                     "chunk_0001.json"]
        rows = read_csv(log_dir / "results.csv")
        assert [r["selected"] for r in rows] == [r["selected"] for r in expected] and len(rows) == 3
        for r, e in zip(rows, expected):
            for column in report.COLUMNS:
                if column in ("train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc", "test_acc") and e[column]:
                    assert float(r[column]) == pytest.approx(float(e[column]), rel=1e-12, abs=1e-12), (version, column)
                else:
                    assert r[column] == e[column], (version, column)
        w_two = selected_weights(log_dir)
        for k in w_one:
            torch.testing.assert_close(w_one[k], w_two[k], rtol=1e-12, atol=1e-15)
        name = member_names(expand_grid(members=yaml.safe_load(members)))[2]  # trained on rank 1, written by rank 0
        assert len(scalars(log_dir / name)["val/acc"]) == 2


MEMORY_SCRIPT = """
import json, resource, sys
from handgrad.sweep import run as sweep
peaks = []
for samples in ("16", "200"):
    result = sweep.main(json.loads(sys.argv[1]) + ["--model.samples", samples])
    peaks.append([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(result["rows"]), str(result["log_dir"])])
print("PEAKS", json.dumps(peaks))
"""


def test_200_member_random_search_in_bounded_memory(image_folder, tmp_path):
    """200 members drawn at random, 16 per step, on a network whose members weigh 1.6 MB each (about 6 MB with
    gradients, momentum buffers and the saved copy; all 200 at once would add about 1.2 GB to a process of under
    1 GB): the peak memory (max RSS of the process) stays within a small factor of a 16-member run's."""
    root, _ = image_folder
    args = sweep_args(root, "--model.members", "null", "--model.sizes", "[3072, 128, 2]",
                      "--model.grid", "{lr: {log_uniform: [1.0e-4, 0.1]}, momentum: {uniform: [0, 0.95]}}",
                      "--model.members_per_step", "16", "--trainer.accelerator", "cpu", "--data.batch_size", "16",
                      epochs=1)
    done = run_processes([sys.executable, "-c", MEMORY_SCRIPT, json.dumps(args)], tmp_path)
    (peak_16, n_16, _), (peak_200, n_200, log_dir) = json.loads(done.stdout.split("PEAKS")[-1])
    assert (n_16, n_200) == (16, 200)
    assert len(list((tmp_path / log_dir / "chunks").glob("chunk_*.json"))) == 13  # 12 x 16 + 8
    assert peak_200 < 1.25 * peak_16, (peak_16, peak_200)


def test_a_killed_rank_stops_the_other_and_a_rerun_resumes(image_folder, tmp_path, monkeypatch, capsys):
    """SIGKILL rank 0 of a 2-process sweep after its first chunk is saved: rank 1 stops within 60 s with one error
    line naming rank 0; the same command into the same log folder (here on one process) trains only the rest."""
    root, _ = image_folder
    monkeypatch.chdir(tmp_path)
    args = sweep_args(root, "--model.members", "null", "--model.members_per_step", "1",
                      "--model.grid", "{lr: [0.002, 0.01, 0.05, 0.2], momentum: [0, 0.9]}",
                      "--trainer.accelerator", "cpu", "--trainer.logger.init_args.version", "0", epochs=3)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    rank0 = subprocess.Popen(sweep_command(*args, "--trainer.devices", "2", "--trainer.strategy", "ddp"),
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chunks = tmp_path / "lightning_logs" / "sweep" / "version_0" / "chunks"
    deadline = time.monotonic() + 180
    while not (chunks / "chunk_0000.json").exists():
        assert rank0.poll() is None and time.monotonic() < deadline, rank0.communicate()[1][-3000:]
        time.sleep(0.05)
    [rank1] = [int(p) for p in Path(f"/proc/{rank0.pid}/task/{rank0.pid}/children").read_text().split()]
    rank0.kill()
    killed = time.monotonic()
    _, err = rank0.communicate(timeout=60)  # the pipes close when rank 1, which shares them, has exited too
    assert time.monotonic() - killed < 60
    stat = Path(f"/proc/{rank1}/stat")
    assert not stat.exists() or stat.read_text().split(") ")[1][0] in "ZX"  # gone (or a zombie of no one)
    assert "error: sweep rank 1 of 2: lost contact with rank 0" in err, err[-3000:]
    rerun = [a for i, a in enumerate(args) if "--trainer.logger.init_args.version" not in args[max(0, i - 1):i + 1]]
    again = shlex.join(["python", "-m", "handgrad", "sweep", *rerun, "--trainer.devices", "2", "--trainer.strategy",
                        "ddp", "--trainer.logger.init_args.version", "0"])
    assert f"The chunks completed so far are saved: to train only the rest, run {again}" in err, err[-3000:]
    done_before = sorted(p.name for p in chunks.glob("chunk_*.json"))
    assert 0 < len(done_before) < 8
    stamps = {name: (chunks / name).stat().st_mtime_ns for name in done_before}
    capsys.readouterr()
    result = sweep.main(args)
    assert f"{len(done_before)} of 8 chunks are done" in capsys.readouterr().out
    assert {name: (chunks / name).stat().st_mtime_ns for name in done_before} == stamps  # not trained again
    assert len(list(chunks.glob("chunk_*.json"))) == 8 and len(result["rows"]) == 8
    assert all(r["status"] == "ok" and math.isfinite(r["val_acc"]) for r in result["rows"])


HEARTBEAT_SCRIPT = """
import sys, time
import torch.distributed as dist
from handgrad.sweep.ranks import Heartbeat
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
Heartbeat(dist.new_group(backend="gloo"), rank, 2, {"how": "the same log folder"}).start()
print("training", flush=True)
time.sleep(600)  # a long chunk: the main thread reaches no collective for minutes
"""


def test_heartbeat_stops_a_rank_whose_peer_died_while_it_trains(tmp_path):
    """The heartbeat (not the next collective) ends a rank whose peer was SIGKILLed in the middle of a chunk."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    ranks = [subprocess.Popen([sys.executable, "-c", HEARTBEAT_SCRIPT, str(r), port], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    try:
        assert [p.stdout.readline().strip() for p in ranks] == ["training", "training"]
        time.sleep(3)  # a few heartbeats
        ranks[1].kill()
        killed = time.monotonic()
        ranks[0].wait(timeout=60)
        assert time.monotonic() - killed < 60 and ranks[0].returncode == 1
        err = ranks[0].stderr.read()
        assert re.search(r"error: sweep rank 0 of 2: lost contact with rank(\(s\))? 1 ", err), err
    finally:
        for p in ranks:
            p.kill()
            p.communicate()
