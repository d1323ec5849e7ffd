"""What a sweep keeps on disk, so that a rerun into the same log folder trains only what is missing.

    <log dir>/chunks/plan.json           the options' fingerprint, the number of members, K (members per step)
    <log dir>/chunks/chunk_NNNN.pt       the final (and best-epoch) weights of chunk NNNN's members
    <log dir>/chunks/chunk_NNNN.json     their histories and failures, and the sha256 of chunk_NNNN.pt; written last:
                                         it marks the chunk done and vouches for its weights

Rank 0 writes every file atomically (:func:`handgrad.runtime.atomic.atomic_write`) as the chunk's results arrive,
so a kill at any moment leaves whole files. A rerun keeps the saved K (the chunks must stay the same), refuses a
folder whose chunks were trained with other options, and checks every chunk before it counts as done: its JSON holds
what a chunk holds, for the members the plan gives it, and its weights file has the recorded sha256. A chunk that
fails the check is trained again, with one notice naming it; a damaged plan.json is refused with one error line.
No number reaches the results table that an intact file does not back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from handgrad.runtime.atomic import atomic_write, sha256_of, write_text
from handgrad.runtime.errors import ConfigError
from handgrad.sweep.outcome import METRICS, STEPS, SweepOutcome
from handgrad.sweep.ranks import Ranks, chunks_of

NOT_RESULTS = ("devices", "num_nodes", "strategy", "accelerator", "logger", "enable_progress_bar",
               "enable_model_summary", "default_root_dir", "callbacks")  # trainer options that leave results alone
PLAN_KEYS = ("fingerprint", "members", "members_per_step")
CHUNK_KEYS = ("members", "history", "steps", "failed_epoch", "global_step", "sha256")


def fingerprint(cli) -> str:
    """What fixes the results of a chunk (the options but where and how it runs), as a short hash."""
    config = cli.config.clone().as_dict()
    for key in NOT_RESULTS:
        config["trainer"].pop(key, None)
    config["model"].pop("members_per_step", None)
    config.pop("config", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chunk_plan(cli, ranks: Ranks, log_dir: Path, k: int) -> tuple[list[list[int]], list[int]]:
    """The chunks of the sweep (K = ``k`` members each, the same on every rank) and those still to train; a rerun
    into a log folder with ``chunks/plan.json`` keeps that plan's K and skips the intact chunks saved there."""
    plan = None
    if ranks.rank == 0:
        try:
            plan = _plan_on_disk(log_dir, {"fingerprint": fingerprint(cli), "members": len(cli.model.members),
                                           "members_per_step": k})
        except ConfigError as err:
            plan = {"error": str(err)}
    plan = ranks.broadcast(plan)  # every rank stops on a refused folder, not only rank 0
    if "error" in plan:
        raise ConfigError(plan["error"])
    chunks = chunks_of(len(cli.model.members), plan["members_per_step"])
    return chunks, [c for c in range(len(chunks)) if c not in plan["done"]]


def _plan_on_disk(log_dir: Path, plan: dict) -> dict:
    """The folder's plan (written now if there is none), with the chunks already done."""
    folder = log_dir / "chunks"
    plan_file = folder / "plan.json"
    if (saved := saved_plan(log_dir)) is not None:
        if [saved[key] for key in ("fingerprint", "members")] != [plan[key] for key in ("fingerprint", "members")]:
            raise ConfigError(f"{log_dir} holds the chunks of a sweep with other options: resume it with the options "
                              f"of its config.yaml, or write into a new folder (leave out "
                              f"--trainer.logger.init_args.version)")
        plan["members_per_step"] = saved["members_per_step"]
    else:
        write_text(plan_file, json.dumps(plan))
    chunks = chunks_of(plan["members"], plan["members_per_step"])
    plan["done"] = [c for c, members in enumerate(chunks) if chunk_is_intact(folder, c, members)]
    return plan


def saved_plan(log_dir: Path) -> Optional[dict]:
    """The plan a sweep saved in ``log_dir`` (None if there is none); a damaged one is a :class:`ConfigError`
    saying what to do (checked before a rerun writes anything, and again when the plan is read)."""
    plan_file = log_dir / "chunks" / "plan.json"
    if not plan_file.exists():
        return None
    saved = _read_json(plan_file, PLAN_KEYS)
    if saved is None or not isinstance(saved["members_per_step"], int) or saved["members_per_step"] < 1:
        raise ConfigError(f"{plan_file} is damaged (not the plan a sweep writes): move {plan_file.parent} away to "
                          f"train every member again, or write into a new folder (leave out "
                          f"--trainer.logger.init_args.version)")
    return saved


def chunk_name(folder: Path, c: int) -> Path:
    return folder / f"chunk_{c:04d}"


def chunk_is_intact(folder: Path, c: int, members: list[int]) -> bool:
    """Whether chunk ``c`` was saved whole: False, silently, when it never finished (no JSON); False with a notice
    naming the file when what is there is damaged (then it is trained again)."""
    name = chunk_name(folder, c)
    if not name.with_suffix(".json").exists():
        return False
    saved = _read_json(name.with_suffix(".json"), CHUNK_KEYS)
    why = "its record is not a chunk's" if saved is None else \
        "it records other members" if saved["members"] != members else \
        "its weights are missing" if not name.with_suffix(".pt").is_file() else \
        "its weights do not have the recorded checksum" if sha256_of(name.with_suffix(".pt")) != saved["sha256"] \
        else None
    if why:
        print(f"notice: {name.with_suffix('.json')} is damaged ({why}); training chunk {c} again")
    return why is None


def _read_json(path: Path, keys: tuple) -> Optional[dict]:
    """The JSON object in ``path`` if it has every key of ``keys``, else None (unreadable, truncated, random)."""
    try:
        saved = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and all(key in saved for key in keys) else None


def save_chunk(log_dir: Path, result: dict) -> None:
    """``chunks/chunk_NNNN.pt`` (the weights) then ``chunk_NNNN.json`` (histories and the weights' sha256; its
    presence marks the chunk done), each written atomically."""
    name = chunk_name(log_dir / "chunks", result["chunk"])
    weights = atomic_write(name.with_suffix(".pt"),
                           lambda f: torch.save({k: result[k] for k in ("members", "final", "best")}, f))
    record = {k: result[k] for k in CHUNK_KEYS if k != "sha256"} | {"sha256": sha256_of(weights)}
    write_text(name.with_suffix(".json"), json.dumps(record))


class ChunkOutcome(SweepOutcome):
    """The saved chunks as one outcome; a member's weights are read from its chunk's file."""

    def __init__(self, log_dir: Path, chunks: list[list[int]]):
        parts = [json.loads(chunk_name(log_dir / "chunks", c).with_suffix(".json").read_text())
                 for c in range(len(chunks))]
        history = {name: [sum((p["history"][name][row] for p in parts), [])
                          for row in range(len(parts[0]["history"][name]))] for name in METRICS}
        super().__init__(history, {k: parts[0]["steps"][k] for k in STEPS},
                         sum((p["failed_epoch"] for p in parts), []), max(p["global_step"] for p in parts))
        self.folder, self.per_chunk = log_dir / "chunks", len(chunks[0])

    def weights(self, k: int, best_epoch: bool) -> dict:
        path = chunk_name(self.folder, k // self.per_chunk).with_suffix(".pt")
        state = torch.load(path, map_location="cpu", weights_only=True)["best" if best_epoch else "final"]
        return {name: v[k % self.per_chunk] for name, v in state.items()}
