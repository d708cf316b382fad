"""``linear-rank1``: the rank-1 direction extrapolated by least squares (a stand-in for AlphaRL).

a_i = σ^G_i u^G_i of the sign-aligned global triples is fitted by least squares against the step
over the last k+1 points (the base included while the run has fewer than k+1 checkpoints) and
evaluated k spacings after s_r: T̂ = (â − a_r) v^G_rᵀ, returned as σ̂ = ‖â − a_r‖,
û = (â − a_r)/σ̂, v̂ = v^G_r. Scaled by α, it lands on the common target step (the fit is linear).

AlphaRL itself (caiyuchen-ustc/AlphaRL) fits σ₁u₁ against *measured accuracy* by PLS and inverts it
at a target accuracy; that needs evaluations nexttools does not have, so this is a stand-in.
"""

from __future__ import annotations

import numpy as np

from nexttools.methods.base import Jump, JumpRequest, Method, rank1_change, step_points, target_step
from nexttools.predictor import TrainedPredictor
from nexttools.store import DeltaArrays, TrajectoryStore
from nexttools.store.trajectory import Trajectory, as_trajectory, per_column, segment_norms


def linear_rank1(source: TrajectoryStore | Trajectory, row: int = -1) -> DeltaArrays:
    """The prediction of T_row from rows ≤ ``row`` (module docstring), at α = 1.

    Returns 1-D arrays (σ̂ ``(M,)``, û ``(Σout,)``, v̂ ``(Σin,)``); modules whose global delta at
    ``row`` is zero get σ̂ = 0, û = v̂ = 0. Computed in float64, returned as float32.
    """
    trajectory = as_trajectory(source)
    r = trajectory.row_index(row)
    k, g = trajectory.k, trajectory.global_
    a = g.u[: r + 1].astype(np.float64) * per_column(g.sigma[: r + 1].astype(np.float64), trajectory.u_offset)
    steps = step_points(trajectory.steps[: r + 1])
    if len(steps) > r + 1:  # the base is the point (step 0, ΔW = 0)
        a = np.concatenate([np.zeros((1, a.shape[1])), a])
    steps, a = steps[-(k + 1) :], a[-(k + 1) :]
    centred = steps - steps.mean()
    slope = centred @ (a - a.mean(axis=0)) / np.square(centred).sum()
    ahead = steps[-1] + k * (steps[-1] - steps[0]) / (len(steps) - 1)
    change = a.mean(axis=0) + slope * (ahead - steps.mean()) - a[-1]

    sigma = segment_norms(change, trajectory.u_offset)
    sigma[g.sigma[r] <= 0] = 0.0
    live = sigma > 0
    inverse = np.divide(1.0, sigma, out=np.zeros_like(sigma), where=live)
    u = change * per_column(inverse, trajectory.u_offset)
    v = g.v[r].astype(np.float64) * per_column(live.astype(np.float64), trajectory.v_offset)
    return DeltaArrays(sigma=sigma.astype(np.float32), u=u.astype(np.float32), v=v.astype(np.float32))


class LinearRank1(Method):
    name = "linear-rank1"
    summary = (
        "least-squares line through the last k+1 rank-1 global deltas σu (along the last v), a "
        "stand-in for AlphaRL"
    )

    def jump(self, request: JumpRequest) -> Jump:
        run = request.run
        return Jump(
            target_step=target_step(run.steps, run.k, request.alpha),
            change=rank1_change(run, linear_rank1(run.store, row=run.rows - 1), request.alpha),
        )

    def backtest(
        self, trajectory: Trajectory, rows: np.ndarray, predictor: TrainedPredictor
    ) -> dict[int, DeltaArrays]:
        return {int(r): linear_rank1(trajectory, int(r)) for r in rows}
