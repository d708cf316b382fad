"""The user's eval command: run it on a model folder, read its score, and remember scores by model.

The command prints a score, higher is better, as the last line of its stdout. It never goes through
a shell with a path in it (a folder named ``$(rm -rf ~)`` must stay a name):

- By default it is split once into arguments (``shlex.split``: POSIX quoting, so ``"{model}"`` and
  ``'{model}'`` mean the same as ``{model}``) and run directly; ``{model}`` is replaced inside each
  argument by the folder's path, which stays one argument whatever characters it holds. Shell syntax
  (``|``, ``&&``, ``;``, ``>``, ``$VAR``, ``cd``) is refused with a pointer to the opt-in below.
- With ``--eval-shell`` it is run by ``/bin/sh -c`` (pipes, ``cd``, ``&&``), and the path is never
  put into its text: ``{model}`` is refused there, and the command reads the folder from the
  environment variable ``NEXTTOOLS_MODEL`` (write ``"$NEXTTOOLS_MODEL"``, quoted), which a shell
  expands as data, never as code. Every eval also gets ``NEXTTOOLS_MODEL``.

It runs in a process group of its own, with a time limit (``--eval-timeout``); on the limit, on
Ctrl-C and on SIGTERM the whole group is ended (SIGTERM, then SIGKILL after a grace period) before
nexttools exits, so no eval is left running. Scores are cached in ``<workdir>/eval-scores.json``
under the SHA-256 of the model's weight files and the command, so that re-running ``backtest``
evaluates only models it has not scored yet; the cache is replaced atomically after every score
(under a fresh temporary name: a planted link is never written through), so an interrupted
back-test keeps what it finished and never a half-written cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nexttools.errors import UserError
from nexttools.safe_files import write_atomic
from nexttools.workdir import Workdir

PLACEHOLDER = "{model}"
MODEL_VARIABLE = "NEXTTOOLS_MODEL"
DEFAULT_TIMEOUT = 3600.0
_GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL for an eval's process group
_STDERR_TAIL = 3  # lines of the command's stderr quoted in an error
_SHELL_TOKENS = {"|", "||", "&", "&&", ";", ";;", "<", ">", ">>", "<<", "2>", "2>>", "&>", "2>&1", "(", ")"}
_SHELL_BUILTINS = {"cd", "export", "source", ".", "set", "unset", "alias", "exec", "eval"}


@dataclass(frozen=True)
class EvalCommand:
    """The user's eval command, checked once (module docstring).

    ``text`` is the command as typed; ``shell`` the ``--eval-shell`` opt-in; ``timeout`` the limit of
    one evaluation in seconds.
    """

    text: str
    shell: bool = False
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise UserError(f"--eval-timeout must be a positive number of seconds, not {self.timeout}")
        if self.shell:
            if PLACEHOLDER in self.text:
                raise UserError(
                    f"with --eval-shell the model folder is never put into the command: read it from "
                    f'"${MODEL_VARIABLE}" instead of {PLACEHOLDER}'
                )
            if MODEL_VARIABLE not in self.text:
                raise UserError(
                    f'--eval-cmd must read the model folder from "${MODEL_VARIABLE}" (--eval-shell)'
                )
            return
        tokens = self._tokens()
        if not any(PLACEHOLDER in token for token in tokens) and MODEL_VARIABLE not in self.text:
            raise UserError(
                f"--eval-cmd must contain {PLACEHOLDER}, the model folder to score: {self.text!r}"
            )
        shell_syntax = [
            token
            for token in tokens
            if token in _SHELL_TOKENS or "$" in token or "`" in token or token == tokens[0] in _SHELL_BUILTINS
        ]
        if shell_syntax:
            raise UserError(
                f"--eval-cmd is run without a shell, so {shell_syntax[0]!r} would reach the program as "
                f'text: pass --eval-shell and read the folder from "${MODEL_VARIABLE}" to use a shell'
            )

    def _tokens(self) -> list[str]:
        try:
            tokens = shlex.split(self.text)
        except ValueError as error:
            raise UserError(f"--eval-cmd cannot be split into arguments ({error}): {self.text!r}") from None
        if not tokens:
            raise UserError("--eval-cmd is empty")
        return tokens

    @property
    def cache_key(self) -> str:
        """What the score cache files scores under (the shell's commands apart from the others)."""
        return f"sh -c {self.text}" if self.shell else self.text

    def argv(self, folder: Path) -> list[str]:
        """The program and arguments that score ``folder``."""
        if self.shell:
            return ["/bin/sh", "-c", self.text]
        return [token.replace(PLACEHOLDER, str(folder)) for token in self._tokens()]


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

    def __init__(self, workdir: Path, command: EvalCommand) -> None:
        self.path = Workdir(workdir).scores
        self.command = command.cache_key
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
        write_atomic(self.path, json.dumps(self._document, indent=1, sort_keys=True).encode())


def run_eval(command: EvalCommand, folder: Path, label: str) -> float:
    """Run the eval ``command`` on ``folder``; its score, or one ``UserError`` line naming ``label``."""
    where = f"the eval command on {label}"
    argv = command.argv(folder)
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env={**os.environ, MODEL_VARIABLE: str(folder)},
            start_new_session=True,  # its own process group, which is ended as a whole
        )
    except OSError as error:
        raise UserError(f"{where} cannot start {argv[0]!r}: {error.strerror or error}") from None
    try:
        stdout, stderr = process.communicate(timeout=command.timeout)
    except subprocess.TimeoutExpired:
        _end_group(process)
        raise UserError(
            f"{where} did not finish within {command.timeout:g} s (--eval-timeout); its processes were ended"
        ) from None
    except BaseException:  # Ctrl-C, SIGTERM: the eval does not outlive nexttools
        _end_group(process)
        raise
    _end_group(process)  # anything it left running in its group
    tail = " | ".join(stderr.strip().splitlines()[-_STDERR_TAIL:])
    if process.returncode != 0:
        raise UserError(f"{where} failed (exit {process.returncode}): {tail or 'no stderr'}")
    lines = stdout.strip().splitlines()
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


def _end_group(process: subprocess.Popen[str]) -> None:
    """End the eval's whole process group: SIGTERM, a grace period for its leader, then SIGKILL for
    whatever of the group is left (children that ignored SIGTERM or were left running)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=_GRACE_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
