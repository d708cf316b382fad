"""Linear baselines against exact dense computations, on synthetic trajectories whose truth is known.

This file also holds the synthetic-trajectory builders that ``test_predictor`` and ``test_fit`` use:
every module's ΔW_i is a small dense matrix, and the global, local and target triples are its numpy
SVDs, sign-aligned as DESIGN.md says (so they are what ``extract`` would store).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from nexttools.errors import UserError
from nexttools.methods.last_interval import last_interval, last_interval_available
from nexttools.methods.linear_rank1 import linear_rank1
from nexttools.store import DeltaArrays, StoreLayout, StoreWriter, open_store
from nexttools.store.trajectory import Trajectory

SHAPES = {
    "q_proj": (32, 24),
    "k_proj": (8, 24),
    "v_proj": (8, 24),
    "o_proj": (24, 32),
    "gate_proj": (40, 24),
    "up_proj": (40, 24),
    "down_proj": (24, 40),
}
STEPS = tuple(range(10, 151, 10))


def module_names(layers: int) -> list[str]:
    names = []
    for layer in range(layers):
        for kind in SHAPES:
            block = "mlp" if kind in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            names.append(f"model.layers.{layer}.{block}.{kind}.weight")
    return names


def _rank1(delta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    if not delta.any():
        return 0.0, np.zeros(delta.shape[0]), np.zeros(delta.shape[1])
    u, s, vt = np.linalg.svd(delta)
    return float(s[0]), u[:, 0], vt[0]


def _aligned(u: np.ndarray, v: np.ndarray, reference: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    flip = u[np.argmax(np.abs(u))] < 0 if reference is None else float(u @ reference) < 0
    return (-u, -v) if flip else (u, v)


def trajectory_from_deltas(
    names: Sequence[str], deltas: Sequence[Sequence[np.ndarray]], steps: Sequence[int], k: int
) -> Trajectory:
    """``deltas[j][i]`` is module j's ΔW at checkpoint i (float64 (out, in)); the base is ΔW = 0."""
    c, m = len(steps), len(names)
    u_offset = np.concatenate([[0], np.cumsum([d[0].shape[0] for d in deltas])]).astype(np.int64)
    v_offset = np.concatenate([[0], np.cumsum([d[0].shape[1] for d in deltas])]).astype(np.int64)

    def arrays(fill: float) -> DeltaArrays:
        return DeltaArrays(
            np.full((c, m), fill, np.float32),
            np.full((c, u_offset[-1]), fill, np.float32),
            np.full((c, v_offset[-1]), fill, np.float32),
        )

    kinds = {"global": arrays(0.0), "local": arrays(0.0), "target": arrays(math.nan)}
    for j, sequence in enumerate(deltas):
        us, vs = slice(u_offset[j], u_offset[j + 1]), slice(v_offset[j], v_offset[j + 1])
        previous_u = None
        for i in range(c):
            before = sequence[i - 1] if i > 0 else np.zeros_like(sequence[i])
            ahead = sequence[i + k] - sequence[i] if i + k < c else None
            sigma, u, v = _rank1(sequence[i])
            if sigma > 0:
                u, v = _aligned(u, v, previous_u)
                previous_u = u
            triples = {"global": (sigma, u, v)}
            reference = u if sigma > 0 else None
            for kind, delta in (("local", sequence[i] - before), ("target", ahead)):
                if delta is not None:
                    s, du, dv = _rank1(delta)
                    triples[kind] = (s, *_aligned(du, dv, reference)) if s > 0 else (s, du, dv)
            for kind, (s, u_, v_) in triples.items():
                kinds[kind].sigma[i, j], kinds[kind].u[i, us], kinds[kind].v[i, vs] = s, u_, v_
    return Trajectory(
        k=k,
        steps=np.asarray(steps, dtype=np.int64),
        modules=list(names),
        u_offset=u_offset,
        v_offset=v_offset,
        global_=kinds["global"],
        local=kinds["local"],
        target=kinds["target"],
        store_fingerprint="synthetic",
    )


def linear_deltas(layers: int = 1, steps: Sequence[int] = STEPS, seed: int = 0) -> list[list[np.ndarray]]:
    """ΔW_s = (a0 + b·s) vᵀ: the rank-1 factor σu moves linearly with the step (σ from 1e-3 to 1e+1)."""
    rng = np.random.default_rng(seed)
    deltas = []
    for name in module_names(layers):
        out_dim, in_dim = SHAPES[name.split(".")[-2]]
        a0, b = rng.normal(size=out_dim), rng.normal(size=out_dim)
        v = rng.normal(size=in_dim)
        scale = 10.0 ** rng.uniform(-3, 1) / np.linalg.norm(v)
        deltas.append([scale * np.outer(0.5 * a0 + b * step / 100.0, v) for step in steps])
    return deltas


def curved_deltas(layers: int = 1, steps: Sequence[int] = STEPS, seed: int = 0) -> list[list[np.ndarray]]:
    """As ``examples/demo_run.py``: the dominant direction rotates at a constant angular speed while its
    magnitude saturates (1 − e^{−s/τ}), plus two weak directions growing linearly."""
    rng = np.random.default_rng(seed)
    deltas = []
    for name in module_names(layers):
        out_dim, in_dim = SHAPES[name.split(".")[-2]]
        u_basis, _ = np.linalg.qr(rng.normal(size=(out_dim, 4)))
        v_basis, _ = np.linalg.qr(rng.normal(size=(in_dim, 4)))
        tau, omega, scale = rng.uniform(40, 120), rng.uniform(0.004, 0.012), 10.0 ** rng.uniform(-3, 1)
        sequence = []
        for step in steps:
            angle, weak = omega * step, 0.15 * scale * step / 150
            u = math.cos(angle) * u_basis[:, 0] + math.sin(angle) * u_basis[:, 1]
            v = math.cos(0.7 * angle) * v_basis[:, 0] + math.sin(0.7 * angle) * v_basis[:, 1]
            sequence.append(
                scale * (1 - math.exp(-step / tau)) * np.outer(u, v)
                + weak * np.outer(u_basis[:, 2], v_basis[:, 2])
                + 0.5 * weak * np.outer(u_basis[:, 3], v_basis[:, 3])
            )
        deltas.append(sequence)
    return deltas


def linear_trajectory(layers: int = 1, steps: Sequence[int] = STEPS, k: int = 5) -> Trajectory:
    return trajectory_from_deltas(module_names(layers), linear_deltas(layers, steps), steps, k)


def curved_trajectory(layers: int = 1, steps: Sequence[int] = STEPS, k: int = 5) -> Trajectory:
    return trajectory_from_deltas(module_names(layers), curved_deltas(layers, steps), steps, k)


def write_store(trajectory: Trajectory, path: Path) -> Path:
    """Write ``trajectory`` as a real schema-v1 store (through the store's own writer)."""
    shapes = tuple(
        (
            int(trajectory.u_offset[j + 1] - trajectory.u_offset[j]),
            int(trajectory.v_offset[j + 1] - trajectory.v_offset[j]),
        )
        for j in range(len(trajectory.modules))
    )
    steps = tuple(int(s) for s in trajectory.steps)
    content = hashlib.sha256(trajectory.global_.u.tobytes() + trajectory.global_.sigma.tobytes()).hexdigest()[
        :12
    ]
    layout = StoreLayout(
        k=trajectory.k,
        source="synthetic",
        base_model="synthetic",
        base_fingerprint="synthetic",
        run_kind="lora",
        scaling_rule="alpha/r",
        steps=steps,
        paths=tuple(f"checkpoint-{s}" for s in steps),
        fingerprints=tuple(f"{content}-{s}" for s in steps),
        modules=tuple(trajectory.modules),
        shapes=shapes,
        ranks=(8,) * len(shapes),
        carried=(),
    )
    with StoreWriter(path, layout) as writer:
        for kind, arrays in (
            ("global", trajectory.global_),
            ("local", trajectory.local),
            ("target", trajectory.target),
        ):
            for j in range(len(shapes)):
                us = slice(trajectory.u_offset[j], trajectory.u_offset[j + 1])
                vs = slice(trajectory.v_offset[j], trajectory.v_offset[j + 1])
                writer.write_module(
                    kind, j, DeltaArrays(arrays.sigma[:, j], arrays.u[:, us], arrays.v[:, vs])
                )
        for j in range(len(shapes)):  # no factors behind a synthetic trajectory: an empty band
            writer.write_gram(j, np.full((len(trajectory.steps), trajectory.k + 2), np.nan))
        writer.commit()
    return path


def matrix(arrays: DeltaArrays, trajectory: Trajectory, j: int, row: int | None = None) -> np.ndarray:
    """Module j's σuvᵀ from 1-D arrays (``row`` None) or from row ``row`` of 2-D arrays."""
    us = slice(trajectory.u_offset[j], trajectory.u_offset[j + 1])
    vs = slice(trajectory.v_offset[j], trajectory.v_offset[j + 1])
    if row is None:
        return float(arrays.sigma[j]) * np.outer(arrays.u[us], arrays.v[vs]).astype(np.float64)
    return float(arrays.sigma[row, j]) * np.outer(arrays.u[row, us], arrays.v[row, vs]).astype(np.float64)


def test_linear_rank1_is_exact_on_a_linear_trajectory() -> None:
    deltas = linear_deltas()
    trajectory = trajectory_from_deltas(module_names(1), deltas, STEPS, 5)
    for row in (5, 7, 9):  # windows of 6 checkpoints (the base, off the line, is not in them)
        predicted = linear_rank1(trajectory, row)
        for j, sequence in enumerate(deltas):
            truth = sequence[row + 5] - sequence[row]
            np.testing.assert_allclose(
                matrix(predicted, trajectory, j), truth, atol=2e-5 * np.abs(truth).max()
            )


def test_linear_rank1_matches_a_dense_least_squares_fit_on_a_curve_with_uneven_steps() -> None:
    steps = (5, 10, 20, 25, 40, 50, 65, 70, 90)
    deltas = curved_deltas(steps=steps)
    trajectory = trajectory_from_deltas(module_names(1), deltas, steps, 3)
    row = 6  # window: rows 3..6 (steps 25, 40, 50, 65), evaluated 3 mean spacings (40 steps) ahead
    predicted = linear_rank1(trajectory, row)
    window = np.array(steps[3:7], dtype=np.float64)
    for j, sequence in enumerate(deltas):
        # a_i = σ_i u_i of the (sign-aligned) top triple of ΔW_i, with a consistent sign across rows
        a = []
        for i in range(3, 7):
            u, s, vt = np.linalg.svd(sequence[i])
            sign = np.sign(
                u[:, 0] @ trajectory.global_.u[i, trajectory.u_offset[j] : trajectory.u_offset[j + 1]]
            )
            a.append(sign * s[0] * u[:, 0])
            if i == 6:
                v_last = sign * vt[0]
        slope, intercept = np.polyfit(window, np.array(a), 1)
        change = slope * (65 + 40) + intercept - a[-1]
        np.testing.assert_allclose(
            matrix(predicted, trajectory, j), np.outer(change, v_last), atol=1e-5 * np.abs(change).max()
        )
        us = slice(trajectory.u_offset[j], trajectory.u_offset[j + 1])
        assert np.linalg.norm(predicted.u[us]) == pytest.approx(1.0, abs=1e-6)


def test_linear_rank1_uses_the_base_while_the_run_is_short() -> None:
    deltas = linear_deltas()
    trajectory = trajectory_from_deltas(module_names(1), deltas, STEPS, 5)
    # row 1: points (0, ΔW=0), (10, ΔW_10), (20, ΔW_20), evaluated 5 mean spacings (50 steps) after 20;
    # ΔW_0 = 0 is off the line a0/2 + b·s, so compare with numpy's fit of the same three points
    predicted = linear_rank1(trajectory, 1)
    j = 2
    us = slice(trajectory.u_offset[j], trajectory.u_offset[j + 1])
    a = np.stack(
        [np.zeros(us.stop - us.start)]
        + [trajectory.global_.sigma[i, j] * trajectory.global_.u[i, us] for i in (0, 1)]
    )
    slope, intercept = np.polyfit([0.0, 10.0, 20.0], a.astype(np.float64), 1)
    change = slope * 70.0 + intercept - a[-1]
    np.testing.assert_allclose(predicted.sigma[j], np.linalg.norm(change), rtol=1e-5)


def test_last_interval_repeats_the_previous_k_checkpoint_change() -> None:
    deltas = curved_deltas()
    trajectory = trajectory_from_deltas(module_names(1), deltas, STEPS, 5)
    for row in (4, 9, 14):  # row 4: ΔW_4 − base; others: ΔW_r − ΔW_{r−5}
        predicted = last_interval(trajectory, row)
        for j, sequence in enumerate(deltas):
            change = sequence[row] - (sequence[row - 5] if row >= 5 else 0)
            top = np.linalg.svd(change, compute_uv=False)[0]
            assert predicted.sigma[j] == pytest.approx(top, rel=1e-5)
            u, s, vt = np.linalg.svd(change)
            np.testing.assert_allclose(
                matrix(predicted, trajectory, j), s[0] * np.outer(u[:, 0], vt[0]), atol=1e-5 * top
            )
    assert not last_interval_available(trajectory, 3)
    with pytest.raises(UserError, match="needs 5 checkpoints before row 3"):
        last_interval(trajectory, 3)


def test_baselines_only_use_rows_up_to_the_predicted_one() -> None:
    trajectory = curved_trajectory()
    row, k = 8, trajectory.k
    expected = {name: fn(trajectory, row) for name, fn in (("lin", linear_rank1), ("last", last_interval))}
    rng = np.random.default_rng(5)
    future = {}
    for kind in ("global_", "local", "target"):
        arrays = getattr(trajectory, kind)
        first = row + 1 if kind != "target" else row - k + 1  # target row i needs checkpoint i+k
        future[kind] = DeltaArrays(
            *(
                np.where(np.arange(len(a))[:, None] >= first, rng.normal(size=a.shape), a).astype(np.float32)
                if a.ndim == 2
                else a
                for a in (arrays.sigma, arrays.u, arrays.v)
            )
        )
    changed = Trajectory(**{**trajectory.__dict__, **future})
    assert not np.array_equal(changed.global_.u, trajectory.global_.u)
    for name, fn in (("lin", linear_rank1), ("last", last_interval)):
        got = fn(changed, row)
        for field in ("sigma", "u", "v"):
            np.testing.assert_array_equal(getattr(got, field), getattr(expected[name], field))


def test_zero_modules_get_no_prediction_and_rows_are_checked() -> None:
    deltas = linear_deltas()
    deltas[1] = [np.zeros_like(d) for d in deltas[1]]  # k_proj never trained
    trajectory = trajectory_from_deltas(module_names(1), deltas, STEPS, 5)
    for predicted in (linear_rank1(trajectory), last_interval(trajectory)):
        assert predicted.sigma.shape == (7,) and predicted.sigma[1] == 0
        assert not predicted.u[trajectory.u_offset[1] : trajectory.u_offset[2]].any()
        assert not predicted.v[trajectory.v_offset[1] : trajectory.v_offset[2]].any()
        assert (predicted.sigma[[0, 2, 3, 4, 5, 6]] > 0).all()
    with pytest.raises(UserError, match="row 15 is outside the store's 15 checkpoints"):
        linear_rank1(trajectory, 15)


def test_baselines_read_a_real_store(tmp_path: Path) -> None:
    trajectory = curved_trajectory()
    with open_store(write_store(trajectory, tmp_path / "trajectory.h5")) as store:
        for fn in (linear_rank1, last_interval):
            from_store, in_memory = fn(store), fn(trajectory)
            for field in ("sigma", "u", "v"):
                np.testing.assert_array_equal(getattr(from_store, field), getattr(in_memory, field))
