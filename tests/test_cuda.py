"""Every device path on a CUDA GPU, each against a CPU or eager reference (skipped, by the marker's name, without a
GPU; bench/gpu_check.sh runs them first). Also on the GPU elsewhere: the device-resident batches
(tests/test_data.py::test_data_lives_on_the_gpu) and the CUDA-graph grid step in float64
(tests/test_compile.py::test_cuda_graph_step_gives_the_eager_numbers)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision

from handgrad.core import losses
from handgrad.core.backprop import backward
from handgrad.core.loss_scale import LossScaler
from handgrad.core.mlp import MLP
from handgrad.runtime.errors import NonFiniteLossError
from handgrad.sweep.module import GridClassifier
from handgrad.sweep.ranks import default_members_per_step
from handgrad.train.module import HandgradClassifier
from test_module import TensorData
from test_precision import Scales, grad_scaler_run, relative, tolerance

pytestmark = pytest.mark.cuda
SIZES = [3072, 64, 32, 10]
REPO = Path(__file__).resolve().parents[1]


def gpu_trainer(**kwargs) -> L.Trainer:
    options = dict(max_epochs=2, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**(options | kwargs))


def fitted(accelerator: str, seed: int = 0, **kwargs) -> HandgradClassifier:
    torch.manual_seed(seed)
    model = HandgradClassifier(SIZES)
    gpu_trainer(accelerator=accelerator, **kwargs).fit(model, TensorData())
    return model.cpu()


def test_training_on_the_gpu_gives_the_cpu_numbers():
    """float64 (no TF32, deterministic enough): the hand-written step on the GPU trains the CPU's weights."""
    cpu, gpu = fitted("cpu", precision="64-true"), fitted("gpu", precision="64-true")
    for (n, p), (_, q) in zip(cpu.named_parameters(), gpu.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=n)


def test_the_nan_guard_flag_lives_on_the_device_and_names_the_step():
    """On an accelerator the flag is read every 50 steps (and before validation and checkpoints): the error still
    names the first bad step, found on the device."""
    model = HandgradClassifier(SIZES, nan_check_every_n_steps=None)
    with pytest.raises(NonFiniteLossError, match=r"at step 1 \("):
        gpu_trainer(max_epochs=1, limit_val_batches=0).fit(model, TensorData(nan_at=1))
    assert model._bad_step.is_cuda and int(model._bad_step) == 1


def test_members_per_step_fits_the_free_memory(monkeypatch):
    """The GPU default of members per step: half the free memory over one member's share. With the free memory
    read as 2 GiB (the real reading is asked first), a grid of that many members trains in at most 2 GiB."""
    device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    sizes = [3072, 512, 128, 32, 2]
    real = default_members_per_step(device, sizes, 256, torch.float32, keep_best=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 1024 ** 3, total))
    k = default_members_per_step(device, sizes, 256, torch.float32, keep_best=False)
    assert 10 <= k <= 60 and (real >= k or free < 2 * 1024 ** 3)  # about 30: 2 GiB / 2 over 34 MB per member
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    model = GridClassifier(members=[{"lr": 0.01, "momentum": 0.9}] * k, sizes=sizes, init_seed=0)
    gpu_trainer(max_steps=3, limit_val_batches=0).fit(model, TensorData(n=768, k=2, batch_size=256))
    assert torch.cuda.max_memory_allocated(device) - before <= 2 * 1024 ** 3


def test_ddp_with_nccl_on_one_process_trains_as_one_device():
    """Lightning's ddp strategy on one GPU (world size 1, the NCCL backend): the same weights as one device, on the
    hand-written path and on the autograd path (which DDP wraps)."""
    backends, runs = [], {}

    class Backend(L.Callback):
        def on_train_start(self, trainer, pl_module):
            backends.append(torch.distributed.get_backend() if torch.distributed.is_initialized() else None)

    try:
        for strategy in ("auto", "ddp"):  # (the process group lives on after a ddp fit: one device first)
            for backprop in ("handgrad", "autograd"):
                torch.manual_seed(0)
                model = HandgradClassifier(SIZES, backprop=backprop)
                gpu_trainer(strategy=strategy, precision="64-true", callbacks=[Backend()],
                            use_distributed_sampler=False).fit(model, TensorData())  # (else ddp shuffles the order)
                runs[strategy, backprop] = model.cpu()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert backends == [None, None, "nccl", "nccl"]
    for backprop in ("handgrad", "autograd"):
        one, ddp = runs["auto", backprop], runs["ddp", backprop]
        for (n, p), (_, q) in zip(one.named_parameters(), ddp.named_parameters()):
            torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14, msg=lambda m, n=n: f"{backprop} {n}: {m}")


def test_classify_and_predict_on_the_gpu_give_the_cpu_answers():
    torch.backends.cuda.matmul.allow_tf32 = False  # full float32 products, to compare with the CPU's
    model = fitted("gpu")
    model.input_mean.copy_(torch.tensor([0.5, 0.45, 0.4], dtype=torch.float64))
    model.input_std.copy_(torch.tensor([0.25, 0.24, 0.26], dtype=torch.float64))
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    names_cpu, p_cpu = model.classify(images)
    names_gpu, p_gpu = model.to("cuda").classify(images)
    assert p_gpu.is_cuda and names_gpu == names_cpu
    torch.testing.assert_close(p_gpu.cpu(), p_cpu, rtol=1e-4, atol=1e-6)
    data = TensorData()
    got = torch.cat([p.cpu() for p in gpu_trainer().predict(model, data.test_dataloader())])
    torch.testing.assert_close(got, model.cpu().probabilities(data.x["test"]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_gradients_equal_autograd_under_cuda_autocast(dtype):
    torch.manual_seed(0)
    hand, reference = MLP(SIZES).cuda(), MLP(SIZES).cuda()
    reference.load_state_dict(hand.state_dict())
    x, y = torch.randn(128, 3, 32, 32, device="cuda"), torch.randint(0, 10, (128,), device="cuda")
    hand.compute_dtype = dtype
    with torch.no_grad():
        out = hand(x)
        backward(hand, losses.cross_entropy(out.float(), y)[1])
    with torch.autocast("cuda", dtype=dtype):
        ref_loss = F.cross_entropy(reference(x).float(), y)
    ref_loss.backward()
    L = len(SIZES) - 1
    for l in range(1, L + 1):
        for name in ("weight", "bias"):
            ours, theirs = getattr(hand.fc[str(l)], name).grad, getattr(reference.fc[str(l)], name).grad
            assert relative(ours, theirs) <= tolerance(dtype, L, l), (l, name, relative(ours, theirs))


def test_16_mixed_on_the_gpu_scales_as_grad_scaler():
    """Lightning's 16-mixed on CUDA, its GradScaler started at a scale that overflows float16: the model puts the
    hand-written scaler in its place (same settings) and skips steps and rescales exactly as a plain loop with
    autocast, torch.amp.GradScaler and torch.optim.SGD does."""
    settings = dict(init_scale=2.0 ** 24, growth_interval=3)
    torch.manual_seed(0)
    model = HandgradClassifier(SIZES, lr=0.05)
    start = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("mlp.")}
    plugin = MixedPrecision("16-mixed", "cuda", scaler=torch.amp.GradScaler("cuda", **settings))
    record = Scales()
    gpu_trainer(max_epochs=3, plugins=[plugin], limit_val_batches=0, callbacks=[record]).fit(model, TensorData())
    assert isinstance(plugin.scaler, LossScaler) and model.mlp.compute_dtype == torch.float16
    _, scales, skipped = grad_scaler_run(start, TensorData(), 3, settings, "cuda")
    assert record.scales == scales and record.skipped == skipped
    assert any(skipped) and min(scales) < settings["init_scale"]  # it overflowed: the test is not vacuous


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_cuda_graph_grid_step_gives_the_eager_numbers_in_mixed_precision(precision):
    """The recorded CUDA graph replays the mixed-precision step (casts, per-member scales under 16-mixed, masked
    SGD) with the eager step's numbers."""
    members = [{"lr": 0.05, "momentum": 0.9, "weight_decay": 0.001}, {"lr": 0.02}, {"lr": 5.0, "momentum": 0.9}]
    runs = []
    for compile in (None, "cuda_graph"):
        model = GridClassifier(members=members, sizes=SIZES, init_seed=0, compile=compile)
        gpu_trainer(max_epochs=3, precision=precision).fit(model, TensorData(batch_size=24))  # 160 = 6 x 24 + 16
        runs.append(model.cpu())
    eager, graph = runs
    assert len(graph.fused.graphs) == 2 and graph.fused.steps > 0
    assert graph.failed_epoch.tolist() == eager.failed_epoch.tolist()
    for (n, p), (_, q) in zip(eager.named_parameters(), graph.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
    assert torch.equal(graph.loss_scale, eager.loss_scale)
    for name in eager.history:
        a, b = eager.history[name][-1], graph.history[name][-1]
        assert [math.isnan(v) for v in a] == [math.isnan(v) for v in b], name


def test_the_main_job_runs_on_the_gpu(image_folder, tmp_path, monkeypatch):
    """`python train.py` on the GPU (the generated images), in bf16-mixed: its data on the device, exit 0."""
    spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    monkeypatch.chdir(tmp_path)
    cli = train.main(["--data.data_dir", str(image_folder[0]), "--data.download", "false", "--model.sizes",
                      "[3072, 32, 2]", "--trainer.max_epochs", "2", "--trainer.accelerator", "gpu",
                      "--trainer.precision", "bf16-mixed", "--data.batch_size", "16",
                      "--trainer.enable_progress_bar", "false"])
    assert cli.datamodule.train_x.is_cuda and cli.model.mlp.compute_dtype == torch.bfloat16
    assert math.isfinite(float(cli.trainer.callback_metrics["test/acc"]))
