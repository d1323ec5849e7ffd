"""The fused training step of the grid (GridClassifier(compile=...), handgrad.sweep.fused.FusedStep) against the eager step.

The fused step is the eager step's code run through torch.compile (or recorded as a CUDA graph), so it must
give the same numbers up to floating-point rounding (compiled kernels may fuse and reorder operations).
The torch.compile test compiles one graph with Inductor's C++ backend: 25-40 s on a 2-core CPU the first time,
a few seconds once Inductor's on-disk cache holds it. The CUDA graph test needs a GPU and is skipped without one;
on a CPU, the CUDA graph mode's bookkeeping and its premise (every tensor the step touches stays where it was)
are checked with the recording emulated.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from handgrad.sweep.fused import FusedStep
from handgrad.sweep.module import GridClassifier
from test_grid import MEMBERS, SEED, SIZES, TensorData

# the first four kinds of members, and one whose lr makes it overflow float64 in its second step: the
# failure mask must work the same inside the fused step
FUSED_MEMBERS = MEMBERS[:4] + [dict(lr=1e200, momentum=0.9)]


def fit(compile, epochs=3, precision="64-true", accelerator="cpu", batch_size=16, fused=None):
    data = TensorData(batch_size=batch_size)
    model = GridClassifier(members=FUSED_MEMBERS, sizes=SIZES, init_seed=SEED, compile=compile)
    if fused is not None:
        model.fused = FusedStep(model, fused)
    t = L.Trainer(max_epochs=epochs, precision=precision, accelerator=accelerator, devices=1, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0)
    t.fit(model, datamodule=data)
    return model, t


def assert_same_training(eager, fused, rel):
    assert fused.failed_epoch.tolist() == eager.failed_epoch.tolist() == [-1, -1, -1, -1, 0]
    assert fused.alive.tolist() == eager.alive.tolist()
    for name in eager.history:
        for e, (a, b) in enumerate(zip(eager.history[name], fused.history[name], strict=True)):
            assert [math.isnan(v) for v in a] == [math.isnan(v) for v in b], (name, e)
            assert [v for v in b if not math.isnan(v)] == pytest.approx([v for v in a if not math.isnan(v)],
                                                                        rel=rel), (name, e)
    for (n, p), (_, q) in zip(eager.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q, p, rtol=rel, atol=rel, msg=n)
    for k in range(4):  # the surviving members really trained (the comparison is not of two frozen grids)
        assert eager.history["train_loss"][-1][k] < eager.history["train_loss"][0][k]


def test_inductor_step_gives_the_eager_numbers():
    eager, _ = fit(None)
    fused, t = fit("inductor")
    assert fused.fused.compiled is not None
    assert fused.fused.steps == t.global_step - 1 == 3 * 6 - 1  # every step but the first (eager) was compiled
    assert_same_training(eager, fused, rel=1e-12)


@pytest.mark.cuda
def test_cuda_graph_step_gives_the_eager_numbers():
    # batch 20: 96 = 4 x 20 + 16, two batch shapes, so two graphs; each shape is warmed up once, then recorded
    eager, _ = fit(None, accelerator="gpu", batch_size=20)
    fused, t = fit("cuda_graph", accelerator="gpu", batch_size=20)
    assert len(fused.fused.graphs) == 2 and all(isinstance(g, tuple) for g in fused.fused.graphs.values())
    assert_same_training(eager, fused, rel=1e-12)


def addresses(model) -> dict:
    """Where every tensor a recorded step reads or writes lives (name -> data_ptr)."""
    opt = model.trainer.optimizers[0]
    out = {f"param {n}": p.data_ptr() for n, p in model.named_parameters()}
    out.update({f"grad {n}": p.grad.data_ptr() for n, p in model.named_parameters()})
    out.update({f"buffer {n}": opt.state[p]["momentum_buffer"].data_ptr() for n, p in model.named_parameters()})
    out.update({f"member steps {n}": opt.state[p]["member_step"].data_ptr() for n, p in model.named_parameters()})
    out.update({f"work {n} {i}": w.data_ptr() for n, p in model.named_parameters()
                for i, w in enumerate(opt.work_tensors(p))})
    out.update({f"hp {k}": v.data_ptr() for hp in opt._hp_cache.values() for k, v in hp.items()})
    out.update({n: b.data_ptr() for n, b in model.named_buffers()})
    out.update({f"sums {i}": t.data_ptr() for i, t in enumerate(model.sums.sums["train"])})
    return out


class RecordedStep:
    """Stands in for a torch.cuda.CUDAGraph on a CPU: replay() runs the recorded step again on the same static
    inputs, after checking that every tensor it touches is still where it was when it was recorded (a real
    graph would read and write those addresses, whatever Python holds by then)."""

    def __init__(self, fused: FusedStep, static_x, static_y):
        self.fused, self.static = fused, (static_x, static_y)
        self.at_capture = addresses(fused.model)
        self.replays = 0

    def replay(self):
        assert addresses(self.fused.model) == self.at_capture
        self.replays += 1
        self.fused._step(*self.static)


def test_cuda_graph_bookkeeping_emulated_on_a_cpu(monkeypatch):
    """The CUDA graph mode's control flow (eager first step, one warm-up then recording per batch shape, copies
    into the static inputs, replays, Lightning's step count) and its premise (every tensor stays in place,
    through epochs and validation), with the recording emulated: the numbers must be the eager ones."""

    def capture(self, x, y):
        static_x, static_y = x.clone(), y.clone()
        return RecordedStep(self, static_x, static_y), static_x, static_y

    monkeypatch.setattr(FusedStep, "_capture", capture)
    monkeypatch.setattr(FusedStep, "_on_side_stream", lambda self, x, y: self._step(x, y))
    # batch 20: 96 = 4 x 20 + 16, two batch shapes; 5 steps per epoch, with validation after each epoch
    eager, _ = fit(None, batch_size=20)
    fused, t = fit(None, batch_size=20, fused="cuda_graph")
    graphs = fused.fused.graphs
    assert set(graphs) == {((n, 3, 16), (n,), torch.float64, torch.int64) for n in (20, 16)}
    # shape 20: 12 steps = the eager first step, a warm-up, the recording step and 9 more replays; shape 16: 3 steps
    # = a warm-up, then (recorded) 2 replays
    assert [graphs[k][0].replays for k in sorted(graphs, reverse=True)] == [10, 2]
    assert fused.fused.steps == t.global_step - 1 == 14
    assert_same_training(eager, fused, rel=1e-12)


def test_cuda_graph_mode_on_a_cpu_and_unknown_modes_are_explained():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        fit("cuda_graph", epochs=1)
    with pytest.raises(ValueError, match="inductor"):
        GridClassifier(members=MEMBERS[:1], sizes=SIZES, compile="jit")
