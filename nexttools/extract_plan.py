"""``extract``'s plan: which rows of the store to keep from the old one and which to compute.

Rules (``docs/store.md``, "How it is updated"): unchanged rows are kept; new checkpoints must come
after the stored ones (else the store is rebuilt); a stored checkpoint whose folder is gone keeps
its rows; a changed fingerprint recomputes every row that depends on it; another k recomputes every
target; Gram band entries are kept when the old store holds the same pair of unchanged rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from nexttools.consistency import gram_lags
from nexttools.errors import UserError
from nexttools.store import KINDS, DeltaKind, StoreLayout


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
