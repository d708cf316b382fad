"""The record of a run's jumps: ``<workdir>/jumps.json``, one entry per jump tried.

A run that jumped while training is still one trajectory: a kept factor-space jump at step N is
written into ``checkpoint-N``'s own adapter (so that a resume from it, and the store, see the weights
the run went on from), and the adapter it replaced is kept as ``<workdir>/jumps/step-N/``,
so that the pre-jump state can be rebuilt exactly. A jump folded into the frozen base keeps its shift
there instead (:mod:`nexttools.base_shifts`). ``extract`` reads the kept entries and marks the
local delta of each interval that holds a jump, so that ``fit`` never learns a jump as the run's own
motion (``docs/store.md``).

An entry: ``step`` (the checkpoint it jumped from), ``method``, ``alpha``, ``target_step``,
``claimed_steps``, ``kept`` (False when the gate reverted it), ``score_before``/``score_after`` (the
gate's scores, or None), ``seconds_update`` (the store update), ``seconds_jump`` and ``base_shift``
(True when the kept jump was folded into the frozen base of a LoRA run, whose shift is then kept as
``<workdir>/jumps/step-N/base-shift.safetensors``: :mod:`nexttools.base_shifts`) and
``in_checkpoint``: True when the jump is part of checkpoint N (``JumpCallback`` writes it there), False
when the run's own checkpoint N is the pre-jump state and the jump lies in the interval after it
(``extrapolate --record``: the run resumed from an output written beside it); ``refused`` says why a
jump was not applied at all (too large: ``schedule.live.JumpTooLarge``), None otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
    base_shift: bool = False
    in_checkpoint: bool = True
    refused: str | None = None


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


def first_step_of(entry: JumpEntry) -> int:
    """The first checkpoint step whose weights include the jump of ``entry``."""
    return entry.step if entry.in_checkpoint else entry.step + 1


def jumped_steps(workdir: Path, steps: Sequence[int]) -> set[int]:
    """The checkpoints among ``steps`` whose interval (from the checkpoint before) holds a kept jump."""
    ordered = sorted(steps)
    found = set()
    for entry in read_jumps(workdir):
        later = [step for step in ordered if step >= first_step_of(entry)]
        if entry.kept and later:
            found.add(later[0])
    return found
