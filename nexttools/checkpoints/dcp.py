"""HF Trainer / accelerate FSDP sharded checkpoints: the adapter inside ``pytorch_model_fsdp_0/``.

With FSDP and ``SHARDED_STATE_DICT`` (accelerate's default for FSDP2), the Trainer writes no
``adapter_model.safetensors``: ``accelerate.utils.save_fsdp_model(adapter_only=True)`` saves
``{"model": get_peft_model_state_dict(model)}`` with ``torch.distributed.checkpoint`` (DCP) into
``checkpoint-N/pytorch_model_fsdp_0/``: one ``__R_0.distcp`` file per rank and a ``.metadata`` file.
Keys are PEFT's, prefixed ``model.``; each tensor is a set of chunks (``offsets``, ``sizes``), each
chunk one ``torch.save`` record at a byte range of a ``.distcp`` file.

Reading, without a process group and without ever running ``dcp.load`` on untrusted files:

- ``.metadata`` is a pickle. It is never unpickled: :mod:`nexttools.checkpoints.pickle_data` reads
  it as plain data (nothing imported, called or built; memory and nesting bounded by the file), and
  this module checks the shape DCP's filesystem writer gives it and builds its own records: each
  tensor's size, dtype (a fixed table of torch dtypes) and chunks, which must be dense and strided,
  and each chunk's byte range, which must lie inside its data file and hold the chunk's bytes, so
  that nothing is allocated beyond what the files hold.
- Each chunk is read from its byte range and loaded with ``torch.load(weights_only=True)``; it must
  be a dense CPU tensor of the declared dtype and shape; only the adapter's tensors are read
  (memory: one tensor at a time), the optimizer's ``optimizer_0/`` never.
- The DCP records neither r nor alpha: they come from an ``adapter_config.json`` in the checkpoint
  folder or the run folder (the user's ``LoraConfig.save_pretrained``); the rank comes from the shapes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nexttools.checkpoints.adapter_config import CONFIG_FILE, read_config
from nexttools.checkpoints.keys import LORA_KEY
from nexttools.checkpoints.pickle_data import Global, Instance, PickleRefused, read_pickle
from nexttools.errors import UserError

DCP_FOLDER = "pytorch_model_fsdp_0"
METADATA_FILE = ".metadata"
MAX_METADATA_BYTES = 1 << 30
"""A larger ``.metadata`` is refused before it is read (a 70B model's is a few MB)."""
_KEY_PREFIX = "model."  # save_fsdp_model saves {"model": state_dict}; DCP flattens it with dots
_DCP = "torch.distributed.checkpoint.metadata"
_MAX_DIM = 2**62  # a size, offset or byte count beyond this is damage, not a checkpoint
_DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
        "float8_e4m3fn", "float8_e5m2", "complex64", "complex128",
    )
}  # fmt: skip


@dataclass(frozen=True)
class ChunkRecord:
    """One saved piece of a tensor: where it sits in the tensor (``offsets``, ``sizes``, elements)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class TensorRecord:
    """A tensor the metadata declares: its whole ``size``, ``dtype`` and saved ``chunks``."""

    size: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[ChunkRecord, ...]


@dataclass(frozen=True)
class StorageRecord:
    """Where one chunk's ``torch.save`` record lies: ``relative_path``, byte ``offset`` and ``length``;
    ``transformed`` when DCP stored it through a transform (compression), which is not read."""

    relative_path: str
    offset: int
    length: int
    transformed: bool


@dataclass(frozen=True)
class DcpMetadata:
    """What this reader takes from a ``.metadata`` file: tensors by key, storage by (key, offsets)."""

    tensors: dict[str, TensorRecord]
    storage: dict[tuple[str, tuple[int, ...]], StorageRecord]


def is_dcp(folder: Path) -> bool:
    """Whether ``folder`` is a torch DCP checkpoint folder (it has a ``.metadata`` file)."""
    return (folder / METADATA_FILE).is_file()


class _Malformed(ValueError):
    """A field of the metadata does not have the shape DCP's writer gives it."""


def read_metadata(folder: Path) -> DcpMetadata:
    """The tensors and storage of the DCP checkpoint in ``folder`` (module docstring); one
    ``UserError`` line for anything else."""
    path = folder / METADATA_FILE
    try:
        size = path.stat().st_size
        if size > MAX_METADATA_BYTES:
            raise UserError(f"{path}: {size} bytes, more than a DCP metadata file holds")
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        return _metadata(read_pickle(data))
    except PickleRefused as error:
        raise UserError(f"{path}: not read ({error})") from None
    except _Malformed as error:
        raise UserError(f"{path}: not a DCP metadata file of the filesystem writer ({error})") from None


def _metadata(value: Any) -> DcpMetadata:
    state = _state(value, _DCP, "Metadata")
    entries, storage = state.get("state_dict_metadata"), state.get("storage_data")
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise _Malformed("no state_dict_metadata or storage_data")
    tensors: dict[str, TensorRecord] = {}
    for key, entry in entries.items():
        if not isinstance(key, str):
            raise _Malformed("a key that is not a string")
        if isinstance(entry, Instance) and entry.cls.name == "BytesStorageMetadata":
            continue  # saved bytes (not tensors): never read
        tensors[key] = _tensor(key, entry)
    records: dict[tuple[str, tuple[int, ...]], StorageRecord] = {}
    for index, info in storage.items():
        where = _state(index, _DCP, "MetadataIndex")
        fqn, offset = where.get("fqn"), where.get("offset")
        if not isinstance(fqn, str):
            raise _Malformed("a storage index without a key")
        if offset is not None:  # saved bytes have none
            records[(fqn, _size(offset))] = _storage(info)
    return DcpMetadata(tensors, records)


def _state(value: Any, module: str, name: str) -> dict[str, Any]:
    """The field dict of ``value``, which must describe ``module.name`` (a dataclass's pickled
    ``__dict__``, or its ``(dict, slots)`` pair)."""
    if not (isinstance(value, Instance) and (value.cls.module, value.cls.name) == (module, name)):
        raise _Malformed(f"expected a {name}")
    state = value.state
    if isinstance(state, tuple) and len(state) == 2:
        state = (
            {**(state[0] or {}), **(state[1] or {})}
            if all(part is None or isinstance(part, dict) for part in state)
            else None
        )
    if not isinstance(state, dict):
        raise _Malformed(f"a {name} without its fields")
    return state


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_DIM:
        raise _Malformed(f"{value!r} is not a size, offset or length")
    return value


def _size(value: Any) -> tuple[int, ...]:
    """A ``torch.Size`` (or plain sequence) of counts, at most 16 dimensions."""
    if isinstance(value, Instance) and (value.cls.module, value.cls.name) == ("torch", "Size"):
        value = value.args[0] if len(value.args) == 1 else None
    if not isinstance(value, tuple | list) or len(value) > 16:
        raise _Malformed("a size that is not a short sequence of counts")
    return tuple(_count(v) for v in value)


def _tensor(key: str, entry: Any) -> TensorRecord:
    state = _state(entry, _DCP, "TensorStorageMetadata")
    properties = state.get("properties")
    if not (isinstance(properties, Instance) and properties.cls.name == "TensorProperties"):
        raise _Malformed(f"{key} has no TensorProperties")
    fields = properties.state  # (dtype, layout, requires_grad, memory_format, pin_memory), or a dict
    if isinstance(fields, dict):
        dtype, layout = fields.get("dtype"), fields.get("layout")
    elif isinstance(fields, tuple) and len(fields) >= 2:
        dtype, layout = fields[0], fields[1]
    else:
        raise _Malformed(f"{key} has unreadable properties")
    if not (isinstance(dtype, Global) and dtype.module == "torch" and dtype.name in _DTYPES):
        raise _Malformed(f"{key} has no known dtype")
    strided = (isinstance(layout, Instance) and layout.args == ("torch.strided",)) or (
        isinstance(layout, Global) and (layout.module, layout.name) == ("torch", "strided")
    )
    if not strided:
        raise _Malformed(f"{key} is not a dense strided tensor")
    size, chunks = _size(state.get("size")), state.get("chunks")
    if not isinstance(chunks, list):
        raise _Malformed(f"{key} has no chunk list")
    records = []
    for chunk in chunks:
        fields = _state(chunk, _DCP, "ChunkStorageMetadata")
        offsets, sizes = _size(fields.get("offsets")), _size(fields.get("sizes"))
        if not len(offsets) == len(sizes) == len(size) or any(
            o + n > whole for o, n, whole in zip(offsets, sizes, size, strict=True)
        ):
            raise _Malformed(f"a chunk of {key} lies outside its tensor")
        records.append(ChunkRecord(offsets, sizes))
    return TensorRecord(size, _DTYPES[dtype.name], tuple(records))


def _storage(info: Any) -> StorageRecord:
    fields = _state(info, "torch.distributed.checkpoint.filesystem", "_StorageInfo")
    relative_path = fields.get("relative_path")
    if not isinstance(relative_path, str):
        raise _Malformed("a storage entry without a file name")
    return StorageRecord(
        relative_path,
        _count(fields.get("offset")),
        _count(fields.get("length")),
        bool(fields.get("transform_descriptors")),
    )


class DcpAdapter:
    """The adapter in an accelerate DCP folder: shapes up front, each tensor read on demand.

    ``shapes`` and :meth:`get` use PEFT's keys (the ``model.`` prefix removed); ``config`` is the
    ``adapter_config.json`` found beside it (module docstring) and ``files`` what a fingerprint covers.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder
        metadata = read_metadata(folder)
        tensors = {
            key.removeprefix(_KEY_PREFIX): value
            for key, value in metadata.tensors.items()
            if key.startswith(_KEY_PREFIX)
        }
        if not any(LORA_KEY.search(key) for key in tensors):
            raise UserError(
                f"{folder}: holds no LoRA tensors (lora_A/lora_B); a full-weight FSDP sharded checkpoint is "
                "not read: train with fsdp_state_dict_type FULL_STATE_DICT"
            )
        if any(".base_layer." in key for key in tensors):  # a whole model's state dict, not adapter_only
            tensors = {key: value for key, value in tensors.items() if LORA_KEY.search(key)}
        self._tensors = tensors
        self._storage = metadata.storage
        relative = sorted({info.relative_path for info in metadata.storage.values()})
        data_files = {name: self._data_file(name) for name in relative}
        for key, record in tensors.items():
            self._check_chunks(key, record, data_files)
        self.shapes = {key: record.size for key, record in tensors.items()}
        self.config_path = _find_config(folder)
        self.config = read_config(self.config_path)
        self.files = [folder / METADATA_FILE, *data_files.values(), self.config_path]

    def _check_chunks(self, key: str, record: TensorRecord, data_files: dict[str, Path]) -> None:
        """Every chunk of ``key`` has a byte range inside its data file that can hold its elements, so
        that reading the tensor allocates no more than the files hold."""
        itemsize = torch.empty((), dtype=record.dtype).element_size()
        for chunk in record.chunks:
            info = self._storage.get((_KEY_PREFIX + key, chunk.offsets))
            if info is None:
                raise UserError(f"{self.path / METADATA_FILE}: no storage recorded for a chunk of {key}")
            path = data_files[info.relative_path]
            if info.offset + info.length > path.stat().st_size:
                raise UserError(
                    f"{path}: truncated ({key} needs bytes {info.offset}-{info.offset + info.length})"
                )
            if math.prod(chunk.sizes) * itemsize > info.length:
                raise UserError(
                    f"{self.path / METADATA_FILE}: a chunk of {key} claims {chunk.sizes} elements in "
                    f"{info.length} bytes"
                )
        if sum(math.prod(chunk.sizes) for chunk in record.chunks) != math.prod(record.size):
            raise UserError(
                f"{self.path / METADATA_FILE}: the chunks of {key} do not cover its shape {record.size}"
            )

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` (a PEFT key), whole, as stored, in a new buffer."""
        meta = self._tensors[key]
        whole = torch.empty(meta.size, dtype=meta.dtype)
        covered = torch.zeros(meta.size, dtype=torch.bool)  # every element written exactly once
        for chunk in meta.chunks:
            info = self._storage[(_KEY_PREFIX + key, chunk.offsets)]
            piece = self._read_chunk(key, info)
            if tuple(piece.shape) != chunk.sizes or piece.dtype != whole.dtype:
                raise UserError(
                    f"{self._data_file(info.relative_path)}: a chunk of {key} is {tuple(piece.shape)} "
                    f"{piece.dtype}, the metadata says {chunk.sizes} {whole.dtype}"
                )
            region = tuple(
                slice(start, start + size) for start, size in zip(chunk.offsets, chunk.sizes, strict=True)
            )
            if bool(covered[region].any()):
                raise UserError(f"{self.path / METADATA_FILE}: chunks of {key} overlap")
            whole[region] = piece
            covered[region] = True
        if not bool(covered.all()):
            raise UserError(
                f"{self.path / METADATA_FILE}: the chunks of {key} do not cover its shape {meta.size}"
            )
        return whole

    def _read_chunk(self, key: str, info: StorageRecord) -> torch.Tensor:
        path = self._data_file(info.relative_path)
        if info.transformed:
            raise UserError(
                f"{path}: {key} is stored through a transform (compression), which is not supported"
            )
        try:
            with path.open("rb") as stream:
                stream.seek(info.offset)
                record = stream.read(info.length)  # within the file: checked at open
        except OSError as error:
            raise UserError(f"{path}: cannot read ({error.strerror or error})") from None
        if len(record) != info.length:
            raise UserError(
                f"{path}: truncated ({key} needs bytes {info.offset}-{info.offset + info.length})"
            )
        try:
            piece = torch.load(io.BytesIO(record), map_location="cpu", weights_only=True)
        except Exception as error:  # weights_only: nothing ran; any failure is damage
            raise UserError(
                f"{path}: {key} is not a readable weights-only tensor ({type(error).__name__})"
            ) from None
        if not isinstance(piece, torch.Tensor):
            raise UserError(f"{path}: {key} is a {type(piece).__name__}, not a tensor")
        if piece.layout != torch.strided or piece.is_quantized or piece.is_meta or piece.device.type != "cpu":
            raise UserError(f"{path}: {key} is not a dense CPU tensor ({piece.layout}, {piece.device})")
        return piece

    def _data_file(self, relative_path: str) -> Path:
        """A data file named by the metadata, which must lie in this folder."""
        path = self.path / relative_path
        if Path(relative_path).name != relative_path:
            raise UserError(
                f"{self.path / METADATA_FILE}: names a data file outside its folder ({relative_path})"
            )
        if not path.is_file():
            raise UserError(f"{path} is missing: the DCP metadata names it")
        return path


def _find_config(folder: Path) -> Path:
    """``adapter_config.json`` in the checkpoint folder, else in the run folder."""
    checkpoint, run = folder.parent, folder.parent.parent
    for candidate in (checkpoint / CONFIG_FILE, run / CONFIG_FILE):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"{folder}: an FSDP sharded checkpoint records no LoRA alpha; save the run's LoraConfig "
        f"beside its checkpoints (peft_config.save_pretrained('{run}') writes {run / CONFIG_FILE})"
    )
