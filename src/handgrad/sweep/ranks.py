"""The sweep's processes: who trains which members, how the results reach rank 0, and what happens when a rank dies.

Lightning starts the processes, as for ``fit``: ``--trainer.strategy ddp --trainer.devices N`` runs this
command again once per extra device (Lightning's subprocess launcher); under ``torchrun`` or ``srun`` the
processes are already there (``--trainer.num_nodes M``). The strategy's ``setup_environment()`` joins them
into one process group. Members are independent, so nothing is averaged: the W ranks train disjoint chunks of
members, each chunk as one batched model on the rank's own device, on the full training set.

Each chunk is fitted by a one-device Trainer on the rank's device, not through the DDP strategy itself: DDP would
wrap the module in DistributedDataParallel, which broadcasts rank 0's parameters to every rank and checks that all
ranks hold the same shapes (here they hold different members, possibly a different number of them), and the
training data would be sharded over the ranks (here every member sees all of it).

    chunk c  = members [c K, (c + 1) K)              K = members per step (fixed for the whole sweep)
    round r  : rank w trains the (r W + w)-th chunk that is not done yet, then rank 0 gathers the round's results

Coordination goes through a gloo group (CPU tensors and pickled objects, also when training uses NCCL), and a
second gloo group carries a heartbeat: every :data:`HEARTBEAT_S` seconds every rank passes a monitored barrier;
when a rank stops (killed, out of memory, machine gone) the others notice within :data:`HEARTBEAT_TIMEOUT_S`
seconds, print one ``error:`` line naming the lost rank and exit with code 1. The chunks completed so far are on
disk (rank 0 writes each one atomically as it arrives): rerunning the same command into the same log folder
trains only the rest.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from handgrad.runtime.errors import RankLostError

HEARTBEAT_S = 2.0
HEARTBEAT_TIMEOUT_S = 30.0
CPU_MEMBERS_PER_STEP = 16  # on a CPU: 16 reference networks (1.7 M parameters, x3 with gradients, momentum) ~ 0.3 GB


class Ranks:
    """This process's rank among the sweep's W processes, the collectives the sweep needs, and the heartbeat.
    With one process every collective is the identity."""

    def __init__(self, strategy=None):
        self.world, self.rank, self.local_rank = 1, 0, 0
        self.group = self._heartbeat = None
        self.resume = {"how": "the same command with --trainer.logger.init_args.version N"}  # said when a rank is lost
        if strategy is None or strategy.world_size == 1:
            return
        strategy.setup_environment()  # Lightning's own process group set-up (backend, addresses, timeout)
        self.world, self.rank, self.local_rank = strategy.world_size, strategy.global_rank, strategy.local_rank
        self.group = dist.new_group(backend="gloo")
        self._heartbeat = Heartbeat(dist.new_group(backend="gloo"), self.rank, self.world, self.resume)
        self._heartbeat.start()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        self._collective(lambda: dist.broadcast_object_list(box, src=0, group=self.group))
        return box[0]

    def gather(self, obj: Any) -> Optional[list]:
        """Every rank's ``obj`` on rank 0 (a list in rank order), None on the others."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        self._collective(lambda: dist.gather_object(obj, out, dst=0, group=self.group))
        return out

    def all_min(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value])
        self._collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group))
        return int(t)

    def barrier(self) -> None:
        if self.world > 1:
            self._collective(lambda: dist.barrier(group=self.group))

    def _collective(self, call) -> None:
        """Run one collective; a peer that is gone is a :class:`RankLostError` naming it, not a gloo traceback."""
        try:
            call()
        except RuntimeError as err:
            raise RankLostError(lost_rank_message(err, self.rank, self.world, self.resume["how"])) from None

    def close(self) -> None:
        """Stop the heartbeat and leave the process group (all ranks call this after the last gather): a process
        that exits with its gloo groups still alive can abort in their C++ destructors ("terminate called without
        an active exception"), and rank 0 goes on alone (test, report) as one process."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self.world > 1 and dist.is_initialized():
            self.barrier()
            dist.destroy_process_group()
            self.group = None
            self.world = 1


class Heartbeat(threading.Thread):
    """A monitored barrier of all ranks every HEARTBEAT_S seconds on its own gloo group; it fails within
    HEARTBEAT_TIMEOUT_S when a rank is gone. Then this process prints which rank was lost and exits (code 1):
    the main thread may be blocked in a collective that would otherwise wait for the process group's timeout."""

    def __init__(self, group, rank: int, world: int, resume: dict):
        super().__init__(daemon=True, name="handgrad-sweep-heartbeat")
        self.group, self.rank, self.world, self.resume = group, rank, world, resume
        self._stop_asked = threading.Event()

    def run(self) -> None:
        try:
            while True:
                dist.monitored_barrier(self.group, timeout=timedelta(seconds=HEARTBEAT_TIMEOUT_S), wait_all_ranks=True)
                done = torch.tensor([int(self._stop_asked.is_set())])
                dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self.group)
                if done.item():
                    return
                self._stop_asked.wait(HEARTBEAT_S)
        except Exception as err:  # noqa: BLE001  (any failure of the heartbeat means a rank is gone)
            print(f"error: {lost_rank_message(err, self.rank, self.world, self.resume['how'])}", file=sys.stderr,
                  flush=True)
            os._exit(1)

    def stop(self) -> None:
        self._stop_asked.set()
        self.join()


def lost_rank_message(err: Exception, rank: int, world: int, resume: str) -> str:
    """Which rank stopped, from a failed collective: a monitored barrier tells rank 0 the ranks that did not arrive
    ("Ranks 1, 3 failed to pass monitoredBarrier"); the others only see that rank 0 is gone or gave up (with two
    ranks, the lost one is the other one)."""
    found = re.search(r"Ranks? ([\d, ]+) failed to pass", str(err))
    if found:
        lost = f"rank(s) {found.group(1).strip()}"
    elif world == 2:
        lost = f"rank {1 - rank}"
    else:
        lost = "another rank (see rank 0's output)" if rank == 0 else "rank 0 (or another rank: see rank 0's output)"
    return (f"sweep rank {rank} of {world}: lost contact with {lost} (it was killed, ran out of memory, or its "
            f"machine is gone). The chunks completed so far are saved: to train only the rest, run {resume}")


# ----------------------------------------------------------------------------- how many members per step


def default_members_per_step(device: torch.device, sizes: list[int], batch_size: int, dtype: torch.dtype,
                             keep_best: bool) -> int:
    """K when ``--model.members_per_step`` is not given. On a CPU a fixed :data:`CPU_MEMBERS_PER_STEP`. On a GPU
    half the free memory divided by one member's share: its parameters in every copy the step keeps (weights,
    gradients, momentum buffers, the SGD step's two work tensors, and the best-epoch copy with ``--select
    best_epoch``) plus its activations and deltas for one batch (a^l, z^l, delta^l for every layer)."""
    if device.type != "cuda":
        return CPU_MEMBERS_PER_STEP
    free, _ = torch.cuda.mem_get_info(device)
    size = torch.tensor([], dtype=dtype).element_size()
    params = sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))
    per_member = size * (params * (6 if keep_best else 5) + 3 * batch_size * sum(sizes[1:]))
    return max(1, int(0.5 * free // per_member))


def chunks_of(n_members: int, k: int) -> list[list[int]]:
    """Member indices in chunks of k: [0, k), [k, 2k), ..."""
    return [list(range(s, min(s + k, n_members))) for s in range(0, n_members, k)]
