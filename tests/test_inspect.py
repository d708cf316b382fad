"""``nexttools inspect``: energy ratio and R² against dense float64 references; the plot; the extra."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest

from examples.demo_run import DemoRun
from nexttools.extract import ExtractOptions, extract
from nexttools.fit import FitOptions, fit
from nexttools.inspect_run import inspect
from nexttools.store import open_store
from nexttools.store.trajectory import Trajectory
from tests.cli_helpers import assert_one_line_error, invoke
from tests.test_skill import _dense_run


@pytest.fixture(scope="module")
def workdir(demo_run: DemoRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inspect")
    extract(ExtractOptions(run=demo_run.run, base=str(demo_run.base), workdir=folder, k=3, device="cpu"))
    fit(FitOptions(workdir=folder, epochs=20, width=16, device="cpu"))
    return folder


def test_energy_ratio_and_r2_match_dense_float64(demo_run: DemoRun, workdir: Path) -> None:
    inspection = inspect(workdir)
    with open_store(workdir / "trajectory.h5") as store:
        trajectory = Trajectory.from_store(store)
    factors, _, scaling = _dense_run(demo_run.run, demo_run.steps)
    assert inspection.energy is not None and inspection.energy.shape == (15, 14)
    for row in (0, 7, 14):
        for j, name in enumerate(trajectory.modules):
            b, a = factors[row][name]
            values = np.linalg.svd(scaling * b @ a, compute_uv=False)
            assert inspection.energy[row, j] == pytest.approx(values[0] / values.sum(), rel=1e-9)

    assert (inspection.fit_rows, inspection.predict_rows) == (10, 5)  # the paper's 10 and 5
    steps = np.asarray(demo_run.steps, dtype=np.float64)
    g = trajectory.global_
    for j in range(len(trajectory.modules)):
        us = slice(trajectory.u_offset[j], trajectory.u_offset[j + 1])
        vs = slice(trajectory.v_offset[j], trajectory.v_offset[j + 1])
        rank1 = np.stack([float(g.sigma[i, j]) * np.outer(g.u[i, us], g.v[i, vs]) for i in range(15)])
        rank1 = rank1.astype(np.float64)
        design = np.stack([np.ones(10), steps[:10]], axis=1)
        coefficients, *_ = np.linalg.lstsq(design, rank1[:10].reshape(10, -1), rcond=None)
        predicted = (np.stack([np.ones(5), steps[10:]], axis=1) @ coefficients).reshape(rank1[10:].shape)
        truth = rank1[10:]
        expected = 1 - np.sum((predicted - truth) ** 2) / np.sum((truth - truth.mean(axis=0)) ** 2)
        assert inspection.r2[j] == pytest.approx(expected, rel=1e-6), trajectory.modules[j]
    assert sum(count for _, count in inspection.r2_histogram()) == 14
    assert set(inspection.skill) >= {"next", "last-interval"}  # fit's full-space S, per kind
    assert set(inspection.by_kind) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_plot_and_json_through_the_cli(workdir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from PIL import Image

    png = tmp_path / "figures" / "inspect.png"
    code, out, err = invoke(
        ["inspect", "--workdir", str(workdir), "--plot", str(png), "--json"], capsys, monkeypatch
    )
    assert code == 0, err
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] >= 1000 and image.size[1] >= 700
    assert not list(png.parent.glob(".*"))  # no staging file left
    document = json.loads(out)
    assert len(document["energy_ratio"]) == 15 and document["r2"]["fit_checkpoints"] == 10
    assert document["consistency"]["straightness"] is not None
    assert "per module kind" in err and "paper fig. 3" in err


def test_plot_without_matplotlib_says_how_to_install_it(
    workdir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    png = tmp_path / "x.png"
    code, _, err = invoke(["inspect", "--workdir", str(workdir), "--plot", str(png)], capsys, monkeypatch)
    assert_one_line_error(code, err, "--plot needs matplotlib", "pip install 'nexttools[plots]'")
    assert not png.exists()


def test_without_the_checkpoints_inspect_still_shows_the_store_figures(
    demo_run: DemoRun,
    tmp_path: Path,
    capsys,
    monkeypatch,
) -> None:
    import shutil

    run = shutil.copytree(demo_run.run, tmp_path / "run")
    extract(ExtractOptions(run=run, base=str(demo_run.base), workdir=tmp_path / "wd", k=3, device="cpu"))
    shutil.rmtree(run / f"checkpoint-{demo_run.steps[0]}")
    code, out, err = invoke(["inspect", "--workdir", str(tmp_path / "wd"), "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert "no energy ratio: it needs the run's LoRA checkpoints" in err
    document = json.loads(out)
    assert document["energy_ratio"] is None and document["consistency"]["straightness"] is not None
