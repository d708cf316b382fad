"""One rich console on stderr, and the progress bar every long loop uses.

stdout is reserved for machine-readable output (``--json``), so everything human goes to stderr.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False)


class _Progress(Progress):
    """A :class:`Progress` that counts how many are running, so that an inner one can stay silent."""

    running = 0

    def start(self) -> None:
        _Progress.running += 1
        super().start()

    def stop(self) -> None:
        super().stop()
        _Progress.running -= 1


def progress(*extra_columns: TextColumn) -> Progress:
    """A progress display on stderr: spinner, description, bar, N/M, elapsed and remaining time.

    ``extra_columns`` are appended, e.g. ``TextColumn("loss {task.fields[loss]:.3g}")``. Inside
    another one (writing each model of a back-test) it is disabled: the outer bar says what runs, and
    rich before 14 refuses two live displays at once.
    """
    return _Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *extra_columns,
        console=console,
        transient=False,
        disable=_Progress.running > 0,
    )


def warn(message: str) -> None:
    """Print a one-line warning on stderr."""
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", markup=True, soft_wrap=True)
