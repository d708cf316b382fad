"""``extrapolate`` writing a merged Qwen2.5-1.5B-shaped bf16 model, against copying the base.

Reference: ``shutil.copyfile`` of the base's safetensors (3.1 GB) onto the same disk, measured in the
same run after warming the page cache, which is the floor for any writer that must emit a model of
the same size. ``extrapolate`` additionally reads the 196 LoRA modules of the last checkpoint, forms
each merged weight W + s·BA + α·σ̂ûv̂ᵀ in float32 and rounds it to bf16 once.

Peak RSS is the child's, against the issue's bound of one shard plus 1 GB.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import qwen_run, read_files, run_child, timed

SHARD = "2GB"
SHARD_MIB = 2e9 / 2**20


def copy_all(files: list[Path], folder: Path) -> None:
    """The reference: copy each file into ``folder``, as the fastest model writer would."""
    for path in files:
        shutil.copyfile(path, folder / path.name)


def main(workdir: Path) -> dict:
    """Extrapolate from ``workdir`` (store and predictor written by the extract and fit benchmarks)."""
    base, _ = qwen_run()
    base_files = sorted(base.glob("*.safetensors"))
    read_files(base_files)  # warm the page cache, as extrapolate's own reads will find it
    scratch = Path(tempfile.mkdtemp(prefix="bench-extrapolate-", dir=workdir))
    try:
        copy_seconds = timed(lambda: copy_all(base_files, scratch))
        for copied in scratch.iterdir():
            copied.unlink()
        out = scratch / "merged"
        options = ["--alpha", "1.5", "--out", str(out), "--max-shard-size", SHARD, "--device", "cpu"]
        options += ["--method", "next", "--format", "merged", "--force"]  # the same work as every bench run
        child = run_child(["extrapolate", "--workdir", str(workdir), *options, "--json"])
        written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "base_bytes": sum(f.stat().st_size for f in base_files),
        "written_bytes": written,
        "copy_seconds": copy_seconds,
        "extrapolate_seconds": child["seconds"],
        "extrapolate_over_copy": child["seconds"] / copy_seconds,
        "extrapolate_peak_rss_mib": child["peak_rss_mib"],
        "rss_bound_mib": SHARD_MIB + 1024,
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=2))
