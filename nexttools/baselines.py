"""Linear baselines of the target delta, computed from the trajectory store alone.

Both predict the rank-1 of the target delta T_r = ΔW_{r+k} − ΔW_r of every module at store row r
(row r is checkpoint r in step order; the base, step 0, is "row −1" with ΔW = 0). Both use only
rows ≤ r, i.e. only what was known when checkpoint r was written, so the back-test in ``fit`` is
honest. ``extrapolate --method linear-rank1`` uses :func:`linear_rank1` at the last row.

- :func:`linear_rank1` (AlphaRL style, DESIGN.md "Baselines"): a_i = σ^G_i u^G_i of the
  sign-aligned global triples is fitted by least squares against the step over the last k+1 points
  (the base included while the run has fewer than k+1 checkpoints), evaluated k mean spacings after
  step s_r: T̂ = (â − a_r) v^G_rᵀ, returned as σ̂ = ‖â − a_r‖, û = (â − a_r)/σ̂, v̂ = v^G_r.
- :func:`last_interval`: the previous k-checkpoint change repeated, T̂_r = ΔW_r − ΔW_{r−k}, which
  is the store's target row r−k (T_{r−k} = ΔW_r − ΔW_{r−k}), or G_r when r−k is the base. It needs
  k checkpoints before row r counting the base; earlier rows raise ``UserError``.

Results are 1-D :class:`~nexttools.store.DeltaArrays` (σ̂ ``(M,)``, û ``(Σout,)``, v̂ ``(Σin,)``,
float32); a module without a prediction (zero global delta) has σ̂ = 0 and û = v̂ = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nexttools.errors import UserError
from nexttools.store import DeltaArrays, TrajectoryStore


@dataclass(frozen=True)
class Trajectory:
    """The three delta kinds of a store in memory, plus what is needed to cut them per module.

    ``steps`` int64 ``(C,)``; ``u_offset``/``v_offset`` int64 ``(M+1,)``; each :class:`DeltaArrays`
    is ``sigma (C, M)``, ``u (C, Σout)``, ``v (C, Σin)`` float32 (target rows r > C−1−k are NaN).
    Built from a store with :meth:`from_store`, or directly from arrays (synthetic trajectories).
    """

    k: int
    steps: np.ndarray
    modules: list[str]
    u_offset: np.ndarray
    v_offset: np.ndarray
    global_: DeltaArrays
    local: DeltaArrays
    target: DeltaArrays
    store_fingerprint: str

    @staticmethod
    def from_store(store: TrajectoryStore) -> Trajectory:
        """Read all three kinds of ``store`` (memory: 3 × C × (M + Σout + Σin) float32)."""
        return Trajectory(
            k=store.k,
            steps=np.asarray(store.steps, dtype=np.int64),
            modules=list(store.modules),
            u_offset=np.asarray(store.u_offset, dtype=np.int64),
            v_offset=np.asarray(store.v_offset, dtype=np.int64),
            global_=store.read("global"),
            local=store.read("local"),
            target=store.read("target"),
            store_fingerprint=store.fingerprint(),
        )

    def fingerprint(self) -> str:
        """The fingerprint of the store this trajectory was read from (as ``TrajectoryStore.fingerprint``)."""
        return self.store_fingerprint

    @property
    def checkpoints(self) -> int:
        """C, the number of checkpoints (rows)."""
        return len(self.steps)

    @property
    def target_rows(self) -> int:
        """C − k, the number of rows whose target delta exists (rows 0 … C−k−1)."""
        return max(self.checkpoints - self.k, 0)

    def row_index(self, row: int) -> int:
        """``row`` as an index in 0 … C−1 (negative rows count from the end, as in numpy)."""
        count = self.checkpoints
        if not -count <= row < count:
            raise UserError(f"row {row} is outside the store's {count} checkpoints")
        return row % count


def as_trajectory(source: TrajectoryStore | Trajectory) -> Trajectory:
    """``source`` itself if it is already in memory, else everything read from the store."""
    return source if isinstance(source, Trajectory) else Trajectory.from_store(source)


def segment_norms(values: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Euclidean norm of every module's segment of the last axis: ``(..., Σdim) -> (..., M)``, float64."""
    squares = np.square(values.astype(np.float64))
    return np.sqrt(np.add.reduceat(squares, offset[:-1], axis=-1))


def _per_column(per_module: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Repeat a per-module value over its segment: ``(..., M) -> (..., Σdim)``."""
    return np.repeat(per_module, np.diff(offset), axis=-1)


def linear_rank1(source: TrajectoryStore | Trajectory, row: int = -1) -> DeltaArrays:
    """AlphaRL-style least-squares extrapolation of σ^G u^G, k checkpoints after row ``row``.

    Returns 1-D arrays (σ̂ ``(M,)``, û ``(Σout,)``, v̂ ``(Σin,)``); modules whose global delta at
    ``row`` is zero get σ̂ = 0, û = v̂ = 0. Computed in float64, returned as float32.
    """
    trajectory = as_trajectory(source)
    r = trajectory.row_index(row)
    k, g = trajectory.k, trajectory.global_
    steps = trajectory.steps[: r + 1].astype(np.float64)
    a = g.u[: r + 1].astype(np.float64) * _per_column(
        g.sigma[: r + 1].astype(np.float64), trajectory.u_offset
    )
    if steps[0] > 0:  # the base is the point (step 0, ΔW = 0)
        steps = np.concatenate([[0.0], steps])
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
    u = change * _per_column(inverse, trajectory.u_offset)
    v = g.v[r].astype(np.float64) * _per_column(live.astype(np.float64), trajectory.v_offset)
    return DeltaArrays(sigma=sigma.astype(np.float32), u=u.astype(np.float32), v=v.astype(np.float32))


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


def last_interval(source: TrajectoryStore | Trajectory, row: int = -1) -> DeltaArrays:
    """The previous k-checkpoint change ΔW_r − ΔW_{r−k}, repeated as the prediction of T_r.

    Returns 1-D arrays (σ̂ ``(M,)``, û ``(Σout,)``, v̂ ``(Σin,)``). ``UserError`` when row ``row``
    has fewer than k checkpoints before it (counting the base as the checkpoint at step 0).
    """
    trajectory = as_trajectory(source)
    r = trajectory.row_index(row)
    found = _previous_interval(trajectory, r)
    if found is None:
        before = r + (1 if trajectory.steps[0] > 0 else 0)
        raise UserError(
            f"last-interval needs {trajectory.k} checkpoints before row {r} "
            f"(step {int(trajectory.steps[r])}), counting the base; it has {before}"
        )
    rows, index = found
    return DeltaArrays(sigma=rows.sigma[index].copy(), u=rows.u[index].copy(), v=rows.v[index].copy())
