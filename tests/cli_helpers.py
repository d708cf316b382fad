"""Run the real ``nexttools`` entry point in-process and check the one-line-error contract."""

from __future__ import annotations

import sys

import pytest

from nexttools.cli import main


def invoke(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    """Run ``nexttools ARGS`` in-process through :func:`nexttools.cli.main`; (exit code, stdout, stderr)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["nexttools", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """Exit code 2, no traceback, exactly one ``error:`` line, last, containing every fragment."""
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert err.rstrip().endswith(errors[0])
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
