"""``fit`` and ``extract`` on a shared machine: their time beside one other CPU-bound process.

Each command runs twice on the Qwen-shaped run, in its own child process: alone, then with one busy
process (a pure-Python loop) beside it. The figure is the ratio of the two wall times; the target is
at most 2×. On 2 cores one busy process takes half the machine, so about 2× is what a command that
uses both cores must expect, and anything far above it is threads waiting for each other (OpenMP
threads spinning on a core they share with another process; see the README's "Benchmarks").

    python -m benchmarks.bench_load         # also part of `make bench`
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.common import qwen_run, run_child

BUSY = "while True: pass"


@contextmanager
def one_busy_process() -> Iterator[None]:
    """A CPU-bound process for the duration of the block."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


def _extract_seconds(run: Path, base: Path) -> float:
    workdir = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        return run_child(["extract", str(run), "--base", str(base), "--workdir", str(workdir)])["seconds"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _fit_seconds(workdir: Path) -> float:
    scratch = Path(tempfile.mkdtemp(prefix="bench-load-fit-"))
    try:  # a copy of the store, so that the benchmark's own predictor is left alone
        shutil.copy2(workdir / "trajectory.h5", scratch / "trajectory.h5")
        return run_child(["fit", "--workdir", str(scratch), "--device", "cpu"])["seconds"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(workdir: Path) -> dict:
    """``workdir`` holds the store ``bench_extract`` wrote (``fit`` reads a copy of it)."""
    base, run = qwen_run()
    figures: dict[str, float] = {}
    for name, measure in (
        ("extract", lambda: _extract_seconds(run, base)),
        ("fit", lambda: _fit_seconds(workdir)),
    ):
        idle = measure()
        with one_busy_process():
            loaded = measure()
        figures |= {
            f"{name}_idle_seconds": idle,
            f"{name}_loaded_seconds": loaded,
            f"{name}_loaded_over_idle": loaded / idle,
        }
    return figures


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-out/work")), indent=2))
