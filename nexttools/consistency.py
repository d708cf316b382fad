"""Trajectory consistency: does the run drift in one direction, or wander like a random walk?

Everything comes from one exact table per module that ``extract`` stores, the **Gram band**

    gram[m, i, l] = ⟨ΔW_i, ΔW_(i−l)⟩_F,   l = 0 … k+1        (float64, ``consistency/gram``)

with ΔW_(−1) = 0 (the base) and NaN where row i−l does not exist, computed from the LoRA factors
(:mod:`nexttools.frobenius`) or the dense deltas. From it, with the local deltas L_i = ΔW_i − ΔW_(i−1):

- **lag cosine** c(ℓ), ℓ = 1 … k: Σ_i ⟨L_i, L_(i+ℓ)⟩ / √(Σ_i ‖L_i‖² · Σ_i ‖L_(i+ℓ)‖²). Near 1 for a
  steady drift, ≈ 0 for a random walk (independent steps), negative for oscillation; how fast it
  decays with ℓ is how fast the direction is forgotten.
- **straightness** over the last k intervals, ‖ΔW_c − ΔW_(c−k)‖ / Σ_(i=c−k+1…c) ‖L_i‖, averaged
  over every window c: 1 for a straight line, 1/√k for a random walk of equal steps.

Per module the sums run over that module's rows; **overall** treats the whole model as one vector
(the sums run over modules too), so large modules count as much as they move. Lags count
checkpoints, not steps. A run that looks like a random walk (overall lag-1 cosine below
:data:`WALK_COSINE`, or straightness below :data:`WALK_STRAIGHTNESS` × 1/√k) gets a warning: no
extrapolation can predict its next step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

WALK_COSINE = 0.1
WALK_STRAIGHTNESS = 1.25


def gram_lags(k: int) -> int:
    """Lags the band stores, 0 … k+1: lag cosines up to k need ⟨ΔW_j, ΔW_(i−1)⟩ with j − i = k."""
    return k + 2


class _Band:
    """⟨ΔW_a, ΔW_b⟩ for rows a, b ≥ −1 (|a − b| ≤ k+1) of every module: ``(M, n)`` arrays."""

    def __init__(self, gram: np.ndarray) -> None:
        self.gram = gram  # (M, C, lags)

    def ip(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Inner products for row index arrays ``a`` and ``b`` (same shape ``(n,)``): ``(M, n)``."""
        hi, lo = np.maximum(a, b), np.minimum(a, b)
        out = np.zeros((self.gram.shape[0], len(a)))
        real = hi >= 0
        out[:, real] = self.gram[:, hi[real], (hi - lo)[real]]
        return out

    def local_inner(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """⟨L_i, L_j⟩ for index arrays ``i``, ``j``: ``(M, n)``."""
        return self.ip(j, i) - self.ip(j, i - 1) - self.ip(j - 1, i) + self.ip(j - 1, i - 1)


@dataclass(frozen=True)
class Consistency:
    """Lag cosines ``(M, k)`` / ``(k,)`` and straightness ``(M,)`` / scalar, per module and overall."""

    k: int
    lag_cosine: np.ndarray
    straightness: np.ndarray
    overall_lag_cosine: np.ndarray
    overall_straightness: float

    @property
    def random_walk_straightness(self) -> float:
        """1/√k, the straightness of a random walk of equal steps."""
        return 1.0 / math.sqrt(self.k)

    @property
    def looks_like_random_walk(self) -> bool:
        cosine = float(self.overall_lag_cosine[0]) if len(self.overall_lag_cosine) else math.nan
        straight = self.overall_straightness
        return (not math.isnan(cosine) and cosine < WALK_COSINE) or (
            not math.isnan(straight) and straight < WALK_STRAIGHTNESS * self.random_walk_straightness
        )

    def document(self) -> dict[str, object]:
        """The overall figures for ``--json`` (None where undefined)."""
        return {
            "lag_cosine": [_number(x) for x in self.overall_lag_cosine],
            "straightness": _number(self.overall_straightness),
            "random_walk_straightness": self.random_walk_straightness,
            "looks_like_random_walk": self.looks_like_random_walk,
        }

    def warning(self) -> str | None:
        if not self.looks_like_random_walk:
            return None
        cosine = self.overall_lag_cosine[0] if len(self.overall_lag_cosine) else math.nan
        return (
            f"the run looks like a random walk: consecutive local deltas have cosine {cosine:.2f} and "
            f"its straightness over k={self.k} checkpoints is {self.overall_straightness:.2f} (a random "
            f"walk: {self.random_walk_straightness:.2f}, a straight line: 1); no extrapolation can "
            "predict such a run (check with `nexttools backtest`)"
        )


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def consistency(gram: np.ndarray, k: int) -> Consistency:
    """The figures of the module docstring from the Gram band ``gram (M, C, k+2)`` (float64)."""
    band = _Band(np.asarray(gram, dtype=np.float64))
    count = gram.shape[1]
    rows = np.arange(count)
    norms = band.local_inner(rows, rows)  # ‖L_i‖², (M, C)
    lag_cos, overall_cos = [], []
    for lag in range(1, k + 1):
        i = rows[: max(count - lag, 0)]
        dots, a, b = band.local_inner(i, i + lag), norms[:, i], norms[:, i + lag]
        live = ~(np.isnan(dots) | np.isnan(a) | np.isnan(b))
        sums = [np.where(live, x, 0.0).sum(axis=1) for x in (dots, a, b)]
        lag_cos.append(_ratio(sums[0], np.sqrt(sums[1] * sums[2])))
        overall_cos.append(
            float(_ratio(np.array([sums[0].sum()]), np.sqrt([sums[1].sum() * sums[2].sum()]))[0])
        )
    ends = rows[rows - k >= -1]  # windows c with ΔW_(c−k) defined (the base counts)
    modules = gram.shape[0]
    straight, overall_straight = np.full(modules, np.nan), math.nan
    if len(ends):
        chord = band.ip(ends, ends) - 2 * band.ip(ends, ends - k) + band.ip(ends - k, ends - k)  # (M, W)
        path = np.stack([np.sqrt(norms[:, c - k + 1 : c + 1]).sum(axis=1) for c in ends], axis=1)
        whole_path = np.stack([np.sqrt(norms[:, c - k + 1 : c + 1].sum(axis=0)).sum() for c in ends])
        straight = _nanmean(_ratio(np.sqrt(np.clip(chord, 0, None)), path), axis=1)
        whole_chord = np.sqrt(np.clip(chord.sum(axis=0), 0, None))
        overall_straight = float(_nanmean(_ratio(whole_chord, whole_path), axis=0))
    return Consistency(
        k=k,
        lag_cosine=np.stack(lag_cos, axis=1) if lag_cos else np.zeros((modules, 0)),
        straightness=straight,
        overall_lag_cosine=np.array(overall_cos),
        overall_straightness=overall_straight,
    )


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    live = ~np.isnan(values)
    total = np.where(live, values, 0.0).sum(axis=axis)
    count = live.sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)
