"""Schema v1 of the trajectory store: its names, its layout and the identity of its content.

User documentation: ``docs/store.md``. Row i of every per-checkpoint array is checkpoint i in step
order; per-module vectors are concatenated along the column axis and cut by the offset arrays, so
the file holds a handful of large datasets whatever the number of modules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

FORMAT = "nexttools.trajectory"
"""The ``format`` attribute that marks a nexttools store."""
VERSION = 1
DeltaKind = Literal["global", "local", "target"]
RunKind = Literal["lora", "full"]
KINDS: tuple[DeltaKind, ...] = ("global", "local", "target")
GRAM = "consistency/gram"
"""The Gram band ``(M, C, k+2)`` float64, ⟨ΔW_i, ΔW_(i−l)⟩ (:mod:`nexttools.consistency`); an addition
to schema v1: stores written before it lack it, and :meth:`TrajectoryStore.gram` returns None."""


def partial_path(path: Path) -> Path:
    """Where a store is built before it replaces ``path``: ``<store>.partial``."""
    return path.with_name(path.name + ".partial")


def lock_path(path: Path) -> Path:
    """The sidecar file that writers of ``path`` lock: ``<store>.lock``."""
    return path.with_name(path.name + ".lock")


@dataclass(frozen=True)
class DeltaArrays:
    """Rank-1 triples of one delta kind, float32.

    Whole store (:meth:`TrajectoryStore.read`): ``sigma (C, M)``, ``u (C, Σout)``, ``v (C, Σin)``.
    One module (:meth:`TrajectoryStore.read_module`): ``sigma (C,)``, ``u (C, out)``, ``v (C, in)``.
    A zero delta has σ = 0 and u = v = 0; a target row that does not exist yet is NaN.
    """

    sigma: np.ndarray
    u: np.ndarray
    v: np.ndarray


@dataclass(frozen=True)
class StoreLayout:
    """Everything in a store except the delta arrays: its header, checkpoint table and module table.

    ``steps``/``paths``/``fingerprints`` have one entry per checkpoint (C, step order);
    ``jumped`` lists the steps whose checkpoint holds a jump made while training (the local delta
    of the interval ending there is not the run's own motion; ``docs/store.md``);
    ``shift_steps``/``shift_paths`` the jumps folded into the frozen base of a LoRA run, and the files
    that hold their shifts (:mod:`nexttools.base_shifts`; every delta includes those in effect);
    ``modules``/``shapes``/``ranks`` one per module (M). ``rank`` is the LoRA rank, 0 for a
    full-weight run. ``carried`` names absolute tensors (``modules_to_save``, and every non-module
    tensor of a full-weight run) that outputs copy from the last checkpoint instead of extrapolating.
    """

    k: int
    source: str
    base_model: str
    base_fingerprint: str
    run_kind: RunKind
    scaling_rule: str
    steps: tuple[int, ...]
    paths: tuple[str, ...]
    fingerprints: tuple[str, ...]
    modules: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    ranks: tuple[int, ...]
    carried: tuple[str, ...]
    jumped: tuple[int, ...] = ()
    shift_steps: tuple[int, ...] = ()
    shift_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (len(self.steps) == len(self.paths) == len(self.fingerprints)):
            raise ValueError("steps, paths and fingerprints must have one entry per checkpoint")
        if not (len(self.modules) == len(self.shapes) == len(self.ranks)):
            raise ValueError("modules, shapes and ranks must have one entry per module")
        if len(self.shift_steps) != len(self.shift_paths):
            raise ValueError("shift_steps and shift_paths must have one entry per base shift")
        if list(self.steps) != sorted(set(self.steps)):
            raise ValueError(f"steps must be strictly increasing, got {self.steps}")

    @property
    def u_offset(self) -> np.ndarray:
        """int64 (M+1,): module j's u lives in columns ``u_offset[j]:u_offset[j+1]``."""
        return _offsets([shape[0] for shape in self.shapes])

    @property
    def v_offset(self) -> np.ndarray:
        """int64 (M+1,): module j's v lives in columns ``v_offset[j]:v_offset[j+1]``."""
        return _offsets([shape[1] for shape in self.shapes])


def _offsets(sizes: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))]).astype(np.int64)


def content_fingerprint(
    version: int, k: int, steps: Sequence[int], fingerprints: Sequence[str], modules: Sequence[str]
) -> str:
    """16 hex digits identifying a store's content: what predictors and outputs record."""
    digest = hashlib.sha256()
    for part in (str(version), str(k), *map(str, steps), "|", *fingerprints, "|", *modules):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
