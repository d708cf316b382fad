"""``relex`` against a dense float64 implementation of RELEX's rule: M of flattened global deltas, its
top right-singular vector by a full SVD, the coefficients' least-squares line (numpy), the rise along
v to the common target step. LoRA (factors) and full-weight (blocks) runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from examples.demo_run import DemoRun
from nexttools.extract import ExtractOptions, extract
from nexttools.methods import get_method
from nexttools.methods.base import JumpRequest, target_step
from nexttools.run import OpenedRun
from nexttools.store import open_store


def _dense(change: object) -> torch.Tensor:
    if isinstance(change, torch.Tensor):
        return change.double()
    return change.left.double() @ change.right.double().T  # type: ignore[attr-defined]


def _reference(deltas: list[torch.Tensor], steps: list[float], target: float) -> torch.Tensor:
    """RELEX's rule, dense, float64: the rise of the fitted coefficient line along the top direction."""
    matrix = torch.stack([d.reshape(-1) for d in deltas])  # (T, out·in)
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    v = vh[0]
    coefficients = (matrix @ v).numpy()
    slope, _ = np.polyfit(np.asarray(steps), coefficients, 1)
    return (float(slope) * (target - steps[-1]) * v).reshape(deltas[0].shape)


def _check(workdir: Path, delta_of) -> None:
    with open_store(workdir / "trajectory.h5") as store:
        run = OpenedRun(store)
        for alpha in (0.0, 1.0, 1.5):
            jump = get_method("relex").jump(JumpRequest(run=run, alpha=alpha))
            rows = list(range(max(0, run.rows - 1 - run.k), run.rows))
            steps = [float(run.steps[r]) for r in rows]
            target = target_step(run.steps, run.k, alpha)
            assert jump.target_step == target
            for name in run.modules:
                expected = _reference([delta_of(run, r, name) for r in rows], steps, target)
                got = _dense(jump.change(name))
                scale = max(float(expected.norm()), 1e-12)
                # the jump is handed out in float32 (the factors as stored, scaled): 1e-5 relative
                assert float((got - expected).norm()) <= 1e-5 * scale + 1e-12, (alpha, name)
                if alpha == 0.0:
                    assert float(got.norm()) < 1e-12  # α = 0 is the last checkpoint itself


def test_relex_matches_its_dense_rule_on_a_lora_run(short_run: DemoRun, tmp_path: Path) -> None:
    extract(ExtractOptions(run=short_run.run, workdir=tmp_path / "work", k=3, device="cpu"))

    def delta(run: OpenedRun, row: int, name: str) -> torch.Tensor:
        factors = run.adapter(row).factors(name)
        return factors.left.double() @ factors.right.double().T

    _check(tmp_path / "work", delta)


def test_relex_matches_its_dense_rule_on_a_full_weight_run(short_run: DemoRun, tmp_path: Path) -> None:
    from tests.test_extrapolate import _full_run

    run_dir, base = _full_run(short_run, tmp_path)
    extract(ExtractOptions(run=run_dir, base=str(base), workdir=tmp_path / "work", k=2, device="cpu"))

    def delta(run: OpenedRun, row: int, name: str) -> torch.Tensor:
        return run.checkpoint(row).get(name).double() - run.base.get(name).double()  # type: ignore[union-attr]

    _check(tmp_path / "work", delta)


def test_relex_needs_two_checkpoints(tmp_path: Path) -> None:
    from examples.demo_run import build_demo_run
    from nexttools.errors import UserError

    built = build_demo_run(tmp_path / "run", steps=(10,))
    extract(ExtractOptions(run=built.run, workdir=tmp_path / "work", k=2, device="cpu"))
    with (
        open_store(tmp_path / "work" / "trajectory.h5") as store,
        pytest.raises(UserError, match="at least 2"),
    ):
        get_method("relex").jump(JumpRequest(run=OpenedRun(store), alpha=1.0))
