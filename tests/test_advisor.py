"""``nexttools backtest``: worth on runs with a known answer (real PEFT adapters), the cache, refusals.

A run whose LoRA trajectory is exactly linear in the step, scored by closeness to a point further
along the same line, must give worth ≈ 1 to the linear methods at α = 1 and a recommendation; a pure
random walk, scored by closeness to its own last checkpoint, must be told not to extrapolate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.demo_run import DemoRun, build_demo_run
from nexttools.advisor import (
    BacktestOptions,
    JumpWorth,
    backtest,
    origin_rows,
    recommend,
    spread_over_origins,
)
from nexttools.extract import ExtractOptions, extract
from nexttools.extrapolate import ExtrapolateOptions, extrapolate
from nexttools.fit import FitOptions, fit
from nexttools.workdir import Workdir
from nexttools.worth import RealCurve, isotonic
from tests.cli_helpers import assert_one_line_error, invoke

K = 3
STEPS = tuple(range(10, 101, 10))
TOY_EVAL = Path(__file__).parent.parent / "examples" / "toy_eval.py"


def linear_factors(
    shape: tuple[int, int], rank: int, step: int, seed: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """B_t = (t/100)·B*, A fixed: ΔW_t = s·B_t A is exactly linear in the step."""
    g = torch.Generator().manual_seed(seed)
    b = 0.05 * torch.randn(shape[0], rank, generator=g, dtype=torch.float64)
    a = torch.randn(rank, shape[1], generator=g, dtype=torch.float64) / shape[1] ** 0.5
    return (step / 100.0) * b / scaling, a


def random_walk_factors(
    shape: tuple[int, int], rank: int, step: int, seed: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """B_t = Σ of independent increments (one per 10 steps), A fixed: no drift at all."""
    a = torch.randn(rank, shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    b = torch.zeros(shape[0], rank, dtype=torch.float64)
    for i in range(step // 10):
        g = torch.Generator().manual_seed(seed * 7919 + i)
        b += 0.02 * torch.randn(shape[0], rank, generator=g, dtype=torch.float64)
    return b / scaling, a / shape[1] ** 0.5


def _eval_cmd(reference: Path) -> str:
    return f"{sys.executable} {TOY_EVAL} {{model}} {reference}"


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoRun, Path]:
    out = tmp_path_factory.mktemp("linear")
    run = build_demo_run(out, steps=STEPS, rank=4, alpha=8, factors=linear_factors, future_step=1000)
    workdir = out / "work"
    extract(ExtractOptions(run=run.run, base=str(run.base), workdir=workdir, k=K, device="cpu"))
    return run, workdir


@pytest.fixture(scope="module")
def walk_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoRun, Path]:
    out = tmp_path_factory.mktemp("walk")
    run = build_demo_run(
        out, steps=STEPS, rank=4, alpha=8, factors=random_walk_factors, future_step=STEPS[-1]
    )
    workdir = out / "work"
    extract(ExtractOptions(run=run.run, base=str(run.base), workdir=workdir, k=K, device="cpu"))
    return run, workdir


def test_isotonic_pools_violators_and_keeps_monotone_input() -> None:
    assert isotonic([1.0, 3.0, 2.0, 4.0]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert isotonic([3.0, 2.0, 1.0]).tolist() == [2.0, 2.0, 2.0]
    assert isotonic([0.0, 1.0, 1.0, 5.0]).tolist() == [0.0, 1.0, 1.0, 5.0]
    values = np.random.default_rng(0).normal(size=30).cumsum()
    fitted = isotonic(values.tolist())
    assert (np.diff(fitted) >= 0).all() and fitted.sum() == pytest.approx(values.sum())


def test_steps_to_reach_interpolates_caps_and_goes_negative() -> None:
    curve = RealCurve.of([100, 110, 120], [0.2, 0.4, 0.6])
    assert curve.steps_to_reach(0.5) == pytest.approx((15.0, False))
    assert curve.steps_to_reach(0.6) == pytest.approx((20.0, False))
    assert curve.steps_to_reach(0.9) == (20.0, True)  # above the last real score: a lower bound
    assert curve.steps_to_reach(0.1) == pytest.approx((-5.0, False))  # below the origin: harmful
    flat = RealCurve.of([0, 10], [0.5, 0.5])
    assert flat.steps_to_reach(0.4) == (0.0, False)


def test_recommendation_prefers_the_most_real_steps_among_jumps_that_pay() -> None:
    def worth(method: str, alpha: float, steps: float, claimed: float, bound: bool = False) -> JumpWorth:
        return JumpWorth(method, alpha, 0.0, claimed, steps, steps / claimed, bound)

    def one(results: list[JumpWorth]) -> list:
        return spread_over_origins({100: results})

    results = [worth("a", 1, 50, 50), worth("b", 3, 90, 150), worth("c", 2, 50, 100, bound=True)]
    assert recommend(one(results))[0] == ("b", 3)
    assert recommend(one([worth("a", 1, 20, 50)]))[0] is None
    assert "the best, a at α=1, was worth 0.40" in recommend(one([worth("a", 1, 20, 50)]))[1]


def test_a_recommendation_must_pay_from_every_origin() -> None:
    """b pays more on average, but one origin of three gave it 0.2: a is the robust choice."""

    def worth(method: str, steps: float) -> JumpWorth:
        return JumpWorth(method, 1.0, 0.0, 50.0, steps, steps / 50.0, False)

    per_origin = {
        80: [worth("a", 30), worth("b", 50)],
        100: [worth("a", 32), worth("b", 10)],
        120: [worth("a", 28), worth("b", 50)],
    }
    spreads = {s.method: s for s in spread_over_origins(per_origin)}
    assert spreads["b"].worth_mean == pytest.approx(110 / 150) and spreads["b"].worth_min == pytest.approx(
        0.2
    )
    assert spreads["a"].worth_sd == pytest.approx(float(np.std([0.6, 0.64, 0.56], ddof=1)))
    choice, reason = recommend(list(spreads.values()))
    assert choice == ("a", 1.0) and "over 3 origins" in reason
    assert origin_rows(np.arange(10, 160, 10), 5, None, 3) == [3, 6, 9]  # ⌈5/2⌉ = 3 apart
    assert origin_rows(np.arange(10, 80, 10), 5, None, 3) == [1]  # a short run: the one origin it has


def test_a_linear_run_is_worth_a_jump(linear_run: tuple[DemoRun, Path]) -> None:
    run, workdir = linear_run
    verdict = backtest(
        BacktestOptions(
            eval_cmd=_eval_cmd(run.base.parent / "future.safetensors"), workdir=workdir, device="cpu"
        )
    )
    assert verdict.origin_step == 70 and verdict.k == K
    assert [s for s, _ in verdict.real] == [70, 80, 90, 100]
    assert all(b > a for (_, a), (_, b) in zip(verdict.real, verdict.real[1:], strict=False))
    by = {(r.method, r.alpha): r for r in verdict.results}
    for method in ("last-interval", "rl-extra", "factor-linear"):
        assert by[(method, 1.0)].worth == pytest.approx(1.0, abs=0.01), method
        assert by[(method, 0.5)].worth == pytest.approx(1.0, abs=0.01) and not by[(method, 0.5)].lower_bound
        assert by[(method, 2.0)].lower_bound and by[(method, 2.0)].worth == pytest.approx(0.5)
    # three origins (rows 1, 3, 5 of a k=3 run: steps 30, 50, 70); from the earlier ones α = 2 lands
    # inside the real run, fully measured: on a linear run it pays from every origin
    assert verdict.origin_steps == (30, 50, 70) and set(verdict.per_origin) == {30, 50, 70}
    spreads = {(s.method, s.alpha): s for s in verdict.spreads}
    assert verdict.recommendation is not None and verdict.recommendation[0] in (
        "last-interval",
        "rl-extra",
        "factor-linear",
    )
    assert spreads[verdict.recommendation].worth_min >= 0.5 and spreads[verdict.recommendation].origins == 3
    assert not list(workdir.glob(".backtest-*"))  # every scratch model is gone

    saved = json.loads(Workdir(workdir).verdict.read_text())
    assert set(saved) >= {"origin_step", "results", "real", "recommendation", "store_fingerprint", "eval_cmd"}
    assert {"method", "alpha", "worth_mean", "worth_sd", "worth_min", "origins"} <= set(saved["spreads"][0])
    assert {"method", "alpha", "score", "worth"} <= set(saved["results"][0])

    again = backtest(
        BacktestOptions(
            eval_cmd=_eval_cmd(run.base.parent / "future.safetensors"), workdir=workdir, device="cpu"
        )
    )
    assert again.evaluated == 0 and again.cached == verdict.evaluated + verdict.cached
    assert again.document()["results"] == verdict.document()["results"]


def test_a_random_walk_is_told_not_to_extrapolate(
    walk_run: tuple[DemoRun, Path], capsys, monkeypatch, tmp_path: Path
) -> None:
    run, workdir = walk_run
    command = _eval_cmd(run.base.parent / "future.safetensors")
    args = ["backtest", "--workdir", str(workdir), "--eval-cmd", command, "--device", "cpu", "--json"]
    code, out, err = invoke(args, capsys, monkeypatch)
    assert code == 0, err
    document = json.loads(out)
    assert document["recommendation"] is None
    assert max(r["worth"] for r in document["results"]) < 0.5
    assert "do not extrapolate this run" in err and "no jump was worth half the steps" in err

    # fit and extrapolate record the verdict; extrapolate warns
    fit(FitOptions(workdir=workdir, epochs=20, width=16, device="cpu"))
    assert json.loads((workdir / "predictor.json").read_text())["verdict"]["recommendation"] is None
    out_dir = tmp_path / "out"
    summary = extrapolate(
        ExtrapolateOptions(workdir=workdir, method="last-interval", alpha=1.0, out=out_dir, device="cpu")
    )
    assert any("judged: do not extrapolate this run" in w for w in summary.warnings)
    assert json.loads((out_dir / "nexttools.json").read_text())["verdict"]["recommendation"] is None
    assert "**do not extrapolate this run**" in (out_dir / "README.md").read_text()


def test_eval_command_faults_are_one_line_and_leave_nothing(
    linear_run: tuple[DemoRun, Path], capsys, monkeypatch
) -> None:
    _, workdir = linear_run
    before = sorted(p.name for p in workdir.iterdir())
    cases = [
        (
            f"{sys.executable} -c 'import sys; sys.stderr.write(\"no GPU here\\n\"); sys.exit(3)' {{model}}",
            "failed (exit 3): no GPU here",
        ),
        ("echo accuracy: high {model}", "did not print a score as its last stdout line"),
        (f"{sys.executable} -c 'print(\"nan\")' {{model}}", "not finite"),
        ("echo 1.0", "must contain {model}"),
        ("echo 1.0 {model} | tail -1", "pass --eval-shell"),
        ("cd /tmp && echo 1.0 {model}", "pass --eval-shell"),
        ("echo 1.0 '{model}", "cannot be split into arguments"),
        ("no-such-program-here {model}", "cannot start 'no-such-program-here'"),
    ]
    for command, message in cases:
        code, _, err = invoke(
            ["backtest", "--workdir", str(workdir), "--eval-cmd", command, "--device", "cpu"],
            capsys,
            monkeypatch,
        )
        assert_one_line_error(code, err, message)
    code, _, err = invoke(
        ["backtest", "--workdir", str(workdir), "--eval-cmd", "echo 1 {model}", "--origin", "75"],
        capsys,
        monkeypatch,
    )
    assert_one_line_error(code, err, "no checkpoint at step 75 (--origin)")
    code, _, err = invoke(
        ["backtest", "--workdir", str(workdir), "--eval-cmd", "echo 1 {model}", "--origin", "100"],
        capsys,
        monkeypatch,
    )
    assert_one_line_error(code, err, "is the last checkpoint")
    assert sorted(p.name for p in workdir.iterdir()) == before  # no scratch model, no partial verdict
