"""``next``: the NExt predictor's rank-1 update (paper §4.2, Eq. 10), û and v̂ renormalised."""

from __future__ import annotations

import numpy as np

from nexttools.methods.base import Jump, JumpRequest, Method, rank1_change, target_step
from nexttools.predictor import TrainedPredictor
from nexttools.store import DeltaArrays
from nexttools.store.trajectory import Trajectory


class NExt(Method):
    name = "next"
    summary = (
        "NExt: a small MLP predicts the next rank-1 update (σ, u, v) of every trained module from its "
        "trajectory so far; T̂ = σ̂ û v̂ᵀ"
    )
    needs_predictor = True

    def jump(self, request: JumpRequest) -> Jump:
        run, predictor = request.run, request.predictor
        assert predictor is not None, "next needs the predictor (needs_predictor)"
        arrays = predictor.predict(run.trajectory(), row=run.rows - 1)
        return Jump(
            target_step=target_step(run.steps, run.k, request.alpha),
            change=rank1_change(request.run, arrays, request.alpha),
        )

    def backtest(
        self, trajectory: Trajectory, rows: np.ndarray, predictor: TrainedPredictor
    ) -> dict[int, DeltaArrays]:
        predictions = {}
        for r in (int(row) for row in rows):
            live = np.flatnonzero(trajectory.global_.sigma[r] > 0)
            predictions[r] = predictor.predict_pairs(trajectory, np.full(len(live), r), live)
        return predictions
