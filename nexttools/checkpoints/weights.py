"""Lazy, validated reading of Hugging Face model folders (``model.safetensors`` or a sharded index).

A model can be far larger than memory, so nothing here loads a whole file: headers are parsed by
hand (8-byte length + JSON, the cheapest way to learn names, shapes and dtypes) and checked against
the file size, so that a truncated or corrupt file is reported *before* any work starts.

Tensors are then read one at a time with a positioned read into a fresh buffer, not through a
memory map: pages touched through a map held open stay in the process's resident set (measured:
reading a 320 MB file through an open ``safe_open`` handle adds 320 MB of RSS), so a run read
through maps would grow to the size of everything it read. A read tensor is freed with its last
reference; the file data stays in the OS page cache, where it costs the process nothing.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nexttools.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the safetensors format caps headers at 100 MB

# safetensors dtype strings -> torch dtypes (those this torch build can hold).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: ``shape``, ``dtype`` and the byte range ``[begin, end)`` in the data buffer."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header.

    ``raw`` is the file's first ``8 + N`` bytes (length prefix + JSON), hashed by the fingerprint;
    ``tensors`` is in file (offset) order.
    """

    path: Path
    raw: bytes
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored (dtype, shape), in a new CPU buffer owned by the caller."""
        info = self.tensors[name]
        nbytes = info.end - info.begin
        with self.path.open("rb", buffering=0) as handle:
            handle.seek(len(self.raw) + info.begin)
            buffer = self._read_bytes(handle, nbytes)
        return buffer.view(info.dtype).reshape(info.shape)

    def _read_bytes(self, handle: io.RawIOBase, nbytes: int) -> torch.Tensor:
        """The next ``nbytes`` of ``handle`` into a fresh uint8 buffer (``UserError`` if truncated)."""
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view, done = buffer.numpy().data, 0
        while done < nbytes:
            count = handle.readinto(view[done:])
            if not count:
                raise UserError(f"{self.path}: file was truncated while being read")
            done += count
        return buffer

    def read_blocks(self, name: str, block_bytes: int) -> Iterator[torch.Tensor]:
        """Tensor ``name`` as consecutive flat pieces of its dtype, each at most ``block_bytes`` (whole
        elements; at least one piece, empty for an empty tensor): a copy that never holds the whole
        tensor, so that an embedding larger than memory's budget streams through."""
        info = self.tensors[name]
        item = info.dtype.itemsize
        step = max(item, block_bytes // item * item)
        with self.path.open("rb", buffering=0) as handle:
            handle.seek(len(self.raw) + info.begin)
            for start in range(info.begin, max(info.end, info.begin + 1), step):
                yield self._read_bytes(handle, min(step, info.end - start)).view(info.dtype)


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of ``path`` without reading its data.

    Checks the length prefix, the JSON, every entry (dtype, shape, offsets), that the byte ranges
    tile the data buffer with no hole or overlap and that they cover it exactly: a truncated file,
    or one with bytes appended, fails here. Every failure is a ``UserError`` naming the file.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise UserError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise UserError(
                    f"{path}: corrupt safetensors file (header length {length} does not fit in {size} bytes)"
                )
            header_bytes = handle.read(length)
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from error
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: corrupt safetensors file (header is not valid JSON)") from error
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors file (header is not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    tensors = {name: _tensor_info(path, name, entry) for name, entry in header.items()}
    ordered = dict(sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)))
    expected_begin = 0
    for name, info in ordered.items():
        if info.begin != expected_begin:
            raise UserError(
                f"{path}: corrupt safetensors file (tensor {name!r} does not start where the previous ends)"
            )
        expected_begin = info.end
    data_size = size - 8 - length
    if expected_begin != data_size:
        raise UserError(
            f"{path}: corrupt or truncated safetensors file (header describes {expected_begin} data bytes, "
            f"the file holds {data_size})"
        )
    return SafetensorsHeader(path=path, raw=prefix + header_bytes, tensors=ordered, metadata=dict(metadata))


def _tensor_info(path: Path, name: str, entry: Any) -> TensorInfo:
    """Validate one header entry: known dtype, integer shape, and a byte range of the right size."""
    try:
        dtype = _DTYPES[entry["dtype"]]
        shape = tuple(int(dim) for dim in entry["shape"])
        begin, end = (int(offset) for offset in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: corrupt safetensors file (bad header entry for {name!r})") from error
    nbytes = math.prod(shape) * dtype.itemsize
    if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes:
        raise UserError(f"{path}: corrupt safetensors file ({name!r}: offsets do not match shape and dtype)")
    return TensorInfo(shape=shape, dtype=dtype, begin=begin, end=end)


def has_model_weights(folder: Path) -> bool:
    """Whether ``folder`` holds HF safetensors weights (single file or sharded index)."""
    return (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()


class ModelWeights:
    """Read-only, lazy view of a HF model folder's tensors.

    Every header is validated on construction (cheap: headers only), so a corrupt shard is reported
    before any computation. ``get`` reads one tensor through a memory map; memory therefore grows
    with the tensors the caller keeps, never with the model.

    Attributes:
        folder: the model folder.
        files: the safetensors files, in index order (first appearance in ``weight_map``).
        names: every tensor name, shard by shard in file (offset) order.
        config: ``config.json`` as a dict, ``{}`` if absent.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index_path = self.folder / INDEX_FILE
        if index_path.is_file():
            self.files = self._files_from_index(index_path)
        elif (self.folder / SINGLE_FILE).is_file():
            self.files = [self.folder / SINGLE_FILE]
        else:
            raise UserError(
                f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE} (not a Hugging Face model folder)"
            )

        self._where: dict[str, SafetensorsHeader] = {}
        for file in self.files:
            header = read_safetensors_header(file)
            for name in header.tensors:
                if name in self._where:
                    raise UserError(
                        f"{file}: tensor {name!r} is also stored in {self._where[name].path.name}"
                    )
                self._where[name] = header
        if index_path.is_file():
            self._check_index(index_path)
        self.names = list(self._where)
        self.config = self._read_config()

    def _files_from_index(self, index_path: Path) -> list[Path]:
        self._weight_map = _read_weight_map(index_path)
        files = [self.folder / name for name in dict.fromkeys(self._weight_map.values())]
        for file in files:
            if not file.is_file():
                raise UserError(f"{index_path}: shard {file.name} is missing")
        return files

    def _check_index(self, index_path: Path) -> None:
        """Every ``weight_map`` entry must be in the shard it names (a stale index is corrupt)."""
        for name, shard in self._weight_map.items():
            found = self._where.get(name)
            if found is None or found.path.name != shard:
                raise UserError(f"{index_path}: {name!r} is not in {shard} as the index says")

    def _read_config(self) -> dict[str, Any]:
        path = self.folder / "config.json"
        if not path.is_file():
            return {}
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: not valid JSON") from error
        return config if isinstance(config, dict) else {}

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def _header(self, name: str) -> SafetensorsHeader:
        try:
            return self._where[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tensor of {self.folder}") from None

    def file_of(self, name: str) -> Path:
        """The safetensors file that holds ``name``."""
        return self._header(name).path

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` as stored (from the header; nothing is read)."""
        return self._header(name).tensors[name].shape

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of ``name`` as stored (from the header; nothing is read)."""
        return self._header(name).tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` on CPU, in its stored dtype and shape, in a new buffer (freed with it)."""
        return self._header(name).read(name)

    def blocks(self, name: str, block_bytes: int) -> Iterator[torch.Tensor]:
        """The tensor ``name`` as flat pieces of at most ``block_bytes``
        (:meth:`SafetensorsHeader.read_blocks`)."""
        return self._header(name).read_blocks(name, block_bytes)


def _read_weight_map(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{index_path}: corrupt index (no readable weight_map)") from error
    if not isinstance(weight_map, dict) or not all(
        isinstance(key, str) and isinstance(value, str) and "/" not in value
        for key, value in weight_map.items()
    ):
        raise UserError(f"{index_path}: corrupt index (weight_map must map names to shard file names)")
    return weight_map
