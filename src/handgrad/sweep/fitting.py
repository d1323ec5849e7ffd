"""Training a sweep's members in batched chunks: one GridClassifier per chunk, on a one-device Trainer per rank.

Every rank trains its chunks (:mod:`handgrad.sweep.ranks`), rank 0 saves each as it arrives
(:mod:`handgrad.sweep.chunks`) and, at the end, tests the selected member's weights (:func:`evaluate_on_test`).
"""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from handgrad.sweep.chunks import ChunkOutcome, chunk_plan, save_chunk
from handgrad.sweep.module import GridClassifier
from handgrad.sweep.ranks import Ranks, default_members_per_step
from handgrad.sweep.report import write_member_curves


def seed(cli) -> None:
    """Re-seed before every fit, so each run (each chunk, each sequential member) sees the same random stream."""
    seed = cli.config.seed_everything
    if seed is not False and seed is not None:
        L.seed_everything(int(seed), verbose=False)


def chunk_trainer(cli, ranks: Ranks, **kwargs) -> L.Trainer:
    """A one-device Trainer on this rank's device, with the options' settings: the members of a chunk are one
    batched model, trained on the full training set (nothing to average with other ranks)."""
    device = cli.trainer.strategy.root_device
    show = ranks.rank == 0
    config = cli.config.trainer
    options = dict(devices=[device.index] if device.type == "cuda" else 1, num_nodes=1, strategy="auto",
                   logger=False, enable_checkpointing=False, callbacks=list(cli.config_init.trainer.callbacks or []),
                   enable_progress_bar=show and config.enable_progress_bar is not False,
                   enable_model_summary=show and config.enable_model_summary is not False)
    return cli.instantiate_trainer(**(options | kwargs))


def save_config(cli, ranks: Ranks, log_dir: Path) -> None:
    """The sweep's options as ``config.yaml`` in its log folder (``--config`` it to run the same sweep again)."""
    if ranks.rank == 0:
        log_dir.mkdir(parents=True, exist_ok=True)
        cli.parser.save(cli.config, log_dir / "config.yaml", overwrite=True)


def loaders(data, trainer: L.Trainer, stage: str) -> list:
    """The datamodule's loaders for ``trainer`` (its device and dtype; one process: the full training set).

    A fit given a datamodule calls ``prepare_data`` inside a barrier of every process whenever torch.distributed
    is initialized, whatever the strategy; the sweep's ranks fit different numbers of chunks, so it prepares the
    data itself (:func:`run_chunks`, once per machine) and hands each fit its loaders."""
    data.trainer = trainer
    data.setup(stage)
    if stage == "test":
        return [data.test_dataloader()]
    return [data.train_dataloader(), data.val_dataloader()]


def train_chunk(cli, ranks: Ranks, chunk: int, indices: list[int]) -> dict:
    """Train the members ``indices`` as one GridClassifier; returns what rank 0 saves (histories, weights)."""
    spec = cli.model
    keep_best = cli.config.select == "best_epoch"
    model = GridClassifier(members=[spec.members[k] for k in indices], sizes=spec.sizes, activation=spec.activation,
                           init_seed=spec.init_seed, compile=spec.compile, keep_best=keep_best)
    trainer = chunk_trainer(cli, ranks)
    seed(cli)
    trainer.fit(model, *loaders(cli.datamodule, trainer, "fit"))
    cli.datamodule.trainer = None  # it would keep this chunk's trainer, and with it the model, alive
    names = [n for n, _ in model.net.named_parameters()]
    return {"chunk": chunk, "members": indices, "history": model.history, "steps": model.history_steps,
            "failed_epoch": model.failed_epoch.tolist(), "global_step": trainer.global_step,
            "final": {k: v.detach().cpu() for k, v in model.net.state_dict().items()},
            "best": dict(zip(names, (b.cpu() for b in model.best_weights))) if model.best_weights else None}


def run_chunks(cli, ranks: Ranks, log_dir: Path) -> Optional[ChunkOutcome]:
    """Every rank trains its chunks; rank 0 saves each as it arrives. Returns the merged outcome on rank 0."""
    spec, data = cli.model, cli.datamodule
    dtype = torch.float64 if str(cli.trainer.precision) == "64-true" else torch.float32
    k = spec.members_per_step or default_members_per_step(cli.trainer.strategy.root_device, spec.sizes,
                                                          getattr(data, "hparams", {}).get("batch_size", 256), dtype,
                                                          cli.config.select == "best_epoch")
    chunks, todo = chunk_plan(cli, ranks, log_dir, ranks.all_min(min(k, len(spec.members))))
    save_config(cli, ranks, log_dir)
    if ranks.rank == 0 and len(todo) < len(chunks):
        print(f"resuming the sweep in {log_dir}: {len(chunks) - len(todo)} of {len(chunks)} chunks are done")
    if ranks.local_rank == 0:  # decode the images once per machine; the other ranks read the cache
        cli.datamodule.prepare_data()
        cli.datamodule.setup("fit")
    ranks.barrier()
    members = cli.model.members
    for r in range(math.ceil(len(todo) / ranks.world)):
        i = r * ranks.world + ranks.rank
        result = train_chunk(cli, ranks, todo[i], chunks[todo[i]]) if i < len(todo) else None
        for got in ranks.gather(result) or []:
            if got is not None:
                save_chunk(log_dir, got)
                write_member_curves(log_dir, members, got["members"], got["history"], got["steps"])
        result = got = None  # peak memory: one chunk of members per rank (rank 0: also one round's results)
        gc.collect()  # the chunk's trainer and model refer to each other: free them now, not at some later collection
    return ChunkOutcome(log_dir, chunks) if ranks.rank == 0 else None


# ----------------------------------------------------------------------------- the selected member


def evaluate_on_test(cli, ranks: Ranks, member: dict, state: dict) -> dict:
    """The test set's loss and accuracy of one member's weights, on one device of rank 0."""
    spec = cli.model
    model = GridClassifier(members=[member], sizes=spec.sizes, activation=spec.activation, init_seed=spec.init_seed)
    model.net.to(state["fc.1.weight"].dtype)  # load float64 weights as float64, not rounded through float32
    model.net.load_state_dict({k: v[None] for k, v in state.items()})
    model.test_member = 0
    tester = chunk_trainer(cli, ranks, enable_progress_bar=False, enable_model_summary=False)
    tester.test(model, *loaders(cli.datamodule, tester, "test"), verbose=False)
    return model.test_result


# ----------------------------------------------------------------------------- the command
