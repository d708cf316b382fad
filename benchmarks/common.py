"""Shared plumbing for the benchmarks: synthetic data on demand, timing, and child-process peak RSS.

Every figure is a ratio against a reference measured in the same run on the same machine, so the
numbers travel between machines better than absolute seconds do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.synthetic_qwen import write_base, write_run

DATA = Path(os.environ.get("NEXTTOOLS_BENCH_DATA", "bench-out/data"))


def qwen_run() -> tuple[Path, Path]:
    """(base, run) of the Qwen2.5-1.5B-shaped LoRA run, written on first use (~7 GB, a few minutes)."""
    base, run = DATA / "base", DATA / "run"
    if not (base / "model.safetensors").exists():
        write_base(base)
    if not (run / "checkpoint-150" / "trainer_state.json").exists():
        write_run(run, base)
    return base, run


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_files(paths: list[Path]) -> int:
    """Read every byte of ``paths`` (page cache included); returns the byte count."""
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(64 << 20):
                total += len(chunk)
    return total


def run_child(args: list[str]) -> dict:
    """Run ``python -m nexttools ARGS`` in a child process; wall seconds and its peak RSS in MiB.

    The child is wrapped by :mod:`benchmarks.peak_rss` so that its own ``ru_maxrss`` is reported,
    not the maximum over every child this benchmark ever started.
    """
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.peak_rss", *args], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"nexttools {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    report = json.loads(done.stderr.strip().splitlines()[-1])
    return {"seconds": wall, "peak_rss_mib": report["peak_rss_mib"], "stdout": done.stdout}
