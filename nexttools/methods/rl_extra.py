"""``rl-extra``: RL-Extra's own rule, the global delta scaled by the step ratio.

RL-Extra (Miaow-Lab/RLVR-Linearity, ``acceleration/weight_extrapolation.py``) writes
W = W_0 + (t_target / s_c)·ΔW_c: the run is assumed to move along a straight line from the base.
With the common target step t_target = s_c + α·k·Δ that is

    α·T̂ = (α·k·Δ / s_c) · ΔW_c,

which has the rank of ΔW_c (r for LoRA), so it needs no predictor and no earlier checkpoint.
"""

from __future__ import annotations

import numpy as np

from nexttools.errors import UserError
from nexttools.methods.base import Jump, JumpRequest, Method, checkpoint_spacing, target_step
from nexttools.predictor import TrainedPredictor
from nexttools.store import DeltaArrays
from nexttools.store.trajectory import Trajectory


def step_ratio(steps: np.ndarray, k: int, alpha: float) -> float:
    """α·k·Δ / s_c, the multiple of ΔW_c that RL-Extra adds (``steps`` up to the last checkpoint)."""
    last = float(steps[-1])
    if last <= 0:
        raise UserError("rl-extra scales ΔW_c by the step ratio and needs a last checkpoint after step 0")
    return alpha * k * checkpoint_spacing(steps, k) / last


class RLExtra(Method):
    name = "rl-extra"
    summary = "RL-Extra's rule: the whole change since the base, scaled by the step ratio, W_0 + (t/s_c)·ΔW_c"
    measured = True

    def jump(self, request: JumpRequest) -> Jump:
        run = request.run
        last = {run.rows - 1: step_ratio(run.steps, run.k, request.alpha)}
        return Jump(
            target_step=target_step(run.steps, run.k, request.alpha),
            change=lambda name: run.combination(name, last),
        )

    def backtest(
        self, trajectory: Trajectory, rows: np.ndarray, predictor: TrainedPredictor
    ) -> dict[int, DeltaArrays]:
        g = trajectory.global_
        predictions = {}
        for r in (int(row) for row in rows):
            ratio = step_ratio(trajectory.steps[: r + 1], trajectory.k, 1.0)
            predictions[r] = DeltaArrays(
                sigma=(ratio * g.sigma[r]).astype(np.float32), u=g.u[r].copy(), v=g.v[r].copy()
            )
        return predictions
