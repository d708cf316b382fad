"""Step 3: ``nexttools extract / fit / backtest / extrapolate``, run as a user types them (subprocesses).

Every command line is appended to ``<workdir>/commands.sh`` so the README can show exactly what ran.
Nothing here imports nexttools: the example exercises the installed command, not the library.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


def nexttools_command() -> str:
    """The ``nexttools`` executable of the running environment (falls back to the one on PATH)."""
    beside = Path(sys.executable).with_name("nexttools")
    if beside.exists():
        return str(beside)
    found = shutil.which("nexttools")
    if found is None:
        raise RuntimeError("the nexttools command is not installed: pip install -e '.[examples]'")
    return found


def run_nexttools(args: list[str], log: Path) -> dict:
    """Run ``nexttools ARGS --json``, log the command line to ``log`` and return the parsed JSON summary.

    Human output (stderr) is passed through; a non-zero exit raises with the command's stderr tail.
    """
    command = [nexttools_command(), *args, "--json"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write(shlex.join(["nexttools", *args, "--json"]) + "\n")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def extract(run: Path, base: Path, workdir: Path, last_step: int) -> dict:
    """``nexttools extract RUN --base BASE --steps :LAST --workdir W``: checkpoints up to ``last_step``.

    The vanilla run goes on to the full budget; ``--steps`` keeps exactly the part NExt may use.
    """
    args = ["extract", str(run), "--base", str(base), "--workdir", str(workdir), "--steps", f":{last_step}"]
    return run_nexttools(args, workdir / "commands.sh")


def fit(workdir: Path) -> dict:
    """``nexttools fit --workdir W``: trains the predictor; the JSON holds the back-test figures."""
    return run_nexttools(["fit", "--workdir", str(workdir)], workdir / "commands.sh")


def extrapolate(workdir: Path, *, alpha: float, method: str, output_format: str, out: Path) -> dict:
    """``nexttools extrapolate --alpha A --method M --format F --out DIR --workdir W``."""
    args = [
        "extrapolate",
        "--workdir",
        str(workdir),
        "--alpha",
        f"{alpha:g}",
        "--method",
        method,
        "--format",
        output_format,
        "--out",
        str(out),
    ]
    return run_nexttools(args, workdir / "commands.sh")


def backtest(workdir: Path, eval_cmd: str, *, alphas: list[float], methods: list[str]) -> dict:
    """``nexttools backtest --eval-cmd CMD --workdir W [--alpha A ...] [--method M ...]``: the advisor."""
    args = ["backtest", "--workdir", str(workdir), "--eval-cmd", eval_cmd]
    for alpha in alphas:
        args += ["--alpha", f"{alpha:g}"]
    for method in methods:
        args += ["--method", method]
    return run_nexttools(args, workdir / "commands.sh")
