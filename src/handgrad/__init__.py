"""handgrad: neural-network training with hand-written backpropagation and a hand-written SGD step."""

from handgrad.core.backprop import backpropagation, backward
from handgrad.core.losses import cross_entropy, mse
from handgrad.core.mlp import MLP
from handgrad.core.optim import SGD

__all__ = ["MLP", "SGD", "backward", "backpropagation", "cross_entropy", "mse"]
__version__ = "0.1.0"
