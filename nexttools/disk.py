"""Bytes as people read them, and the one free-space check every writer makes before it starts."""

from __future__ import annotations

import shutil
from pathlib import Path

from nexttools.errors import UserError


def human_bytes(nbytes: float) -> str:
    """``2.31 GB`` from 0.1 GB up, else ``12.40 MB`` (decimal units, as disks and the Hub count)."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def free_bytes(folder: Path) -> int:
    """The bytes free on the file system that holds ``folder``."""
    return shutil.disk_usage(folder).free


def require_free(folder: Path, needed: int, what: str) -> None:
    """``UserError`` (one line, nothing written yet) unless ``needed`` bytes are free under ``folder``."""
    free = free_bytes(folder)
    if needed > free:
        raise UserError(
            f"not enough disk space for {what}: it needs {human_bytes(needed)}, {human_bytes(free)} are "
            "free; nothing was changed"
        )
