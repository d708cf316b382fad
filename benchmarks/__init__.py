"""``make bench``: the benchmarks (``benchmarks/run_all.py``)."""
