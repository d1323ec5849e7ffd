"""Data parallel training on CPU (gloo): W processes with batch B train exactly like one process with batch W*B.

References: the hand-written gradient of the whole batch on one process (and autograd's), and a one-process
train.py run over the same global batches. float64 throughout, tolerance 1e-12.

Run as a script (`python tests/test_distributed.py DATA_DIR`), this file is the 2-process train.py job of
test_two_processes_train_like_one: Lightning's ddp launcher starts rank 1 by running the same command again.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from handgrad.core import distributed
from handgrad.train.module import HandgradClassifier

REPO = Path(__file__).resolve().parents[1]

CLASSES = ("airplane", "bird", "cat")
# 24 training images per class, val_fraction 0.2: 57 train, 15 val. With 2 processes of batch 4 (global batch 8)
# an epoch is 7 full global batches and a last one of 1 image: rank 0 gets it, rank 1 an empty batch.
PER_CLASS_TRAIN = 24


@functools.cache
def train_py():
    """train.py as a module (loaded on first use: the all-reduce workers do not need it)."""
    spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fit_args(data_dir) -> list[str]:
    return ["fit", "--config", str(REPO / "configs" / "float64.yaml"), "--data.data_dir", str(data_dir),
            "--data.classes", f"[{', '.join(CLASSES)}]", "--model.sizes", f"[3072, 16, {len(CLASSES)}]",
            "--data.download", "false", "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


# ------------------------------------------------------------------ the all-reduce, 2 processes

def _all_reduce_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        calls = []
        all_reduce = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            calls.append(tensor.numel())
            return all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        torch.manual_seed(0)
        model = HandgradClassifier([3072, 8, 5, 3]).double()  # same seed: the same weights on both ranks
        x = torch.randn(7, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        y = torch.tensor([0, 2, 1, 1, 0, 2, 2])
        results = {}
        # the global batch of 7 split 4/3 (uneven), then 7/0 (rank 1 has nothing), as TensorBatches splits them
        for name, split in (("uneven", [(0, 4), (4, 7)]), ("empty", [(0, 7), (7, 7)])):
            s, e = split[rank]
            before = len(calls)
            for p in model.parameters():
                p.grad = None
            _, loss, n = model.forward_backward(x[s:e], y[s:e])
            results[name] = dict(loss=loss, n=n, grads=[p.grad.clone() for p in model.parameters()],
                                 calls=calls[before:])
        torch.save(dict(results=results, n_params=sum(p.numel() for p in model.parameters()),
                        init=copy.deepcopy(model.state_dict())), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_gives_the_global_batch_gradient_with_one_call(tmp_path):
    """Two gloo processes run HandgradClassifier.forward_backward on their shards of one batch of 7; every rank
    ends with the gradient and loss of the whole batch (autograd on one process), after ONE all-reduce."""
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    model = HandgradClassifier([3072, 8, 5, 3]).double()
    model.load_state_dict(ranks[0]["init"])
    x = torch.randn(7, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    loss = F.cross_entropy(model.mlp(x), y)
    loss.backward()
    expected = [p.grad for p in model.parameters()]

    for r, rank in enumerate(ranks):
        for name, res in rank["results"].items():
            assert res["calls"] == [rank["n_params"] + 2], (r, name)  # one flat buffer [n g, n L, n]
            assert res["n"].item() == 7, (r, name)
            assert abs(res["loss"].item() - loss.item()) < 1e-12, (r, name)
            for g, ref in zip(res["grads"], expected):
                assert (g - ref).abs().max() < 1e-12, (r, name)
    # the shards alone have other gradients: the all-reduce did the work
    local = HandgradClassifier([3072, 8, 5, 3]).double()
    local.load_state_dict(ranks[0]["init"])
    local.forward_backward(x[:4], y[:4])
    assert (next(local.parameters()).grad - expected[0]).abs().max() > 1e-3


def test_outside_a_process_group_nothing_is_reduced():
    model = HandgradClassifier([3072, 4, 2]).double()
    x, y = torch.randn(3, 3072, dtype=torch.float64), torch.tensor([0, 1, 1])
    _, loss, n = model.forward_backward(x, y)
    grads = [p.grad.clone() for p in model.parameters()]
    assert n.item() == 3
    assert distributed.all_reduce_gradients(model.parameters(), loss, 3)[0] is loss
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def _low_precision_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.randn(50, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
        p = torch.nn.Parameter(torch.zeros(50, dtype=torch.bfloat16))
        p.grad = g.clone()
        n_local = 999 if rank == 0 else 2  # N = 1001: bfloat16 has 8 bits, it would count 1000
        loss, n = distributed.all_reduce_gradients([p], torch.tensor(1.0 + rank, dtype=torch.bfloat16), n_local)
        torch.save(dict(g=g, grad=p.grad, loss=loss, n=n), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_all_reduce_of_half_precision_gradients_counts_exactly(tmp_path):
    """bf16-true / 16-true runs: the global batch's N and weighted mean are summed in float32, then the gradient
    is rounded once into the parameter's dtype."""
    mp.start_processes(_low_precision_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected = ((999 * ranks[0]["g"].float() + 2 * ranks[1]["g"].float()) / 1001).to(torch.bfloat16)
    for r in ranks:
        assert r["n"].item() == 1001 and r["grad"].dtype == torch.bfloat16
        assert torch.equal(r["grad"], expected)
        assert r["loss"].item() == pytest.approx((999 * 1 + 2 * 2) / 1001, rel=1e-2)  # in the loss's dtype


# ------------------------------------------------------------------ train.py with --trainer.strategy ddp

def scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def two_processes(cmd: list[str], cwd: Path) -> str:
    """Run a 2-process job to its end (killing its whole session after 240 s); its output."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the processes the launcher started are in the same session
        output, _ = proc.communicate()
        pytest.fail(f"the 2-process run did not finish in 240 s; its output:\n{output[-5000:]}")
    assert proc.returncode == 0, f"the 2-process run failed (exit {proc.returncode}):\n{output[-5000:]}"
    assert "Starting with 2 processes" in output and "distributed_backend=gloo" in output
    return output


def srun_tasks(cmd: list[str], cwd: Path, tasks: int = 2) -> str:
    """Run cmd as `srun --ntasks TASKS` would on one node: one process per task, with the variables srun gives
    each (Lightning's SLURMEnvironment reads them: it is detected by SLURM_NTASKS and creates no processes)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slurm = {"SLURM_NTASKS": str(tasks), "SLURM_NTASKS_PER_NODE": str(tasks), "SLURM_NNODES": "1",
             "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "handgrad", "SLURM_NODELIST": "127.0.0.1",
             "MASTER_PORT": str(port)}
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True,
                              env={**os.environ, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
             for r in range(tasks)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            pytest.fail(f"the srun-like job did not finish in 240 s; its output:\n{proc.communicate()[0][-5000:]}")
    assert [p.returncode for p in procs] == [0] * tasks, "\n".join(o[-3000:] for o in outputs)
    assert "distributed_backend=gloo" in outputs[0] and f"Starting with {tasks} processes" in outputs[0]
    assert all(f"GLOBAL_RANK: {r}," in o and o.count("GLOBAL_RANK") == 1 for r, o in enumerate(outputs)), \
        "each task is one rank: Lightning started no processes of its own"
    return outputs[0]


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn", "slurm"])
def test_two_processes_train_like_one(tmp_path, monkeypatch, strategy):
    """train.py fit with 2 CPU processes (gloo) and batch 4 against 1 process and batch 8: the same weights
    (float64, 1e-12) and the same logged metrics. ddp: the hand-written backward, then autograd (through DDP's
    hooks) in the same job (this file run as a script); ddp_spawn: the hand-written backward; slurm: two processes
    started as srun starts them (docs/distributed.md), the hand-written backward."""
    from conftest import write_image_folder

    data = tmp_path / "data"
    write_image_folder(data, per_class_train=PER_CLASS_TRAIN, per_class_test=3, classes=CLASSES)
    run_dir = tmp_path / strategy
    run_dir.mkdir()
    if strategy == "ddp":
        two_processes([sys.executable, __file__, str(data)], run_dir)
        backprops = ("handgrad", "autograd")
    elif strategy == "slurm":
        srun_tasks([sys.executable, str(REPO / "train.py"), *fit_args(data), "--data.batch_size", "4",
                    "--trainer.strategy", "ddp", "--trainer.devices", "2"], run_dir)
        backprops = ("handgrad",)
    else:
        two_processes([sys.executable, str(REPO / "train.py"), *fit_args(data), "--data.batch_size", "4",
                       "--trainer.strategy", "ddp_spawn", "--trainer.devices", "2"], run_dir)
        backprops = ("handgrad",)

    monkeypatch.chdir(tmp_path)
    single = train_py().main([*fit_args(data), "--data.batch_size", "8"])
    assert single.trainer.global_step == 16  # 2 epochs of 8 global batches
    ref = single.model.state_dict()
    ref_metrics = scalars(Path(single.trainer.log_dir))

    for version, backprop in enumerate(backprops):
        log_dir = run_dir / "lightning_logs" / f"version_{version}"
        ckpt = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
        assert ckpt["hyper_parameters"]["backprop"] == backprop
        assert ckpt["global_step"] == 16 and ckpt["epoch"] == 1
        for name, w in ckpt["state_dict"].items():
            assert w.dtype == torch.float64
            assert (w - ref[name]).abs().max() < 1e-12, (backprop, name)
        metrics = scalars(log_dir)
        # train/acc is summed over the processes' shards, train/loss is the global batch's; val is complete on each
        for tag in ("~train/loss_step", "train/loss", "train/acc", "~train/grad_norm", "val/loss", "val/acc"):
            assert len(metrics[tag]) == len(ref_metrics[tag]) > 0, (backprop, tag)
            assert metrics[tag] == pytest.approx(ref_metrics[tag], abs=1e-6), (backprop, tag)
    assert ref_metrics["train/loss"][1] < ref_metrics["train/loss"][0]  # it trained: not vacuous


if __name__ == "__main__":  # the 2-process ddp job of test_two_processes_train_like_one (every rank runs this)
    for backprop in ("handgrad", "autograd"):
        train_py().main([*fit_args(sys.argv[1]), "--data.batch_size", "4", "--trainer.strategy", "ddp",
                         "--trainer.devices", "2", "--model.backprop", backprop])
