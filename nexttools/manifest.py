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


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``folder/nexttools.json``: ``manifest`` plus ``"files"`` fingerprinting every other file.

    Call it last, when every other file of the output is in place. Returns the manifest's path.
    """
    files = {name: file_fingerprint(folder / name) for name in _listed_files(folder)}
    path = folder / MANIFEST_NAME
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({**manifest, "files": files}, indent=2) + "\n")
    os.replace(partial, path)
    return path


def _required_files(manifest: dict[str, Any], folder: Path) -> list[str]:
    """The files an output cannot be without: by its ``weights`` (``model`` or ``adapter``).

    Manifests written before ``weights`` was recorded name it through ``format`` (``adapter``, else
    a model).
    """
    weights = manifest.get("weights", "adapter" if manifest.get("format") == "adapter" else "model")
    if weights == "adapter":
        return list(_ADAPTER_FILES)
    if weights != "model":
        raise UserError(f"{folder / MANIFEST_NAME}: unknown weights kind {weights!r}")
    files = manifest["files"]
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


# What every reader of a manifest (push, the card) relies on, with its type.
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


def _check_keys(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest that lacks a key (or holds a value of the wrong type) that readers need."""
    damaged = "; the output is damaged: write it again with `nexttools extrapolate --overwrite`"
    for key, kind in _REQUIRED_KEYS.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise UserError(f"{path} has no valid {key!r}{damaged}")
    if not isinstance(manifest["base"].get("path"), str):
        raise UserError(f"{path} has no valid base path{damaged}")
    for entry in manifest["checkpoints"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("step"), int) and "path" in entry):
            raise UserError(f"{path} has a checkpoint entry without step and path{damaged}")
    if not manifest["checkpoints"]:
        raise UserError(f"{path} lists no checkpoint{damaged}")


def verify_output(folder: Path) -> dict[str, Any]:
    """Check that ``folder`` is a complete, unmodified nexttools output and return its manifest.

    Raises :class:`UserError` when the manifest is missing or unreadable, when the weights (or the
    index, or a shard it names) are missing, or when any listed file is missing or differs in size
    or fingerprint from what the manifest recorded.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{folder} is not a complete nexttools output (no {MANIFEST_NAME})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is unreadable: {error}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UserError(f"{path} has no file list; the output is incomplete")
    _check_keys(path, manifest)
    listed: dict[str, Any] = manifest["files"]
    for name, expected in listed.items():
        target = folder / name
        if not target.is_file():
            raise UserError(f"{folder} is incomplete: {name} is missing")
        if file_fingerprint(target) != expected:
            raise UserError(f"{target} changed since it was written (size or fingerprint differs)")
    for name in _required_files(manifest, folder):
        if name not in listed:
            raise UserError(f"{folder} is incomplete: {name} is not listed in {MANIFEST_NAME}")
    return manifest
