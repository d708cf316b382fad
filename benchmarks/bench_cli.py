"""How fast the CLI answers before any work: ``nexttools --help``, ``nexttools <cmd> --help`` and an
unknown command, each against ``python -c pass`` measured in the same run (median of 7 runs each).

    python -m benchmarks.bench_cli          # also part of `make bench`

The group imports a command's module only when that command runs or shows its help
(``nexttools.cli.LazyGroup``), so the top-level help and a mistyped command never import torch; a
command's own ``--help`` still imports its core module, torch included.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

RUNS = 7
NEXTTOOLS = [sys.executable, "-m", "nexttools"]


def _seconds(argv: list[str]) -> float:
    """Median wall time of ``argv`` over :data:`RUNS` runs (stdout and stderr discarded)."""
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> dict[str, float]:
    reference = _seconds([sys.executable, "-c", "pass"])
    cases = {
        "help": [*NEXTTOOLS, "--help"],
        "unknown_command": [*NEXTTOOLS, "bogus"],
        "extract_help": [*NEXTTOOLS, "extract", "--help"],
    }
    results = {"python_seconds": reference}
    for name, argv in cases.items():
        seconds = _seconds(argv)
        results[f"{name}_seconds"] = seconds
        results[f"{name}_over_python"] = seconds / reference
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
