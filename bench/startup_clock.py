"""A Lightning callback for the start-up measurement of bench/bench.py.

``python train.py fit ... --trainer.callbacks+=startup_clock.FirstStepClock`` (with bench/ on PYTHONPATH) prints
``HANDGRAD_FIRST_STEP_S=<seconds>`` when the first training step starts: the time since HANDGRAD_BENCH_T0 (a
``time.time()`` value the parent process sets in the environment just before it starts the command).
"""

from __future__ import annotations

import os
import time

from lightning.pytorch import Callback


class FirstStepClock(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and batch_idx == 0 and "HANDGRAD_BENCH_T0" in os.environ:
            print(f"HANDGRAD_FIRST_STEP_S={time.time() - float(os.environ['HANDGRAD_BENCH_T0']):.3f}", flush=True)
