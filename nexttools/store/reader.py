"""Reading a trajectory store: :func:`open_store` checks it whole before anything reads it."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from nexttools import __version__
from nexttools.errors import UserError
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
)


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
        jumped = file["checkpoints/jumped"][()] if "checkpoints/jumped" in file else None
        self.jumped: np.ndarray = (
            np.zeros(len(self.steps), dtype=bool)
            if jumped is None
            else np.asarray(jumped).astype(bool).reshape(-1)
        )
        """bool ``(C,)``: the checkpoint holds a jump made while training (all False in older stores)."""
        self.shift_steps: tuple[int, ...] = (
            tuple(int(s) for s in file["shifts/step"][()].reshape(-1)) if "shifts/step" in file else ()
        )
        self.shift_paths: tuple[str, ...] = (
            tuple(_strings(file["shifts/path"])) if "shifts/path" in file else ()
        )
        """The base shifts the run's deltas include, and their files (none in older stores)."""
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
            ("checkpoints/jumped", len(self.jumped)),
        ):
            if length != count:
                raise ValueError(f"{name} has {length} rows for {count} checkpoints")
        if len(self.shift_steps) != len(self.shift_paths):
            raise ValueError(
                f"shifts/path has {len(self.shift_paths)} rows for {len(self.shift_steps)} shifts"
            )
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
            jumped=tuple(int(s) for s, j in zip(self.steps, self.jumped, strict=False) if j),
            shift_steps=self.shift_steps,
            shift_paths=self.shift_paths,
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


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [_text(item) for item in dataset.asstr()[()]] if dataset.shape != (0,) else []
