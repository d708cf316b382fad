"""The NExt trajectory predictor (paper §4.2; ``docs/predictor.md``).

- :mod:`~nexttools.predictor.network`: the networks and the σ scaling;
- :mod:`~nexttools.predictor.samples`: a trajectory's (row, module) pairs as network inputs;
- :mod:`~nexttools.predictor.training`: training them (:func:`train_predictor`);
- :mod:`~nexttools.predictor.trained`: :class:`TrainedPredictor`, which predicts;
- :mod:`~nexttools.predictor.saved`: ``predictor.safetensors`` and ``predictor.json``.
"""

from nexttools.predictor.network import (
    DEFAULT_DEPTH,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_WIDTH,
    Architecture,
    SigmaScale,
    Standardise,
    TrajectoryNet,
    build_net,
    net_key,
)
from nexttools.predictor.samples import Batch, training_batches
from nexttools.predictor.trained import TrainedPredictor
from nexttools.predictor.training import train_nets, train_predictor

__all__ = [
    "DEFAULT_DEPTH",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "DEFAULT_WIDTH",
    "Architecture",
    "Batch",
    "SigmaScale",
    "Standardise",
    "TrainedPredictor",
    "TrajectoryNet",
    "build_net",
    "net_key",
    "train_nets",
    "train_predictor",
    "training_batches",
]
