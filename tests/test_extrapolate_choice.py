"""What ``extrapolate`` writes when the user does not say (nexttools.extrapolate_choice): in place by
default, the back-test's verdict followed (the three cases), fit's skill otherwise, and the jump-size
guard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from examples.demo_run import DemoRun
from nexttools.extract import ExtractOptions, extract
from nexttools.extrapolate_choice import MAX_JUMP_RATIO, skill_at
from nexttools.fit import FitOptions, fit
from nexttools.skill import _Sums
from nexttools.store import open_store
from nexttools.verdict import save_verdict
from tests.cli_helpers import assert_one_line_error, invoke
from tests.conftest import copy_tree


@pytest.fixture(scope="module")
def fitted(short_run: DemoRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("choice") / "work"
    extract(ExtractOptions(run=short_run.run, workdir=workdir, k=5, device="cpu"))
    fit(FitOptions(workdir=workdir, epochs=10, refit=False, device="cpu"))
    return workdir


def _verdict(workdir: Path, recommendation: dict | None) -> None:
    with open_store(workdir / "trajectory.h5") as store:
        save_verdict(
            workdir,
            store,
            {
                "recommendation": recommendation,
                "reason": "every jump was worth less than half the steps it claims",
                "results": [{"method": "last-interval", "alpha": 1.0, "worth": 0.1, "steps_worth": 1.0}],
            },
        )


def _run(workdir: Path, capsys, monkeypatch, *extra: str) -> tuple[int, dict, str]:
    code, out, err = invoke(
        ["extrapolate", "--workdir", str(workdir), "--device", "cpu", "--json", *extra], capsys, monkeypatch
    )
    return code, (json.loads(out) if code == 0 else {}), err


def test_skill_at_any_alpha_is_exact() -> None:
    sums = _Sums(dot=3.0, predicted=2.5, true=7.0)
    recorded = {
        "alpha": 1.0,
        "skill": {"overall": sums.skill(1.0)},
        "alpha_star": {"overall": sums.alpha_star()},
    }
    for alpha in (0.0, 0.5, 1.5, 2.0, 3.0):
        assert skill_at(recorded, alpha) == pytest.approx(sums.skill(alpha), rel=1e-12, abs=1e-12)
    assert (
        skill_at({"alpha": 1.0, "skill": {"overall": math.nan}, "alpha_star": {"overall": 1.0}}, 1.5) is None
    )


def test_the_verdict_is_followed(fitted: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    workdir = copy_tree(fitted, tmp_path / "work")
    _verdict(workdir, {"method": "last-interval", "alpha": 1.0})
    code, document, err = _run(workdir, capsys, monkeypatch)
    assert code == 0, err
    assert (document["method"], document["alpha"], document["format"]) == ("last-interval", 1.0, "base")
    assert "following `nexttools backtest`: --method last-interval --alpha 1" in err
    assert Path(document["out"]).name == "extrapolated-alpha1-last-interval-base"


def test_a_do_not_extrapolate_verdict_stops_the_default_but_not_a_choice(
    fitted: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    workdir = copy_tree(fitted, tmp_path / "work")
    _verdict(workdir, None)
    code, _, err = _run(workdir, capsys, monkeypatch)
    assert_one_line_error(code, err, "do not extrapolate this run", "name --method and --alpha")
    assert not list(workdir.glob("extrapolated-*"))
    code, document, err = _run(workdir, capsys, monkeypatch, "--method", "last-interval", "--alpha", "1")
    assert code == 0, err
    assert "judged: do not extrapolate" in err and document["warnings"]


def test_without_a_verdict_fit_decides_and_never_below_zero(
    fitted: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """fit's skill is recorded at α = 1; the default is judged at the chosen α (1.5), where a method
    that led at α = 1 can fall below zero."""
    workdir = copy_tree(fitted, tmp_path / "work")
    config = json.loads((workdir / "predictor.json").read_text())
    skills = config["backtest"]["skill"]
    for name in skills:
        skills[name] = None
    skills["next"] = {"alpha": 1.0, "skill": {"overall": 0.3}, "alpha_star": {"overall": 1.2}}
    skills["linear-rank1"] = {"alpha": 1.0, "skill": {"overall": 0.5}, "alpha_star": {"overall": 0.6}}
    (workdir / "predictor.json").write_text(json.dumps(config))
    assert skill_at(skills["linear-rank1"], 1.5) < 0 < skill_at(skills["next"], 1.5) < 0.5
    code, document, err = _run(workdir, capsys, monkeypatch, "--force")
    assert code == 0, err
    assert document["method"] == "next" and "`nexttools backtest` decides better" in err
    skills["next"]["skill"]["overall"] = -0.1  # now no method beats not jumping at α = 1.5
    (workdir / "predictor.json").write_text(json.dumps(config))
    code, _, err = _run(workdir, capsys, monkeypatch)
    assert_one_line_error(code, err, "no method better than not jumping", "name --method")


def test_a_jump_larger_than_its_weights_needs_force(
    fitted: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    workdir = copy_tree(fitted, tmp_path / "work")
    args = ("--method", "linear-rank1", "--alpha", "1e4", "--format", "merged")
    code, _, err = _run(workdir, capsys, monkeypatch, *args)
    assert_one_line_error(code, err, f"its own weight norm (limit {MAX_JUMP_RATIO:g})", "--force")
    assert not list(workdir.glob("extrapolated-*"))
    code, document, err = _run(workdir, capsys, monkeypatch, *args, "--force")
    assert code == 0, err
    assert Path(document["out"]).is_dir() and "its own weight norm" not in err


def test_a_full_weight_run_defaults_to_its_checkpoint_when_resumable(
    short_run: DemoRun, tmp_path: Path, capsys, monkeypatch
) -> None:
    """A full-weight run of HF Trainer folders resumes in place (--format checkpoint); without a
    trainer_state.json the default is a restart from --format merged, and the line says why."""
    from tests.test_extrapolate import _full_run

    run, base = _full_run(short_run, tmp_path)
    workdir = tmp_path / "work"
    extract(ExtractOptions(run=run, base=str(base), workdir=workdir, k=2, device="cpu"))
    code, document, err = _run(workdir, capsys, monkeypatch, "--method", "last-interval", "--alpha", "0.5")
    assert code == 0, err
    assert document["format"] == "checkpoint" and "--format checkpoint" in err
    for state in run.glob("checkpoint-*/trainer_state.json"):
        state.unlink()
    workdir2 = tmp_path / "work2"
    extract(ExtractOptions(run=run, base=str(base), workdir=workdir2, k=2, device="cpu"))
    code, document, err = _run(workdir2, capsys, monkeypatch, "--method", "last-interval", "--alpha", "0.5")
    assert code == 0, err
    assert document["format"] == "merged" and "--format merged (a restart" in err
