"""The trajectory store: HDF5 schema v1, its reader, its crash-safe writer and its lock.

One file, ``trajectory.h5``, holds the exact rank-1 triples (σ, u, v) of the global, local and
target deltas of every module at every checkpoint (schema v1;
user documentation in ``docs/store.md``). Row i of every per-checkpoint array is checkpoint i in
step order; per-module vectors are concatenated along the column axis and cut by the offset
arrays, so the file holds a handful of large datasets whatever the number of modules.

Why a whole new file per write: HDF5 files written in place can be left unreadable by a kill.
:class:`StoreWriter` builds the complete new store in ``<store>.partial`` (copying the rows it
keeps from the old one), fsyncs it and ``os.replace``\\ s it over the store, so at every instant
the store path holds either the previous store or the new one, never a half-written file.
:func:`store_lock` takes an exclusive ``flock`` on ``<store>.lock``; the kernel drops it when a
process dies, so even ``kill -9`` leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np

from nexttools import __version__
from nexttools.errors import UserError
from nexttools.locking import exclusive_lock

FORMAT = "nexttools.trajectory"
"""The store's file name inside a workdir."""
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

    def __post_init__(self) -> None:
        if not (len(self.steps) == len(self.paths) == len(self.fingerprints)):
            raise ValueError("steps, paths and fingerprints must have one entry per checkpoint")
        if not (len(self.modules) == len(self.shapes) == len(self.ranks)):
            raise ValueError("modules, shapes and ranks must have one entry per module")
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


class TrajectoryStore:
    """A read-only view of a schema-v1 store (from :func:`open_store`).

    The header and tables are read at open; delta arrays are read on demand from the open file,
    which stays consistent even if a writer replaces the path meanwhile (the old inode stays
    alive until :meth:`close`). Usable as a context manager.
    """

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self._file = file
        attrs = file.attrs
        self.version: int = int(attrs["version"])
        self.k: int = int(attrs["k"])
        self.nexttools_version: str = _text(attrs["nexttools_version"])
        self.source: str = _text(attrs["source"])
        self.base_model: str = _text(attrs["base_model"])
        self.base_fingerprint: str = _text(attrs["base_fingerprint"])
        self.run_kind: RunKind = _text(attrs["run_kind"])  # type: ignore[assignment]
        self.scaling_rule: str = _text(attrs["scaling_rule"])
        self.steps: np.ndarray = file["checkpoints/step"][()].astype(np.int64)
        self.checkpoint_paths: list[str] = _strings(file["checkpoints/path"])
        self.fingerprints: list[str] = _strings(file["checkpoints/fingerprint"])
        self.modules: list[str] = _strings(file["modules/name"])
        self.shapes: np.ndarray = file["modules/shape"][()].astype(np.int64).reshape(-1, 2)
        self.ranks: np.ndarray = file["modules/rank"][()].astype(np.int64)
        self.u_offset: np.ndarray = file["modules/u_offset"][()].astype(np.int64)
        self.v_offset: np.ndarray = file["modules/v_offset"][()].astype(np.int64)
        self.carried: list[str] = _strings(file["modules/carried"])
        self._check_shapes()

    def _check_shapes(self) -> None:
        """Every table and delta array agrees with the others (``ValueError`` naming the first that
        does not), so that a damaged or hand-edited store is refused at open, not deep in a command."""
        count, modules = len(self.steps), len(self.modules)
        for name, length in (
            ("checkpoints/path", len(self.checkpoint_paths)),
            ("checkpoints/fingerprint", len(self.fingerprints)),
        ):
            if length != count:
                raise ValueError(f"{name} has {length} rows for {count} checkpoints")
        sizes = (self.shapes.shape, self.ranks.shape, self.u_offset.shape, self.v_offset.shape)
        if sizes != ((modules, 2), (modules,), (modules + 1,), (modules + 1,)):
            raise ValueError(f"the module tables disagree in length with {modules} modules")
        if not (
            np.array_equal(np.diff(self.u_offset), self.shapes[:, 0])
            and np.array_equal(np.diff(self.v_offset), self.shapes[:, 1])
        ):
            raise ValueError("modules/u_offset or v_offset does not match modules/shape")
        expected = {
            "sigma": (count, modules),
            "u": (count, int(self.u_offset[-1])),
            "v": (count, int(self.v_offset[-1])),
        }
        for kind in KINDS:
            for name, shape in expected.items():
                dataset = self._file[f"{kind}/{name}"]
                if tuple(dataset.shape) != shape:
                    raise ValueError(f"{kind}/{name} has shape {tuple(dataset.shape)}, expected {shape}")

    @property
    def layout(self) -> StoreLayout:
        """The header and tables as a :class:`StoreLayout` (e.g. to plan an incremental write)."""
        return StoreLayout(
            k=self.k,
            source=self.source,
            base_model=self.base_model,
            base_fingerprint=self.base_fingerprint,
            run_kind=self.run_kind,
            scaling_rule=self.scaling_rule,
            steps=tuple(int(s) for s in self.steps),
            paths=tuple(self.checkpoint_paths),
            fingerprints=tuple(self.fingerprints),
            modules=tuple(self.modules),
            shapes=tuple((int(o), int(i)) for o, i in self.shapes),
            ranks=tuple(int(r) for r in self.ranks),
            carried=tuple(self.carried),
        )

    def read(self, kind: DeltaKind) -> DeltaArrays:
        """All rows of one delta kind: ``sigma (C, M)``, ``u (C, Σout)``, ``v (C, Σin)``, float32."""
        group = self._group(kind)
        return DeltaArrays(sigma=group["sigma"][()], u=group["u"][()], v=group["v"][()])

    def read_module(self, kind: DeltaKind, index: int) -> DeltaArrays:
        """One module's rows: ``sigma (C,)``, ``u (C, out)``, ``v (C, in)``, float32."""
        group = self._group(kind)
        u_cols = slice(int(self.u_offset[index]), int(self.u_offset[index + 1]))
        v_cols = slice(int(self.v_offset[index]), int(self.v_offset[index + 1]))
        return DeltaArrays(sigma=group["sigma"][:, index], u=group["u"][:, u_cols], v=group["v"][:, v_cols])

    def gram(self) -> np.ndarray | None:
        """The Gram band ``(M, C, k+2)`` float64 (NaN: not computable), or None in an older store."""
        dataset = self._file.get(GRAM)
        return None if dataset is None else np.asarray(dataset[()], dtype=np.float64)

    def fingerprint(self) -> str:
        """16 hex digits over (version, k, steps, checkpoint fingerprints, module names)."""
        return content_fingerprint(self.version, self.k, self.steps.tolist(), self.fingerprints, self.modules)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TrajectoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _group(self, kind: DeltaKind) -> h5py.Group:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return self._file[kind]


def open_store(path: Path) -> TrajectoryStore:
    """Open a store read-only; a missing file, a non-store or an unknown version is a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no trajectory store at {path} (run `nexttools extract` first)")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise UserError(f"{path} is not a readable HDF5 file ({error})") from None
    try:
        attrs = file.attrs
        if _text(attrs.get("format", "")) != FORMAT:
            raise UserError(f"{path} is not a nexttools trajectory store (no format={FORMAT!r} attribute)")
        version = attrs.get("version")
        if not isinstance(version, (int, np.integer)) or int(version) != VERSION:
            shown = int(version) if isinstance(version, (int, np.integer)) else repr(_text(version))
            raise UserError(
                f"{path} is a trajectory store of version {shown}; this nexttools "
                f"{__version__} reads version {VERSION} only (re-run `nexttools extract` into a new --store)"
            )
        return TrajectoryStore(path, file)
    except UserError:
        file.close()
        raise
    except (KeyError, OSError, ValueError, IndexError, TypeError) as error:
        file.close()
        raise UserError(
            f"{path} is a damaged trajectory store ({error}): delete it and re-run `nexttools extract`"
        ) from None


_FALLOC_FL_KEEP_SIZE = 1


def _fallocate_keep_size(fd: int, nbytes: int) -> int:
    """Linux ``fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, nbytes)``: 0, or the errno (ENOTSUP elsewhere)."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "fallocate", None)
    if function is None:
        return errno.ENOTSUP
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    function.restype = ctypes.c_int
    return 0 if function(fd, _FALLOC_FL_KEEP_SIZE, 0, nbytes) == 0 else ctypes.get_errno()


def estimated_bytes(layout: StoreLayout) -> int:
    """An upper bound of the size of the store file of ``layout``, in bytes.

    The three delta kinds are ``3 × C × (M + Σout + Σin)`` float32; the tables and strings add
    their own bytes; HDF5's metadata (object headers, B-trees, the global heap) stays well under
    64 KiB per dataset, and a flat MiB covers the rest.
    """
    c, m = len(layout.steps), len(layout.modules)
    deltas = 3 * c * (m + int(layout.u_offset[-1]) + int(layout.v_offset[-1])) * 4
    strings = sum(len(text.encode()) + 16 for text in (*layout.paths, *layout.fingerprints, *layout.modules))
    strings += sum(len(text.encode()) + 16 for text in layout.carried)
    tables = 8 * (c + 4 * m + 2)
    gram = 8 * m * c * (layout.k + 2)
    return deltas + gram + 2 * strings + tables + 20 * 64 * 1024 + 2**20


class StoreWriter:
    """Builds a complete store in ``<store>.partial`` and atomically replaces the store on :meth:`commit`.

    Every module's rows must be written with :meth:`write_module` (one call per module and kind;
    rows of a target not yet computable are NaN). Used as a context manager it removes the partial
    file when the block raises. Callers hold :func:`store_lock` around the whole write.
    """

    def __init__(self, path: Path, layout: StoreLayout) -> None:
        self.path = Path(path)
        self.layout = layout
        self.partial = partial_path(self.path)
        self._written: set[tuple[str, int]] = set()
        self.partial.unlink(missing_ok=True)
        self._file = h5py.File(self.partial, "w")
        try:
            self._reserve_space()
            self._write_header()
        except BaseException:
            self.abort()
            raise

    def _reserve_space(self) -> None:
        """Reserve the whole file's blocks up front, so that a full disk is a clean error here.

        HDF5 cannot survive a failed write: on ENOSPC it raises from inside its metadata cache and
        then crashes the process on close, leaving the partial file behind. With the blocks of an
        upper bound of the file's size reserved (``fallocate`` with ``FALLOC_FL_KEEP_SIZE``: the
        file's size does not change) no later write can run out of space; :meth:`commit` releases
        what the file did not use. Where ``fallocate`` is not supported, the free space is checked.
        """
        needed = estimated_bytes(self.layout)
        with open(self.partial, "r+b") as handle:
            code = _fallocate_keep_size(handle.fileno(), needed)
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or (
            code != 0 and shutil.disk_usage(self.partial.parent).free < needed
        ):
            free = shutil.disk_usage(self.partial.parent).free
            raise UserError(
                f"not enough disk space for {self.path}: it needs up to {needed / 1e6:.1f} MB, "
                f"{free / 1e6:.1f} MB are free; nothing was changed"
            )

    def _write_header(self) -> None:
        layout, file = self.layout, self._file
        strings = h5py.string_dtype()
        file.attrs["format"] = FORMAT
        file.attrs["version"] = np.int64(VERSION)
        file.attrs["nexttools_version"] = __version__
        file.attrs["k"] = np.int64(layout.k)
        file.attrs["source"] = layout.source
        file.attrs["base_model"] = layout.base_model
        file.attrs["base_fingerprint"] = layout.base_fingerprint
        file.attrs["run_kind"] = layout.run_kind
        file.attrs["scaling_rule"] = layout.scaling_rule
        c, m = len(layout.steps), len(layout.modules)
        file.create_dataset("checkpoints/step", data=np.asarray(layout.steps, dtype=np.int64).reshape(c))
        file.create_dataset("checkpoints/path", data=list(layout.paths), dtype=strings, shape=(c,))
        file.create_dataset(
            "checkpoints/fingerprint", data=list(layout.fingerprints), dtype=strings, shape=(c,)
        )
        file.create_dataset("modules/name", data=list(layout.modules), dtype=strings, shape=(m,))
        file.create_dataset("modules/shape", data=np.asarray(layout.shapes, dtype=np.int64).reshape(m, 2))
        file.create_dataset("modules/rank", data=np.asarray(layout.ranks, dtype=np.int64).reshape(m))
        file.create_dataset("modules/u_offset", data=layout.u_offset)
        file.create_dataset("modules/v_offset", data=layout.v_offset)
        carried = list(layout.carried)
        file.create_dataset("modules/carried", data=carried, dtype=strings, shape=(len(carried),))
        total_out, total_in = int(layout.u_offset[-1]), int(layout.v_offset[-1])
        for kind in KINDS:
            fill = np.float32(np.nan) if kind == "target" else np.float32(0)
            group = file.create_group(kind)
            group.create_dataset("sigma", shape=(c, m), dtype=np.float32, fillvalue=fill)
            group.create_dataset("u", shape=(c, total_out), dtype=np.float32, fillvalue=fill)
            group.create_dataset("v", shape=(c, total_in), dtype=np.float32, fillvalue=fill)
        file.create_dataset(GRAM, shape=(m, c, layout.k + 2), dtype=np.float64, fillvalue=np.nan)

    def write_module(self, kind: DeltaKind, index: int, rows: DeltaArrays) -> None:
        """Write module ``index``'s rows of one kind: ``sigma (C,)``, ``u (C, out)``, ``v (C, in)``."""
        layout = self.layout
        c = len(layout.steps)
        out_dim, in_dim = layout.shapes[index]
        expected = {"sigma": (c,), "u": (c, out_dim), "v": (c, in_dim)}
        for name, shape in expected.items():
            got = getattr(rows, name).shape
            if got != shape:
                raise ValueError(f"{layout.modules[index]} {kind}.{name}: shape {got}, expected {shape}")
        group = self._file[kind]
        u_offset, v_offset = layout.u_offset, layout.v_offset
        group["sigma"][:, index] = np.asarray(rows.sigma, dtype=np.float32)
        group["u"][:, int(u_offset[index]) : int(u_offset[index + 1])] = np.asarray(rows.u, dtype=np.float32)
        group["v"][:, int(v_offset[index]) : int(v_offset[index + 1])] = np.asarray(rows.v, dtype=np.float32)
        self._written.add((kind, index))

    def write_gram(self, index: int, band: np.ndarray) -> None:
        """Write module ``index``'s Gram band ``(C, k+2)`` float64."""
        expected = (len(self.layout.steps), self.layout.k + 2)
        if band.shape != expected:
            raise ValueError(f"{self.layout.modules[index]} gram: shape {band.shape}, expected {expected}")
        self._file[GRAM][index] = np.asarray(band, dtype=np.float64)
        self._written.add(("gram", index))

    def commit(self) -> None:
        """Check completeness, fsync the partial file and ``os.replace`` it over the store."""
        missing = [
            f"{kind}:{name}"
            for kind in (*KINDS, "gram")
            for index, name in enumerate(self.layout.modules)
            if (kind, index) not in self._written
        ]
        if missing:
            raise RuntimeError(f"store rows never written: {', '.join(missing[:5])}")
        self._file.flush()
        self._file.close()
        os.truncate(self.partial, self.partial.stat().st_size)  # releases the unused reservation
        with open(self.partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self.partial, self.path)
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Close and remove the partial file; the previous store (if any) is untouched."""
        with contextlib.suppress(Exception):
            self._file.close()
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None:
            self.abort()


def store_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """Hold an exclusive lock on ``<store>.lock`` for the duration of a write (:func:`exclusive_lock`)."""
    return exclusive_lock(lock_path(Path(path)), Path(path))


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: fsync the directory entry (best effort where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [_text(item) for item in dataset.asstr()[()]] if dataset.shape != (0,) else []
