"""The saved verdict of ``nexttools backtest``, and what ``fit`` and ``extrapolate`` do with it.

``<workdir>/backtest.json`` is the ``backtest --json`` document plus the eval command and the
fingerprint of the store it was computed on; a verdict of another store (``extract`` grew it since)
is ignored, as a stale one would mislead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nexttools.console import warn
from nexttools.safe_files import write_atomic
from nexttools.store import TrajectoryStore
from nexttools.workdir import Workdir

MIN_WORTH = 0.5
"""A jump worth less than half the steps it claims does not pay for itself: "do not extrapolate"."""


def save_verdict(workdir: Path, store: TrajectoryStore, document: dict[str, Any]) -> Path:
    """Write ``<workdir>/backtest.json``: ``document`` (``backtest --json``) with the store's fingerprint."""
    path = Workdir(workdir).verdict
    document = {**document, "store_fingerprint": store.fingerprint()}
    write_atomic(path, json.dumps(document, indent=2).encode())
    return path


def read_verdict(workdir: Path, store: TrajectoryStore) -> dict[str, Any] | None:
    """The saved verdict for this very store (None when there is none, or it is of another store)."""
    try:
        document = json.loads(Workdir(workdir).verdict.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("store_fingerprint") != store.fingerprint():
        return None
    return document


def verdict_warning(verdict: dict[str, Any], method: str, alpha: float) -> str | None:
    """The warning ``extrapolate`` prints when the back-test judged (``method``, ``alpha``) not worth it."""
    recommendation = verdict.get("recommendation")
    if recommendation is None:
        return f"`nexttools backtest` judged: do not extrapolate this run ({verdict.get('reason', '')})"
    results = verdict.get("results", [])
    result = next((r for r in results if r.get("method") == method and r.get("alpha") == alpha), None)
    if result is not None and float(result["worth"]) < MIN_WORTH:
        return (
            f"`nexttools backtest` found {method} at α={alpha:g} worth {float(result['worth']):.2f} of the "
            f"steps it claims (< {MIN_WORTH}); it recommends {recommendation['method']} at "
            f"α={recommendation['alpha']:g}"
        )
    return None


def warn_if_judged(verdict: dict[str, Any] | None, method: str, alpha: float) -> list[str]:
    """Print and return :func:`verdict_warning`'s warning, if any."""
    message = None if verdict is None else verdict_warning(verdict, method, alpha)
    if message is None:
        return []
    warn(message)
    return [message]
