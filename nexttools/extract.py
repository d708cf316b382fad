"""``extract``: a run's checkpoints -> the exact rank-1 trajectory store (schema v1, ``docs/store.md``).

Order of work, and why:

1. Validate everything before any work: discover the checkpoints, open and cross-check every
   adapter (same targets, ranks, scalings), check the base shapes. A user mistake fails here with
   nothing written.
2. Plan under the store lock (:func:`plan_rows`): rows of the old store whose checkpoint is
   unchanged are kept, new checkpoints are appended, newly computable targets are filled, and a
   changed checkpoint is recomputed with every row that depends on it.
3. Compute module by module (outer loop) across the needed checkpoints (inner loop, step order):
   each adapter tensor is read once, and memory holds one module's checkpoints over a window of
   k+2 (:class:`~nexttools.lowrank.FactorWindow`: a checkpoint's float64 copy and its Gram blocks
   with the others serve its G, L, T and Gram band rows). Full-weight runs stream dense deltas the
   same way, so at most W_0 plus k+2 deltas of one module are alive.
4. Sign-align every row in step order (kept rows included, so an appended G follows the stored
   chain) and write it into a new file that atomically replaces the store (:mod:`nexttools.store`).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from nexttools.base_shifts import BaseShifts
from nexttools.checkpoints.discover import discover_checkpoints
from nexttools.consistency import Consistency, consistency, gram_lags
from nexttools.console import progress, warn
from nexttools.device import resolve_device
from nexttools.extract_plan import Plan, plan_rows
from nexttools.extract_ranks import ModuleResult, module_results
from nexttools.extract_sources import ModuleWindow, Source, open_source
from nexttools.jump_record import jumped_steps
from nexttools.lowrank import Rank1, align_sign
from nexttools.options import CheckedOptions, argument, device_option, option, store_option, workdir_option
from nexttools.ranks import Ranks, joined, together
from nexttools.store import (
    KINDS,
    VERSION,
    DeltaArrays,
    DeltaKind,
    StoreLayout,
    StoreWriter,
    TrajectoryStore,
    content_fingerprint,
    open_store,
    partial_path,
    store_lock,
)
from nexttools.threads import cpu_workers, single_threaded_kernels
from nexttools.workdir import Workdir


@dataclass(frozen=True)
class ExtractOptions(CheckedOptions):
    """Inputs of :func:`extract`; each field is also its command-line option (:mod:`nexttools.options`).

    ``steps`` is an inclusive (lo, hi) step range (either end open), ``every`` keeps every N-th
    selected checkpoint; ``base`` defaults to ``adapter_config.json``'s ``base_model_name_or_path``
    (required for full-weight runs: the step-0 model). ``store`` overrides ``workdir/trajectory.h5``.
    """

    run: Path = argument("The RL run's folder (its checkpoints; see the supported layouts).")
    base: str | None = option(
        None, "Base model: local folder or Hub id [default: the adapters' base_model_name_or_path]."
    )
    workdir: Path = workdir_option()
    store: Path | None = store_option()
    k: int = option(5, "Target horizon, in checkpoints.", kind="count")
    steps: tuple[int | None, int | None] | None = option(
        None, "Only checkpoints with LO <= step <= HI.", kind="steps", metavar="LO:HI"
    )
    every: int | None = option(None, "Only checkpoints whose step is a multiple of N.", kind="count")
    device: str = device_option()

    @property
    def store_path(self) -> Path:
        return Workdir(self.workdir, self.store).store


@dataclass(frozen=True)
class ExtractSummary:
    """What one ``extract`` did. ``energy_ratio`` is (min, median, max) over modules of σ1/Σσᵢ of the
    last global delta (paper §3.2), None for full-weight runs (it needs every singular value).
    ``rows_computed`` counts checkpoint rows computed this run per delta kind (the same for every
    module); ``steps_read`` are the checkpoints whose weights were read."""

    store: Path
    run_kind: str
    steps: tuple[int, ...]
    modules: int
    carried: int
    ranks: tuple[int, ...]
    scaling_rule: str
    k: int
    energy_ratio: tuple[float, float, float] | None
    rows_computed: dict[str, int]
    steps_read: tuple[int, ...]
    rebuilt: bool
    written: bool
    store_fingerprint: str
    warnings: tuple[str, ...] = ()
    consistency: Consistency | None = None
    """Lag cosines and straightness (:mod:`nexttools.consistency`); None for a store without a band."""

    @property
    def checkpoints(self) -> int:
        return len(self.steps)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (what ``--json`` prints)."""
        return {
            "store": str(self.store),
            "run_kind": self.run_kind,
            "checkpoints": self.checkpoints,
            "steps": list(self.steps),
            "modules": self.modules,
            "carried": self.carried,
            "ranks": list(self.ranks),
            "scaling_rule": self.scaling_rule,
            "k": self.k,
            "energy_ratio": None
            if self.energy_ratio is None
            else dict(zip(("min", "median", "max"), self.energy_ratio, strict=True)),
            "rows_computed": dict(self.rows_computed),
            "steps_read": list(self.steps_read),
            "rebuilt": self.rebuilt,
            "written": self.written,
            "store_fingerprint": self.store_fingerprint,
            "consistency": None if self.consistency is None else self.consistency.document(),
            "warnings": list(self.warnings),
        }


def extract(options: ExtractOptions) -> ExtractSummary:
    """Extract (or bring up to date) the trajectory store of ``options.run``; see the module docstring."""
    with joined(resolve_device(options.device)) as ranks:
        summary = _extract(options, ranks)
    if summary.checkpoints < options.k + 2:
        message = (
            f"the store has {summary.checkpoints} checkpoints; `nexttools fit` needs at least "
            f"k+2 = {options.k + 2} (extract again when the run has more)"
        )
        warn(message)
        summary = replace(summary, warnings=(*summary.warnings, message))
    return summary


def _extract(options: ExtractOptions, ranks: Ranks) -> ExtractSummary:
    """:func:`extract` on this rank: every step that can fail is taken by all ranks together, and
    only rank 0 creates folders, holds the lock and writes (:mod:`nexttools.ranks`)."""
    with together(ranks):
        refs = discover_checkpoints(Path(options.run), steps=options.steps, every=options.every)
        shifts = BaseShifts.of_workdir(Path(options.workdir))
        source = open_source(refs, options.base, ranks.device, shifts)
    fresh = StoreLayout(
        k=options.k,
        source=str(options.run),
        base_model=source.base_model,
        base_fingerprint=source.base_fingerprint,
        run_kind=source.run_kind,
        scaling_rule=source.scaling_rule,
        steps=tuple(ref.step for ref in refs),
        paths=tuple(str(ref.path.resolve()) for ref in refs),
        fingerprints=tuple(source.fingerprints),
        modules=tuple(source.modules),
        shapes=tuple((int(o), int(i)) for o, i in source.shapes),
        ranks=tuple(source.ranks),
        carried=tuple(source.carried),
        jumped=tuple(sorted(jumped_steps(Path(options.workdir), [ref.step for ref in refs]))),
        shift_steps=shifts.steps,
        shift_paths=tuple(str(path.resolve()) for path in shifts.paths),
    )
    store_path = Path(options.store_path)
    created: list[Path] = []
    try:
        with contextlib.ExitStack() as held:
            with together(ranks):
                if ranks.writer:
                    created = _create_folder(store_path.parent)
                    held.enter_context(store_lock(store_path))
                    partial_path(store_path).unlink(missing_ok=True)  # left by a killed run: we hold the lock
            with together(ranks):  # after the lock: the store read is the one rank 0 replaces
                old = open_store(store_path) if store_path.exists() else None
            if old is not None:
                held.callback(old.close)
            return _update_store(source, fresh, old, store_path, ranks)
    except BaseException:
        _remove_empty(created)
        raise


def _update_store(
    source: Source, fresh: StoreLayout, old: TrajectoryStore | None, store: Path, ranks: Ranks
) -> ExtractSummary:
    """Plan, compute and write the store (rank 0 writes; on other ranks the summary's figures are
    those of the old store: only rank 0 sees every module)."""
    with together(ranks):
        old_gram = old.gram() if old is not None else None
        old_lags = old_gram.shape[2] if old_gram is not None else None
        plan = plan_rows(fresh, old.layout if old is not None else None, store, old_lags)
    for message in plan.warnings:
        warn(message)
    layout = replace(
        fresh,
        steps=tuple(row.step for row in plan.rows),
        paths=tuple(row.path for row in plan.rows),
        fingerprints=tuple(row.fingerprint for row in plan.rows),
    )
    up_to_date = (
        old is not None and not any(plan.compute.values()) and not plan.gram_compute and old.layout == layout
    )
    last = plan.rows[-1]
    energy_load = source.reports_energy and last.source is not None and len(plan.rows) - 1 not in plan.needed
    steps_read = sorted({plan.rows[i].step for i in plan.needed} | ({last.step} if energy_load else set()))

    def one_module(j: int) -> ModuleResult:
        window = source.window(layout.modules[j], slots=gram_lags(layout.k))
        rows, gram, energy = None, None, None
        if not up_to_date:
            old_band = old_gram[j] if old_gram is not None else None
            rows, gram, energy = _module_rows(window, plan, j, layout.shapes[j], old, old_band)
        if energy_load and last.source is not None:
            window.hold(len(plan.rows) - 1, last.source)
            energy = window.energy(len(plan.rows) - 1)
        return rows, gram, energy

    energies: list[float] = []
    grams: list[np.ndarray] = []
    workers = cpu_workers(source.device)
    writer = None
    with together(ranks):
        if not up_to_date and ranks.writer:
            writer = StoreWriter(store, layout)
    try:
        with progress() as bar, single_threaded_kernels():
            # Counted in checkpoints, what the user knows their run by: each module read is that
            # share of every checkpoint read (modules are the unit of work, checkpoints the unit of size).
            read = len(steps_read)
            label = f"reading {read} checkpoint{'s' if read != 1 else ''}" if read else "extract"
            task = bar.add_task(label, total=read or len(layout.modules))
            modules = len(layout.modules)
            results = module_results(
                one_module,
                layout.shapes,
                len(plan.rows),
                gram_lags(layout.k),
                with_rows=not up_to_date,
                ranks=ranks,
                workers=workers,
            )
            for j, (rows, gram, energy) in enumerate(results):
                if writer is not None:
                    assert rows is not None and gram is not None
                    for kind in KINDS:
                        writer.write_module(kind, j, rows[kind])
                    writer.write_gram(j, gram)
                    grams.append(gram)
                if energy is not None and not math.isnan(energy):  # NaN: zero delta, no ratio
                    energies.append(energy)
                bar.update(task, completed=(j + 1) * read / modules if read else j + 1)  # exact at the end
        with together(ranks):  # the others exit 2 too if the store cannot be committed
            if writer is not None:
                writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise

    band = np.stack(grams) if grams else old_gram
    figures = consistency(band, layout.k) if band is not None else None
    warnings = plan.warnings
    walk = figures.warning() if figures is not None else None
    if walk is not None:
        warn(walk)
        warnings = (*warnings, walk)
    return ExtractSummary(
        store=store,
        run_kind=layout.run_kind,
        steps=layout.steps,
        modules=len(layout.modules),
        carried=len(layout.carried),
        ranks=tuple(sorted(set(layout.ranks))),
        scaling_rule=layout.scaling_rule,
        k=layout.k,
        energy_ratio=(min(energies), statistics.median(energies), max(energies)) if energies else None,
        rows_computed={kind: len(plan.compute[kind]) for kind in KINDS},
        steps_read=tuple(steps_read),
        rebuilt=plan.rebuilt,
        written=not up_to_date,
        store_fingerprint=content_fingerprint(
            VERSION, layout.k, layout.steps, layout.fingerprints, layout.modules
        ),
        warnings=warnings,
        consistency=figures,
    )


def _module_rows(
    window: ModuleWindow,
    plan: Plan,
    index: int,
    shape: tuple[int, int],
    old: TrajectoryStore | None,
    old_gram: np.ndarray | None,
) -> tuple[dict[DeltaKind, DeltaArrays], np.ndarray, float | None]:
    """All rows of one module: kept rows copied from ``old``, the others computed, then sign-aligned.

    Checkpoints are held in step order and dropped once older than the k+2 window that L, T and the
    Gram band need. Returns the rows (``sigma (C,)``, ``u (C, out)``, ``v (C, in)``) per kind, the
    Gram band ``(C, k+2)`` (``old_gram``, the old store's ``(C_old, lags)``, supplies kept entries)
    and the energy ratio of the last global delta when the last checkpoint was loaded (else None).
    """
    c, k = len(plan.rows), plan.k
    triples: dict[DeltaKind, list[Rank1 | None]] = {kind: [None] * c for kind in KINDS}
    for kind in KINDS:
        if plan.keep[kind] and old is not None:
            stored = old.read_module(kind, index)
            for new, was in plan.keep[kind].items():
                u, v = torch.from_numpy(stored.u[was]), torch.from_numpy(stored.v[was])
                triples[kind][new] = Rank1(float(stored.sigma[was]), u, v)

    gram = np.full((c, gram_lags(k)), np.nan)
    if old_gram is not None:
        for (i, lag), was in plan.gram_keep.items():
            gram[i, lag] = old_gram[was, lag]
    gram_lags_of: dict[int, list[int]] = {}
    for i, lag in plan.gram_compute:
        gram_lags_of.setdefault(i, []).append(lag)
    compute = {kind: set(plan.compute[kind]) for kind in KINDS}
    held: list[int] = []
    energy = None
    for n in plan.needed:
        position = plan.rows[n].source
        assert position is not None, "the plan only reads rows whose checkpoint exists"
        for stale in [i for i in held if i < n - k - 1]:
            window.drop(stale)
            held.remove(stale)
        window.hold(n, position)
        held.append(n)
        for lag in gram_lags_of.get(n, ()):
            gram[n, lag] = 0.0 if n - lag < 0 else window.inner(n, n - lag)
        if n in compute["global"]:
            triples["global"][n] = window.rank1(n, None)
        if n in compute["local"]:
            triples["local"][n] = window.rank1(n, n - 1 if n > 0 else None)
        if n - k in compute["target"]:
            triples["target"][n - k] = window.rank1(n, n - k)
        if n == c - 1:
            energy = window.energy(n)
    for i in held:
        window.drop(i)

    _align(triples)
    return {kind: _to_arrays(triples[kind], shape) for kind in KINDS}, gram, energy


def _align(triples: dict[DeltaKind, list[Rank1 | None]]) -> None:
    """The sign convention (README, "How it works, exactly"), in place: G to the previous non-zero G,
    L and T to their row's G.

    Kept rows go through it too: unchanged they come out bit-identical, and after a recomputed
    row they follow its new sign, which is the "G sign chain after it" of a changed checkpoint.
    """
    previous: torch.Tensor | None = None
    for i, g in enumerate(triples["global"]):
        assert g is not None, "every checkpoint has a global row"
        g = align_sign(g, previous)
        triples["global"][i] = g
        reference = None if g.is_zero else g.u
        if reference is not None:
            previous = reference
        for kind in ("local", "target"):
            r = triples[kind][i]
            if r is not None and not np.isnan(r.sigma):
                triples[kind][i] = align_sign(r, reference.to(r.u.device) if reference is not None else None)


def _to_arrays(triples: list[Rank1 | None], shape: tuple[int, int]) -> DeltaArrays:
    """Stack rows into float32 arrays; a missing row (no target yet) is NaN."""
    c, (out_dim, in_dim) = len(triples), shape
    sigma = np.full(c, np.nan, dtype=np.float32)
    u = np.full((c, out_dim), np.nan, dtype=np.float32)
    v = np.full((c, in_dim), np.nan, dtype=np.float32)
    for i, r in enumerate(triples):
        if r is not None:
            sigma[i] = r.sigma
            u[i] = r.u.detach().to("cpu", torch.float32).numpy()
            v[i] = r.v.detach().to("cpu", torch.float32).numpy()
    return DeltaArrays(sigma, u, v)


def _create_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, deepest first."""
    missing: list[Path] = []
    current = folder.absolute()
    while not current.exists():
        missing.append(current)
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Undo :func:`_create_folder` after a failure, so that a mistake leaves nothing behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
