"""``fit``: back-test figures on trajectories with a known truth, determinism, save/load, refusals, CLI."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from examples.demo_run import DemoRun
from nexttools.errors import UserError
from nexttools.extract import ExtractOptions, extract
from nexttools.fit import FitOptions, fit
from nexttools.methods import METHODS
from nexttools.predictor.saved import PredictorConfig, load_predictor, read_config
from nexttools.store import open_store
from nexttools.store.trajectory import module_kind
from tests.cli_helpers import assert_one_line_error, invoke
from tests.test_methods import curved_trajectory, linear_trajectory, write_store

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = {"epochs": 100, "width": 32, "device": "cpu"}  # seconds on 2 shared cores


@pytest.fixture(scope="module")
def curved_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(curved_trajectory(layers=2), tmp_path_factory.mktemp("curved") / "trajectory.h5")


@pytest.fixture(scope="module")
def linear_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(linear_trajectory(layers=2), tmp_path_factory.mktemp("linear") / "trajectory.h5")


def test_module_kind() -> None:
    assert module_kind("model.layers.3.self_attn.q_proj.weight") == "q_proj"
    assert module_kind("transformer.h.0.mlp.c_fc") == "c_fc"


def test_linear_trajectory_linear_baselines_are_exact_and_next_is_close(
    linear_store: Path, tmp_path: Path
) -> None:
    result = fit(FitOptions(workdir=tmp_path, store=linear_store, **SMALL))
    methods = result.backtest.methods
    assert result.backtest.holdout_rows == 3 and result.backtest.train_rows == 7
    for name in ("linear-rank1", "last-interval"):
        assert methods[name].cosine["overall"] > 0.99999
        assert methods[name].sigma_rel_err["overall"] < 1e-4
    assert list(methods["next"].cosine) == ["overall", *KINDS]
    assert methods["next"].cosine["overall"] > 0.98
    assert methods["next"].sigma_rel_err["overall"] < 0.15


def test_curved_trajectory_next_beats_last_interval(curved_store: Path, tmp_path: Path) -> None:
    result = fit(FitOptions(workdir=tmp_path, store=curved_store, **SMALL))
    methods = result.backtest.methods
    next_, last = methods["next"], methods["last-interval"]
    assert next_.cosine["overall"] > last.cosine["overall"] + 0.1, result.backtest.summary
    assert next_.sigma_rel_err["overall"] < 0.2  # σ is not where it wins: ~9% against last-interval's ~6%
    assert result.backtest.winner == "next"
    assert result.backtest.summary.startswith("next predicts the held-out targets best")


def test_same_seed_same_predictor_files(curved_store: Path, tmp_path: Path) -> None:
    options = FitOptions(store=curved_store, holdout=2, epochs=30, width=16, device="cpu")
    first = fit(replace(options, workdir=tmp_path / "a"))
    second = fit(replace(options, workdir=tmp_path / "b"))
    assert first.weights_path.read_bytes() == second.weights_path.read_bytes()
    documents = [json.loads(r.config_path.read_text()) for r in (first, second)]
    for document in documents:
        document.pop("path")
    assert documents[0] == documents[1]
    third = fit(replace(options, workdir=tmp_path / "c", seed=1))
    assert third.weights_path.read_bytes() != first.weights_path.read_bytes()


def test_saved_predictor_reloads_and_predicts_the_same(curved_store: Path, tmp_path: Path) -> None:
    result = fit(FitOptions(workdir=tmp_path, store=curved_store, **SMALL))
    config = json.loads(result.config_path.read_text())
    assert config["store_fingerprint"] == result.store_fingerprint and config["k"] == 5
    assert config["training"]["rows"] == [0, 9] and config["training"]["holdout"] == 3
    assert config["architecture"] == {"width": 32, "depth": 2}
    with open_store(curved_store) as store:
        predictor = load_predictor(tmp_path, store)
        first, second = predictor.predict(store), load_predictor(tmp_path, store).predict(store, row=14)
        earlier = predictor.predict(store, row=3)
    for field in ("sigma", "u", "v"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
    assert not np.array_equal(first.u, earlier.u)
    saved = read_config(tmp_path)
    assert saved is not None and saved.weights_sha256
    assert PredictorConfig.from_json(saved.to_json(), tmp_path / "predictor.json") == saved
    info = saved.manifest_entry()
    assert info["store_fingerprint"] == result.store_fingerprint and info["train_loss"] == result.train_loss
    assert info["backtest"]["winner"] == result.backtest.winner


def test_predictor_files_get_the_usual_permissions(curved_store: Path, tmp_path: Path) -> None:
    """Both files are shareable like any other output (the umask decides), not private 0600 temp files."""
    previous = os.umask(0o022)
    try:
        result = fit(FitOptions(workdir=tmp_path, store=curved_store, **SMALL))
    finally:
        os.umask(previous)
    modes = {stat.S_IMODE(path.stat().st_mode) for path in (result.weights_path, result.config_path)}
    assert modes == {0o644}


def test_no_refit_keeps_the_back_test_predictor(curved_store: Path, tmp_path: Path) -> None:
    result = fit(FitOptions(workdir=tmp_path, store=curved_store, refit=False, **SMALL))
    config = json.loads(result.config_path.read_text())
    assert config["training"]["rows"] == [0, 6] and config["training"]["refit"] is False
    assert result.document()["predictor"]["refit"] is False


def test_load_predictor_refusals(curved_store: Path, linear_store: Path, tmp_path: Path) -> None:
    with open_store(curved_store) as store:
        with pytest.raises(UserError, match=r"no predictor in .*: run `nexttools fit` first"):
            load_predictor(tmp_path, store)
        fit(FitOptions(workdir=tmp_path, store=curved_store, epochs=5, width=8, device="cpu"))
        weights = tmp_path / "predictor.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # a weights file from another fit
        with pytest.raises(UserError, match="incomplete"):
            load_predictor(tmp_path, store)
    with open_store(linear_store) as other, pytest.raises(UserError, match="trained on another store"):
        load_predictor(tmp_path, other)


def test_refusals_through_the_cli(
    curved_store: Path, linear_store: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    small = ["--epochs", "5", "--width", "8", "--device", "cpu"]
    work = tmp_path / "work"
    code, _, err = invoke(["fit", "--workdir", str(work), *small], capsys, monkeypatch)
    assert_one_line_error(code, err, "no trajectory store at", "run `nexttools extract` first")
    assert not work.exists() or not any(work.iterdir())

    code, _, err = invoke(
        ["fit", "--store", str(curved_store), "--holdout", "10", "--workdir", str(work), *small],
        capsys,
        monkeypatch,
    )
    assert_one_line_error(code, err, "--holdout 10 leaves nothing to train on", "10 target rows")

    short = curved_trajectory(steps=tuple(range(10, 61, 10)))  # 6 checkpoints, k = 5: one target row
    path = write_store(short, tmp_path / "short.h5")
    code, _, err = invoke(["fit", "--store", str(path), "--workdir", str(work), *small], capsys, monkeypatch)
    assert_one_line_error(code, err, "the store has 6 checkpoints", "at least k+2 = 7")

    broken = write_store(curved_trajectory(), tmp_path / "nan.h5")
    with h5py.File(broken, "r+") as file:
        file["local/u"][4, 3] = np.nan
    code, _, err = invoke(
        ["fit", "--store", str(broken), "--workdir", str(work), *small], capsys, monkeypatch
    )
    assert_one_line_error(code, err, "NaN/Inf in local/u")

    future = write_store(curved_trajectory(), tmp_path / "v2.h5")
    with h5py.File(future, "r+") as file:
        file.attrs["version"] = np.int64(2)
    code, _, err = invoke(
        ["fit", "--store", str(future), "--workdir", str(work), *small], capsys, monkeypatch
    )
    assert_one_line_error(code, err, "version 2")
    assert not (work / "predictor.json").exists() and not (work / "predictor.safetensors").exists()

    assert (
        invoke(["fit", "--store", str(curved_store), "--workdir", str(work), *small], capsys, monkeypatch)[0]
        == 0
    )
    before = (work / "predictor.safetensors").read_bytes()
    code, _, err = invoke(
        ["fit", "--store", str(linear_store), "--workdir", str(work), *small], capsys, monkeypatch
    )
    assert_one_line_error(code, err, "trained on another store", "--force")
    assert (work / "predictor.safetensors").read_bytes() == before
    # the same store simply replaces it; another store with --force too
    assert (
        invoke(
            ["fit", "--store", str(curved_store), "--workdir", str(work), "--seed", "2", *small],
            capsys,
            monkeypatch,
        )[0]
        == 0
    )
    assert (work / "predictor.safetensors").read_bytes() != before
    code, _, _ = invoke(
        ["fit", "--store", str(linear_store), "--workdir", str(work), "--force", *small], capsys, monkeypatch
    )
    assert code == 0
    with open_store(linear_store) as store:
        load_predictor(work, store)  # the refit predictor belongs to this store
        saved = read_config(work)
        assert saved is not None and saved.store_fingerprint == store.fingerprint()


def test_json_document_and_table(curved_store: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    args = [
        "fit",
        "--store",
        str(curved_store),
        "--workdir",
        str(tmp_path),
        "--epochs",
        "20",
        "--width",
        "16",
    ]
    code, out, err = invoke([*args, "--device", "cpu", "--holdout", "2", "--json"], capsys, monkeypatch)
    assert code == 0, err
    document = json.loads(out)
    backtest = document["backtest"]
    assert backtest["holdout_rows"] == 2 and backtest["train_rows"] == 8
    assert list(backtest["methods"]) == list(METHODS)  # every registered method, in registry order
    assert backtest["methods"]["factor-linear"] is None  # the store holds no factors to back-test it on
    assert "factor-linear is not scored here" in backtest["summary"]
    for figures in (f for f in backtest["methods"].values() if f is not None):
        assert set(figures) == {"cosine", "sigma_rel_err"}
        for table in figures.values():
            assert list(table) == ["overall", *KINDS]
            assert all(isinstance(x, float) for x in table.values())
    assert backtest["winner"] in backtest["methods"]
    assert backtest["summary"].startswith(backtest["winner"])
    predictor = document["predictor"]
    assert predictor["path"] == str(tmp_path / "predictor.safetensors")
    assert isinstance(predictor["train_loss"], float) and predictor["train_loss"] > 0
    assert json.loads((tmp_path / "predictor.json").read_text())["backtest"] == backtest
    # the human output is on stderr: the table and the verdict
    assert "rank-1 back-test (store only) on the last 2 target row(s)" in " ".join(err.split())
    assert "overall" in err and "gate_proj" in err
    # a synthetic store has no run files behind it: no full-space figures, and it says so
    assert backtest["skill"] is None and "full-space back-test was skipped" in err
    assert backtest["summary"].split(":")[0] in err


def test_end_to_end_on_a_real_peft_run(short_run: DemoRun, tmp_path: Path) -> None:
    extract(ExtractOptions(run=short_run.run, base=str(short_run.base), workdir=tmp_path, device="cpu"))
    result = fit(FitOptions(workdir=tmp_path, **SMALL))
    # 8 checkpoints, k = 5: 3 target rows, 1 held out (row 2, step 30), which last-interval cannot predict
    assert result.backtest.holdout_rows == 1 and result.backtest.train_rows == 2
    assert result.backtest.methods["last-interval"] is None
    assert result.document()["backtest"]["methods"]["last-interval"] is None
    assert result.backtest.skill is not None and result.backtest.skill["last-interval"] is None
    assert "last-interval is not scored (last-interval needs 5 checkpoints before row 2" in (
        result.backtest.summary
    )
    with open_store(tmp_path / "trajectory.h5") as store:
        predicted = load_predictor(tmp_path, store).predict(store)
        modules, u_offset, v_offset = store.modules, store.u_offset, store.v_offset
    assert len(modules) == 14 and predicted.sigma.shape == (14,) and (predicted.sigma > 0).all()
    for j in range(14):
        assert np.linalg.norm(predicted.u[u_offset[j] : u_offset[j + 1]]) == pytest.approx(1.0, abs=1e-5)
        assert np.linalg.norm(predicted.v[v_offset[j] : v_offset[j + 1]]) == pytest.approx(1.0, abs=1e-5)
