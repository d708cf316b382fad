"""A toy eval command for ``nexttools backtest``: how close a model's weights are to a reference.

    python examples/toy_eval.py MODEL_FOLDER REFERENCE.safetensors

prints −‖W − W_ref‖_F over the tensors the reference holds (higher is better) as its last line.
The demo writes the reference as the run's own future (the trajectory at a later step), so the score
rises as the run trains and a jump scores what it actually gets right. Only numpy and safetensors are
imported, so one evaluation takes a fraction of a second; a real eval loads the model and scores a
task.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open


def distance(model: Path, reference: Path) -> float:
    """‖W − W_ref‖_F over the reference's tensors, in float64 (``KeyError`` if the model lacks one)."""
    shards = sorted(model.glob("*.safetensors"))
    where: dict[str, Path] = {}
    for shard in shards:
        with safe_open(str(shard), framework="numpy") as handle:
            where.update(dict.fromkeys(handle.keys(), shard))
    total = 0.0
    with safe_open(str(reference), framework="numpy") as ref:
        for name in ref.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            with safe_open(str(where[name]), framework="numpy") as handle:
                diff = handle.get_tensor(name).astype(np.float64) - ref.get_tensor(name).astype(np.float64)
            total += float(np.square(diff).sum())
    return total**0.5


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python examples/toy_eval.py MODEL_FOLDER REFERENCE.safetensors")
    print(-distance(Path(sys.argv[1]), Path(sys.argv[2])))
