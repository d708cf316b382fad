"""Options shared by the commands that work in one folder: ``--workdir`` and ``--store``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

F = TypeVar("F", bound=Callable[..., object])

MAX_COUNT = 10**9
"""The largest count (k, epochs, width, ...) an option accepts: larger ones are typos, and some would
overflow a C integer deep inside numpy or torch instead of failing here."""
Count = click.IntRange(min=1, max=MAX_COUNT)
Seed = click.IntRange(min=0, max=2**63 - 1)
MAX_STEP = 2**62


def workdir_options(function: F) -> F:
    """Add ``--workdir`` (default ``./nexttools-run``) and ``--store`` (default ``WORKDIR/trajectory.h5``)."""
    function = click.option(
        "--store",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Trajectory store [default: WORKDIR/trajectory.h5].",
    )(function)
    return click.option(
        "--workdir",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("nexttools-run"),
        help="Working folder shared by extract, fit and extrapolate.",
    )(function)
