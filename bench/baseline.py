"""The plain-PyTorch reference loop the benchmark compares against: autograd + torch.optim.SGD.

This is what a careful PyTorch user writes without any framework: the data already on the
device as one tensor, batches as slices, ``loss.backward()`` and ``opt.step()``, and the
loss accumulated on the device and read once at the end (no host synchronisation per step).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn


def reference_mlp(sizes) -> nn.Sequential:
    """Flatten, then Linear/ReLU pairs and a last Linear. Built right after ``torch.manual_seed(s)`` it holds the
    same initial weights as ``handgrad.core.mlp.MLP(sizes)`` built after the same seed (same layers, same order)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(1, len(sizes)):
        layers.append(nn.Linear(sizes[i - 1], sizes[i]))
        if i < len(sizes) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_plain(train_x, train_y, *, sizes, lr, momentum, dampening=0.0, weight_decay=0.0, nesterov=False,
                epochs, batch_size, seed, val=None, low=None) -> dict:
    """Train one member with autograd + torch.optim.SGD; returns what :func:`timed_epochs` returns and "model".
    ``low``: mixed precision as PyTorch documents it, torch.autocast in that dtype (float16: with a GradScaler)."""
    torch.manual_seed(seed)
    model = reference_mlp(sizes).to(device=train_x.device, dtype=train_x.dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, dampening=dampening,
                          weight_decay=weight_decay, nesterov=nesterov)
    device = train_x.device.type
    scaler = torch.amp.GradScaler(device) if low == torch.float16 else None

    def step(xb, yb):
        with torch.autocast(device, dtype=low or torch.bfloat16, enabled=low is not None):
            loss = F.cross_entropy(model(xb).float(), yb)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return loss.detach()

    summed_loss = lambda out, y: F.cross_entropy(out.float(), y, reduction="sum")  # noqa: E731
    return {**timed_epochs(step, model, summed_loss, train_x, train_y, epochs=epochs, batch_size=batch_size,
                           val=val), "model": model}


def timed_epochs(step, model, summed_loss, train_x, train_y, *, epochs, batch_size, val=None) -> dict:
    """``epochs`` passes of ``step(xb, yb) -> loss`` over slices of the device-resident tensors; returns
    {"epoch_s": [seconds per epoch], "epoch_cpu_s": [CPU seconds of this process per epoch], "train_loss": last
    epoch's mean loss}.

    Each epoch is timed from a device synchronisation to the next (the work queued in it is finished); the loss is
    summed on the device and read once at the end. With ``val=(val_x, val_y)`` every epoch ends with a pass of
    ``model`` over the validation set (``summed_loss(out, y)`` and the correct count summed on the device), as a
    Trainer's validation would."""
    device = train_x.device
    n = train_x.shape[0]
    epoch_s, epoch_cpu_s = [], []
    loss_sum = torch.zeros((), device=device, dtype=train_x.dtype)
    val_loss_sum = torch.zeros((), device=device, dtype=train_x.dtype)
    val_correct = torch.zeros((), device=device, dtype=torch.long)
    for _ in range(epochs):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        loss_sum.zero_()
        for i in range(0, n, batch_size):
            xb, yb = train_x[i:i + batch_size], train_y[i:i + batch_size]
            loss_sum += step(xb, yb) * xb.shape[0]
        if val is not None:
            with torch.no_grad():
                for i in range(0, val[0].shape[0], batch_size):
                    out = model(val[0][i:i + batch_size])
                    val_loss_sum += summed_loss(out, val[1][i:i + batch_size])
                    val_correct += (out.argmax(1) == val[1][i:i + batch_size]).sum()
        sync(device)
        epoch_s.append(time.perf_counter() - t0)
        epoch_cpu_s.append(time.process_time() - c0)
    return {"epoch_s": epoch_s, "epoch_cpu_s": epoch_cpu_s, "train_loss": (loss_sum / n).item()}
