"""``extract``: a run's checkpoints -> the exact rank-1 trajectory store (schema v1, ``docs/store.md``).

Order of work, and why:

1. Validate everything before any work: discover the checkpoints, open and cross-check every
   adapter (same targets, ranks, scalings), check the base shapes. A user mistake fails here with
   nothing written.
2. Plan under the store lock (:func:`plan_rows`): rows of the old store whose checkpoint is
   unchanged are kept, new checkpoints are appended, newly computable targets are filled, and a
   changed checkpoint is recomputed with every row that depends on it.
3. Compute module by module (outer loop) across the needed checkpoints (inner loop, step order):
   each adapter tensor is read once, memory holds one module's operands over a window of k+1
   checkpoints, and one :class:`~nexttools.lowrank.GramCache` per module lets a checkpoint's
   decomposition serve its G, L and T. Full-weight runs stream dense deltas the same way, so at
   most W_0 plus k+1 deltas of one module are alive.
4. Sign-align every row in step order (kept rows included, so an appended G follows the stored
   chain) and write it into a new file that atomically replaces the store (:mod:`nexttools.store`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from nexttools.checkpoints.adapter import AdapterCheckpoint, check_same_targets, open_adapter
from nexttools.checkpoints.base import recorded_base, resolve_base
from nexttools.checkpoints.discover import CheckpointRef, discover_checkpoints
from nexttools.checkpoints.fingerprint import fingerprint
from nexttools.checkpoints.weights import ModelWeights
from nexttools.consistency import Consistency, consistency, gram_lags
from nexttools.console import progress, warn
from nexttools.device import resolve_device
from nexttools.errors import UserError
from nexttools.frobenius import inner
from nexttools.lowrank import (
    GramCache,
    LowRankFactors,
    Rank1,
    align_sign,
    energy_ratio,
    rank1_dense,
    rank1_of_difference,
)
from nexttools.store import (
    KINDS,
    VERSION,
    DeltaArrays,
    DeltaKind,
    RunKind,
    StoreLayout,
    StoreWriter,
    TrajectoryStore,
    content_fingerprint,
    open_store,
    partial_path,
    store_lock,
)

Operand = LowRankFactors | torch.Tensor  # a LoRA delta as factors, or a dense ΔW (rows, cols) float32


@dataclass(frozen=True)
class ExtractOptions:
    """Inputs of :func:`extract`; the CLI maps its options one to one onto these fields.

    ``steps`` is an inclusive (lo, hi) step range (either end open), ``every`` keeps every N-th
    selected checkpoint; ``base`` defaults to ``adapter_config.json``'s ``base_model_name_or_path``
    (required for full-weight runs: the step-0 model). ``store`` overrides ``workdir/trajectory.h5``.
    """

    run: Path
    base: str | None = None
    workdir: Path = Path("nexttools-run")
    store: Path | None = None
    k: int = 5
    steps: tuple[int | None, int | None] | None = None
    every: int | None = None
    device: str = "auto"

    @property
    def store_path(self) -> Path:
        return self.store if self.store is not None else self.workdir / "trajectory.h5"


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


# --------------------------------------------------------------------------------------------------
# Sources: where a module's operand at a checkpoint comes from (LoRA factors or dense deltas).


def non_finite(path: Path, step: int, tensor: str) -> UserError:
    """The error for a checkpoint whose weights hold NaN or Inf (a diverged run)."""
    return UserError(
        f"{path} (step {step}): {tensor} holds NaN or Inf values, so the run diverged by this step; "
        f"extract the steps before it (--steps :{max(step - 1, 0)})"
    )


class _LoraSource:
    """A LoRA run: operands are :class:`LowRankFactors` (scaling folded in); Rank-1 is exact from factors."""

    run_kind: RunKind = "lora"
    reports_energy = True

    def __init__(self, refs: Sequence[CheckpointRef], base_spec: str | None, device: torch.device) -> None:
        self.device = device
        self.adapters: list[AdapterCheckpoint] = [open_adapter(ref) for ref in refs]
        check_same_targets(self.adapters)
        last = self.adapters[-1]
        if not last.modules:
            raise UserError(f"{last.ref.path}: the adapter holds no LoRA module")
        spec = base_spec or last.base_model_name_or_path
        if not spec:
            raise UserError(
                f"{last.ref.path / 'adapter_config.json'} names no base_model_name_or_path; pass --base"
            )
        self.base_model = recorded_base(spec)
        base = ModelWeights(resolve_base(spec))
        for adapter in self.adapters:
            adapter.check_base(base)  # settles each module's orientation against the base
        self.modules = list(last.modules)
        self.shapes = [tuple(last.modules[name].shape) for name in self.modules]
        self.ranks = [int(last.modules[name].rank) for name in self.modules]  # may vary per checkpoint
        self.scaling_rule = last.scaling_rule
        self.carried = sorted(last.carried)
        self.base_fingerprint = fingerprint(base.files)
        self.fingerprints = [fingerprint(adapter.files) for adapter in self.adapters]
        self._cache: GramCache | None = None

    def begin_module(self, name: str) -> None:
        self._cache = GramCache()

    def load(self, index: int, name: str) -> Operand:
        factors = self.adapters[index].factors(name)
        if not bool(torch.isfinite(factors.left).all() and torch.isfinite(factors.right).all()):
            ref = self.adapters[index].ref
            raise non_finite(ref.path, ref.step, name.removesuffix(".weight") + " (lora_A/lora_B)")
        if self.device.type != "cpu":
            factors = LowRankFactors(factors.left.to(self.device), factors.right.to(self.device))
        return factors

    def rank1(self, newer: Operand, older: Operand | None) -> Rank1:
        assert isinstance(newer, LowRankFactors) and (older is None or isinstance(older, LowRankFactors))
        return rank1_of_difference(newer, older, self._cache)

    def energy(self, operand: Operand) -> float | None:
        assert isinstance(operand, LowRankFactors)
        return energy_ratio(operand)

    def release(self, operand: Operand) -> None:
        """Drop an operand that no later delta of this module needs (and its cached decomposition)."""
        if self._cache is not None and isinstance(operand, LowRankFactors):
            self._cache.forget(operand)

    def end_module(self) -> None:
        self._cache = None


class _FullSource:
    """A full-weight run: operands are dense ΔW_i = W_i − W_0 in float32 on the device.

    Modules are the 2-D floating tensors that the run changed (last checkpoint ≠ base); every other
    tensor of the last checkpoint is ``carried``.
    """

    run_kind: RunKind = "full"
    scaling_rule = "none"
    reports_energy = False

    def __init__(self, refs: Sequence[CheckpointRef], base_spec: str | None, device: torch.device) -> None:
        if not base_spec:
            raise UserError("full-weight checkpoints need --base (the step-0 model the run started from)")
        self.device = device
        self.base_model = recorded_base(base_spec)
        self.base = ModelWeights(resolve_base(base_spec))
        self.checkpoints = [ModelWeights(ref.path) for ref in refs]
        self.steps = [ref.step for ref in refs]
        last = self.checkpoints[-1]
        for weights in self.checkpoints:
            _check_same_tensors(last, weights)
        candidates = [
            name for name in last.names if len(last.shape(name)) == 2 and last.dtype(name).is_floating_point
        ]
        for name in candidates:
            if name not in self.base or self.base.shape(name) != last.shape(name):
                found = self.base.shape(name) if name in self.base else "missing"
                raise UserError(
                    f"base {self.base.folder} does not match the checkpoints: {name} is "
                    f"{tuple(last.shape(name))} in {last.folder}, {found} in the base"
                )
        self.modules = sorted(
            name for name in candidates if not _same_tensor(last.get(name), self.base.get(name))
        )
        if not self.modules:
            raise UserError(f"{last.folder}: no 2-D weight differs from the base {self.base.folder}")
        self.shapes = [tuple(last.shape(name)) for name in self.modules]
        self.ranks = [0] * len(self.modules)
        self.carried = sorted(set(last.names) - set(self.modules))
        self.base_fingerprint = fingerprint(self.base.files)
        self.fingerprints = [fingerprint(weights.files) for weights in self.checkpoints]
        self._w0: torch.Tensor | None = None

    def begin_module(self, name: str) -> None:
        self._w0 = self.base.get(name).to(self.device, torch.float32)

    def load(self, index: int, name: str) -> Operand:
        assert self._w0 is not None
        delta = self.checkpoints[index].get(name).to(self.device, torch.float32) - self._w0
        if not bool(torch.isfinite(delta.sum())):  # one pass; a NaN or Inf anywhere makes the sum one
            raise non_finite(self.checkpoints[index].folder, self.steps[index], name)
        return delta

    def rank1(self, newer: Operand, older: Operand | None) -> Rank1:
        assert isinstance(newer, torch.Tensor) and not isinstance(older, LowRankFactors)
        return rank1_dense(newer if older is None else newer - older)

    def energy(self, operand: Operand) -> float | None:
        return None

    def release(self, operand: Operand) -> None:
        """Nothing is cached beside the window itself."""

    def end_module(self) -> None:
        self._w0 = None


_Source = _LoraSource | _FullSource


def _check_same_tensors(last: ModelWeights, other: ModelWeights) -> None:
    if set(last.names) != set(other.names):
        raise UserError(f"{other.folder} and {last.folder} hold different tensors")
    for name in last.names:
        if other.shape(name) != last.shape(name):
            raise UserError(
                f"{other.folder}: {name} is {other.shape(name)}, {last.shape(name)} in {last.folder}"
            )


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.to(torch.float32), b.to(torch.float32))


def _open_source(refs: Sequence[CheckpointRef], base_spec: str | None, device: torch.device) -> _Source:
    """Open and validate every checkpoint (discovery already refused runs that mix the two kinds)."""
    if refs[0].kind == "lora":
        return _LoraSource(refs, base_spec, device)
    return _FullSource(refs, base_spec, device)


# --------------------------------------------------------------------------------------------------
# Planning: which rows to keep from the old store and which to compute.


@dataclass(frozen=True)
class PlannedRow:
    """One checkpoint row of the new store.

    ``source`` indexes the discovered checkpoints (None: its folder was deleted since it was
    extracted, the stored rows are kept); ``old`` is its row in the old store (None: new);
    ``dirty`` means its weights are new or changed, so every row that uses it is recomputed.
    """

    step: int
    path: str
    fingerprint: str
    source: int | None
    old: int | None
    dirty: bool


@dataclass(frozen=True)
class Plan:
    """Rows of the new store and, per delta kind, the rows to compute and the rows copied (new -> old)."""

    rows: tuple[PlannedRow, ...]
    k: int
    compute: dict[DeltaKind, tuple[int, ...]]
    keep: dict[DeltaKind, dict[int, int]]
    rebuilt: bool
    warnings: tuple[str, ...] = field(default=())
    gram_compute: frozenset[tuple[int, int]] = frozenset()
    """Entries (i, l) of the Gram band ⟨ΔW_i, ΔW_(i−l)⟩ to compute (:mod:`nexttools.consistency`)."""
    gram_keep: dict[tuple[int, int], int] = field(default_factory=dict)
    """Entries (i, l) copied from the old store's row (value) at the same lag."""

    @property
    def needed(self) -> tuple[int, ...]:
        """Rows whose weights are read: every operand of every computed delta, ascending."""
        rows = set(self.compute["global"])
        for i in self.compute["local"]:
            rows.update((i, i - 1) if i > 0 else (i,))
        for i in self.compute["target"]:
            rows.update((i, i + self.k))
        for i, lag in self.gram_compute:
            rows.update((i, i - lag) if i - lag >= 0 else (i,))
        return tuple(sorted(rows))


def plan_rows(
    fresh: StoreLayout, old: StoreLayout | None, store: Path, old_gram_lags: int | None = None
) -> Plan:
    """Plan the new store from ``fresh`` (the layout of the current selection) and the ``old`` store.

    Rules (``docs/store.md``, "Appending"): unchanged rows are kept; new checkpoints must come
    after the stored ones (else the store is rebuilt from scratch); a stored checkpoint whose
    folder is gone keeps its rows; a changed fingerprint recomputes G and L of that row, L of the
    next, the targets that use it (and the sign chain after it, in :func:`_align`); another k
    recomputes every target. A Gram band entry is kept when the old store (whose band has
    ``old_gram_lags`` lags, None: none) holds the same pair of unchanged rows, else computed.
    """
    selected = [
        PlannedRow(step, path, fp, index, None, True)
        for index, (step, path, fp) in enumerate(
            zip(fresh.steps, fresh.paths, fresh.fingerprints, strict=True)
        )
    ]
    warnings: list[str] = []
    rebuild_reason = None if old is None else _rebuild_reason(fresh, old)
    if old is None or rebuild_reason is not None:
        if rebuild_reason is not None:
            warnings.append(f"{store} {rebuild_reason}; rebuilding it from scratch")
        return _full_plan(tuple(selected), fresh.k, rebuilt=old is not None, warnings=warnings)

    by_step = {row.step: row for row in selected}
    rows: list[PlannedRow] = []
    for old_index, (step, path, fp) in enumerate(zip(old.steps, old.paths, old.fingerprints, strict=True)):
        current = by_step.pop(step, None)
        if current is None:
            warnings.append(
                f"checkpoint of step {step} ({path}) was deleted since it was extracted; keeping its rows"
            )
            rows.append(PlannedRow(step, path, fp, None, old_index, False))
            continue
        changed = current.fingerprint != fp
        if changed:
            warnings.append(
                f"checkpoint of step {step} ({current.path}) changed since it was extracted; re-extracting it"
            )
        rows.append(replace(current, old=old_index, dirty=changed))
    rows.extend(by_step.values())  # all after the last stored step (checked in _rebuild_reason)

    if old.k != fresh.k:
        warnings.append(f"{store} was extracted with k={old.k}; recomputing its targets for k={fresh.k}")
    compute: dict[DeltaKind, list[int]] = {kind: [] for kind in KINDS}
    keep: dict[DeltaKind, dict[int, int]] = {kind: {} for kind in KINDS}
    unreachable: list[int] = []
    c, old_c = len(rows), len(old.steps)
    for i, row in enumerate(rows):
        if row.dirty:
            compute["global"].append(i)
        else:
            keep["global"][i] = _old(row)
        previous = rows[i - 1] if i > 0 else None
        if row.dirty or (previous is not None and previous.dirty):
            for needed in (row, previous):
                if needed is not None and needed.source is None:
                    raise UserError(
                        f"cannot recompute the local delta of step {row.step}: the checkpoint of step "
                        f"{needed.step} ({needed.path}) was deleted; restore it or extract into a new --store"
                    )
            compute["local"].append(i)
        else:
            keep["local"][i] = _old(row)
        if i + fresh.k >= c:
            continue  # no target yet
        partner = rows[i + fresh.k]
        stored = old.k == fresh.k and row.old is not None and row.old + old.k < old_c
        if stored and not row.dirty and not partner.dirty:
            keep["target"][i] = _old(row)
        elif row.source is not None and partner.source is not None:
            compute["target"].append(i)
        else:
            unreachable.append(row.step)
    if unreachable:
        warnings.append(
            f"targets of steps {unreachable} need deleted checkpoints and stay empty (NaN) in the store"
        )
    gram_compute, gram_keep, missing = _gram_plan(rows, fresh.k, old_gram_lags)
    if missing:
        warnings.append(
            f"{missing} consistency entries need deleted checkpoints and stay empty (NaN) in the store"
        )
    return Plan(
        rows=tuple(rows),
        k=fresh.k,
        compute={kind: tuple(rows_) for kind, rows_ in compute.items()},
        keep=keep,
        rebuilt=False,
        warnings=tuple(warnings),
        gram_compute=gram_compute,
        gram_keep=gram_keep,
    )


def _gram_plan(
    rows: Sequence[PlannedRow], k: int, old_lags: int | None
) -> tuple[frozenset[tuple[int, int]], dict[tuple[int, int], int], int]:
    """Which Gram band entries (i, l), l = 0 … k+1, to compute and which to keep (new -> old row);
    the number that can be neither (a deleted checkpoint with no stored entry)."""
    compute: set[tuple[int, int]] = set()
    keep: dict[tuple[int, int], int] = {}
    missing = 0
    for i, row in enumerate(rows):
        for lag in range(gram_lags(k)):
            j = i - lag
            if j < -1:
                break
            other = rows[j] if j >= 0 else None
            unchanged = not row.dirty and (other is None or not other.dirty)
            old_j = -1 if other is None else other.old
            if (
                old_lags is not None
                and lag < old_lags
                and unchanged
                and row.old is not None
                and old_j is not None
                and row.old - old_j == lag
            ):
                keep[(i, lag)] = row.old
            elif row.source is not None and (other is None or other.source is not None):
                compute.add((i, lag))
            else:
                missing += 1
    return frozenset(compute), keep, missing


def _old(row: PlannedRow) -> int:
    assert row.old is not None
    return row.old


def _rebuild_reason(fresh: StoreLayout, old: StoreLayout) -> str | None:
    """Why the old store cannot be extended by the current selection, or None when it can."""
    if old.run_kind != fresh.run_kind:
        return f"holds a {old.run_kind} run, the checkpoints are a {fresh.run_kind} run"
    if old.modules != fresh.modules or old.shapes != fresh.shapes:
        return "holds other modules than these checkpoints train"
    if fresh.run_kind == "full" and old.base_fingerprint != fresh.base_fingerprint:
        return "was extracted against another base model"
    selected = set(fresh.steps)
    for step, path in zip(old.steps, old.paths, strict=True):
        if step not in selected and Path(path).exists():
            return f"holds step {step}, which is not in this selection of checkpoints"
    last = max(old.steps)
    inserted = sorted(step for step in selected - set(old.steps) if step < last)
    if inserted:
        return f"lacks steps {inserted[:5]} before its last step {last}"
    return None


def _full_plan(rows: tuple[PlannedRow, ...], k: int, *, rebuilt: bool, warnings: list[str]) -> Plan:
    c = len(rows)
    gram = frozenset((i, lag) for i in range(c) for lag in range(gram_lags(k)) if i - lag >= -1)
    return Plan(
        rows=rows,
        k=k,
        compute={"global": tuple(range(c)), "local": tuple(range(c)), "target": tuple(range(max(c - k, 0)))},
        keep={kind: {} for kind in KINDS},
        rebuilt=rebuilt,
        warnings=tuple(warnings),
        gram_compute=gram,
    )


# --------------------------------------------------------------------------------------------------
# Computing and writing.


def extract(options: ExtractOptions) -> ExtractSummary:
    """Extract (or bring up to date) the trajectory store of ``options.run``; see the module docstring."""
    if options.k < 1:
        raise UserError(f"--k must be at least 1, got {options.k}")
    if options.every is not None and options.every < 1:
        raise UserError(f"--every must be at least 1, got {options.every}")
    device = resolve_device(options.device)
    refs = discover_checkpoints(Path(options.run), steps=options.steps, every=options.every)
    source = _open_source(refs, options.base, device)
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
    )
    store_path = Path(options.store_path)
    created = _create_folder(store_path.parent)
    try:
        with store_lock(store_path):
            partial_path(store_path).unlink(missing_ok=True)  # left by a killed run: we hold the lock
            old = open_store(store_path) if store_path.exists() else None
            try:
                summary = _update_store(source, fresh, old, store_path)
            finally:
                if old is not None:
                    old.close()
    except BaseException:
        _remove_empty(created)
        raise
    if summary.checkpoints < options.k + 2:
        message = (
            f"the store has {summary.checkpoints} checkpoints; `nexttools fit` needs at least "
            f"k+2 = {options.k + 2} (extract again when the run has more)"
        )
        warn(message)
        summary = replace(summary, warnings=(*summary.warnings, message))
    return summary


def _update_store(
    source: _Source, fresh: StoreLayout, old: TrajectoryStore | None, store: Path
) -> ExtractSummary:
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

    energies: list[float] = []
    grams: list[np.ndarray] = []
    writer = None if up_to_date else StoreWriter(store, layout)
    try:
        with progress() as bar:
            task = bar.add_task("extract", total=len(layout.modules))
            for j, name in enumerate(layout.modules):
                source.begin_module(name)
                try:
                    energy = None
                    if writer is not None:
                        old_band = old_gram[j] if old_gram is not None else None
                        rows, gram, energy = _module_rows(
                            source, plan, j, name, layout.shapes[j], old, old_band
                        )
                        for kind in KINDS:
                            writer.write_module(kind, j, rows[kind])
                        writer.write_gram(j, gram)
                        grams.append(gram)
                    if energy_load and last.source is not None:
                        energy = source.energy(source.load(last.source, name))
                finally:
                    source.end_module()
                if energy is not None and not math.isnan(energy):  # NaN: zero delta, no ratio
                    energies.append(energy)
                bar.advance(task)
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
        written=writer is not None,
        store_fingerprint=content_fingerprint(
            VERSION, layout.k, layout.steps, layout.fingerprints, layout.modules
        ),
        warnings=warnings,
        consistency=figures,
    )


def _module_rows(
    source: _Source,
    plan: Plan,
    index: int,
    name: str,
    shape: tuple[int, int],
    old: TrajectoryStore | None,
    old_gram: np.ndarray | None,
) -> tuple[dict[DeltaKind, DeltaArrays], np.ndarray, float | None]:
    """All rows of one module: kept rows copied from ``old``, the others computed, then sign-aligned.

    Operands are loaded in step order and dropped once older than the k+2 window that L, T and the
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
    window: dict[int, Operand] = {}
    energy = None
    for n in plan.needed:
        position = plan.rows[n].source
        assert position is not None, "the plan only reads rows whose checkpoint exists"
        window[n] = source.load(position, name)
        for stale in [i for i in window if i < n - k - 1]:
            source.release(window.pop(stale))
        for lag in gram_lags_of.get(n, ()):
            gram[n, lag] = 0.0 if n - lag < 0 else inner(window[n], window[n - lag])
        if n in compute["global"]:
            triples["global"][n] = source.rank1(window[n], None)
        if n in compute["local"]:
            triples["local"][n] = source.rank1(window[n], window[n - 1] if n > 0 else None)
        if n - k in compute["target"]:
            triples["target"][n - k] = source.rank1(window[n], window[n - k])
        if n == c - 1:
            energy = source.energy(window[n])
    for operand in window.values():
        source.release(operand)

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
