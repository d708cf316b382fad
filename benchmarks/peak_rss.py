"""Run the nexttools CLI in this process, then print its own peak RSS as a JSON line on stderr.

Usage: ``python -m benchmarks.peak_rss extract RUN --base BASE ...`` (the arguments of ``nexttools``).

The peak is ``VmHWM`` from ``/proc/self/status``, the high-water mark of this process's own address
space. ``ru_maxrss`` would be wrong here: Linux carries it over from the parent across fork and exec,
so a child of a benchmark that had 3 GB resident reports at least 3 GB whatever it does itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nexttools.cli import main

if __name__ == "__main__":
    sys.argv = ["nexttools", *sys.argv[1:]]
    try:
        main()
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    status = Path("/proc/self/status").read_text()
    peak_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    peak_mib = peak_kib / 1024
    print(json.dumps({"peak_rss_mib": round(peak_mib, 1)}), file=sys.stderr)
