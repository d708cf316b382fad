"""``nexttools extract`` through the real CLI: output, errors (exit 2, one line), kill -9, lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

from examples.demo_run import DemoRun, save_lora_checkpoint, save_tiny_llama
from nexttools.store import lock_path, open_store, partial_path, store_lock
from tests.cli_helpers import assert_one_line_error, invoke
from tests.conftest import copy_tree

REPO = Path(__file__).resolve().parents[1]


def select(demo: DemoRun, out: Path, steps: tuple[int, ...]) -> Path:
    out.mkdir()
    for step in steps:
        copy_tree(demo.run / f"checkpoint-{step}", out / f"checkpoint-{step}")
    return out


def test_summary_json_and_table(short_run: DemoRun, tmp_path: Path, capsys, monkeypatch) -> None:
    workdir = tmp_path / "work"
    code, out, err = invoke(
        ["extract", str(short_run.run), "--workdir", str(workdir), "--k", "3", "--device", "cpu", "--json"],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    assert "reading 8 checkpoints" in err and "8/8" in err  # progress counts checkpoints, not modules
    summary = json.loads(out)
    assert summary["checkpoints"] == 8 and summary["steps"] == list(short_run.steps)
    assert summary["modules"] == 14 and summary["ranks"] == [8] and summary["scaling_rule"] == "alpha/r"
    assert summary["k"] == 3 and summary["store"] == str(workdir / "trajectory.h5")
    assert set(summary["energy_ratio"]) == {"min", "median", "max"}
    assert summary["rows_computed"] == {"global": 8, "local": 8, "target": 5}
    with h5py.File(workdir / "trajectory.h5", "r") as f:  # plain h5py reads it
        assert f.attrs["k"] == 3 and f["global/sigma"].shape == (8, 14)
        assert summary["store_fingerprint"] == open_store(workdir / "trajectory.h5").fingerprint()

    # Human output: a table on stderr, nothing on stdout; a second run has nothing to do.
    code, out, err = invoke(
        ["extract", str(short_run.run), "--workdir", str(workdir), "--k", "3"], capsys, monkeypatch
    )
    assert code == 0 and out == "" and "reading 1 checkpoint " in err  # only the last, for its energy
    for label in ("checkpoints", "modules", "rank", "scaling rule", "σ1/Σσᵢ", "up to date"):
        assert label in err, label


def test_fewer_than_k_plus_2_checkpoints_warns(
    short_run: DemoRun, tmp_path: Path, capsys, monkeypatch
) -> None:
    store = tmp_path / "s" / "trajectory.h5"
    code, _, err = invoke(
        ["extract", str(short_run.run), "--store", str(store), "--steps", "10:30", "--k", "5"],
        capsys,
        monkeypatch,
    )
    assert code == 0
    assert "fit` needs at least k+2 = 7" in " ".join(err.split())
    with open_store(store) as opened:
        assert opened.steps.tolist() == [10, 20, 30]
        assert opened.read("target").sigma.shape == (3, 14)


def _mixed_targets_run(demo: DemoRun, out: Path) -> Path:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    run = select(demo, out, (10, 20))
    model = AutoModelForCausalLM.from_pretrained(demo.base, dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], base_model_name_or_path=str(demo.base)
    )
    save_lora_checkpoint(model, config, 30, run / "checkpoint-30", seed=0)
    return run


def test_user_errors_exit_2_with_one_line_and_leave_nothing(
    short_run: DemoRun, tmp_path: Path, capsys, monkeypatch
) -> None:
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    truncated = select(short_run, tmp_path / "truncated", (10, 20, 30))
    weights = truncated / "checkpoint-20" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    dora = select(short_run, tmp_path / "dora", (10, 20, 30))
    config_path = dora / "checkpoint-20" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": True}))
    other_base = save_tiny_llama(tmp_path / "other-base", hidden_size=32, intermediate_size=64)
    mixed = _mixed_targets_run(short_run, tmp_path / "mixed")

    cases = [
        ([str(tmp_path / "missing")], ["missing"]),
        ([str(empty)], ["no checkpoints found", "checkpoint-N/"]),
        ([str(truncated)], ["checkpoint-20"]),
        ([str(dora)], ["use_dora", "checkpoint-20"]),
        ([str(mixed)], ["checkpoint-30"]),
        ([str(short_run.run), "--base", str(other_base)], ["other-base"]),
        ([str(short_run.run), "--steps", "ten:20"], ["--steps"]),
    ]
    for args, fragments in cases:
        workdir = tmp_path / "work"
        code, out, err = invoke(
            ["extract", *args, "--workdir", str(workdir), "--device", "cpu"], capsys, monkeypatch
        )
        assert_one_line_error(code, err, *fragments)
        assert out == ""
        assert not workdir.exists(), args  # no store, no partial, no lock, not even the folder


def test_unknown_store_version_is_refused_untouched(
    short_run: DemoRun, tmp_path: Path, capsys, monkeypatch
) -> None:
    store = tmp_path / "trajectory.h5"
    args = ["extract", str(short_run.run), "--store", str(store), "--steps", "10:40", "--k", "2"]
    assert invoke(args, capsys, monkeypatch)[0] == 0
    with h5py.File(store, "a") as f:
        f.attrs["version"] = 99
    data = store.read_bytes()
    code, _, err = invoke(args, capsys, monkeypatch)
    assert_one_line_error(code, err, "version 99")
    assert store.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trajectory.h5"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_a_gpu_is_a_user_error(short_run: DemoRun, tmp_path: Path, capsys, monkeypatch) -> None:
    code, _, err = invoke(
        ["extract", str(short_run.run), "--workdir", str(tmp_path / "w"), "--device", "cuda"],
        capsys,
        monkeypatch,
    )
    assert_one_line_error(code, err, "no CUDA device")


def test_second_writer_is_refused(short_run: DemoRun, tmp_path: Path, capsys, monkeypatch) -> None:
    store = tmp_path / "trajectory.h5"
    with store_lock(store):
        code, _, err = invoke(["extract", str(short_run.run), "--store", str(store)], capsys, monkeypatch)
    assert_one_line_error(code, err, "being written by another nexttools process", f"pid {os.getpid()}")
    assert not store.exists() and not partial_path(store).exists()


def _long_run(demo: DemoRun, out: Path, count: int) -> Path:
    """``count`` real PEFT checkpoints (copies of the demo's, renumbered): slow enough to kill mid-run."""
    out.mkdir()
    for n in range(1, count + 1):
        folder = out / f"checkpoint-{10 * n}"
        copy_tree(demo.run / f"checkpoint-{demo.steps[(n - 1) % len(demo.steps)]}", folder)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 10 * n}))
    return out


def test_kill_9_mid_run_keeps_the_old_store_and_rerun_completes(
    short_run: DemoRun, tmp_path: Path, capsys, monkeypatch
) -> None:
    run = _long_run(short_run, tmp_path / "run", count=100)
    store = tmp_path / "trajectory.h5"
    base_args = ["extract", str(run), "--store", str(store), "--k", "2", "--device", "cpu"]
    assert invoke([*base_args, "--steps", ":50"], capsys, monkeypatch)[0] == 0
    data = store.read_bytes()

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-m", "nexttools", *base_args], cwd=REPO, env=env, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not partial_path(store).exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.3)  # well inside the module loop
        assert child.poll() is None, "extraction finished before it could be killed: make the run longer"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert partial_path(store).exists()  # the half-built file it was writing

    assert store.read_bytes() == data  # the previous store is intact...
    with open_store(store) as old:  # ...and readable
        assert old.steps.tolist() == [10, 20, 30, 40, 50]

    code, _, err = invoke(base_args, capsys, monkeypatch)  # the lock died with the process
    assert code == 0, err
    assert not partial_path(store).exists() and not lock_path(store).exists()
    with open_store(store) as done:
        assert done.steps.tolist() == [10 * n for n in range(1, 101)]


def test_python_m_entry_point(short_run: DemoRun, tmp_path: Path) -> None:
    """The installed entry point maps a user error to exit 2 and one stderr line, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nexttools",
            "extract",
            str(tmp_path / "nope"),
            "--workdir",
            str(tmp_path / "w"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()
