"""Where ``extract`` reads a module's operand at a checkpoint from: LoRA factors or dense deltas.

A source opens and validates every checkpoint of the run up front (same targets, ranks and
scalings; shapes against the base), so that a user mistake fails before any work. Per module it
then loads operands one checkpoint at a time: :class:`~nexttools.lowrank.LowRankFactors` with the
scaling folded in (LoRA; rank-1 exact from the factors, one :class:`~nexttools.lowrank.GramCache`
per module) or dense ΔW_i = W_i − W_0 in float32 on the device (full weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from nexttools.checkpoints.adapter import AdapterCheckpoint, check_same_targets, open_adapter
from nexttools.checkpoints.base import recorded_base, resolve_base
from nexttools.checkpoints.discover import CheckpointRef
from nexttools.checkpoints.fingerprint import fingerprint
from nexttools.checkpoints.weights import ModelWeights
from nexttools.errors import UserError
from nexttools.lowrank import (
    GramCache,
    LowRankFactors,
    Rank1,
    energy_ratio,
    rank1_dense,
    rank1_of_difference,
)
from nexttools.store import RunKind

Operand = LowRankFactors | torch.Tensor  # a LoRA delta as factors, or a dense ΔW (rows, cols) float32


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


Source = LoraSource | FullSource


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


def open_source(refs: Sequence[CheckpointRef], base_spec: str | None, device: torch.device) -> Source:
    """Open and validate every checkpoint (discovery already refused runs that mix the two kinds)."""
    if refs[0].kind == "lora":
        return LoraSource(refs, base_spec, device)
    return FullSource(refs, base_spec, device)
