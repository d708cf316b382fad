"""The user's eval command: run it on a model folder, read its score, and remember scores by model.

The command is a shell command with a ``{model}`` placeholder (replaced by the quoted folder path)
that prints a score, higher is better, as the last line of its stdout. Scores are cached in
``<workdir>/eval-scores.json`` under the SHA-256 of the model's weight files and the command text,
so that re-running ``backtest`` evaluates only models it has not scored yet; the cache is written
atomically after every score, so an interrupted back-test keeps what it finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import subprocess
from pathlib import Path

from nexttools.errors import UserError
from nexttools.workdir import Workdir

PLACEHOLDER = "{model}"
_STDERR_TAIL = 3  # lines of the command's stderr quoted in an error


def check_command(command: str) -> None:
    """Refuse an eval command without the ``{model}`` placeholder."""
    if PLACEHOLDER not in command:
        raise UserError(f"--eval-cmd must contain {PLACEHOLDER}, the model folder to score: {command!r}")


def model_fingerprint(folder: Path) -> str:
    """SHA-256 over the names and bytes of the folder's ``*.safetensors`` files (the weights)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


class ScoreCache:
    """Scores by (command, model fingerprint), kept in ``<workdir>/eval-scores.json``."""

    def __init__(self, workdir: Path, command: str) -> None:
        self.path = Workdir(workdir).scores
        self.command = command
        self._document: dict[str, dict[str, float]] = {}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
            except ValueError:
                loaded = None
            if not isinstance(loaded, dict) or not all(isinstance(v, dict) for v in loaded.values()):
                raise UserError(f"{self.path} is not a score cache; remove it to start afresh")
            self._document = loaded

    def get(self, fingerprint: str) -> float | None:
        value = self._document.get(self.command, {}).get(fingerprint)
        return float(value) if isinstance(value, (int, float)) else None

    def put(self, fingerprint: str, score: float) -> None:
        self._document.setdefault(self.command, {})[fingerprint] = score
        staging = self.path.with_name(f".{self.path.name}.tmp")
        staging.write_text(json.dumps(self._document, indent=1, sort_keys=True))
        os.replace(staging, self.path)


def run_eval(command: str, folder: Path, label: str) -> float:
    """Run the eval ``command`` on ``folder``; its score, or one ``UserError`` line naming ``label``."""
    line = command.replace(PLACEHOLDER, shlex.quote(str(folder)))
    completed = subprocess.run(line, shell=True, capture_output=True, text=True, check=False)
    tail = " | ".join(completed.stderr.strip().splitlines()[-_STDERR_TAIL:])
    where = f"the eval command on {label}"
    if completed.returncode != 0:
        raise UserError(f"{where} failed (exit {completed.returncode}): {tail or 'no stderr'}")
    lines = completed.stdout.strip().splitlines()
    last = lines[-1].strip() if lines else ""
    try:
        score = float(last)
    except ValueError:
        raise UserError(
            f"{where} did not print a score as its last stdout line (got {last[:80]!r})"
            + (f"; stderr: {tail}" if tail else "")
        ) from None
    if not math.isfinite(score):
        raise UserError(f"{where} printed a score that is not finite: {last!r}")
    return score
