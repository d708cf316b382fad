"""The full-space back-test: exact Frobenius products, and S / α* against dense float64 references.

The reference reads each real PEFT adapter's safetensors itself (ΔW = (lora_alpha / r)·B A in
float64), builds every method's jump as a dense matrix, and sums ‖αT̂ − T‖² and ⟨T̂, T⟩ directly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from examples.demo_run import DemoRun
from nexttools.extract import ExtractOptions, extract
from nexttools.fit import FitOptions, fit
from nexttools.frobenius import inner, squared_norm
from nexttools.lowrank import LowRankFactors
from nexttools.methods.linear_rank1 import linear_rank1
from nexttools.predictor.saved import load_predictor
from nexttools.run import OpenedRun
from nexttools.skill import full_space_backtest
from nexttools.store import open_store
from nexttools.store.trajectory import Trajectory, module_kind

K = 3
ALPHA = 1.5


def test_inner_products_match_dense_float64() -> None:
    g = torch.Generator().manual_seed(0)
    a = LowRankFactors(torch.randn(40, 3, generator=g), torch.randn(24, 3, generator=g))
    b = LowRankFactors(torch.randn(40, 5, generator=g), torch.randn(24, 5, generator=g))
    dense = torch.randn(40, 24, generator=g)
    da, db = (f.left.double() @ f.right.double().T for f in (a, b))
    assert inner(a, b) == pytest.approx(float((da * db).sum()), rel=1e-12)
    assert inner(a, dense) == pytest.approx(float((da * dense.double()).sum()), rel=1e-12)
    assert inner(dense, b) == pytest.approx(float((dense.double() * db).sum()), rel=1e-12)
    assert inner(dense, dense) == pytest.approx(float(dense.double().square().sum()), rel=1e-12)
    assert squared_norm(a) == pytest.approx(float(da.square().sum()), rel=1e-12)
    empty = LowRankFactors(torch.zeros(40, 0), torch.zeros(24, 0))
    assert inner(empty, a) == 0.0
    tall = torch.randn(2500, 6, generator=g)  # more rows than one float64 block
    factors = LowRankFactors(torch.randn(2500, 2, generator=g), torch.randn(6, 2, generator=g))
    reference = factors.left.double() @ factors.right.double().T
    assert inner(tall, factors) == pytest.approx(float((tall.double() * reference).sum()), rel=1e-12)
    assert inner(tall, tall) == pytest.approx(float(tall.double().square().sum()), rel=1e-12)


def _dense_run(run: Path, steps: tuple[int, ...]) -> tuple[list[dict[str, np.ndarray]], dict, float]:
    """Per checkpoint, {store module name: (B, A) float64}, the adapter config, and the scaling."""
    config = json.loads((run / f"checkpoint-{steps[0]}" / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    factors = []
    for step in steps:
        tensors = load_file(run / f"checkpoint-{step}" / "adapter_model.safetensors")
        pairs = {}
        for key, a in tensors.items():
            if ".lora_A." in key:
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                pairs[name] = (b.double().numpy(), a.double().numpy())
        factors.append(pairs)
    return factors, config, scaling


def _line(values: list[np.ndarray], steps: np.ndarray, at: float) -> np.ndarray:
    slope = np.tensordot(steps - steps.mean(), np.stack(values) - np.mean(values, axis=0), axes=1)
    slope /= np.square(steps - steps.mean()).sum()
    return np.mean(values, axis=0) + slope * (at - steps.mean())


def test_skill_and_alpha_star_match_a_dense_reference(demo_run: DemoRun, tmp_path: Path) -> None:
    extract(ExtractOptions(run=demo_run.run, base=str(demo_run.base), workdir=tmp_path, k=K, device="cpu"))
    result = fit(FitOptions(workdir=tmp_path, epochs=60, width=32, device="cpu", alpha=ALPHA, refit=False))
    skill = result.backtest.skill
    assert skill is not None and result.backtest.skill_skipped is None
    with open_store(tmp_path / "trajectory.h5") as store:
        trajectory = Trajectory.from_store(store)
        predictor = load_predictor(tmp_path, store)  # --no-refit: the back-test's own predictor
    steps = np.array(demo_run.steps, dtype=np.float64)
    factors, _, scaling = _dense_run(demo_run.run, demo_run.steps)
    held = range(trajectory.target_rows - result.backtest.holdout_rows, trajectory.target_rows)

    def delta(row: int, name: str) -> np.ndarray:
        b, a = factors[row][name]
        return scaling * b @ a

    def rank1(arrays, j: int) -> np.ndarray:
        u = arrays.u[trajectory.u_offset[j] : trajectory.u_offset[j + 1]].astype(np.float64)
        v = arrays.v[trajectory.v_offset[j] : trajectory.v_offset[j + 1]].astype(np.float64)
        return float(arrays.sigma[j]) * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))

    sums: dict[str, dict[str, np.ndarray]] = {}
    for r in held:
        spacing = (steps[r] - steps[r - K]) / K
        target = steps[r] + K * spacing
        predicted_next = predictor.predict(trajectory, r)
        predicted_line = linear_rank1(trajectory, r)
        for j, name in enumerate(trajectory.modules):
            truth = delta(r + K, name) - delta(r, name)
            window = list(range(r - K, r + 1))
            b_new = _line([factors[i][name][0] for i in window], steps[window], target).astype(np.float32)
            a_new = _line([factors[i][name][1] for i in window], steps[window], target).astype(np.float32)
            jumps = {
                "next": rank1(predicted_next, j),
                "last-interval": delta(r, name) - delta(r - K, name),
                "rl-extra": (K * spacing / steps[r]) * delta(r, name),
                "linear-rank1": rank1(predicted_line, j),
                "factor-linear": scaling * b_new.astype(np.float64) @ a_new.astype(np.float64)
                - delta(r, name),
            }
            for method, jump in jumps.items():
                for key in (module_kind(name), "overall"):
                    total = sums.setdefault(method, {}).setdefault(key, np.zeros(3))
                    total += [np.sum(jump * truth), np.sum(jump * jump), np.sum(truth * truth)]
    for method, by_kind in sums.items():
        score = skill[method]
        assert score is not None and score.alpha == ALPHA
        assert list(score.skill) == [*dict.fromkeys(module_kind(n) for n in trajectory.modules), "overall"]
        for key, (dot, predicted, true) in by_kind.items():
            expected = 1 - np.sum(ALPHA**2 * predicted - 2 * ALPHA * dot + true) / true
            assert score.skill[key] == pytest.approx(expected, rel=1e-5, abs=1e-7), (method, key)
            assert score.alpha_star[key] == pytest.approx(dot / predicted, rel=1e-5), (method, key)
    document = result.document()["backtest"]
    assert document["skill"]["last-interval"]["skill"]["overall"] == skill["last-interval"].skill["overall"]
    winner = max(skill, key=lambda m: skill[m].skill["overall"])  # type: ignore[union-attr]
    assert result.backtest.winner == winner and f"skill S {skill[winner].skill['overall']:.3f}" in (
        result.backtest.summary
    )


def test_without_the_run_files_fit_falls_back_to_the_rank1_figures(
    demo_run: DemoRun, tmp_path: Path, capsys
) -> None:
    import shutil

    run = shutil.copytree(demo_run.run, tmp_path / "run")
    extract(ExtractOptions(run=run, base=str(demo_run.base), workdir=tmp_path / "wd", k=K, device="cpu"))
    shutil.rmtree(run / f"checkpoint-{demo_run.steps[-2]}")
    result = fit(FitOptions(workdir=tmp_path / "wd", epochs=20, width=16, device="cpu"))
    assert result.backtest.skill is None and "is missing" in str(result.backtest.skill_skipped)
    assert "full-space back-test was skipped" in capsys.readouterr().err
    assert result.backtest.methods["next"] is not None and "overall cosine" in result.backtest.summary
    assert not math.isnan(result.backtest.methods["next"].cosine["overall"])


def test_modules_on_worker_threads_give_the_same_bits(demo_run: DemoRun, tmp_path: Path) -> None:
    """A LoRA run's modules are scored on one worker thread per core; the sums stay in module order,
    so the scores do not depend on the number of threads."""
    extract(ExtractOptions(run=demo_run.run, base=str(demo_run.base), workdir=tmp_path, k=K, device="cpu"))
    fit(FitOptions(workdir=tmp_path, epochs=5, width=8, device="cpu", refit=False))
    with open_store(tmp_path / "trajectory.h5") as store:
        predictor = load_predictor(tmp_path, store)
        run = OpenedRun(store)
        rows = [run.rows - K - 2, run.rows - K - 1]
        scores = {}
        before = torch.get_num_threads()
        for threads in (1, 3):
            torch.set_num_threads(threads)  # cpu_workers: this many worker threads
            try:
                scores[threads] = full_space_backtest(run, rows, predictor, ALPHA)
            finally:
                torch.set_num_threads(before)
    assert scores[1] == scores[3]
    assert all(score is not None for score in scores[1][0].values())
