"""The extracted run, reopened for writing: the base and the checkpoints, checked against the store.

``extrapolate`` (and every method and output it calls) reads weights only through :class:`OpenedRun`,
so that each file is checked against the fingerprint ``extract`` recorded before a byte of output is
written, and a method never needs to know whether the run is LoRA or full-weight: it asks for a linear
combination of the run's deltas, Σ cᵢ ΔWᵢ, and gets factors (LoRA) or a dense tensor (full weights).
A LoRA run's deltas include the base shifts of the jumps folded into its base while it trained
(:mod:`nexttools.base_shifts`), so every ΔWᵢ is against the original base W_0.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nexttools.base_shifts import BaseShifts
from nexttools.checkpoints.adapter import AdapterCheckpoint, open_adapter
from nexttools.checkpoints.base import resolve_base
from nexttools.checkpoints.discover import CheckpointRef
from nexttools.checkpoints.fingerprint import fingerprint
from nexttools.checkpoints.weights import ModelWeights
from nexttools.errors import UserError
from nexttools.lowrank import LowRankFactors
from nexttools.store import RunKind, TrajectoryStore
from nexttools.store.trajectory import Trajectory

Checkpoint = AdapterCheckpoint | ModelWeights
Change = LowRankFactors | torch.Tensor
"""A change of one module's weight in the base weight's orientation: factors (``left (rows, q)``,
``right (cols, q)``, ΔW = left rightᵀ) or a dense ``(rows, cols)`` tensor, float32 on the CPU."""


class OpenedRun:
    """The store's run with its base and checkpoints opened lazily, each verified on first use.

    ``kind`` is ``"lora"`` or ``"full"``; ``last`` is the last checkpoint (row C−1); row −1 is the base.
    :meth:`up_to` gives the same run as it stood at an earlier checkpoint (the back-tests jump from
    there), sharing the verified checkpoints and the weight cache.
    """

    def __init__(self, store: TrajectoryStore, trajectory: Trajectory | None = None) -> None:
        """Open ``store``'s run; ``trajectory``, when the caller has already read the store, saves
        :meth:`trajectory` a second read."""
        self.store = store
        self.k = store.k
        self.kind: RunKind = store.run_kind
        self.base_path = resolve_base(store.base_model)
        self.base = ModelWeights(self.base_path)
        if fingerprint(self.base.files) != store.base_fingerprint:
            raise UserError(
                f"the base model {self.base_path} changed since extraction: run `nexttools extract` again"
            )
        self.shifts = BaseShifts.recorded(store.shift_steps, store.shift_paths)
        self._opened: dict[int, Checkpoint] = {}
        self._cache = _Cache(trajectory=trajectory)
        self._shapes = {
            name: (int(o), int(i)) for name, (o, i) in zip(store.modules, store.shapes, strict=True)
        }
        self.rows = len(store.steps)
        """C, the number of checkpoints this view of the run has (rows 0 … C−1)."""
        self.steps: np.ndarray = np.asarray(store.steps, dtype=np.int64)
        """The checkpoints' steps, int64 ``(C,)``."""
        self.last = self.checkpoint(self.rows - 1)

    def up_to(self, row: int) -> OpenedRun:
        """The run as it stood at checkpoint ``row`` (0 … C−1): rows after it do not exist in the view.

        Methods and outputs given the view jump from checkpoint ``row`` using nothing after it.
        """
        if not 0 <= row < len(self.store.steps):
            raise UserError(f"row {row} is outside the run's {len(self.store.steps)} checkpoints")
        view = copy.copy(self)  # shares the opened checkpoints and the cache: rows are absolute
        view.rows, view.steps = row + 1, self.steps[: row + 1]
        view.last = self.checkpoint(row)
        return view

    @property
    def modules(self) -> list[str]:
        """The trained modules (base weight names), in store order."""
        return list(self.store.modules)

    @property
    def last_folder(self) -> Path:
        """The folder that holds the last checkpoint's weights (adapter folder or model folder)."""
        return self.last.ref.path if isinstance(self.last, AdapterCheckpoint) else self.last.folder

    def checkpoint(self, row: int) -> Checkpoint:
        """Checkpoint ``row`` (0 … C−1), refused if missing or changed since extraction."""
        if not -1 < row < self.rows:
            raise UserError(f"row {row} is outside the run's {self.rows} checkpoints")
        if row not in self._opened:
            self._opened[row] = self._open(row)
        return self._opened[row]

    def _open(self, row: int) -> Checkpoint:
        store = self.store
        step, path = int(store.steps[row]), Path(store.checkpoint_paths[row])
        if not path.is_dir():
            raise UserError(f"checkpoint {path} (step {step}) is missing; it was extracted into {store.path}")
        checkpoint: Checkpoint
        if self.kind == "full":
            checkpoint = ModelWeights(path)
        else:
            checkpoint = open_adapter(CheckpointRef(step=step, path=path, kind="lora", layout="adapter"))
        # The same file list ``extract`` fingerprinted, since both come from the opened checkpoint.
        if fingerprint([*checkpoint.files, *self.shifts.files_at(step)]) != store.fingerprints[row]:
            raise UserError(
                f"checkpoint {path} (step {step}) changed since extraction: run `nexttools extract` again"
            )
        if isinstance(checkpoint, AdapterCheckpoint):
            checkpoint.check_base(self.base)  # settles each module's orientation (Conv1D) as extract did
        return checkpoint

    def trajectory(self) -> Trajectory:
        """The whole store in memory, read once per run (views included): what the predictor reads."""
        if self._cache.trajectory is None:
            self._cache.trajectory = Trajectory.from_store(self.store)
        return self._cache.trajectory

    def adapter(self, row: int) -> AdapterCheckpoint:
        """Checkpoint ``row`` of a LoRA run."""
        checkpoint = self.checkpoint(row)
        assert isinstance(checkpoint, AdapterCheckpoint), "a LoRA run's checkpoints are adapters"
        return checkpoint

    def factors(self, row: int, name: str) -> LowRankFactors:
        """ΔW_row of module ``name`` of a LoRA run against W_0: its base shifts beside its adapter's
        factors (just the adapter's when the run folded no jump into its base)."""
        step = int(self.steps[row])
        return self.shifts.delta_factors(step, name, self.adapter(row).factors(name))

    def shift(self, row: int, name: str) -> LowRankFactors | None:
        """The base shift of module ``name`` in effect at checkpoint ``row`` (None: none), which the
        base under that checkpoint's adapter holds."""
        return self.shifts.at(int(self.steps[row]), name)

    def combination(self, name: str, coefficients: Mapping[int, float]) -> Change:
        """Σ cᵣ ΔW_r of module ``name`` over ``{row: cᵣ}`` (row −1, the base, has ΔW = 0).

        LoRA: the rows' factors side by side (rank Σ rᵣ, exact: no subtraction of factors). Full
        weights: Σ cᵣ W_r − (Σ cᵣ) W_0, read from the files in float32.
        """
        rows = {row: c for row, c in coefficients.items() if row >= 0 and c != 0.0}
        if self.kind == "lora":
            factors = [self.factors(row, name) for row in rows]
            if not factors:
                out_dim, in_dim = self._shapes[name]
                return LowRankFactors(torch.zeros(out_dim, 0), torch.zeros(in_dim, 0))
            left = torch.cat([c * f.left for c, f in zip(rows.values(), factors, strict=True)], dim=1)
            right = torch.cat([f.right for f in factors], dim=1)
            return LowRankFactors(left, right)
        total = torch.zeros(self._shapes[name], dtype=torch.float32)
        for row, c in rows.items():
            total.add_(self.weight(row, name).to(torch.float32), alpha=c)
        base_coefficient = -sum(rows.values())
        if base_coefficient:
            total.add_(self.weight(-1, name).to(torch.float32), alpha=base_coefficient)
        return total

    def weight(self, row: int, name: str) -> torch.Tensor:
        """W_row of module ``name`` of a full-weight run, as stored (row −1: the base). Do not modify it.

        The tensors of the module being written are kept until the next module is asked for: the
        output reads W_c and the method reads it again for its change, and a dense tensor of a large
        model is worth one read, not two.
        """
        cache = self._cache
        if name != cache.module:
            cache.tensors, cache.module = {}, name
        if row not in cache.tensors:
            source = self.base if row < 0 else self.checkpoint(row)
            assert isinstance(source, ModelWeights), "a full-weight run's checkpoints are model folders"
            cache.tensors[row] = source.get(name)
        return cache.tensors[row]


@dataclass
class _Cache:
    """What the views of one run share: the store in memory, and the tensors of one module of a
    full-weight run by row (see :meth:`OpenedRun.weight`)."""

    trajectory: Trajectory | None = None
    module: str | None = None
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)
