"""The in-place sweep's pipeline (examples/trl_grpo/sweep.py) end to end on a tiny configuration.

A 2-layer hidden-32 Llama SFT'd for at most 150 steps, LoRA GRPO with 16 prompts × 4 for a budget of
40 steps (a checkpoint every step; the advisor and every arm work from step 15), the reduced arms and
advisor of `make example`, then the report. Slow (several minutes on 2 cores) and needs the
``examples`` extra (trl); run with
``.venv-examples/bin/python -m pytest -m slow tests/test_example_in_place.py``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("trl")

BUDGET = 40  # every = 1: the jump origin is step 15, the arms resume to step 25


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    import torch

    from examples.trl_grpo.grpo import GrpoSettings
    from examples.trl_grpo.in_place import REDUCED_ADVISOR, reduced_arms, run_seed
    from examples.trl_grpo.regime import Regime
    from examples.trl_grpo.sweep import start_model, write_report
    from examples.trl_grpo.task import make_split

    torch.set_num_threads(1)
    tiny = Regime(
        name="tiny",
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        sft_target=0.05,
        sft_max_steps=150,
        noisy_last_digit=0.5,
        settings=GrpoSettings(learning_rate=3e-4, prompts_per_step=16, generations=4),
    )
    root = tmp_path_factory.mktemp("in-place")
    split = make_split()
    split = replace(split, heldout=split.heldout[:64])  # the arms' own scoring; the advisor uses all 500
    start = start_model(root, tiny)
    document = run_seed(
        root / "seed-0", start, split, tiny, BUDGET, reduced_arms(), 0, print, REDUCED_ADVISOR
    )
    summary = write_report([document], reduced_arms(), root / "results")
    return root, document, summary


def _at(curve: list[list[float]], step: int) -> list[float]:
    return next(point[1:] for point in curve if point[0] == step)


def test_vanilla_and_every_arm_are_scored_at_every_checkpoint(sweep: tuple[Path, dict, dict]) -> None:
    _, document, _ = sweep
    curves = document["curves"]
    assert [p[0] for p in curves["vanilla"]] == list(range(BUDGET + 1))
    for name in (
        "in-place/no-jump",
        "in-place/oracle-a1",
        "in-place/next-a1.5",
        "in-place/factor-linear-a1.5",
    ):
        assert [p[0] for p in curves[name]] == list(range(15, 26)), name
        assert all(0.0 <= value <= 1.0 for point in curves[name] for value in point[1:])


def test_no_jump_resumes_exactly_where_vanilla_stood(sweep: tuple[Path, dict, dict]) -> None:
    """The run's own base plus its own checkpoint-15 is vanilla's step 15: the same scores (same seed)."""
    _, document, _ = sweep
    curves = document["curves"]
    assert _at(curves["in-place/no-jump"], 15) == _at(curves["vanilla"], 15)


def test_the_oracle_starts_at_the_true_future(sweep: tuple[Path, dict, dict]) -> None:
    """Oracle base + checkpoint-15's adapter = vanilla's weights at step 15 + k: its first score is
    vanilla's at step 20, up to the float rounding of the merged base."""
    _, document, _ = sweep
    curves = document["curves"]
    assert _at(curves["in-place/oracle-a1"], 15)[0] == pytest.approx(_at(curves["vanilla"], 20)[0], abs=0.03)


def test_the_advisor_ran_before_the_arms_on_the_prefix_only(sweep: tuple[Path, dict, dict]) -> None:
    _, document, _ = sweep
    assert document["extract"]["steps_read"] == list(range(1, 16))
    tried = {(r["method"], r["alpha"]) for r in document["backtest"]["results"]}
    assert tried == {(m, a) for m in ("next", "last-interval", "factor-linear") for a in (1.0, 1.5)}


def test_the_report_has_every_arm_the_advisor_and_the_plots(sweep: tuple[Path, dict, dict]) -> None:
    root, document, summary = sweep
    results = root / "results"
    assert json.loads((results / "seed-0.json").read_text()) == document
    assert set(summary["arms"]) == {name for name in document["curves"] if name != "vanilla"}
    for row in summary["arms"].values():
        assert row["avg8"]["n"] == 1 and row["steps_to_match"]["mean"] is not None
    assert summary["advisor"][0]["pairs"] >= 2  # next and factor-linear at 1.5 were both predicted
    assert "| arm |" in (results / "summary.md").read_text()
    assert (results / "accuracy_vs_steps.png").is_file() and (results / "worth_vs_saving.png").is_file()
