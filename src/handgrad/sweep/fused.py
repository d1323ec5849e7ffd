"""The training step of a :class:`handgrad.sweep.module.GridClassifier` as one compiled function or one CUDA graph."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from handgrad.core.grid import GridSGD, stacked_sgd
from handgrad.runtime.errors import SetupError

COMPILE_MODES = ("inductor", "cuda_graph")
Compile = Optional[Literal["none", "inductor", "cuda_graph"]]  # "none" or null: the eager step


def check_compile(mode: Compile, device: torch.device) -> None:
    """cuda_graph needs a CUDA device (SetupError, one line, otherwise)."""
    if mode == "cuda_graph" and device.type != "cuda":
        raise SetupError("--model.compile cuda_graph records the training step as a CUDA graph and needs a CUDA "
                         "device (--trainer.accelerator gpu); on a CPU use --model.compile inductor or none")


class FusedStep:
    """The whole training step of a :class:`GridClassifier` (forward, losses, failure mask, backward, SGD update,
    metric sums) as one function of (x, y) made of tensor operations only, run either

    - ``"inductor"``: through ``torch.compile`` (fused kernels; C++ on a CPU, Triton on a GPU), one compiled
      graph per batch shape (the last, shorter batch of an epoch gets its own);
    - ``"cuda_graph"``: recorded once per batch shape as a CUDA graph and replayed (one launch per step
      instead of ~100 kernel launches); the batch is copied into the graph's static input tensors first.
      The first step of each shape runs eagerly on a side stream (the usual warm-up), the second is
      recorded and replayed, later ones are replayed.

    It is valid only while every tensor it touches keeps its address: parameters, gradients, momentum buffers,
    work tensors, ``alive``/``failed_epoch`` and the metric sums are all updated in place (and the gradients are
    kept through validation, see ``GridClassifier.on_validation_model_zero_grad``); every step checks those
    addresses (a few dozen pointer reads) and rebuilds the plan, dropping the graphs, when one has moved.
    """

    def __init__(self, model: "GridClassifier", mode: str):
        self.model, self.mode = model, mode
        self.plan: Optional[list] = None  # per param group: (params, bufs, steps, scratch, hp tensors, any_nesterov)
        self._addresses: list = []  # where every tensor the step touches was when the plan was made
        self.compiled = None
        self.graphs: dict = {}  # batch shape -> (graph, static x, static y) or the count of warm-up steps done
        self.steps = 0  # steps run by this object (the others were eager)

    def _current_plan(self, opt: GridSGD) -> list:
        """The optimizer's tensors, gathered once (the compiled function and the graphs see plain lists); gathered
        again, and the graphs dropped, when any tensor the step touches has moved (a checkpoint loaded into the
        optimizer, the model moved to another device and back between two fits, ...)."""
        plan = [(list(g["params"]), *opt.buffers(list(g["params"])), [opt.work_tensors(p) for p in g["params"]],
                 opt.member_tensors(g, g["params"][0]), any(g["nesterov"])) for g in opt.param_groups]
        m = self.model
        tensors = [t for params, bufs, steps, scratch, hp, _ in plan
                   for t in (*params, *bufs, *steps, *(w for pair in scratch for w in pair), *hp.values())]
        tensors += [p.grad for params, *_ in plan for p in params]
        tensors += [*m.buffers(), *m.sums.sums["train"]]
        addresses = [(t.device, t.data_ptr()) for t in tensors]
        if addresses != self._addresses:
            self.plan, self._addresses = plan, addresses
            self.compiled, self.graphs = None, {}
        return self.plan

    def _step(self, x: Tensor, y: Tensor) -> None:
        m = self.model
        with torch.no_grad():
            stepping, found = m._train_math(x, y)
            for params, bufs, steps, scratch, hp, any_nesterov in self.plan:
                stacked_sgd(params, bufs, steps, scratch, hp, mask=stepping, any_nesterov=any_nesterov)
            m._after_step(found)

    def runner(self, opt: GridSGD, x: Tensor, y: Tensor):
        """A callable doing this step (for ``GridSGD.step(run=...)``), or None: take an eager step instead
        (the first step creates the momentum buffers, so it is always eager)."""
        if not opt.state or any(p.grad is None for g in opt.param_groups for p in g["params"]):
            return None
        self._current_plan(opt)
        self.steps += 1
        if self.mode == "inductor":
            if self.compiled is None:
                self.compiled = torch.compile(self._step, dynamic=False)
            return lambda: self.compiled(x, y)
        key = (tuple(x.shape), tuple(y.shape), x.dtype, y.dtype)
        entry = self.graphs.get(key, 0)
        if entry == 0:  # warm-up: a real (eager) step on a side stream, as CUDA graph capture wants
            self.graphs[key] = 1
            return lambda: self._on_side_stream(x, y)
        if entry == 1:
            self.graphs[key] = entry = self._capture(x, y)
        graph, static_x, static_y = entry

        def replay():
            static_x.copy_(x)
            static_y.copy_(y)
            graph.replay()

        return replay

    def _on_side_stream(self, x: Tensor, y: Tensor) -> None:
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            self._step(x, y)
        torch.cuda.current_stream(x.device).wait_stream(side)

    def _capture(self, x: Tensor, y: Tensor):
        """Record the step into a CUDA graph (nothing runs while recording) for this batch shape."""
        static_x, static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(static_x, static_y)
        return graph, static_x, static_y
