"""Click options generated from the options dataclasses (:mod:`nexttools.options`), and the command line.

``@declared(FitOptions)`` adds one click option (or argument) per field that :func:`nexttools.options.option`
made, in field order: its flag, type, check, default and help all come from the field. The command
function then takes them as keyword arguments and passes them on unchanged,
``fit(FitOptions(**values))``, so an option is spelled once, on its field.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from nexttools.errors import UserError
from nexttools.options import MAX_COUNT, MAX_STEP, OPTION_KEY, OptionSpec, parse_size
from nexttools.secrets_scrub import scrub_secrets

F = TypeVar("F", bound=Callable[..., object])


class ByteSize(click.ParamType):
    """``5GB``, ``500MB``, ``2GiB`` or a byte count -> bytes (:func:`nexttools.options.parse_size`)."""

    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except UserError as error:
            self.fail(str(error), param, ctx)


class StepRange(click.ParamType):
    """``LO:HI`` (inclusive; either end may be empty) -> ``(lo, hi)``, steps within 0 … MAX_STEP."""

    name = "LO:HI"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int | None, int | None]:
        if isinstance(value, tuple):
            return value
        text = str(value)
        lo, sep, hi = text.partition(":")
        try:
            bounds = (int(lo) if lo.strip() else None, int(hi) if hi.strip() else None)
        except ValueError:
            bounds = None
        if not sep or bounds is None or bounds == (None, None):
            self.fail(f"{text!r}: expected LO:HI, e.g. 10:150, 100: or :80", param, ctx)
        if any(b is not None and not 0 <= b <= MAX_STEP for b in bounds):
            self.fail(f"{text!r}: steps are between 0 and {MAX_STEP}", param, ctx)
        if bounds[0] is not None and bounds[1] is not None and bounds[0] > bounds[1]:
            self.fail(f"{text!r}: LO is greater than HI", param, ctx)
        return bounds


_KIND_TYPES: dict[str, click.ParamType] = {
    "count": click.IntRange(min=1, max=MAX_COUNT),
    "step": click.IntRange(min=0, max=MAX_STEP),
    "seed": click.IntRange(min=0, max=2**63 - 1),
    "positive": click.FloatRange(min=0, min_open=True),
    "alpha": click.FloatRange(min=0),
    "size": ByteSize(),
    "steps": StepRange(),
    "dir": click.Path(file_okay=False, path_type=Path),
    "file": click.Path(dir_okay=False, path_type=Path),
}
_PLAIN_TYPES: dict[object, click.ParamType | type] = {
    Path: click.Path(path_type=Path),
    int: int,
    float: float,
    str: str,
}


def _unwrap(annotation: object) -> tuple[object, bool]:
    """(the element type, whether the field repeats): ``X | None`` -> X; ``tuple[X, ...]`` -> X, repeated."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple and typing.get_args(annotation)[1:] == (Ellipsis,):
        return typing.get_args(annotation)[0], True
    return annotation, False


def _param(field: dataclasses.Field[Any], annotation: object, spec: OptionSpec) -> Callable[[F], F]:
    element, multiple = _unwrap(annotation)
    allowed = spec.allowed()
    if allowed is not None:
        kind: click.ParamType | type = click.Choice(list(allowed))
    elif spec.kind in _KIND_TYPES:
        kind = _KIND_TYPES[spec.kind]
    else:
        kind = _PLAIN_TYPES.get(element, str)
    if spec.argument:
        return click.argument(field.name, type=kind, metavar=spec.metavar)
    flag = spec.spelled(field.name)
    settings: dict[str, Any] = {"help": spec.help, "metavar": spec.metavar}
    if field.default is dataclasses.MISSING:
        settings["required"] = True
    else:
        settings["default"] = field.default
        if spec.kind == "size":
            settings["show_default"] = _human_size(field.default)
    if spec.envvar:
        settings |= {"envvar": spec.envvar, "show_envvar": True}
    if element is bool:
        declaration = f"{flag}/--no-{flag.removeprefix('--')}" if spec.kind == "toggle" else flag
        return click.option(declaration, field.name, is_flag=True, **settings)
    return click.option(flag, field.name, type=kind, multiple=multiple, **settings)


def _human_size(size: int) -> str:
    """``5000000000`` -> ``5GB`` (the largest decimal unit that divides it)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def declared(options_class: type, only: tuple[str, ...] | None = None) -> Callable[[F], F]:
    """Add the click parameters of every option field of the dataclass ``options_class`` (of the
    fields named in ``only``, when a command borrows a few of another's options)."""
    hints = typing.get_type_hints(options_class)
    params = [
        _param(field, hints[field.name], field.metadata[OPTION_KEY])
        for field in dataclasses.fields(options_class)
        if OPTION_KEY in field.metadata and (only is None or field.name in only)
    ]

    def add(function: F) -> F:
        for param in reversed(params):  # click lists the options in the order they are applied last
            function = param(function)
        return function

    return add


def command_line() -> str:
    """The command line this process was started with, as a shell would take it back, with any
    access token (``--token X``, ``hf_...``) replaced by ``***``: the manifest and the card are
    published."""
    return scrub_secrets(shlex.join(["nexttools", *sys.argv[1:]]))
