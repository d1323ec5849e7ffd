"""A callback whose construction waits until `parties` processes have constructed theirs: runs started "at once"
by tests/test_concurrency.py then reach the trainer's checks and folder choice within milliseconds of each other
(LightningCLI builds the callbacks just before the run's checks), the worst case for collisions."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch import Callback


class Barrier(Callback):
    def __init__(self, folder: str, parties: int, timeout: float = 120.0):
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, str(os.getpid())).touch()
        deadline = time.monotonic() + timeout
        while len(os.listdir(folder)) < parties and time.monotonic() < deadline:
            time.sleep(0.005)
