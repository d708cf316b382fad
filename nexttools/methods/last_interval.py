"""``last-interval``: the last k-checkpoint change repeated, T̂ = ΔW_c − ΔW_{c−k}, exact and of full rank.

For a LoRA run it is the two checkpoints' factors side by side (rank ≤ 2r, no subtraction of
factors); for a full-weight run, W_c − W_{c−k} read from the files. The interval spans k·Δ steps,
so α·T̂ lands on the common target step. (Until nexttools 0.1 this was called ``linear-full``; it is
*not* RL-Extra's rule, which is ``rl-extra``.)

The back-test reads the same change from the store: ΔW_r − ΔW_{r−k} is target row r−k
(T_{r−k} = ΔW_r − ΔW_{r−k}), or G_r when r−k is the base.
"""

from __future__ import annotations

import numpy as np

from nexttools.errors import UserError
from nexttools.methods.base import Jump, JumpRequest, Method, target_step
from nexttools.predictor import TrainedPredictor
from nexttools.store import DeltaArrays, TrajectoryStore
from nexttools.store.trajectory import Trajectory, as_trajectory


def _previous_interval(trajectory: Trajectory, r: int) -> tuple[DeltaArrays, int] | None:
    """Where ΔW_r − ΔW_{r−k} is stored: (target, r−k), (global, r) when r−k is the base, else None."""
    k = trajectory.k
    if r - k >= 0:
        return trajectory.target, r - k
    if r - k == -1 and trajectory.steps[0] > 0:
        return trajectory.global_, r
    return None


def last_interval_available(trajectory: Trajectory, row: int) -> bool:
    """Whether :func:`last_interval` can predict row ``row`` (k checkpoints before it, counting the base)."""
    return _previous_interval(trajectory, trajectory.row_index(row)) is not None


def _refuse_short(k: int, r: int, step: int, before: int) -> UserError:
    return UserError(
        f"last-interval needs {k} checkpoints before row {r} (step {step}), counting the base; "
        f"it has {before}"
    )


def last_interval(source: TrajectoryStore | Trajectory, row: int = -1) -> DeltaArrays:
    """The rank-1 of ΔW_r − ΔW_{r−k}, the prediction of T_r: 1-D arrays (σ̂ ``(M,)``, û, v̂).

    ``UserError`` when row ``row`` has fewer than k checkpoints before it (counting the base).
    """
    trajectory = as_trajectory(source)
    r = trajectory.row_index(row)
    found = _previous_interval(trajectory, r)
    if found is None:
        before = r + (1 if trajectory.steps[0] > 0 else 0)
        raise _refuse_short(trajectory.k, r, int(trajectory.steps[r]), before)
    rows, index = found
    return DeltaArrays(sigma=rows.sigma[index].copy(), u=rows.u[index].copy(), v=rows.v[index].copy())


class LastInterval(Method):
    name = "last-interval"
    summary = "the last k-checkpoint change repeated at full rank: T̂ = ΔW_c − ΔW_(c−k)"
    backtest_note = "needs k checkpoints before each held-out row, counting the base"
    measured = True

    def jump(self, request: JumpRequest) -> Jump:
        run, alpha = request.run, request.alpha
        last, older = run.rows - 1, run.rows - 1 - run.k
        if older < -1 or (older == -1 and run.steps[0] == 0):
            raise _refuse_short(run.k, last, int(run.steps[-1]), last + int(run.steps[0] > 0))
        if older >= 0:
            run.checkpoint(older)  # checked against its fingerprint now, before anything is written
        coefficients = {last: alpha, older: -alpha}
        return Jump(
            target_step=target_step(run.steps, run.k, alpha),
            change=lambda name: run.combination(name, coefficients),
        )

    def backtest(
        self, trajectory: Trajectory, rows: np.ndarray, predictor: TrainedPredictor
    ) -> dict[int, DeltaArrays] | None:
        if not all(last_interval_available(trajectory, int(r)) for r in rows):
            return None
        return {int(r): last_interval(trajectory, int(r)) for r in rows}
