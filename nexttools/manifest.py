"""``nexttools.json``: what an output was made from, and a fingerprint of every file it holds.

The manifest is the last file written into an output folder, and it lists the size and a SHA-256
of every other file (``README.md`` excepted: the model card may be re-rendered, e.g. with a Hub
repo id, without invalidating the weights). :func:`verify_output` is what makes a folder "a
complete nexttools output": ``push`` calls it before any network call, and ``--overwrite`` only
replaces folders that carry a manifest.

Why only the header of ``.safetensors`` files is hashed: hashing gigabytes of weights would cost as
much as writing them, and any rewrite of a shard changes its size or its JSON header (names,
shapes, dtypes, offsets); a truncated file changes its size. Small files are hashed whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from nexttools.errors import UserError

MANIFEST_NAME = "nexttools.json"
CARD_NAME = "README.md"
_NOT_LISTED = frozenset({MANIFEST_NAME, CARD_NAME})
_MERGED_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def file_fingerprint(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of ``path``; for ``.safetensors``, of its length prefix + header."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if path.suffix == ".safetensors":
            prefix = file.read(8)
            digest.update(prefix)
            if len(prefix) == 8:
                (header_length,) = struct.unpack("<Q", prefix)
                digest.update(file.read(min(header_length, size)))
        else:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return {"size": size, "sha256": digest.hexdigest()}


def _listed_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative POSIX paths, sorted) except the manifest and the card."""
    names = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
    return sorted(name for name in names if name not in _NOT_LISTED)


@dataclass(frozen=True)
class BaseRecord:
    """The base model an output was made on: its local ``path``, Hub ``id`` (None when unknown) and
    fingerprint (:func:`nexttools.checkpoints.fingerprint.fingerprint`)."""

    path: str
    id: str | None = None
    fingerprint: str | None = None


@dataclass(frozen=True)
class CheckpointRecord:
    """One checkpoint of the run the store was extracted from."""

    step: int
    path: str
    fingerprint: str | None = None


@dataclass(frozen=True)
class Manifest:
    """``nexttools.json``: what an output is and what it was made from.

    ``files`` fingerprints every other file of the folder (filled in by :func:`write_manifest`).
    ``weights`` is what the folder loads as: ``"model"`` (a whole model) or ``"adapter"`` (PEFT).
    ``target_step`` is the run step the jump stands for (s_c + α·k·Δ); ``lora`` the run's own
    ``LoraConfig`` fields (r, lora_alpha, target_modules, use_rslora) for the resume recipes;
    ``adapter_rank`` the rank an adapter output declares. ``store``, ``predictor``, ``backtest``
    and ``verdict`` are the JSON documents of the store, of ``fit`` (``BacktestResult.document``)
    and of ``nexttools backtest`` (``backtest.json``), recorded as they were; their own modules
    own their schemas.
    """

    format: str
    method: str
    alpha: float
    k: int
    dtype: str
    library_name: str
    base: BaseRecord
    checkpoints: tuple[CheckpointRecord, ...]
    weights: str = "model"
    target_step: float | None = None
    run_kind: str | None = None
    untied_embeddings: bool = False
    lora: dict[str, Any] | None = None
    adapter_rank: int | None = None
    resume_from: str | None = None
    command: str | None = None
    created_utc: str | None = None
    nexttools_version: str | None = None
    store: dict[str, Any] | None = None
    predictor: dict[str, Any] | None = None
    backtest: dict[str, Any] | None = None
    verdict: dict[str, Any] | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        """The run's checkpoint steps, in order."""
        return [entry.step for entry in self.checkpoints]

    @property
    def base_name(self) -> str:
        """The base's Hub id, else its folder's name."""
        return self.base.id or Path(self.base.path).name

    @property
    def base_reference(self) -> str:
        """What a snippet loads the base from: its Hub id, else its local path."""
        return self.base.id or self.base.path

    def to_json(self) -> dict[str, Any]:
        """The JSON document (the one writer is :func:`write_manifest`)."""
        document = asdict(self)
        document["checkpoints"] = list(document["checkpoints"])
        return document

    @staticmethod
    def from_json(document: object, path: Path) -> Manifest:
        """The manifest in ``document`` (read from ``path``); one clear ``UserError`` when it lacks
        (or holds a wrong type for) a field that readers need."""
        damaged = "; the output is damaged: write it again with `nexttools extrapolate --overwrite`"
        if not isinstance(document, dict):
            raise UserError(f"{path} is not a JSON object{damaged}")
        for key, kind in _REQUIRED_KEYS.items():
            if not _has_type(document.get(key), kind):
                raise UserError(f"{path} has no valid {key!r}{damaged}")
        base = document["base"]
        if not isinstance(base.get("path"), str):
            raise UserError(f"{path} has no valid base path{damaged}")
        entries = document["checkpoints"]
        if not entries:
            raise UserError(f"{path} lists no checkpoint{damaged}")
        for entry in entries:
            if not (isinstance(entry, dict) and _has_type(entry.get("step"), int) and "path" in entry):
                raise UserError(f"{path} has a checkpoint entry without step and path{damaged}")
        for key, kind in _OPTIONAL_KEYS.items():
            value = document.get(key)
            if value is not None and not _has_type(value, kind):
                raise UserError(f"{path} has an invalid {key!r}{damaged}")
        values = {key: document[key] for key in (*_REQUIRED_KEYS, *_OPTIONAL_KEYS) if key in document}
        values = {key: value for key, value in values.items() if value is not None}
        # Manifests written before `weights` was recorded name it through `format`.
        values.setdefault("weights", "adapter" if document["format"] == "adapter" else "model")
        values.pop("base"), values.pop("checkpoints")
        return Manifest(
            **values,
            base=BaseRecord(base["path"], base.get("id"), base.get("fingerprint")),
            checkpoints=tuple(
                CheckpointRecord(int(e["step"]), str(e["path"]), e.get("fingerprint")) for e in entries
            ),
        )


# What every reader of a manifest relies on, with its type.
_REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "method": str,
    "alpha": (int, float),
    "k": int,
    "dtype": str,
    "library_name": str,
    "base": dict,
    "checkpoints": list,
}


_OPTIONAL_KEYS: dict[str, type | tuple[type, ...]] = {
    "weights": str,
    "target_step": (int, float),
    "run_kind": str,
    "untied_embeddings": bool,
    "lora": dict,
    "adapter_rank": int,
    "resume_from": str,
    "command": str,
    "created_utc": str,
    "nexttools_version": str,
    "store": dict,
    "predictor": dict,
    "backtest": dict,
    "verdict": dict,
    "files": dict,
}


def _has_type(value: object, kind: type | tuple[type, ...]) -> bool:
    """``isinstance``, except that a bool is no number (JSON ``true`` is not a step or an α)."""
    if kind is bool:
        return isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write ``folder/nexttools.json``: ``manifest`` with ``files`` fingerprinting every other file.

    Call it last, when every other file of the output is in place. Returns the manifest's path.
    """
    files = {name: file_fingerprint(folder / name) for name in _listed_files(folder)}
    path = folder / MANIFEST_NAME
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(replace(manifest, files=files).to_json(), indent=2) + "\n")
    os.replace(partial, path)
    return path


def _required_files(manifest: Manifest, folder: Path) -> list[str]:
    """The files an output cannot be without: by its ``weights`` (``model`` or ``adapter``)."""
    if manifest.weights == "adapter":
        return list(_ADAPTER_FILES)
    if manifest.weights != "model":
        raise UserError(f"{folder / MANIFEST_NAME}: unknown weights kind {manifest.weights!r}")
    files = manifest.files
    single, index = _MERGED_WEIGHTS
    if single in files:
        return ["config.json", single]
    if index not in files:
        raise UserError(f"{folder} is incomplete: no {single} or {index} listed in {MANIFEST_NAME}")
    try:
        weight_map = json.loads((folder / index).read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{folder / index} is unreadable: {error}") from None
    return ["config.json", index, *sorted(set(weight_map.values()))]


def read_manifest(folder: Path) -> Manifest:
    """The manifest of ``folder`` (``UserError`` when it is missing, unreadable or lacks a field);
    the files are not checked: :func:`verify_output` does that."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{folder} is not a complete nexttools output (no {MANIFEST_NAME})")
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is unreadable: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("files"), dict):
        raise UserError(f"{path} has no file list; the output is incomplete")
    return Manifest.from_json(document, path)


def verify_output(folder: Path) -> Manifest:
    """Check that ``folder`` is a complete, unmodified nexttools output and return its manifest.

    Raises :class:`UserError` when the manifest is missing or unreadable, when the weights (or the
    index, or a shard it names) are missing, or when any listed file is missing or differs in size
    or fingerprint from what the manifest recorded.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, expected in manifest.files.items():
        target = folder / name
        if not target.is_file():
            raise UserError(f"{folder} is incomplete: {name} is missing")
        if file_fingerprint(target) != expected:
            raise UserError(f"{target} changed since it was written (size or fingerprint differs)")
    for name in _required_files(manifest, folder):
        if name not in manifest.files:
            raise UserError(f"{folder} is incomplete: {name} is not listed in {MANIFEST_NAME}")
    return manifest
