"""Formatting shared by the commands' tables, so that every table reads whole at 80 columns."""

from __future__ import annotations


def method_header(method: str) -> str:
    """A method's column header on two lines ("last-" over "interval"): every name whole, narrow."""
    return method.replace("-", "-\n") if "-" in method else method + "\n"


def diverging(value: float, digits: int = 3) -> str:
    """A skill or worth: ``digits`` decimals, or "< −1" for a prediction that diverges (a six-digit
    negative number says nothing more), "n/a" for NaN."""
    if value != value:
        return "n/a"
    return "< −1" if value < -1 else f"{value:.{digits}f}"
