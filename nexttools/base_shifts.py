"""The base shifts of a LoRA run that jumped while training: α·T̂ folded into its frozen base.

A live jump of a method that does not keep the adapter's rank (every method but ``factor-linear``)
adds its change to the frozen base weight of each trained module, in memory. The run's later
checkpoints still hold only the adapter, so on their own they no longer describe the weights. The
shift is therefore kept, exactly, as low-rank factors (the jump's own ``left (rows, q)`` and
``right (cols, q)``, float32, ΔW = left rightᵀ) in ``<workdir>/jumps/step-N/base-shift.safetensors``
(keys ``<module>.left``/``<module>.right``), and a kept jump's record says ``base_shift``.

Like a kept factor-space jump, a shift made by ``JumpCallback`` at step N is part of checkpoint N:
the weights of checkpoint i are W_0 + Σ_{N ≤ i} shift_N + s·B_i A_i. A shift that ``extrapolate
--format base --record`` wrote from checkpoint N (the offline loop) applies from the checkpoint after
N on, since the run's own checkpoint N sits on the base before it.

Every delta the store holds stays relative to the original base W_0 (:meth:`BaseShifts.delta_factors`
puts the shifts beside the adapter's own factors: exact, no subtraction), and the files enter the
fingerprint of each row they apply to, so that a shift added, changed or removed makes ``extract``
recompute exactly the rows it touches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from nexttools.checkpoints.factors import LowRankFactors
from nexttools.errors import UserError
from nexttools.jump_record import first_step_of, read_jumps
from nexttools.safe_files import write_atomic
from nexttools.workdir import Workdir

SHIFT_FILE = "base-shift.safetensors"


@dataclass
class BaseShifts:
    """The kept base shifts of one run: ``steps``, the first checkpoint step each applies to
    (increasing), and their files ``paths``."""

    steps: tuple[int, ...] = ()
    paths: tuple[Path, ...] = ()
    _loaded: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def of_workdir(cls, workdir: Path) -> BaseShifts:
        """The shifts ``workdir``'s jump record keeps (none for a run that never folded a jump)."""
        folder = Workdir(workdir).jump_states
        kept = [entry for entry in read_jumps(workdir) if entry.kept and entry.base_shift]
        paths = tuple(folder / f"step-{entry.step}" / SHIFT_FILE for entry in kept)
        for path in paths:
            if not path.is_file():
                raise UserError(f"{path} is missing: the jump record keeps a base shift there")
        return cls(tuple(first_step_of(entry) for entry in kept), paths)

    @classmethod
    def recorded(cls, steps: Sequence[int], paths: Sequence[str]) -> BaseShifts:
        """The shifts a store recorded (``/shifts``)."""
        return cls(tuple(int(s) for s in steps), tuple(Path(p) for p in paths))

    def __bool__(self) -> bool:
        return bool(self.steps)

    def files_at(self, step: int) -> list[Path]:
        """The shift files in effect at checkpoint ``step`` (made at or before it)."""
        return [path for s, path in zip(self.steps, self.paths, strict=True) if s <= step]

    def at(self, step: int, name: str) -> LowRankFactors | None:
        """Σ of the shifts of module ``name`` in effect at ``step``, as factors side by side (None:
        none)."""
        pairs = [self._factors(path, name) for path in self.files_at(step)]
        if not pairs:
            return None
        return LowRankFactors(torch.cat([p.left for p in pairs], 1), torch.cat([p.right for p in pairs], 1))

    def rank_at(self, step: int, name: str) -> int:
        """The number of columns :meth:`at` gives."""
        shift = self.at(step, name)
        return 0 if shift is None else shift.rank

    def delta_factors(self, step: int, name: str, adapter: LowRankFactors) -> LowRankFactors:
        """ΔW of checkpoint ``step`` against W_0: the shifts in effect beside the adapter's factors."""
        shift = self.at(step, name)
        if shift is None:
            return adapter
        return LowRankFactors(
            torch.cat([shift.left, adapter.left.to(shift.left.dtype)], 1),
            torch.cat([shift.right, adapter.right.to(shift.right.dtype)], 1),
        )

    def _factors(self, path: Path, name: str) -> LowRankFactors:
        if path not in self._loaded:
            try:
                self._loaded[path] = load_file(path)
            except (OSError, SafetensorError) as error:
                raise UserError(f"{path}: not a base shift ({error})") from None
        tensors = self._loaded[path]
        left, right = tensors.get(f"{name}.left"), tensors.get(f"{name}.right")
        if left is None or right is None:
            raise UserError(f"{path} holds no shift of {name}")
        try:
            return LowRankFactors(left.float(), right.float())
        except ValueError as error:
            raise UserError(f"{path}: {name}: {error}") from None


def save_shift(workdir: Path, step: int, shifts: Mapping[str, LowRankFactors]) -> Path:
    """Write the shift of the jump kept at ``step`` (module -> factors) into its jump folder."""
    folder = Workdir(workdir).jump_states / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, factors in shifts.items():
        tensors[f"{name}.left"] = factors.left.detach().float().cpu().contiguous()
        tensors[f"{name}.right"] = factors.right.detach().float().cpu().contiguous()
    path = folder / SHIFT_FILE
    write_atomic(path, save(tensors, metadata={"format": "pt"}))
    return path
