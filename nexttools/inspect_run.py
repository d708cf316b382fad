"""``nexttools inspect``: the paper's §3 analysis (figures 2 and 3) on the user's own run.

Three questions, answered from the store (and, for the energy ratio, the LoRA factors):

- **Does rank 1 dominate the update?** The energy ratio σ₁/Σσᵢ of every module's global delta ΔW_i
  at every checkpoint (paper figure 2), exact from the factors. A full-weight run has no factors
  to take every singular value from cheaply, so it is not computed there.
- **Is the rank-1 trajectory linear?** Paper figure 3's protocol: a least-squares line in the step
  through the rank-1 global deltas R_i = σ_i u_i v_iᵀ of the first :data:`FIT_CHECKPOINTS`
  checkpoints predicts the next :data:`PREDICT_CHECKPOINTS` (fewer when the run is shorter); per
  module, R² = 1 − Σ_t ‖R̂_t − R_t‖² / Σ_t ‖R_t − R̄‖² over those. R̂_t is a linear combination of
  the fitted rows, so every norm is a quadratic form in the Gram matrix ⟨R_i, R_j⟩ =
  σ_iσ_j (u_i·u_j)(v_i·v_j): exact, and no out × in matrix is formed.
- **Per module kind:** the consistency figures (:mod:`nexttools.consistency`, pooled over the
  modules of the kind) and, when ``fit`` has run, its full-space skill S per method.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nexttools.consistency import Consistency, consistency
from nexttools.console import warn
from nexttools.errors import UserError
from nexttools.lowrank import energy_ratio
from nexttools.options import CheckedOptions, option, store_option, workdir_option
from nexttools.predictor.saved import recorded_backtest
from nexttools.run import OpenedRun
from nexttools.store import TrajectoryStore, open_store
from nexttools.store.trajectory import Trajectory, module_kind
from nexttools.workdir import Workdir

FIT_CHECKPOINTS = 10
PREDICT_CHECKPOINTS = 5
R2_BINS = (-math.inf, -0.5, 0.0, 0.5, 0.9, math.inf)
"""Histogram bins of R² (the paper's figure 3 splits at −0.5 and 0)."""


@dataclass(frozen=True)
class Inspection:
    """What ``inspect`` shows.

    ``energy`` ``(C, M)`` (None: a full-weight run); ``r2`` ``(M,)`` over the checkpoints
    ``fit_rows`` / ``predict_rows``; ``kinds`` the module kind of each module; ``by_kind`` the
    consistency figures pooled per kind; ``skill`` the recorded back-test's S per method and kind.
    """

    steps: np.ndarray
    modules: list[str]
    kinds: list[str]
    energy: np.ndarray | None
    r2: np.ndarray
    fit_rows: int
    predict_rows: int
    overall: Consistency | None
    by_kind: dict[str, Consistency] = field(default_factory=dict)
    skill: dict[str, dict[str, float]] = field(default_factory=dict)

    def r2_histogram(self) -> list[tuple[str, int]]:
        """(bin label, modules in it) over :data:`R2_BINS`; NaN (a module that never moved) left out."""
        values = self.r2[~np.isnan(self.r2)]
        counts, _ = np.histogram(values, bins=np.array(R2_BINS))
        labels = [_bin_label(lo, hi) for lo, hi in itertools.pairwise(R2_BINS)]
        return list(zip(labels, (int(c) for c in counts), strict=True))

    def document(self) -> dict[str, object]:
        """The ``inspect --json`` document."""
        energy = None
        if self.energy is not None:
            energy = [
                {
                    "step": int(s),
                    "min": _num(np.nanmin(e)),
                    "median": _num(np.nanmedian(e)),
                    "max": _num(np.nanmax(e)),
                }
                for s, e in zip(self.steps, self.energy, strict=True)
            ]
        return {
            "energy_ratio": energy,
            "r2": {
                "fit_checkpoints": self.fit_rows,
                "predict_checkpoints": self.predict_rows,
                "per_module": {m: _num(x) for m, x in zip(self.modules, self.r2, strict=True)},
                "histogram": dict(self.r2_histogram()),
            },
            "consistency": None if self.overall is None else self.overall.document(),
            "consistency_by_kind": {kind: c.document() for kind, c in self.by_kind.items()},
            "skill_by_kind": self.skill,
        }


def _num(value: float) -> float | None:
    return None if math.isnan(float(value)) else float(value)


def _bin_label(lo: float, hi: float) -> str:
    if math.isinf(lo):
        return f"< {hi:g}"
    if math.isinf(hi):
        return f"≥ {lo:g}"
    return f"{lo:g} … {hi:g}"


@dataclass(frozen=True)
class InspectOptions(CheckedOptions):
    """Inputs of :func:`inspect`: the store in ``workdir`` (or at ``store``), and where to draw."""

    workdir: Path = workdir_option()
    store: Path | None = store_option()
    plot: Path | None = option(
        None, "Also draw the four panels into this PNG (needs the `plots` extra).", kind="file"
    )


def inspect(workdir: Path, store_path: Path | None = None) -> Inspection:
    """The figures of the module docstring for the store in ``workdir`` (or at ``store_path``)."""
    path = Workdir(workdir, store_path).store
    with open_store(path) as store:
        trajectory = Trajectory.from_store(store)
        energy = _energy(store) if store.run_kind == "lora" else None  # None: full weights or files gone
        gram = store.gram()
        recorded = recorded_backtest(Path(workdir), store)
    kinds = [module_kind(name) for name in trajectory.modules]
    fit_rows, predict_rows = _split(trajectory.checkpoints)
    r2 = linear_r2(trajectory, fit_rows, predict_rows)
    overall = consistency(gram, trajectory.k) if gram is not None else None
    by_kind = {}
    if gram is not None:
        for kind in dict.fromkeys(kinds):
            chosen = [j for j, k in enumerate(kinds) if k == kind]
            by_kind[kind] = consistency(gram[chosen], trajectory.k)
    skill: dict[str, dict[str, float]] = {}
    for method, figures in ((recorded or {}).get("skill") or {}).items():
        if figures:
            skill[method] = dict(figures["skill"])
    return Inspection(
        trajectory.steps,
        trajectory.modules,
        kinds,
        energy,
        r2,
        fit_rows,
        predict_rows,
        overall,
        by_kind,
        skill,
    )


def _energy(store: TrajectoryStore) -> np.ndarray | None:
    """σ₁/Σσᵢ of every module's ΔW at every checkpoint ``(C, M)``, from the verified LoRA factors;
    None (with a warning) when the run's files are gone or changed: the rest needs only the store."""
    try:
        run = OpenedRun(store)
        out = np.full((run.rows, len(run.modules)), np.nan)
        for row in range(run.rows):
            for j, name in enumerate(run.modules):
                out[row, j] = energy_ratio(run.factors(row, name))
    except UserError as error:
        warn(f"no energy ratio: it needs the run's LoRA checkpoints ({error})")
        return None
    return out


def _split(count: int) -> tuple[int, int]:
    """(checkpoints fitted, checkpoints predicted): 10 and 5 as in the paper, shrunk for a short run
    (at least 2 fitted and 1 predicted; (count, 0) when the run has fewer than 3)."""
    if count < 3:
        return count, 0
    predict = min(PREDICT_CHECKPOINTS, max(1, count // 3))
    return min(FIT_CHECKPOINTS, count - predict), predict


def linear_r2(trajectory: Trajectory, fit_rows: int, predict_rows: int) -> np.ndarray:
    """R² per module of the least-squares line through rows 0 … fit_rows−1 predicting the next
    ``predict_rows`` rows (module docstring), float64 ``(M,)``; NaN when undefined."""
    modules = len(trajectory.modules)
    if predict_rows == 0:
        return np.full(modules, np.nan)
    rows = np.arange(fit_rows + predict_rows)
    g = trajectory.global_
    steps = trajectory.steps[rows].astype(np.float64)
    fit, ahead = steps[:fit_rows], steps[fit_rows:]
    centred = fit - fit.mean()
    # R̂_t = Σ_i w[t, i] R_i: the line's value at step t as weights on the fitted rows
    weights = 1.0 / fit_rows + np.outer(ahead - fit.mean(), centred) / np.square(centred).sum()
    sigma = g.sigma[rows].astype(np.float64)  # (n, M)
    u = g.u[rows].astype(np.float64)
    v = g.v[rows].astype(np.float64)
    dot_u = np.stack([np.add.reduceat(u * u[i], trajectory.u_offset[:-1], axis=1) for i in range(len(rows))])
    dot_v = np.stack([np.add.reduceat(v * v[i], trajectory.v_offset[:-1], axis=1) for i in range(len(rows))])
    gram = sigma[None, :, :] * sigma[:, None, :] * dot_u * dot_v  # (n, n, M): ⟨R_i, R_j⟩
    past, future = slice(0, fit_rows), slice(fit_rows, fit_rows + predict_rows)
    predicted = np.einsum("ti,sj,ijm->tsm", weights, weights, gram[past, past])  # ⟨R̂_t, R̂_s⟩
    cross = np.einsum("ti,itm->tm", weights, gram[past, future])  # ⟨R̂_t, R_t⟩
    true = gram[future, future]  # ⟨R_t, R_s⟩
    diagonal = np.arange(predict_rows)
    residual = (predicted[diagonal, diagonal] - 2 * cross + true[diagonal, diagonal]).sum(axis=0)
    spread = true[diagonal, diagonal].sum(axis=0) - true.sum(axis=(0, 1)) / predict_rows  # Σ‖R_t − R̄‖²
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(spread > 0, 1.0 - residual / np.where(spread > 0, spread, 1.0), np.nan)
