"""A trajectory store's three delta kinds in memory, and the per-module helpers that cut them.

Row r of every array is checkpoint r in step order; the base (step 0) is "row −1", whose ΔW is 0.
Methods, the predictor and the back-test read a :class:`Trajectory` rather than the HDF5 file, so
that synthetic trajectories (tests) and stores go through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nexttools.errors import UserError
from nexttools.store.reader import TrajectoryStore
from nexttools.store.schema import DeltaArrays


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
    jumped: np.ndarray | None = None
    """bool ``(C,)``: row i's checkpoint holds a jump made while training (None: no jumps)."""

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
            jumped=store.jumped if store.jumped.any() else None,
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

    def free_of_jumps(self, rows: np.ndarray) -> np.ndarray:
        """The target rows among ``rows`` whose local and target deltas hold no jump: row i uses
        L_i (the interval ending at i) and T_i (the intervals i+1 … i+k), so a jump at any of the
        rows i … i+k makes it a jump, not the run's own motion."""
        if self.jumped is None:
            return rows
        spans = [bool(self.jumped[int(i) : int(i) + self.k + 1].any()) for i in rows]
        return rows[~np.asarray(spans, dtype=bool)] if len(rows) else rows

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


def per_column(per_module: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Repeat a per-module value over its segment: ``(..., M) -> (..., Σdim)``."""
    return np.repeat(per_module, np.diff(offset), axis=-1)


def module_kind(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` → ``q_proj``: the module's last name part."""
    parts = name.split(".")
    return parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]
