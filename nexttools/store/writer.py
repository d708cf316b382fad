"""Writing a trajectory store: crash-safe (a whole new file, then a rename) and locked.

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
import os
from pathlib import Path

import h5py
import numpy as np

from nexttools import __version__
from nexttools.disk import free_bytes, human_bytes, require_free
from nexttools.errors import UserError
from nexttools.locking import exclusive_lock
from nexttools.safe_files import create_new_file, same_file
from nexttools.store.schema import (
    FORMAT,
    GRAM,
    KINDS,
    VERSION,
    DeltaArrays,
    DeltaKind,
    StoreLayout,
    lock_path,
    partial_path,
)

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
        # Under the store lock the name is ours: a partial file left by a killed run is removed (a
        # planted link too, never what it points to), then the file is created afresh without
        # following links, and HDF5 must have opened that very file (a swap is refused).
        self.partial.unlink(missing_ok=True)
        try:
            self._fd = create_new_file(self.partial)
        except FileExistsError:
            raise UserError(
                f"{self.partial} reappeared while nexttools created it: is another writer there?"
            ) from None
        try:
            self._file = h5py.File(self.partial, "w")
        except BaseException:
            os.close(self._fd)
            self.partial.unlink(missing_ok=True)
            raise
        try:
            if not same_file(self.partial, self._file.id.get_vfd_handle()) or not same_file(
                self.partial, self._fd
            ):
                raise UserError(
                    f"{self.partial} was replaced while nexttools created it; nothing was changed"
                )
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
        code = _fallocate_keep_size(self._fd, needed)
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise UserError(
                f"not enough disk space for {self.path}: it needs up to {human_bytes(needed)}, "
                f"{human_bytes(free_bytes(self.partial.parent))} are free; nothing was changed"
            )
        if code != 0:  # fallocate is not supported here: the free space is all there is to check
            require_free(self.partial.parent, needed, str(self.path))

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
        if layout.jumped:  # optional: a store without it (every store before jumps existed) has none
            jumped = np.isin(
                np.asarray(layout.steps, dtype=np.int64), np.asarray(layout.jumped, dtype=np.int64)
            )
            file.create_dataset("checkpoints/jumped", data=jumped.reshape(c))
        if layout.shift_steps:  # optional, like jumped: only a LoRA run that folded a jump has it
            shifts = len(layout.shift_steps)
            file.create_dataset("shifts/step", data=np.asarray(layout.shift_steps, dtype=np.int64))
            file.create_dataset("shifts/path", data=list(layout.shift_paths), dtype=strings, shape=(shifts,))
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
        os.ftruncate(self._fd, os.fstat(self._fd).st_size)  # releases the unused reservation
        os.fsync(self._fd)
        if not same_file(self.partial, self._fd):
            raise UserError(
                f"{self.partial} was replaced while nexttools wrote it; the store was not changed"
            )
        os.replace(self.partial, self.path)
        os.close(self._fd)
        self._fd = -1
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Close and remove the partial file; the previous store (if any) is untouched."""
        with contextlib.suppress(Exception):
            self._file.close()
        if self._fd >= 0:
            if same_file(self.partial, self._fd):
                self.partial.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1

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
