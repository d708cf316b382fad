"""Reading a run's checkpoints: discovery per trainer layout, PEFT adapters, HF model weights, the base.

The public names are re-exported here; see ``docs/architecture.md`` for the contracts.
"""

from __future__ import annotations

from nexttools.checkpoints.adapter import AdapterCheckpoint, LoraModule, check_same_targets, open_adapter
from nexttools.checkpoints.base import resolve_base
from nexttools.checkpoints.discover import CheckpointRef, discover_checkpoints
from nexttools.checkpoints.fingerprint import fingerprint
from nexttools.checkpoints.weights import ModelWeights

__all__ = [
    "AdapterCheckpoint",
    "CheckpointRef",
    "LoraModule",
    "ModelWeights",
    "check_same_targets",
    "discover_checkpoints",
    "fingerprint",
    "open_adapter",
    "resolve_base",
]
