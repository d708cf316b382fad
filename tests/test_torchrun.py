"""``torchrun --nproc-per-node 2 --no-python nexttools ...``: two gloo processes on this machine give
byte for byte what one process gives (``extract``'s store, ``extrapolate``'s folder), and a failure on
one rank is one line, with nothing left behind.

Each case launches the real torchrun (``python -m torch.distributed.run``) on the installed console
script, as the README tells users to.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from examples.demo_run import DemoRun
from nexttools.extract import ExtractOptions, extract
from nexttools.store import partial_path, store_lock
from tests.test_extract import write_full_weight_run

NEXTTOOLS = Path(sys.executable).parent / "nexttools"
pytestmark = pytest.mark.torchrun


def torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node RANKS --no-python nexttools ARGS`` on CPU (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, "--no-python", str(NEXTTOOLS), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )


def _strays(folder: Path) -> list[Path]:
    patterns = ("*.partial", "*.lock", ".*.partial-*", ".*.lock")
    return [path for pattern in patterns for path in folder.rglob(pattern)]


@pytest.fixture(scope="module")
def full_run(short_run: DemoRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("full") / "run"
    write_full_weight_run(short_run, folder, (10, 20, 30, 40, 50))
    return folder


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_two_ranks_write_the_single_process_store(
    kind: str, short_run: DemoRun, full_run: Path, tmp_path: Path
) -> None:
    run = short_run.run if kind == "lora" else full_run
    single, split = tmp_path / "single", tmp_path / "split"
    extract(ExtractOptions(run=run, base=str(short_run.base), workdir=single, k=3, device="cpu"))
    done = torchrun("extract", str(run), "--base", str(short_run.base), "--workdir", str(split), "--k", "3")
    assert done.returncode == 0, done.stderr
    assert (split / "trajectory.h5").read_bytes() == (single / "trajectory.h5").read_bytes()
    assert done.stderr.count("trajectory store") == 1  # one summary, from rank 0
    assert not _strays(tmp_path)


def test_two_ranks_update_a_store_incrementally(short_run: DemoRun, tmp_path: Path) -> None:
    """A store extracted on 5 checkpoints, brought up to date on 8 by two ranks, equals a fresh one."""
    partial = tmp_path / "partial"
    shutil.copytree(short_run.run, partial)
    for step in (60, 70, 80):
        shutil.rmtree(partial / f"checkpoint-{step}")
    work, fresh = tmp_path / "work", tmp_path / "fresh"
    base = str(short_run.base)
    torchrun("extract", str(partial), "--base", base, "--workdir", str(work), "--k", "3")
    for step in (60, 70, 80):
        shutil.copytree(short_run.run / f"checkpoint-{step}", partial / f"checkpoint-{step}")
    done = torchrun("extract", str(partial), "--base", base, "--workdir", str(work), "--k", "3")
    assert done.returncode == 0, done.stderr
    extract(ExtractOptions(run=partial, base=base, workdir=fresh, k=3, device="cpu"))
    assert (work / "trajectory.h5").read_bytes() == (fresh / "trajectory.h5").read_bytes()


def test_a_failure_on_one_rank_is_one_line_and_leaves_nothing(short_run: DemoRun, tmp_path: Path) -> None:
    """NaN in the module rank 1 owns: rank 1 says so in one line, rank 0 stops without a store or lock."""
    run = tmp_path / "run"
    shutil.copytree(short_run.run, run)
    path = run / "checkpoint-80" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(key for key in tensors if "lora_B" in key)[1]  # module 1: rank 1's first
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    work = tmp_path / "work"
    done = torchrun("extract", str(run), "--base", str(short_run.base), "--workdir", str(work), "--k", "3")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error:" in line and "NaN or Inf" in line]
    assert len(errors) == 1, done.stderr
    assert key.removeprefix("base_model.model.").split(".lora_B")[0] in errors[0]
    assert not (work / "trajectory.h5").exists() and not _strays(tmp_path)


def test_a_held_lock_refuses_every_rank(short_run: DemoRun, tmp_path: Path) -> None:
    """Rank 0 takes the store's lock for all ranks: a store being written elsewhere is one line."""
    store = tmp_path / "trajectory.h5"
    with store_lock(store):
        done = torchrun("extract", str(short_run.run), "--base", str(short_run.base), "--store", str(store))
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "being written by another nexttools process" in errors[0], done.stderr
    assert not store.exists() and not partial_path(store).exists()


def nexttools(*args: str) -> subprocess.CompletedProcess[str]:
    """The same command as one process, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(NEXTTOOLS), *args], capture_output=True, text=True, env=env, check=False)


def _folder(folder: Path) -> dict[str, bytes]:
    """Every file of an output folder; the manifest without its creation time (the one field that
    differs between two runs of the same command)."""
    files = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }
    manifest = json.loads(files.pop("nexttools.json"))
    del manifest["created_utc"]
    files["nexttools.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


@pytest.mark.parametrize(("kind", "output"), [("lora", "merged"), ("lora", "base"), ("full", "checkpoint")])
def test_two_ranks_write_the_single_process_output(
    kind: str, output: str, short_run: DemoRun, full_run: Path, tmp_path: Path
) -> None:
    """Several shards (--max-shard-size 100KB), each written by its rank; rank 0 writes the index last."""
    run = short_run.run if kind == "lora" else full_run
    work = tmp_path / "work"
    extract(ExtractOptions(run=run, base=str(short_run.base), workdir=work, k=3, device="cpu"))
    out = tmp_path / "out"
    args = ("extrapolate", "--workdir", str(work), "--method", "linear-rank1", "--format", output)
    args += ("--out", str(out), "--max-shard-size", "100KB", "--base-model-id", "org/base")
    single = nexttools(*args)
    assert single.returncode == 0, single.stderr
    expected = _folder(out)
    out.rename(tmp_path / "single")
    done = torchrun(*args)
    assert done.returncode == 0, done.stderr
    written = _folder(out)
    assert sum(name.endswith(".safetensors") for name in written) > 2  # both ranks wrote shards
    assert written == expected
    assert done.stderr.count("wrote ") == single.stderr.count("wrote ") == 1
    assert not _strays(tmp_path)


def test_a_jump_that_overflows_while_ranks_write_is_one_line_and_no_output(
    short_run: DemoRun, tmp_path: Path
) -> None:
    """α so large that float16 overflows: the ranks writing those shards fail, one line is printed,
    and neither the output nor its staging folder or lock is left."""
    work, out = tmp_path / "work", tmp_path / "out"
    extract(ExtractOptions(run=short_run.run, base=str(short_run.base), workdir=work, k=3, device="cpu"))
    args = ("extrapolate", "--workdir", str(work), "--method", "factor-linear", "--alpha", "1e30", "--force")
    done = torchrun(*args, "--dtype", "float16", "--out", str(out), "--max-shard-size", "100KB")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "non-finite values in torch.float16" in errors[0], done.stderr
    assert not out.exists() and not _strays(tmp_path)


def test_a_rank_that_cannot_join_is_one_line(short_run: DemoRun, tmp_path: Path) -> None:
    """torchrun's variables without its rendezvous (no MASTER_ADDR): one line, exit 2, nothing made."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MASTER_")}
    env |= {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    work = tmp_path / "work"
    done = subprocess.run(
        [str(NEXTTOOLS), "extract", str(short_run.run), "--workdir", str(work)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: rank 1 cannot join the torchrun group (gloo)"), done.stderr
    assert done.stderr.count("\n") == 1 and not work.exists()
