"""Command options, declared once: on the fields of each command's options dataclass.

A field made with :func:`option` carries its help text and how the command line spells and checks
it (:class:`OptionSpec`); its Python type and default are the field's own. ``nexttools.cli.declared``
turns the fields into click options, so a new option is one field here and nothing in the CLI. This
module imports no click: the core stays usable (and typed) without the command line.

Kinds (``OptionSpec.kind``) name the checks that the type alone does not say:

- ``count``: an integer from 1 to :data:`MAX_COUNT`; ``step``: a training step, 0 to :data:`MAX_STEP`;
  ``seed``: 0 to 2**63 − 1; ``positive``: a finite float > 0; ``alpha``: a finite float ≥ 0;
- ``size``: a byte count written as ``5GB``, ``500MB``, ``2GiB`` or a plain number;
- ``steps``: an inclusive step range ``LO:HI``, either end open;
- ``dir`` / ``file``: a path that must name a folder / a file when it exists;
- ``toggle``: a boolean spelled ``--x/--no-x`` (a plain bool is an ``--x`` flag).

Every command's options dataclass derives from :class:`CheckedOptions`, so it checks its own fields
(kind, range, choices) when it is made, from the command line or from Python, and a wrong value is
one :class:`UserError` line naming the flag: the core never checks an option's kind or range again.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nexttools.device import DEVICE_HELP
from nexttools.errors import UserError

OPTION_KEY = "nexttools.option"
MAX_COUNT = 10**9
"""The largest count (k, epochs, width, ...) an option accepts: larger ones are typos, and some would
overflow a C integer deep inside numpy or torch instead of failing here."""
MAX_STEP = 2**62

Kind = Literal["count", "step", "seed", "positive", "alpha", "size", "steps", "dir", "file", "toggle"]
Choices = tuple[str, ...] | Callable[[], tuple[str, ...]]
"""The allowed values, or a function giving them (a registry's names, read when the check runs, so
that a method registered after this module was imported is allowed too)."""


@dataclass(frozen=True)
class OptionSpec:
    """How one field appears on the command line.

    ``flag`` overrides the spelling (default ``--field-name``); ``argument`` makes it positional;
    ``choices`` are the only values allowed (of each element, for a tuple field, which then takes the
    option repeatedly); ``metavar`` names its value in ``--help``; ``envvar`` is read when the option
    is absent.
    """

    help: str
    kind: Kind | None = None
    flag: str | None = None
    argument: bool = False
    choices: Choices | None = None
    metavar: str | None = None
    envvar: str | None = None

    def allowed(self) -> tuple[str, ...] | None:
        """The choices now (None: any value of the field's type)."""
        return self.choices() if callable(self.choices) else self.choices

    def spelled(self, name: str) -> str:
        """How the command line spells the field ``name``: ``--flag``, or ``NAME`` for an argument."""
        if self.argument:
            return name.upper()
        return self.flag or "--" + name.replace("_", "-")


def option(
    default: Any = None,
    help: str = "",
    *,
    kind: Kind | None = None,
    flag: str | None = None,
    argument: bool = False,
    choices: Choices | None = None,
    metavar: str | None = None,
    envvar: str | None = None,
) -> Any:
    """A dataclass field with ``default`` that is also a command-line option (see the module docstring)."""
    spec = OptionSpec(help, kind, flag, argument, choices, metavar, envvar)
    return field(default=default, metadata={OPTION_KEY: spec})


def argument(help: str, **spec: Any) -> Any:
    """A required positional command-line argument (a dataclass field without a default)."""
    return field(metadata={OPTION_KEY: OptionSpec(help, argument=True, **spec)})


_LIMITS = {"count": (1, MAX_COUNT), "step": (0, MAX_STEP), "seed": (0, 2**63 - 1)}


def _problem(spec: OptionSpec, value: object) -> str | None:
    """What is wrong with one value of an option (None: nothing)."""
    allowed = spec.allowed()
    if allowed is not None:
        return None if value in allowed else f"must be one of {', '.join(allowed)}"
    kind = spec.kind
    whole = value if isinstance(value, int) and not isinstance(value, bool) else None
    number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    if kind in _LIMITS:
        low, high = _LIMITS[kind]
        return (
            None
            if whole is not None and low <= whole <= high
            else f"must be a whole number from {low} to {high}"
        )
    if kind == "positive":
        ok = number is not None and math.isfinite(number) and number > 0
        return None if ok else "must be a finite number > 0"
    if kind == "alpha":
        ok = number is not None and math.isfinite(number) and number >= 0
        return None if ok else "must be a finite number ≥ 0"
    if kind == "size":
        return None if whole is not None and whole > 0 else "must be a positive number of bytes"
    if kind == "steps":
        return _steps_problem(value)
    return None


def _steps_problem(value: object) -> str | None:
    if not isinstance(value, tuple) or len(value) != 2 or value == (None, None):
        return "must be a step range LO:HI"
    low, high = value
    for end in (low, high):
        if end is not None and not (isinstance(end, int) and 0 <= end <= MAX_STEP):
            return f"must hold steps between 0 and {MAX_STEP}"
    if isinstance(low, int) and isinstance(high, int) and low > high:
        return "must have LO ≤ HI"
    return None


def check_options(options: object) -> None:
    """Check every option field of the dataclass instance ``options`` (module docstring)."""
    for item in dataclasses.fields(options):  # type: ignore[arg-type]
        spec = item.metadata.get(OPTION_KEY)
        value = getattr(options, item.name)
        if spec is None or value is None:
            continue
        repeated = isinstance(value, tuple) and spec.kind != "steps"
        for one in value if repeated else (value,):
            problem = _problem(spec, one)
            if problem is not None:
                raise UserError(f"{spec.spelled(item.name)} {problem}, not {one!r}")


class CheckedOptions:
    """The base of every command's options dataclass: its fields check themselves when it is made."""

    def __post_init__(self) -> None:
        check_options(self)


WORKDIR_HELP = "Working folder shared by extract, fit and extrapolate."
STORE_HELP = "Trajectory store [default: WORKDIR/trajectory.h5]."


def workdir_option() -> Any:
    """``--workdir``, default ``./nexttools-run``."""
    return option(Path("nexttools-run"), WORKDIR_HELP, kind="dir")


def store_option() -> Any:
    """``--store``, default ``WORKDIR/trajectory.h5``."""
    return option(None, STORE_HELP, kind="file")


def device_option() -> Any:
    """``--device``, parsed by :func:`nexttools.device.resolve_device`."""
    return option("auto", DEVICE_HELP)


def parse_size(text: str) -> int:
    """Bytes in ``"5GB"`` (10⁹), ``"2GiB"`` (2³⁰), ``"500MB"``, ``"1024"``...; ``UserError`` otherwise.

    Decimal units are powers of 1000 (as the Hub states its limits), binary ones powers of 1024.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise UserError(f"cannot read the size {text!r} (examples: 5GB, 500MB, 2GiB)")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise UserError(f"the size {text!r} must be positive")
    return size


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
