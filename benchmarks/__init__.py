"""``make bench``: the benchmarks (``benchmarks/run_all.py``).

The in-process references (reads, the Gram floor, the dense SVD) run with the same OpenMP setting
as the ``nexttools`` children they are compared with (``nexttools.cli`` sets it the same way):
idle OpenMP threads sleep instead of spinning.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
