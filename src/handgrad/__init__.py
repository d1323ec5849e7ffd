"""handgrad: neural-network training with hand-written backpropagation and a hand-written SGD step."""

from handgrad.backprop import backpropagation, backward
from handgrad.losses import cross_entropy, mse
from handgrad.mlp import MLP
from handgrad.optim import SGD

__all__ = ["MLP", "SGD", "backward", "backpropagation", "cross_entropy", "mse"]
__version__ = "0.1.0"
