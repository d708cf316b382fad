"""HF Trainer / accelerate FSDP sharded checkpoints: the adapter inside ``pytorch_model_fsdp_0/``.

With FSDP and ``SHARDED_STATE_DICT`` (accelerate's default for FSDP2), the Trainer writes no
``adapter_model.safetensors``: ``accelerate.utils.save_fsdp_model(adapter_only=True)`` saves
``{"model": get_peft_model_state_dict(model)}`` with ``torch.distributed.checkpoint`` (DCP) into
``checkpoint-N/pytorch_model_fsdp_0/``: one ``__R_0.distcp`` file per rank and a ``.metadata`` file.
Keys are PEFT's, prefixed ``model.``; each tensor is a set of chunks (``offsets``, ``sizes``), each
chunk one ``torch.save`` record at a byte range of a ``.distcp`` file.

Reading, without a process group and without ever running ``dcp.load`` on untrusted files:

- ``.metadata`` is a plain pickle. It is read by an unpickler that resolves only DCP's own metadata
  classes, ``torch.Size``, dtypes and layouts (and turns recorded paths into pure paths); any other
  global refuses the file. This is the same rule as ``weights_only=True``, for a file that is not a
  ``torch.save`` archive.
- Each chunk is read from its byte range and loaded with ``torch.load(weights_only=True)``; only the
  adapter's tensors are read (memory: one tensor at a time), the optimizer's ``optimizer_0/`` never.
- The DCP records neither r nor alpha: they come from an ``adapter_config.json`` in the checkpoint
  folder or the run folder (the user's ``LoraConfig.save_pretrained``); the rank comes from the shapes.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from nexttools.checkpoints.adapter_config import CONFIG_FILE, read_config
from nexttools.checkpoints.keys import LORA_KEY
from nexttools.errors import UserError

DCP_FOLDER = "pytorch_model_fsdp_0"
METADATA_FILE = ".metadata"
_KEY_PREFIX = "model."  # save_fsdp_model saves {"model": state_dict}; DCP flattens it with dots

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}
# StorageMeta records the folder it was saved to; a pure path holds the name and does nothing else.
_PATH_CLASSES: dict[str, type] = {
    "PosixPath": PurePosixPath,
    "PurePosixPath": PurePosixPath,
    "WindowsPath": PureWindowsPath,
    "PureWindowsPath": PureWindowsPath,
}


def is_dcp(folder: Path) -> bool:
    """Whether ``folder`` is a torch DCP checkpoint folder (it has a ``.metadata`` file)."""
    return (folder / METADATA_FILE).is_file()


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP ``.metadata`` pickle needs; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] == "pathlib" and name in _PATH_CLASSES:
            return _PATH_CLASSES[name]
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a DCP metadata file never needs")


def read_metadata(folder: Path) -> Any:
    """The ``Metadata`` of the DCP checkpoint in ``folder``, unpickled safely (module docstring)."""
    path = folder / METADATA_FILE
    try:
        with path.open("rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
    except pickle.UnpicklingError as error:
        raise UserError(f"{path}: not read ({error})") from None
    except (OSError, EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError) as error:
        raise UserError(f"{path}: not a readable DCP metadata file ({type(error).__name__})") from None
    if not _well_formed(metadata):
        raise UserError(f"{path}: not a DCP metadata file of the filesystem writer")
    return metadata


def _counts(values: Any, length: int | None = None) -> bool:
    """A tuple or list of non-negative ints (of ``length`` entries, when given)."""
    return (
        isinstance(values, tuple | list)
        and (length is None or len(values) == length)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
    )


def _tensor_entry_ok(value: Any) -> bool:
    """A ``TensorStorageMetadata`` whose size, dtype and chunks are well typed, each chunk inside."""
    size = value.size
    typed = isinstance(value.properties.dtype, torch.dtype) and isinstance(value.chunks, list)
    if not (_counts(size) and typed):
        return False
    for chunk in value.chunks:
        if not (_counts(chunk.offsets, len(size)) and _counts(chunk.sizes, len(size))):
            return False
        if any(o + n > whole for o, n, whole in zip(chunk.offsets, chunk.sizes, size, strict=True)):
            return False
    return True


def _well_formed(metadata: Any) -> bool:
    """Whether every field this reader uses has the type DCP's filesystem writer gives it (a damaged
    or hostile file is refused here, in one line, not half-read)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    try:
        if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
            return False
        for key, value in metadata.state_dict_metadata.items():
            tensor = isinstance(value, TensorStorageMetadata)
            if not isinstance(key, str) or not (tensor or isinstance(value, BytesStorageMetadata)):
                return False
            if tensor and not _tensor_entry_ok(value):
                return False
        return isinstance(metadata.storage_data, dict) and all(
            isinstance(index, MetadataIndex)
            and isinstance(index.fqn, str)
            and (index.offset is None or _counts(index.offset))
            and isinstance(info, _StorageInfo)
            and isinstance(info.relative_path, str)
            and _counts((info.offset, info.length))
            for index, info in metadata.storage_data.items()
        )
    except AttributeError:  # a hostile pickle can leave out any field
        return False


class DcpAdapter:
    """The adapter in an accelerate DCP folder: shapes up front, each tensor read on demand.

    ``shapes`` and :meth:`get` use PEFT's keys (the ``model.`` prefix removed); ``config`` is the
    ``adapter_config.json`` found beside it (module docstring) and ``files`` what a fingerprint covers.
    """

    def __init__(self, folder: Path) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = folder
        metadata = read_metadata(folder)
        tensors = {
            key.removeprefix(_KEY_PREFIX): value
            for key, value in metadata.state_dict_metadata.items()
            if key.startswith(_KEY_PREFIX) and isinstance(value, TensorStorageMetadata)
        }
        if not any(LORA_KEY.search(key) for key in tensors):
            raise UserError(
                f"{folder}: holds no LoRA tensors (lora_A/lora_B); a full-weight FSDP sharded checkpoint is "
                "not read: train with fsdp_state_dict_type FULL_STATE_DICT"
            )
        if any(".base_layer." in key for key in tensors):  # a whole model's state dict, not adapter_only
            tensors = {key: value for key, value in tensors.items() if LORA_KEY.search(key)}
        self._tensors = tensors
        self._storage = {
            (index.fqn, tuple(index.offset)): info
            for index, info in metadata.storage_data.items()
            if index.offset is not None  # byte items (not tensors) have none
        }
        self.shapes = {key: tuple(value.size) for key, value in tensors.items()}
        self.config_path = _find_config(folder)
        self.config = read_config(self.config_path)
        relative = sorted({info.relative_path for info in metadata.storage_data.values()})
        self.files = [folder / METADATA_FILE, *(self._data_file(name) for name in relative), self.config_path]

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` (a PEFT key), whole, as stored, in a new buffer."""
        meta = self._tensors[key]
        whole = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        covered = torch.zeros(tuple(meta.size), dtype=torch.bool)  # every element written exactly once
        for chunk in meta.chunks:
            info = self._storage.get((_KEY_PREFIX + key, tuple(chunk.offsets)))
            if info is None:
                raise UserError(f"{self.path / METADATA_FILE}: no storage recorded for a chunk of {key}")
            piece = self._read_chunk(key, info)
            if tuple(piece.shape) != tuple(chunk.sizes) or piece.dtype != whole.dtype:
                raise UserError(
                    f"{self._data_file(info.relative_path)}: a chunk of {key} is {tuple(piece.shape)} "
                    f"{piece.dtype}, the metadata says {tuple(chunk.sizes)} {whole.dtype}"
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

    def _read_chunk(self, key: str, info: Any) -> torch.Tensor:
        path = self._data_file(info.relative_path)
        if getattr(info, "transform_descriptors", None):
            raise UserError(
                f"{path}: {key} is stored with {info.transform_descriptors}, which is not supported"
            )
        try:
            with path.open("rb") as stream:
                stream.seek(info.offset)
                record = stream.read(info.length)
        except OSError as error:
            raise UserError(f"{path}: cannot read ({error.strerror or error})") from None
        if len(record) != info.length:
            raise UserError(
                f"{path}: truncated ({key} needs bytes {info.offset}-{info.offset + info.length})"
            )
        try:
            piece = torch.load(io.BytesIO(record), map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as error:
            raise UserError(
                f"{path}: {key} is not a readable weights-only tensor ({type(error).__name__})"
            ) from None
        if not isinstance(piece, torch.Tensor):
            raise UserError(f"{path}: {key} is a {type(piece).__name__}, not a tensor")
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
