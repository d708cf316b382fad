"""The eval command: no shell with a path in it, a time limit, and a process group that never outlives us."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nexttools.errors import UserError
from nexttools.evaluation import MODEL_VARIABLE, EvalCommand, ScoreCache, run_eval

# A scorer that records the folder it was given (as its one argument and in the environment).
RECORDER = (
    "import os, sys, pathlib; "
    "pathlib.Path(sys.argv[2]).write_text(sys.argv[1] + '|' + os.environ['{var}']); print(0.5)"
)


def _hostile_folder(tmp_path: Path) -> Path:
    folder = tmp_path / """m'"; touch PWNED1; echo "$(touch PWNED2)`touch PWNED3`"""
    folder.mkdir()
    return folder


@pytest.mark.parametrize("quoting", ["{model}", '"{model}"', "'{model}'"])
def test_a_hostile_folder_name_is_one_argument_whatever_the_quoting(tmp_path: Path, quoting: str) -> None:
    folder = _hostile_folder(tmp_path)
    record = tmp_path / "record.txt"
    script = RECORDER.format(var=MODEL_VARIABLE)
    command = EvalCommand(f'{sys.executable} -c "{script}" {quoting} {record}')
    assert run_eval(command, folder, "test") == 0.5
    assert record.read_text() == f"{folder}|{folder}"
    assert not list(tmp_path.glob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))


def test_the_shell_opt_in_reads_the_folder_from_the_environment(tmp_path: Path) -> None:
    folder = _hostile_folder(tmp_path)
    record = tmp_path / "record.txt"
    command = EvalCommand(
        f'cd {tmp_path} && printf %s "${MODEL_VARIABLE}" > {record} && echo 0.25 | cat', shell=True
    )
    assert run_eval(command, folder, "test") == 0.25
    assert record.read_text() == str(folder)
    assert not list(tmp_path.glob("PWNED*"))
    with pytest.raises(UserError, match=r"never put into the command"):
        EvalCommand("python eval.py {model}", shell=True)
    with pytest.raises(UserError, match=r"must read the model folder"):
        EvalCommand("python eval.py", shell=True)
    assert command.cache_key != EvalCommand(f"x {{model}} {MODEL_VARIABLE}").cache_key


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan"), float("inf")])
def test_the_timeout_checks_itself(timeout: float) -> None:
    with pytest.raises(UserError, match=r"--eval-timeout"):
        EvalCommand("score {model}", timeout=timeout)


def _running(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split(")")[-1].split()[0] != "Z"  # a zombie runs nothing
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs a few seconds on (SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + 5
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _running(pid)


def _wait_for(path: Path) -> int:
    deadline = time.monotonic() + 20
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, "the eval never started"
        time.sleep(0.05)
    return int(path.read_text())


# The eval starts a child that ignores SIGTERM, records its pid, and hangs.
HANGING = textwrap.dedent(
    """
    import pathlib, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    pathlib.Path(sys.argv[2]).write_text(str(child.pid))
    time.sleep(600)
    """
)


def test_a_hanging_eval_is_ended_with_its_whole_group(tmp_path: Path) -> None:
    script, pid_file = tmp_path / "hang.py", tmp_path / "child.pid"
    script.write_text(HANGING)
    command = EvalCommand(f"{sys.executable} {script} {{model}} {pid_file}", timeout=2)
    started = time.monotonic()
    with pytest.raises(UserError, match=r"did not finish within 2 s \(--eval-timeout\)"):
        run_eval(command, tmp_path, "test")
    assert time.monotonic() - started < 15
    assert not _alive(_wait_for(pid_file))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_eval_leaves_no_process_and_a_consistent_cache(tmp_path: Path, sig: int) -> None:
    script, pid_file = tmp_path / "hang.py", tmp_path / "child.pid"
    script.write_text(HANGING)
    workdir = tmp_path / "work"
    workdir.mkdir()
    command = EvalCommand(f"{sys.executable} {script} {{model}} {pid_file}")
    ScoreCache(workdir, command).put("before", 1.0)
    driver = textwrap.dedent(
        f"""
        import signal, sys
        from pathlib import Path
        from nexttools.evaluation import EvalCommand, ScoreCache, run_eval
        def stop(signum, frame): raise SystemExit(143)
        signal.signal(signal.SIGTERM, stop)
        command = EvalCommand({command.text!r})
        cache = ScoreCache(Path({str(workdir)!r}), command)
        try:
            cache.put("after", run_eval(command, Path({str(tmp_path)!r}), "test"))
        except KeyboardInterrupt:
            sys.exit(130)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", driver], cwd=Path(__file__).parent.parent)
    child = _wait_for(pid_file)
    process.send_signal(sig)
    assert process.wait(timeout=30) == (130 if sig == signal.SIGINT else 143)
    assert not _alive(child)
    cache = ScoreCache(workdir, command)
    assert cache.get("before") == 1.0 and cache.get("after") is None
    assert sorted(p.name for p in workdir.iterdir()) == ["eval-scores.json"]  # no temporary left


def test_the_score_cache_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    workdir, victim = tmp_path / "work", tmp_path / "victim.txt"
    workdir.mkdir()
    victim.write_text("precious")
    cache = ScoreCache(workdir, EvalCommand("score {model}"))
    for name in (".eval-scores.json.tmp", "eval-scores.json"):  # the old fixed temporary, the cache
        (workdir / name).unlink(missing_ok=True)
        (workdir / name).symlink_to(victim)
        cache.put("a", 1.0)
        assert victim.read_text() == "precious"
        assert not (workdir / "eval-scores.json").is_symlink()
        (workdir / name).unlink(missing_ok=True)
