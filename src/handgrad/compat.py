"""Differences between the Lightning releases pyproject.toml allows, bridged in one place through public APIs.
Each line names the release that needs it: delete it once the floor in pyproject.toml passes that release."""

import inspect

from lightning.pytorch.plugins.io import TorchCheckpointIO

# Lightning < 2.6: TorchCheckpointIO.load_checkpoint takes no `weights_only` (it loads with weights_only=False)
CHECKPOINT_IO_TAKES_WEIGHTS_ONLY = "weights_only" in inspect.signature(TorchCheckpointIO.load_checkpoint).parameters
