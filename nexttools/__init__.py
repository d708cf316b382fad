"""nexttools: extrapolate LLM RL runs along their rank-1 weight trajectories (NExt, arXiv 2604.11446)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nexttools")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
