"""The working folder that ``extract``, ``fit``, ``backtest``, ``inspect`` and ``extrapolate`` share,
and the name of every file in it: the one place that spells them.

```
nexttools-run/
  trajectory.h5            the trajectory store (extract; any path with --store)
  predictor.safetensors    the NExt networks (fit)
  predictor.json           what they are and were trained on, fit's back-test (fit)
  backtest.json            the advisor's verdict (backtest)
  eval-scores.json         cached scores of the user's eval command (backtest)
  extrapolated-alpha1.5/   an output (extrapolate; any path with --out)
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nexttools.errors import UserError

STORE_FILE = "trajectory.h5"


@dataclass(frozen=True)
class Workdir:
    """The folder ``path``; ``store_path`` overrides where its store is (``--store``)."""

    path: Path
    store_path: Path | None = None

    @property
    def store(self) -> Path:
        return Path(self.store_path) if self.store_path is not None else Path(self.path) / STORE_FILE

    @property
    def predictor_weights(self) -> Path:
        return Path(self.path) / "predictor.safetensors"

    @property
    def predictor_config(self) -> Path:
        return Path(self.path) / "predictor.json"

    @property
    def verdict(self) -> Path:
        return Path(self.path) / "backtest.json"

    @property
    def scores(self) -> Path:
        return Path(self.path) / "eval-scores.json"

    @property
    def jumps(self) -> Path:
        """The record of the jumps a run made while it trained (:mod:`nexttools.schedule.record`)."""
        return Path(self.path) / "jumps.json"

    @property
    def jump_states(self) -> Path:
        """Where each kept jump keeps the weight files it replaced, ``step-N/``."""
        return Path(self.path) / "jumps"

    def existing_store(self) -> Path:
        """The store's path; ``UserError`` when there is none yet."""
        if not self.store.is_file():
            raise UserError(f"no trajectory store at {self.store}: run `nexttools extract` first")
        return self.store

    def output(self, alpha: float, method: str, format_suffix: str) -> Path:
        """``extrapolated-alpha{α}``, then ``-{method}`` unless ``next``, then the format's suffix
        (none for ``merged``; ``-adapter``, ``-base``, ``-checkpoint``)."""
        name = f"extrapolated-alpha{alpha:g}"
        if method != "next":
            name += f"-{method}"
        return Path(self.path) / (name + format_suffix)
