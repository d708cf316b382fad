"""What a jump is worth in steps of the real run: an isotonic curve of real scores against the step.

The real checkpoints from the origin o to the last are scored with the user's eval; scores are
noisy, so they are first made non-decreasing in the step by isotonic regression (pool adjacent
violators, equal weights) and joined linearly: F(s). A jump's score x is worth

    steps(x) = min{s : F(s) ≥ x} − s_o

steps of the real run, and its **worth** is steps(x) divided by the steps it claims (α·k·Δ): 1 for a
perfect jump, 0 for a useless one. Two edges:

- above the last real score, the run never got there: steps is capped at s_last − s_o and the
  worth is marked a **lower bound**;
- below the origin's fitted score, the jump undid training: steps is read off the mean slope of F,
  (x − F(s_o)) / ((F(s_last) − F(s_o)) / (s_last − s_o)), which is negative (0 when F is flat).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def isotonic(values: Sequence[float]) -> np.ndarray:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([float(value), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            previous = blocks[-1]
            previous[0] = (previous[0] * previous[1] + mean * count) / (previous[1] + count)
            previous[1] += count
    return np.concatenate([np.full(int(count), mean) for mean, count in blocks])


@dataclass(frozen=True)
class RealCurve:
    """The real run's scores from the origin on: ``steps`` increasing, ``fitted`` = isotonic(scores)."""

    steps: np.ndarray
    scores: np.ndarray
    fitted: np.ndarray

    @staticmethod
    def of(steps: Sequence[int], scores: Sequence[float]) -> RealCurve:
        """The curve of real checkpoints ``steps`` (the origin first, at least two) and their scores."""
        order = np.argsort(np.asarray(steps))
        s = np.asarray(steps, dtype=np.float64)[order]
        x = np.asarray(scores, dtype=np.float64)[order]
        return RealCurve(steps=s, scores=x, fitted=isotonic(x.tolist()))

    def steps_to_reach(self, score: float) -> tuple[float, bool]:
        """(steps after the origin the real run needed to reach ``score``, whether it is a lower bound)."""
        s, f = self.steps, self.fitted
        if score > f[-1]:
            return float(s[-1] - s[0]), True
        if score <= f[0]:
            slope = (f[-1] - f[0]) / (s[-1] - s[0])
            return (float((score - f[0]) / slope) if slope > 0 else 0.0), False
        i = int(np.argmax(f >= score))  # first point at or above the score; i ≥ 1 here
        lower, upper = f[i - 1], f[i]
        where = s[i - 1] + (s[i] - s[i - 1]) * (score - lower) / (upper - lower) if upper > lower else s[i]
        return float(where - s[0]), False
