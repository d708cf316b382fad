"""Adapters that live inside a trainer's sharded state dict rather than in a PEFT folder.

verl's FSDP engine (:mod:`.verl_fsdp`) and accelerate's FSDP ``SHARDED_STATE_DICT`` (:mod:`.dcp`)
write no ``adapter_model.safetensors``; each reader gives the same :class:`ShardedAdapter` view, which
:func:`nexttools.checkpoints.adapter.open_adapter` maps like a PEFT file. A new sharded format is one
reader and one line in :func:`open_sharded`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from nexttools.checkpoints.dcp import DcpAdapter, is_dcp
from nexttools.checkpoints.verl_fsdp import VerlShards, is_verl_fsdp


class ShardedAdapter(Protocol):
    """The adapter tensors of one sharded checkpoint, reassembled one at a time.

    ``shapes`` maps each PEFT-style key to its whole shape; ``config`` is the ``adapter_config.json``
    equivalent and ``config_path`` the file it came from (named in refusals); ``files`` are what a
    fingerprint covers.
    """

    shapes: dict[str, tuple[int, ...]]
    config: dict[str, Any]
    config_path: Path
    files: list[Path]

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key``, whole, as stored, in a new buffer."""
        ...


def open_sharded(folder: Path) -> ShardedAdapter | None:
    """The sharded adapter in ``folder``, or None when ``folder`` is a plain PEFT folder."""
    if is_verl_fsdp(folder):
        return VerlShards(folder)
    if is_dcp(folder):
        return DcpAdapter(folder)
    return None
