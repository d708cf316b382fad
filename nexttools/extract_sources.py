"""Where ``extract`` reads a module's operand at a checkpoint from: LoRA factors or dense deltas.

A source opens and validates every checkpoint of the run up front (same targets, ranks and
scalings; shapes against the base), so that a user mistake fails before any work. Per module it
then holds a sliding window of checkpoints, keyed by the store row: LoRA factors with the scaling
folded in, in one :class:`~nexttools.lowrank.FactorWindow` per module (rank-1 and inner products
exact from the factors and their Gram blocks), or dense ΔW_i = W_i − W_0 in float32 on the device
(full weights). Both answer the same four questions of held rows: :meth:`rank1`, :meth:`inner`,
:meth:`energy`, and :meth:`drop` when no later row needs one.

A LoRA run whose live jumps were folded into its frozen base (:mod:`nexttools.base_shifts`) has each
checkpoint's shifts put beside its adapter's factors, so that every delta stays relative to W_0, and
the shift files enter the fingerprint of every row they apply to.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from nexttools.base_shifts import BaseShifts
from nexttools.checkpoints.adapter import AdapterCheckpoint, check_same_targets, open_adapter
from nexttools.checkpoints.base import recorded_base, resolve_base
from nexttools.checkpoints.discover import CheckpointRef
from nexttools.checkpoints.fingerprint import fingerprint
from nexttools.checkpoints.weights import ModelWeights
from nexttools.dense_rank1 import rank1_dense
from nexttools.errors import UserError
from nexttools.frobenius import inner
from nexttools.lowrank import (
    FactorWindow,
    NonFiniteFactors,
    Rank1,
    energy_ratio,
)
from nexttools.store import RunKind


def non_finite(path: Path, step: int, tensor: str) -> UserError:
    """The error for a checkpoint whose weights hold NaN or Inf (a diverged run)."""
    return UserError(
        f"{path} (step {step}): {tensor} holds NaN or Inf values, so the run diverged by this step; "
        f"extract the steps before it (--steps :{max(step - 1, 0)})"
    )


class LoraSource:
    """A LoRA run: operands are :class:`LowRankFactors` (scaling folded in); Rank-1 is exact from factors."""

    run_kind: RunKind = "lora"
    reports_energy = True

    def __init__(
        self,
        refs: Sequence[CheckpointRef],
        base_spec: str | None,
        device: torch.device,
        shifts: BaseShifts,
    ) -> None:
        self.device = device
        self.shifts = shifts
        self.adapters: list[AdapterCheckpoint] = [open_adapter(ref) for ref in refs]
        check_same_targets(self.adapters)
        last = self.adapters[-1]
        if not last.modules:
            raise UserError(f"{last.ref.path}: the adapter holds no LoRA module")
        spec = base_spec or last.base_model_name_or_path
        if not spec:
            raise UserError(f"{last.config_path} names no base_model_name_or_path; pass --base")
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
        self.fingerprints = [
            fingerprint([*adapter.files, *shifts.files_at(adapter.ref.step)]) for adapter in self.adapters
        ]

    def window(self, name: str, slots: int) -> LoraWindow:
        """Module ``name``'s window, with room for ``slots`` held rows at once."""
        return LoraWindow(self, name, slots)


class LoraWindow:
    """One module of a LoRA run over a sliding window of checkpoints, held as store rows.

    Each window owns its buffers, so that windows of different modules may run in different threads.
    """

    def __init__(self, source: LoraSource, name: str, slots: int) -> None:
        rows, cols = source.shapes[source.modules.index(name)]
        shifted = source.shifts.rank_at(source.adapters[-1].ref.step, name)  # the most: the last's
        max_rank = max(adapter.modules[name].rank for adapter in source.adapters) + shifted
        self._adapters = source.adapters
        self._shifts = source.shifts
        self._name = name
        self._factors = FactorWindow(rows, cols, max_rank, slots, source.device)

    def hold(self, row: int, index: int) -> None:
        """Read checkpoint ``index``'s factors of this module and hold them as ``row``."""
        adapter = self._adapters[index]
        try:
            own = adapter.factors(self._name)
            self._factors.push(row, self._shifts.delta_factors(adapter.ref.step, self._name, own))
        except NonFiniteFactors:
            tensors = self._name.removesuffix(".weight") + " (lora_A/lora_B)"
            raise non_finite(adapter.ref.path, adapter.ref.step, tensors) from None

    def rank1(self, newer: int, older: int | None) -> Rank1:
        """Top triple of ΔW_newer − ΔW_older (older None: of ΔW_newer itself)."""
        return self._factors.rank1(newer, older)

    def inner(self, a: int, b: int) -> float:
        """⟨ΔW_a, ΔW_b⟩_F of two held rows, float64."""
        return self._factors.inner(a, b)

    def energy(self, row: int) -> float | None:
        """σ₁/Σσᵢ of the held row's ΔW."""
        return energy_ratio(self._factors.factors(row))

    def drop(self, row: int) -> None:
        """Release a row that no later delta of this module needs."""
        self._factors.drop(row)


class FullSource:
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

    def window(self, name: str, slots: int) -> DenseWindow:
        """Module ``name``'s window (``slots`` is not needed: the window is a dict of dense deltas)."""
        return DenseWindow(self, name)


class DenseWindow:
    """One module of a full-weight run: held rows are dense ΔW_i = W_i − W_0, float32 on the device."""

    def __init__(self, source: FullSource, name: str) -> None:
        self._source = source
        self._name = name
        self._w0 = source.base.get(name).to(source.device, torch.float32)
        self._held: dict[int, torch.Tensor] = {}

    def hold(self, row: int, index: int) -> None:
        """Read ΔW = W_index − W_0 of this module and hold it as ``row``."""
        checkpoint = self._source.checkpoints[index]
        delta = checkpoint.get(self._name).to(self._w0.device, torch.float32) - self._w0
        if not bool(torch.isfinite(delta.sum())):  # one pass; a NaN or Inf anywhere makes the sum one
            raise non_finite(checkpoint.folder, self._source.steps[index], self._name)
        self._held[row] = delta

    def rank1(self, newer: int, older: int | None) -> Rank1:
        """Top triple of ΔW_newer − ΔW_older (older None: of ΔW_newer itself)."""
        delta = self._held[newer]
        return rank1_dense(delta if older is None else delta - self._held[older])

    def inner(self, a: int, b: int) -> float:
        """⟨ΔW_a, ΔW_b⟩_F of two held rows, float64."""
        return inner(self._held[a], self._held[b])

    def energy(self, row: int) -> float | None:
        """None: the ratio needs every singular value of a dense delta."""
        return None

    def drop(self, row: int) -> None:
        """Release a row that no later delta of this module needs."""
        del self._held[row]


Source = LoraSource | FullSource
ModuleWindow = LoraWindow | DenseWindow


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


def open_source(
    refs: Sequence[CheckpointRef], base_spec: str | None, device: torch.device, shifts: BaseShifts
) -> Source:
    """Open and validate every checkpoint (discovery already refused runs that mix the two kinds).

    ``shifts``: the run's base shifts (a full-weight run has none: its checkpoints hold the moved
    weights themselves)."""
    if refs[0].kind == "lora":
        return LoraSource(refs, base_spec, device, shifts)
    if shifts:
        raise UserError("the jump record keeps base shifts, which only a LoRA run has: is it this run's?")
    return FullSource(refs, base_spec, device)
