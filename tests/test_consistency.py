"""Trajectory consistency: the stored Gram band and its figures against dense float64 references."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from examples.demo_run import DemoRun, build_demo_run
from nexttools.consistency import consistency
from nexttools.extract import ExtractOptions, extract
from nexttools.store import open_store
from tests.test_advisor import linear_factors, random_walk_factors
from tests.test_skill import _dense_run

K = 3


def _dense_deltas(run: DemoRun, modules: list[str]) -> np.ndarray:
    """ΔW of every checkpoint (the base, ΔW = 0, first), per module: a list of ``(C+1, out, in)``."""
    factors, _, scaling = _dense_run(run.run, run.steps)
    return [
        np.stack(
            [np.zeros_like(scaling * factors[0][m][0] @ factors[0][m][1])]
            + [scaling * f[m][0] @ f[m][1] for f in factors]
        )
        for m in modules
    ]  # type: ignore[return-value]


def test_gram_band_and_figures_match_dense_float64(demo_run: DemoRun, tmp_path: Path) -> None:
    summary = extract(
        ExtractOptions(run=demo_run.run, base=str(demo_run.base), workdir=tmp_path, k=K, device="cpu")
    )
    with open_store(tmp_path / "trajectory.h5") as store:
        gram, modules = store.gram(), list(store.modules)
    assert gram is not None and gram.shape == (14, 15, K + 2) and gram.dtype == np.float64
    deltas = _dense_deltas(demo_run, modules)  # index 0 is the base
    count = len(demo_run.steps)
    for m, d in enumerate(deltas):
        for i in range(count):
            for lag in range(K + 2):
                if i - lag < -1:
                    assert np.isnan(gram[m, i, lag])
                else:
                    expected = float(np.sum(d[i + 1] * d[i + 1 - lag]))
                    assert gram[m, i, lag] == pytest.approx(expected, rel=1e-9, abs=1e-15)

    local = [np.diff(d, axis=0) for d in deltas]  # L_0 … L_(C−1), (C, out, in)
    figures = consistency(gram, K)
    for lag in range(1, K + 1):
        per_module = []
        for m, ls in enumerate(local):
            dots = sum(np.sum(ls[i] * ls[i + lag]) for i in range(count - lag))
            a = sum(np.sum(ls[i] ** 2) for i in range(count - lag))
            b = sum(np.sum(ls[i + lag] ** 2) for i in range(count - lag))
            per_module.append((dots, a, b))
            assert figures.lag_cosine[m, lag - 1] == pytest.approx(dots / math.sqrt(a * b), rel=1e-7)
        dots, a, b = (sum(x[n] for x in per_module) for n in range(3))
        assert figures.overall_lag_cosine[lag - 1] == pytest.approx(dots / math.sqrt(a * b), rel=1e-7)
    ends = range(K - 1, count)  # window c spans rows c−k … c, the base being row −1
    for m, d in enumerate(deltas):
        ratios = [
            np.linalg.norm(d[c + 1] - d[c + 1 - K])
            / sum(np.linalg.norm(local[m][i]) for i in range(c - K + 1, c + 1))
            for c in ends
        ]
        assert figures.straightness[m] == pytest.approx(np.mean(ratios), rel=1e-7)
    whole = [
        math.sqrt(sum(np.sum((d[c + 1] - d[c + 1 - K]) ** 2) for d in deltas))
        / sum(math.sqrt(sum(np.sum(ls[i] ** 2) for ls in local)) for i in range(c - K + 1, c + 1))
        for c in ends
    ]
    assert figures.overall_straightness == pytest.approx(np.mean(whole), rel=1e-7)
    assert summary.consistency is not None
    assert summary.to_json()["consistency"]["straightness"] == pytest.approx(figures.overall_straightness)
    assert not summary.consistency.looks_like_random_walk  # the demo run drifts smoothly


def test_a_straight_run_is_straight_and_a_random_walk_is_flagged(tmp_path: Path) -> None:
    steps = tuple(range(10, 101, 10))
    straight = build_demo_run(tmp_path / "line", steps=steps, rank=4, alpha=8, factors=linear_factors)
    walk = build_demo_run(tmp_path / "walk", steps=steps, rank=4, alpha=8, factors=random_walk_factors)
    line = extract(ExtractOptions(run=straight.run, base=str(straight.base), workdir=tmp_path / "a", k=K))
    assert line.consistency is not None
    assert line.consistency.overall_straightness == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(line.consistency.overall_lag_cosine, 1.0, atol=1e-6)
    assert not any("random walk" in w for w in line.warnings)

    wandering = extract(ExtractOptions(run=walk.run, base=str(walk.base), workdir=tmp_path / "b", k=K))
    assert wandering.consistency is not None and wandering.consistency.looks_like_random_walk
    assert abs(wandering.consistency.overall_lag_cosine[0]) < 0.1
    assert wandering.consistency.overall_straightness < 1.25 / math.sqrt(K)
    assert any("the run looks like a random walk" in w for w in wandering.warnings)
