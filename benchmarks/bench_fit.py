"""``fit`` with its default settings on the Qwen2.5-1.5B-shaped store written by ``bench_extract``.

The issue's budget is absolute (under 10 minutes on this 2-core machine), so wall seconds are reported
beside that budget, together with the child's peak RSS. The store's size is reported so that the
figure can be related to the run (196 modules, 15 checkpoints, k=5 → 10 target rows).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.common import run_child

BUDGET_SECONDS = 600.0


def main(workdir: Path) -> dict:
    """Fit the predictor in ``workdir`` (which holds ``trajectory.h5``); returns the figures."""
    child = run_child(["fit", "--workdir", str(workdir), "--device", "cpu", "--json"])
    document = json.loads(child["stdout"])
    methods = document["backtest"]["methods"].items()
    overall = {name: method["cosine"]["overall"] for name, method in methods if method is not None}
    return {
        "store_bytes": (workdir / "trajectory.h5").stat().st_size,
        "fit_seconds": child["seconds"],
        "fit_over_budget": child["seconds"] / BUDGET_SECONDS,
        "fit_peak_rss_mib": child["peak_rss_mib"],
        "backtest_cosine_overall": overall,
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=2))
