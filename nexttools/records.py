"""The records a workdir holds about one store, each read once: ``fit``'s predictor record (with its
back-test) and ``backtest``'s verdict.

A command opens the store, wraps it in :class:`StoreRecords`, and passes that down, so that one
``extrapolate`` parses ``predictor.json`` and ``backtest.json`` once each, whichever of its parts
(the defaults, the method, the manifest) asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from nexttools.errors import UserError
from nexttools.predictor.saved import PredictorConfig, load_predictor, read_config
from nexttools.predictor.trained import TrainedPredictor
from nexttools.store import TrajectoryStore
from nexttools.verdict import read_verdict


@dataclass
class StoreRecords:
    """``workdir``'s records of the open ``store`` (module docstring)."""

    workdir: Path
    store: TrajectoryStore

    @cached_property
    def config(self) -> PredictorConfig | None:
        """``predictor.json`` (None: no predictor); ``UserError`` when it is unreadable."""
        return read_config(self.workdir)

    @cached_property
    def backtest(self) -> dict[str, Any] | None:
        """The back-test ``fit`` recorded for this very store (None: none, unreadable, or another
        store's)."""
        try:
            config = self.config
        except UserError:
            return None
        if config is None or config.store_fingerprint != self.store.fingerprint():
            return None
        return config.backtest

    @cached_property
    def verdict(self) -> dict[str, Any] | None:
        """``backtest``'s verdict for this very store (None: none, or another store's)."""
        return read_verdict(self.workdir, self.store)

    def predictor(self) -> TrainedPredictor:
        """The saved predictor, checked against the store (``UserError`` when it cannot be used)."""
        return load_predictor(self.workdir, self.store, self.config)
