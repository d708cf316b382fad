"""The record of a run's jumps: ``<workdir>/jumps.json``, one entry per jump tried.

A run that jumped while training is still one trajectory: a kept factor-space jump at step N is
written into ``checkpoint-N``'s own adapter (so that a resume from it, and the store, see the weights
the run went on from), and the adapter it replaced is kept as ``<workdir>/jumps/step-N/``,
so that the pre-jump state can be rebuilt exactly. ``extract`` reads the kept entries and marks the
local delta of each interval that holds a jump, so that ``fit`` never learns a jump as the run's own
motion (``docs/store.md``).

An entry: ``step`` (the checkpoint it jumped from), ``method``, ``alpha``, ``target_step``,
``claimed_steps``, ``kept`` (False when the gate reverted it), ``score_before``/``score_after`` (the
gate's scores, or None), ``seconds_update`` (the store update) and ``seconds_jump``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nexttools.errors import UserError
from nexttools.safe_files import write_atomic
from nexttools.workdir import Workdir


@dataclass(frozen=True)
class JumpEntry:
    """One jump tried during training (module docstring)."""

    step: int
    method: str
    alpha: float
    target_step: float
    claimed_steps: float
    kept: bool
    score_before: float | None = None
    score_after: float | None = None
    seconds_update: float = 0.0
    seconds_jump: float = 0.0


def read_jumps(workdir: Path) -> list[JumpEntry]:
    """The jumps recorded in ``workdir`` (none when there is no record), in step order."""
    path = Workdir(workdir).jumps
    if not path.is_file():
        return []
    try:
        document = json.loads(path.read_text())
        entries = [JumpEntry(**entry) for entry in document["jumps"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"{path}: not a jump record ({type(error).__name__}); remove it to start afresh"
        ) from None
    return sorted(entries, key=lambda entry: entry.step)


def record_jump(workdir: Path, entry: JumpEntry) -> None:
    """Add ``entry`` to the record (replacing one of the same step), atomically."""
    entries = [e for e in read_jumps(workdir) if e.step != entry.step] + [entry]
    document: dict[str, Any] = {"jumps": [asdict(e) for e in sorted(entries, key=lambda e: e.step)]}
    write_atomic(Workdir(workdir).jumps, (json.dumps(document, indent=1) + "\n").encode())


def kept_steps(workdir: Path) -> set[int]:
    """The steps whose checkpoint holds a kept jump."""
    return {entry.step for entry in read_jumps(workdir) if entry.kept}
