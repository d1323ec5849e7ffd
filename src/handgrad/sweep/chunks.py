"""What a sweep keeps on disk, so that a rerun into the same log folder trains only what is missing.

    <log dir>/chunks/plan.json           the options' fingerprint, the number of members, K (members per step)
    <log dir>/chunks/chunk_NNNN.pt       the final (and best-epoch) weights of chunk NNNN's members
    <log dir>/chunks/chunk_NNNN.json     their histories and failures; written last: its presence marks the chunk done

Rank 0 writes each file atomically (a temporary file beside it, then a rename) as the chunk's results arrive, so
a kill at any moment leaves whole chunks or none. A rerun keeps the saved K (the chunks must stay the same) and
refuses a folder whose chunks were trained with other options.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from handgrad.train.checkpoints import AtomicCheckpointIO
from handgrad.runtime.errors import ConfigError
from handgrad.sweep.module import METRICS
from handgrad.sweep.ranks import Ranks, chunks_of

NOT_RESULTS = ("devices", "num_nodes", "strategy", "accelerator", "logger", "enable_progress_bar",
               "enable_model_summary", "default_root_dir", "callbacks")  # trainer options that leave results alone


def fingerprint(cli) -> str:
    """What fixes the results of a chunk (the options but where and how it runs), as a short hash."""
    config = cli.config.clone().as_dict()
    for key in NOT_RESULTS:
        config["trainer"].pop(key, None)
    for key in ("members_per_step",):
        config["model"].pop(key, None)
    config.pop("config", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chunk_plan(cli, ranks: Ranks, log_dir: Path, k: int) -> tuple[list[list[int]], list[int]]:
    """The chunks of the sweep (K = ``k`` members each, the same on every rank) and those still to train; a rerun
    into a log folder with ``chunks/plan.json`` keeps that plan's K and skips the chunks saved there."""
    spec = cli.model
    plan = None
    if ranks.rank == 0:
        try:
            plan = _plan_on_disk(log_dir, {"fingerprint": fingerprint(cli), "members": len(spec.members),
                                           "members_per_step": k})
        except ConfigError as err:
            plan = {"error": str(err)}
    plan = ranks.broadcast(plan)  # every rank stops on a refused folder, not only rank 0
    if "error" in plan:
        raise ConfigError(plan["error"])
    chunks = chunks_of(len(spec.members), plan["members_per_step"])
    return chunks, [c for c in range(len(chunks)) if c not in plan["done"]]


def _plan_on_disk(log_dir: Path, plan: dict) -> dict:
    """The folder's plan (written now if there is none), with the chunks already done."""
    folder = log_dir / "chunks"
    plan_file = folder / "plan.json"
    if plan_file.is_file():
        saved = json.loads(plan_file.read_text())
        if [saved.get(key) for key in ("fingerprint", "members")] != [plan[key] for key in ("fingerprint", "members")]:
            raise ConfigError(f"{log_dir} holds the chunks of a sweep with other options: resume it with the options "
                              f"of its config.yaml, or write into a new folder (leave out "
                              f"--trainer.logger.init_args.version)")
        plan["members_per_step"] = saved["members_per_step"]
    else:
        folder.mkdir(parents=True, exist_ok=True)
        plan_file.write_text(json.dumps(plan))
    plan["done"] = sorted(int(p.stem.split("_")[1]) for p in folder.glob("chunk_*.json"))
    return plan


def save_chunk(log_dir: Path, result: dict) -> None:
    """``chunks/chunk_NNNN.pt`` (the weights) then ``chunk_NNNN.json`` (histories; its presence marks the chunk
    done), each written atomically."""
    name = log_dir / "chunks" / f"chunk_{result['chunk']:04d}"
    AtomicCheckpointIO().save_checkpoint({k: result[k] for k in ("members", "final", "best")}, name.with_suffix(".pt"))
    tmp = name.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({k: result[k] for k in ("members", "history", "steps", "failed_epoch", "global_step")}))
    tmp.replace(name.with_suffix(".json"))


def merged_outcome(cli, log_dir: Path, chunks: list[list[int]]) -> dict:
    """The saved chunks as one outcome: histories [row][member], failures, and the weights of one member."""
    parts = [json.loads((log_dir / "chunks" / f"chunk_{c:04d}.json").read_text()) for c in range(len(chunks))]
    history = {name: [sum((p["history"][name][row] for p in parts), []) for row in range(len(parts[0]["history"][name]))]
               for name in METRICS}
    k_per_chunk = len(chunks[0])

    def weights(k: int, best: bool) -> dict:
        saved = torch.load(log_dir / "chunks" / f"chunk_{k // k_per_chunk:04d}.pt", map_location="cpu", weights_only=True)
        state = saved["best" if best else "final"]
        return {name: v[k % k_per_chunk] for name, v in state.items()}

    return {"history": history, "steps": parts[0]["steps"], "failed_epoch": sum((p["failed_epoch"] for p in parts), []),
            "global_step": max(p["global_step"] for p in parts), "weights": weights, "test": None}
