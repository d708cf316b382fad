"""Tensor reads: nexttools' positioned reads (``ModelWeights.get``) against ``safe_open(backend="pread")``.

Both read every tensor of the Qwen-shaped base (2.9 GB) one at a time, in file order, in a child
process of their own, after one full read has put the file in the page cache; each child reports its
wall time and its own peak RSS (``VmHWM``). ``safe_open`` with the default memory-map backend is the
third row: what reading through a map held open costs in resident memory. Every page of every
tensor is touched, so that a lazy map is really read.

    python -m benchmarks.bench_reads        # also part of `make bench`
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import qwen_run, read_files

READERS = ("nexttools", "safe_open-pread", "safe_open-mmap")


def _touch(tensor: torch.Tensor) -> float:
    """One byte of every 4 KiB page of ``tensor`` summed: each page is really read (a memory map's
    pages then count in the resident set), at almost no arithmetic."""
    return float(tensor.reshape(-1).view(torch.uint8)[::4096].sum())


def _child(reader: str, folder: Path) -> None:
    """Read every tensor of ``folder`` with ``reader``; print seconds and peak RSS as JSON."""
    from safetensors import safe_open

    from nexttools.checkpoints.weights import ModelWeights

    weights = ModelWeights(folder)
    start = time.perf_counter()
    checksum = 0.0
    if reader == "nexttools":
        for name in weights.names:
            checksum += _touch(weights.get(name))
    else:
        options = {"backend": "pread"} if reader == "safe_open-pread" else {}
        for file in weights.files:
            with safe_open(file, framework="pt", **options) as handle:  # type: ignore[call-arg]
                for name in handle.keys():  # noqa: SIM118
                    tensor: torch.Tensor = handle.get_tensor(name)
                    checksum += _touch(tensor)
    seconds = time.perf_counter() - start
    status = Path("/proc/self/status").read_text()
    peak_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_kib / 1024, "checksum": checksum}))


def main() -> dict:
    base, _ = qwen_run()
    files = sorted(base.glob("*.safetensors"))
    read_files(files)  # warm the page cache for every reader alike
    results: dict[str, dict[str, float]] = {}
    for reader in READERS:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_reads", "--child", reader, str(base)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[reader] = json.loads(done.stdout.strip().splitlines()[-1])
    checksums = {round(r["checksum"], 3) for r in results.values()}
    assert len(checksums) == 1, f"the readers disagree: {results}"
    return {
        "file_mib": sum(f.stat().st_size for f in files) / 2**20,
        **{f"{reader}_{key}": r[key] for reader, r in results.items() for key in ("seconds", "peak_rss_mib")},
        "pread_over_nexttools": results["safe_open-pread"]["seconds"] / results["nexttools"]["seconds"],
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2], Path(sys.argv[3]))
    else:
        print(json.dumps(main(), indent=2))
