"""Every bad input and fault ends in one clear line and exit 2 (130/143 for signals), with nothing lost.

Each case is run through the real entry point (``nexttools.cli.main``), in-process where it can be and
in a subprocess for signals. "Nothing lost" is checked after each: no partial store, no lock, no
staging folder, and the previous store, predictor or output intact.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from examples.demo_run import DemoRun, build_demo_run
from nexttools.locking import exclusive_lock
from tests.cli_helpers import assert_one_line_error, invoke

ROOT = Path(__file__).resolve().parents[1]
STEPS = (10, 20, 30, 40)


def _strays(folder: Path) -> list[Path]:
    """What a failed or interrupted command must never leave: partial files, locks, staging folders."""
    patterns = ("*.partial", "*.lock", ".*.partial-*", ".*.lock", ".*.push-*")
    return [path for pattern in patterns for path in folder.rglob(pattern)]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    return build_demo_run(tmp_path_factory.mktemp("rel"), steps=STEPS)


@pytest.fixture()
def run(small_run: DemoRun, tmp_path: Path) -> DemoRun:
    """A private copy of the 4-checkpoint run that a test may damage."""
    shutil.copytree(small_run.base.parent, tmp_path / "run-copy")
    folder = tmp_path / "run-copy"
    return DemoRun(base=folder / "base", run=folder / "run", steps=small_run.steps)


def _extract(run: DemoRun, workdir: Path, capsys, monkeypatch, *extra: str) -> tuple[int, str, str]:
    args = ["extract", str(run.run), "--base", str(run.base), "--workdir", str(workdir), "--k", "2"]
    return invoke([*args, "--device", "cpu", *extra], capsys, monkeypatch)


def _last(run: DemoRun) -> Path:
    return run.run / f"checkpoint-{run.steps[-1]}"


# ---------------------------------------------------------------------------------------------
# Inputs


def test_nan_weights_are_named_with_checkpoint_tensor_and_step(
    run: DemoRun, tmp_path: Path, capsys, monkeypatch
):
    path = _last(run) / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(k for k in tensors if "lora_B" in k)[3]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    code, _, err = _extract(run, tmp_path / "work", capsys, monkeypatch)
    assert_one_line_error(code, err, f"(step {run.steps[-1]})", "NaN or Inf", "--steps :39")
    module = key.removeprefix("base_model.model.").split(".lora_B")[0]
    assert module in err
    assert not (tmp_path / "work" / "trajectory.h5").exists() and not _strays(tmp_path)


def test_nan_in_a_full_weight_checkpoint(run: DemoRun, tmp_path: Path, capsys, monkeypatch):
    from nexttools.checkpoints.weights import ModelWeights

    base = ModelWeights(run.base)
    full = tmp_path / "full"
    for step in (10, 20):
        folder = full / f"checkpoint-{step}"
        shutil.copytree(run.base, folder)
        tensors = {name: base.get(name).clone() for name in base.names}
        name = "model.layers.0.mlp.up_proj.weight"
        tensors[name] += 0.01 * step
        if step == 20:
            tensors[name][1, 2] = float("inf")
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    args = [
        "extract",
        str(full),
        "--base",
        str(run.base),
        "--workdir",
        str(tmp_path / "w"),
        "--device",
        "cpu",
    ]
    code, _, err = invoke(args, capsys, monkeypatch)
    assert_one_line_error(code, err, "checkpoint-20 (step 20)", "model.layers.0.mlp.up_proj.weight")
    assert not _strays(tmp_path)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--steps", "1(:2"], "expected LO:HI"),
        (["--steps", "[:"], "expected LO:HI"),
        (["--steps", "0:99999999999999999999999999"], "steps are between 0 and"),
        (["--k", "99999999999999999999999"], "not in the range"),
        (["--every", "0"], "not in the range"),
        (["--bogus"], "No such option"),
    ],
)
def test_bad_extract_options(run: DemoRun, tmp_path: Path, capsys, monkeypatch, extra, fragment):
    code, _, err = _extract(run, tmp_path / "work", capsys, monkeypatch, *extra)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("rank_pattern", {"q_proj(": 4}, "not a valid regular expression"),
        ("alpha_pattern", {"q_proj": "sixteen"}, "is not a positive float"),
        ("rank_pattern", {"q_proj": 2.5}, "is not a positive int"),
        ("rank_pattern", ["q_proj"], "must be a mapping"),
    ],
)
def test_odd_adapter_patterns(run: DemoRun, tmp_path: Path, capsys, monkeypatch, field, value, fragment):
    config_path = _last(run) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    code, _, err = _extract(run, tmp_path / "work", capsys, monkeypatch)
    assert_one_line_error(code, err, field, fragment)


def test_paths_below_a_regular_file(run: DemoRun, tmp_path: Path, capsys, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, _, err = _extract(run, blocker / "work", capsys, monkeypatch)
    assert_one_line_error(code, err, "afile/work", "Not a directory")
    workdir = tmp_path / "work"
    assert _extract(run, workdir, capsys, monkeypatch)[0] == 0
    common = ["--workdir", str(workdir), "--device", "cpu", "--method", "last-interval"]
    code, _, err = invoke(["extrapolate", *common, "--out", str(blocker / "out")], capsys, monkeypatch)
    assert_one_line_error(code, err, "afile")
    code, _, err = invoke(
        ["fit", "--workdir", str(blocker / "w"), "--store", str(workdir / "trajectory.h5")],
        capsys,
        monkeypatch,
    )
    assert_one_line_error(code, err, "afile")
    assert not _strays(tmp_path)


def test_a_mistyped_relative_base_says_both_readings(run: DemoRun, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["extract", str(run.run), "--base", "demo/base", "--workdir", "w", "--device", "cpu"]
    code, _, err = invoke(args, capsys, monkeypatch)
    assert_one_line_error(
        code, err, "--base demo/base", "not a Hub id in the huggingface_hub cache", "no local folder"
    )


def test_a_relative_base_is_recorded_resolved(run: DemoRun, tmp_path: Path, capsys, monkeypatch):
    """After `make demo`, `extrapolate --workdir <abs path>` works from any directory."""
    monkeypatch.chdir(run.base.parent)
    workdir = tmp_path / "work"
    args = ["extract", "run", "--base", "base", "--workdir", str(workdir), "--k", "2", "--device", "cpu"]
    assert invoke(args, capsys, monkeypatch)[0] == 0
    monkeypatch.chdir(tmp_path)
    with h5py.File(workdir / "trajectory.h5") as file:
        assert file.attrs["base_model"] == str(run.base.resolve())
    args = ["extrapolate", "--workdir", str(workdir), "--method", "last-interval", "--device", "cpu"]
    code, _, err = invoke(args, capsys, monkeypatch)
    assert code == 0, err


def test_fit_refits_after_the_store_grew(small_run: DemoRun, tmp_path: Path, capsys, monkeypatch):
    full = build_demo_run(tmp_path / "grow", steps=(10, 20, 30, 40, 50, 60))
    workdir = tmp_path / "work"
    common = ["--workdir", str(workdir), "--device", "cpu"]
    fit_args = ["fit", *common, "--epochs", "3"]
    assert _extract(full, workdir, capsys, monkeypatch, "--steps", ":50")[0] == 0
    assert invoke(fit_args, capsys, monkeypatch)[0] == 0
    assert _extract(full, workdir, capsys, monkeypatch)[0] == 0  # training went on: one more checkpoint
    code, _, err = invoke(fit_args, capsys, monkeypatch)
    assert code == 0, err
    code, _, err = invoke(["extrapolate", *common], capsys, monkeypatch)
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# Damaged work files


@pytest.fixture()
def workdir(run: DemoRun, tmp_path: Path, capsys, monkeypatch) -> Path:
    folder = tmp_path / "work"
    assert _extract(run, folder, capsys, monkeypatch)[0] == 0
    return folder


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda f: f.__delitem__("local/u"), id="missing-dataset"),
        pytest.param(lambda f: f.__delitem__("modules/u_offset"), id="missing-table"),
        pytest.param(
            lambda f: (
                f.__delitem__("checkpoints/step"),
                f.create_dataset("checkpoints/step", data=np.arange(2)),
            ),
            id="short-steps",
        ),
        pytest.param(
            lambda f: f.create_dataset("checkpoints/jumped", data=np.zeros(2, dtype=bool)), id="short-jumped"
        ),
        pytest.param(
            lambda f: (
                f.__delitem__("global/sigma"),
                f.create_dataset("global/sigma", data=np.zeros((4, 3), np.float32)),
            ),
            id="wrong-shape",
        ),
    ],
)
def test_a_damaged_store_is_one_line(workdir: Path, capsys, monkeypatch, damage):
    with h5py.File(workdir / "trajectory.h5", "r+") as file:
        damage(file)
    for command in (["fit", "--epochs", "2"], ["extrapolate", "--method", "last-interval"]):
        code, _, err = invoke([*command, "--workdir", str(workdir), "--device", "cpu"], capsys, monkeypatch)
        assert_one_line_error(code, err, "damaged trajectory store")
    assert not _strays(workdir.parent)


def _extrapolate_args(workdir: Path, out: Path) -> list[str]:
    """``extrapolate`` with a method that needs no predictor, into ``out``."""
    return [
        "extrapolate",
        "--workdir",
        str(workdir),
        "--method",
        "last-interval",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]


def test_push_of_a_damaged_manifest(workdir: Path, tmp_path: Path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = _extrapolate_args(workdir, out)
    assert invoke(args, capsys, monkeypatch)[0] == 0
    manifest = json.loads((out / "nexttools.json").read_text())
    for text in ("", json.dumps({k: v for k, v in manifest.items() if k != "checkpoints"})):
        (out / "nexttools.json").write_text(text)
        code, _, err = invoke(["push", str(out), "me/model", "--token", "hf_x"], capsys, monkeypatch)
        assert_one_line_error(code, err, "nexttools.json")


def test_push_refuses_stray_files_and_never_changes_the_folder(
    workdir: Path, tmp_path: Path, capsys, monkeypatch
):
    out = tmp_path / "out"
    args = _extrapolate_args(workdir, out)
    assert invoke(args, capsys, monkeypatch)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "notes.txt").write_text("private")
    code, _, err = invoke(["push", str(out), "me/model", "--token", "hf_x"], capsys, monkeypatch)
    assert_one_line_error(code, err, "notes.txt", "not part of the output")
    (out / "notes.txt").unlink()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not _strays(tmp_path)


def test_two_writers_of_one_output(workdir: Path, tmp_path: Path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = _extrapolate_args(workdir, out)
    with exclusive_lock(tmp_path / ".out.lock", out):  # another extrapolate is writing this folder
        code, _, err = invoke(args, capsys, monkeypatch)
    assert_one_line_error(code, err, "being written by another nexttools process")
    assert not out.exists()
    assert invoke(args, capsys, monkeypatch)[0] == 0
    code, _, err = invoke(args, capsys, monkeypatch)  # and a later one does not replace it silently
    assert_one_line_error(code, err, "already exists", "--overwrite")


# ---------------------------------------------------------------------------------------------
# The file system: read-only locations and full disks (a tmpfs of our own; skipped where mounting
# is not allowed).


@pytest.fixture()
def mount(tmp_path: Path) -> Iterator[Path]:
    point = tmp_path / "mnt"
    point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(point)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _remount(point: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_read_only_locations(run: DemoRun, mount: Path, capsys, monkeypatch):
    short, whole = mount / "short", mount / "whole"
    assert _extract(run, short, capsys, monkeypatch, "--steps", ":30")[0] == 0  # extract would add a row
    assert _extract(run, whole, capsys, monkeypatch)[0] == 0
    before = _tree(mount)
    _remount(mount, "ro")
    device = ["--device", "cpu"]
    cases = [
        ["extract", str(run.run), "--base", str(run.base), "--k", "2", "--workdir", str(short), *device],
        ["fit", "--workdir", str(whole), "--epochs", "2", *device],
        ["extrapolate", "--workdir", str(whole), "--method", "last-interval", *device],
    ]
    for args in cases:
        code, _, err = invoke(args, capsys, monkeypatch)
        assert_one_line_error(code, err, "Read-only file system")
    _remount(mount, "rw")
    assert _tree(mount) == before


def test_a_full_disk_in_extract_and_fit(run: DemoRun, mount: Path, capsys, monkeypatch):
    short, whole = mount / "short", mount / "whole"
    assert _extract(run, short, capsys, monkeypatch, "--steps", ":30")[0] == 0
    assert _extract(run, whole, capsys, monkeypatch)[0] == 0
    fit_args = ["fit", "--workdir", str(whole), "--device", "cpu", "--epochs", "2", "--seed", "1"]
    assert invoke(fit_args, capsys, monkeypatch)[0] == 0
    before = _tree(mount)
    _remount(mount, f"size={shutil.disk_usage(mount).used + 64 * 1024}")  # 64 KiB left
    code, _, err = _extract(run, short, capsys, monkeypatch)  # one more checkpoint: a new store
    assert_one_line_error(code, err, "not enough disk space", "nothing was changed")
    code, _, err = invoke([*fit_args[:-1], "2"], capsys, monkeypatch)  # another seed: a new predictor
    assert_one_line_error(code, err, "No space left on device")
    assert _tree(mount) == before  # the previous stores and predictor, and nothing else


# ---------------------------------------------------------------------------------------------
# Signals: Ctrl-C and SIGTERM mid-command, in a subprocess slowed down where the work is short.

# Where each command is slowed down and says that its real work has begun (the marker file).
_HOOKS = {
    "extract": "import nexttools.extract_sources as m\nm.LoraWindow.hold = started(m.LoraWindow.hold)",
    "fit": "import nexttools.predictor.training as m\nm.train_nets = started(m.train_nets)",
    "extrapolate": (
        "from nexttools import writer as m\nm.ShardedWriter._submit = started(m.ShardedWriter._submit)"
    ),
}


def _signal_run(args: list[str], command: str, sig: signal.Signals, marker: Path) -> tuple[int, str]:
    script = (
        # Ctrl-C as a terminal delivers it, even when this suite runs in the background (a shell
        # starts background jobs with SIGINT ignored, and the child would inherit that).
        "import signal\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import sys, time\n"
        "from pathlib import Path\n"
        "def started(function):\n"
        "    def wrapped(*a, **k):\n"
        f"        Path({str(marker)!r}).touch()\n"
        "        time.sleep(0.05)\n"
        "        return function(*a, **k)\n"
        "    return wrapped\n"
        f"{_HOOKS[command]}\n"
        "from nexttools.cli import main\n"
        f"sys.argv = ['nexttools', *{args!r}]\n"
        "main()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"{command} ended before it could be interrupted: {process.stderr.read()}")  # type: ignore[union-attr]
        time.sleep(0.02)
    time.sleep(0.3)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
@pytest.mark.parametrize("command", ["extract", "fit", "extrapolate"])
def test_interrupted_commands_leave_nothing(run: DemoRun, tmp_path: Path, capsys, monkeypatch, command, sig):
    workdir = tmp_path / "work"
    prior = ["--steps", ":30"] if command == "extract" else []  # so that extract has a row to add
    assert _extract(run, workdir, capsys, monkeypatch, *prior)[0] == 0
    common = ["--workdir", str(workdir), "--device", "cpu"]
    if command == "extrapolate":
        assert invoke(["fit", *common, "--epochs", "2"], capsys, monkeypatch)[0] == 0
    before = _tree(tmp_path)
    args = {
        "extract": ["extract", str(run.run), "--base", str(run.base), "--k", "2", *common],
        "fit": ["fit", *common, "--epochs", "1000000"],
        "extrapolate": ["extrapolate", *common, "--max-shard-size", "50KB", "--method", "next", "--force"],
    }[command]
    code, err = _signal_run(args, command, sig, tmp_path.parent / f"{tmp_path.name}-started")
    expected = 130 if sig == signal.SIGINT else 143
    assert code == expected, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert (
        len(lines) == 1 and "Traceback" not in err and ("interrupted" in lines[0] or "terminated" in lines[0])
    ), err
    assert _tree(tmp_path) == before and not _strays(tmp_path)


@pytest.mark.parametrize("command", ["extract", "fit", "extrapolate"])
def test_kill_9_mid_command_is_survived(run: DemoRun, tmp_path: Path, capsys, monkeypatch, command):
    """kill -9 cannot clean up; it must still leave nothing that looks whole, and the next run works."""
    workdir = tmp_path / "work"
    prior = ["--steps", ":30"] if command == "extract" else []
    assert _extract(run, workdir, capsys, monkeypatch, *prior)[0] == 0
    common = ["--workdir", str(workdir), "--device", "cpu"]
    if command == "extrapolate":
        assert invoke(["fit", *common, "--epochs", "2"], capsys, monkeypatch)[0] == 0
    before = _tree(workdir)
    args = {
        "extract": ["extract", str(run.run), "--base", str(run.base), "--k", "2", *common],
        "fit": ["fit", *common, "--epochs", "1000000"],
        "extrapolate": ["extrapolate", *common, "--max-shard-size", "50KB", "--method", "next", "--force"],
    }[command]
    code, _ = _signal_run(args, command, signal.SIGKILL, tmp_path.parent / f"{tmp_path.name}-started")
    assert code == -signal.SIGKILL
    leftovers = (".partial", ".lock")  # what kill -9 may leave: never under a final name
    after = {
        name: data
        for name, data in _tree(workdir).items()
        if not name.endswith(leftovers) and ".partial-" not in name.split("/")[0]
    }
    assert after == before  # the store, predictor and outputs are the previous ones; no new one looks whole
    rerun = [*args[:-1], "3"] if command == "fit" else args
    code, _, err = invoke(rerun, capsys, monkeypatch)
    assert code == 0, err
    assert not _strays(tmp_path)


class _Planted:
    """A pickle that would create a file when unpickled by anything but a weights-only loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_a_malicious_pickle_is_never_executed(run: DemoRun, tmp_path: Path, capsys, monkeypatch):
    import torch

    last = _last(run)
    marker = tmp_path / "executed"
    tensors = load_file(last / "adapter_model.safetensors")
    (last / "adapter_model.safetensors").unlink()
    torch.save({**tensors, "payload": _Planted(marker)}, last / "adapter_model.bin")
    code, _, err = _extract(run, tmp_path / "work", capsys, monkeypatch)
    assert_one_line_error(code, err, "adapter_model.bin", "not a readable weights-only torch file")
    assert not marker.exists()


def test_a_changed_older_checkpoint_is_refused_before_writing(
    workdir: Path, run: DemoRun, capsys, monkeypatch
):
    """last-interval reads checkpoint c−k too: it is checked before any output exists."""
    older = run.run / f"checkpoint-{run.steps[-3]}" / "adapter_model.safetensors"
    tensors = load_file(older)
    save_file({k: t * 1.01 for k, t in tensors.items()}, older, metadata={"format": "pt"})
    out = workdir.parent / "out"
    args = _extrapolate_args(workdir, out)
    code, _, err = invoke(args, capsys, monkeypatch)
    assert_one_line_error(code, err, f"checkpoint-{run.steps[-3]}", "changed since extraction")
    assert not out.exists() and not _strays(workdir.parent)


# ---------------------------------------------------------------------------------------------
# Names planted in a shared workdir or output parent: a symlink, a hard link, a file or a folder
# under a name nexttools creates is refused in one line or never met, and nothing outside changes.


def _victims(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    victim, folder = tmp_path / "victim.txt", tmp_path / "victim-dir"
    victim.write_text("precious")
    folder.mkdir()
    (folder / "private.txt").write_text("secret")
    return victim, folder, {"victim": victim.read_bytes(), "private": (folder / "private.txt").read_bytes()}


def _untouched(victim: Path, folder: Path, before: dict[str, bytes]) -> bool:
    return (
        victim.read_bytes() == before["victim"]
        and sorted(p.name for p in folder.iterdir()) == ["private.txt"]
        and (folder / "private.txt").read_bytes() == before["private"]
    )


def _plant(path: Path, how: str, victim: Path, folder: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    {
        "symlink": lambda: path.symlink_to(victim),
        "dangling": lambda: path.symlink_to(victim.with_name("nowhere")),
        "dir-symlink": lambda: path.symlink_to(folder, target_is_directory=True),
        "hardlink": lambda: path.hardlink_to(victim),
        "folder": lambda: path.mkdir(),
    }[how]()


@pytest.mark.parametrize("how", ["symlink", "dangling", "hardlink", "folder"])
def test_a_planted_lock_is_refused_and_never_written_through(
    workdir: Path, tmp_path: Path, run: DemoRun, capsys, monkeypatch, how: str
):
    victim, folder, before = _victims(tmp_path)
    out = tmp_path / "out"
    for lock, args in (
        (workdir / "trajectory.h5.lock", ["extract", str(run.run), "--base", str(run.base), "--k", "2"]),
        (tmp_path / ".out.lock", _extrapolate_args(workdir, out)),
    ):
        _plant(lock, how, victim, folder)
        if args[0] == "extract":
            args = [*args, "--workdir", str(workdir), "--device", "cpu"]
        code, _, err = invoke(args, capsys, monkeypatch)
        assert_one_line_error(code, err, "is not a lock file nexttools made")
        assert _untouched(victim, folder, before) and not out.exists()
        shutil.rmtree(lock) if how == "folder" else lock.unlink()
    assert invoke(_extrapolate_args(workdir, out), capsys, monkeypatch)[0] == 0


@pytest.mark.parametrize("how", ["symlink", "dangling", "dir-symlink", "folder"])
def test_planted_work_files_are_never_followed(
    workdir: Path, tmp_path: Path, run: DemoRun, capsys, monkeypatch, how: str
):
    """The partial store, the predictor's files (and their old fixed temporaries), an output's
    staging and replaced folders: planted names are removed or never met, the victims stay."""
    import os

    victim, folder, before = _victims(tmp_path)
    out = tmp_path / "out"
    pid = os.getpid()
    planted = [
        workdir / "trajectory.h5.partial",
        workdir / "predictor.safetensors.partial",
        workdir / "predictor.json.partial",
        tmp_path / f".out.partial-{pid}",
        tmp_path / f".out.replaced-{pid}",
        tmp_path / f".out.push-{pid}",
    ]
    for path in planted:
        _plant(path, how, victim, folder)
    extract = ["extract", str(run.run), "--base", str(run.base), "--k", "2", "--workdir", str(workdir)]
    (workdir / "trajectory.h5").unlink()  # so that extract builds the whole store again
    code, _, err = invoke([*extract, "--device", "cpu"], capsys, monkeypatch)
    if how == "folder":  # a folder is not removed for us: one line naming it
        assert_one_line_error(code, err, "trajectory.h5.partial")
        shutil.rmtree(planted[0])
        code, _, err = invoke([*extract, "--device", "cpu"], capsys, monkeypatch)
    assert code == 0, err
    assert (
        invoke(["fit", "--workdir", str(workdir), "--epochs", "2", "--device", "cpu"], capsys, monkeypatch)[0]
        == 0
    )
    for _ in range(2):  # the second one replaces the first output
        assert invoke([*_extrapolate_args(workdir, out), "--overwrite"], capsys, monkeypatch)[0] == 0
    assert _untouched(victim, folder, before)
    for name in ("trajectory.h5", "predictor.safetensors", "predictor.json"):
        assert not (workdir / name).is_symlink() and (workdir / name).is_file()
    assert out.is_dir() and not out.is_symlink()


def test_the_push_view_is_a_fresh_folder(workdir: Path, tmp_path: Path, capsys, monkeypatch):
    import os

    from nexttools.hub import _upload_view
    from nexttools.manifest import verify_output

    victim, folder, before = _victims(tmp_path)
    out = tmp_path / "out"
    assert invoke(_extrapolate_args(workdir, out), capsys, monkeypatch)[0] == 0
    planted = tmp_path / f".out.push-{os.getpid()}"
    planted.symlink_to(folder, target_is_directory=True)
    with _upload_view(out, verify_output(out), "me/model") as view:
        assert view.parent == tmp_path and not view.is_symlink() and view != planted
        assert {p.name for p in view.iterdir()} == {p.name for p in out.iterdir()} | {"README.md"}
    assert _untouched(victim, folder, before) and not view.exists()
    (out / "link.txt").symlink_to(victim)
    code, _, err = invoke(["push", str(out), "me/model", "--token", "hf_x"], capsys, monkeypatch)
    assert_one_line_error(code, err, "is a link")
