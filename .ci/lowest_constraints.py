"""Print pip constraints that pin every library nexttools declares to its lowest allowed version.

    python .ci/lowest_constraints.py > constraints.txt   # used by `make test-lowest`

Covers the runtime dependencies and the libraries the tests check against (peft, transformers,
matplotlib). Not pinned: the tools (pytest, ruff, mypy), whose versions do not change what
nexttools does; the build backend; the example's TRL and datasets (not part of `make test`); and
torch, which the development set-up pins to the local CPU wheel (see the Makefile).
A plain scan of pyproject.toml, so that it runs on Python 3.10 without tomllib.
"""

from __future__ import annotations

import re
from pathlib import Path

NOT_PINNED = {"pytest", "ruff", "mypy", "torch", "setuptools", "trl", "datasets"}
REQUIREMENT = re.compile(r'"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)[^"]*"')


def lowest_pins(pyproject: str) -> dict[str, str]:
    """``{name: floor}`` of every ``name>=floor`` requirement in ``pyproject``, tools excepted."""
    pins: dict[str, str] = {}
    for name, floor in REQUIREMENT.findall(pyproject):
        if name.lower() not in NOT_PINNED:
            pins.setdefault(name.lower(), floor)
    return pins


if __name__ == "__main__":
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    for name, floor in sorted(lowest_pins(text).items()):
        print(f"{name}=={floor}")
