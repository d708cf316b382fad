"""The trajectory store (HDF5 schema v1, ``docs/store.md``) and its in-memory :class:`Trajectory`.

One file, ``trajectory.h5``, holds the exact rank-1 triples (σ, u, v) of the global, local and
target deltas of every module at every checkpoint.

- :mod:`~nexttools.store.schema`: names, :class:`StoreLayout`, :class:`DeltaArrays`, the fingerprint;
- :mod:`~nexttools.store.reader`: :func:`open_store` and :class:`TrajectoryStore`;
- :mod:`~nexttools.store.writer`: :class:`StoreWriter` (crash-safe) and :func:`store_lock`;
- :mod:`~nexttools.store.trajectory`: :class:`Trajectory`, the three delta kinds in memory.
"""

from nexttools.store.reader import TrajectoryStore, open_store
from nexttools.store.schema import (
    FORMAT,
    GRAM,
    KINDS,
    VERSION,
    DeltaArrays,
    DeltaKind,
    RunKind,
    StoreLayout,
    content_fingerprint,
    lock_path,
    partial_path,
)
from nexttools.store.trajectory import Trajectory, as_trajectory, module_kind
from nexttools.store.writer import StoreWriter, estimated_bytes, store_lock

__all__ = [
    "FORMAT",
    "GRAM",
    "KINDS",
    "VERSION",
    "DeltaArrays",
    "DeltaKind",
    "RunKind",
    "StoreLayout",
    "StoreWriter",
    "Trajectory",
    "TrajectoryStore",
    "as_trajectory",
    "content_fingerprint",
    "estimated_bytes",
    "lock_path",
    "module_kind",
    "open_store",
    "partial_path",
    "store_lock",
]
