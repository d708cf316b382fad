"""Print how a venv's packages differ from a lock file: what `make test-latest` tests beyond the lock.

    python .ci/drift.py requirements/dev.lock .venv-latest/bin/python

One line per package whose version differs, or that only one side has, so that a failure in
`make test-latest` can be traced to the release that caused it. Always exits 0: it informs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", re.MULTILINE)


def canonical(name: str) -> str:
    """PEP 503 normalised name, so that ``types-PyYAML`` and ``types_pyyaml`` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(lock: Path) -> dict[str, str]:
    """``{name: version}`` pinned in a pip-compile lock file."""
    return {canonical(name): version for name, version in PIN.findall(lock.read_text())}


def installed(python: str) -> dict[str, str]:
    """``{name: version}`` of what the venv of ``python`` holds (the editable project excepted)."""
    listing = subprocess.run(
        [python, "-m", "pip", "list", "--format=json", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {canonical(item["name"]): item["version"] for item in json.loads(listing)}


def main() -> None:
    lock, python = Path(sys.argv[1]), sys.argv[2]
    pinned, present = locked(lock), installed(python)
    lines = [
        f"  {name}: {pinned.get(name, '-')} -> {present.get(name, '-')}"
        for name in sorted(pinned.keys() | present.keys())
        if pinned.get(name) != present.get(name)
    ]
    print(f"{len(lines)} packages differ from {lock} (locked -> newest):")
    print("\n".join(lines) if lines else "  none")


if __name__ == "__main__":
    main()
