"""What every extrapolation method is: one interface, one definition of where a jump lands.

A method predicts T̂, the change of every trained module over the next k checkpoints, and the jump
is α·T̂. Every method lands on the **same target step**,

    s_target = s_c + α · k · Δ,   Δ = the mean checkpoint spacing over the last k intervals

(the base counts as the point at step 0 while the run has fewer than k+1 checkpoints), so that
``--alpha`` means the same number of steps whatever the method. :func:`target_step` is the only
place that computes it.

A method is a subclass of :class:`Method` in its own module, listed once in
:data:`nexttools.methods.METHODS`; the CLI choices, ``fit``'s back-test and the model card read it
from there.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from nexttools.errors import UserError
from nexttools.lowrank import LowRankFactors
from nexttools.predictor import TrainedPredictor
from nexttools.run import Change, OpenedRun
from nexttools.store import DeltaArrays
from nexttools.store.trajectory import Trajectory


@dataclass(frozen=True)
class JumpRequest:
    """What a method is given to make its jump: the run (jump from its last checkpoint), α, and the
    trained predictor for the methods that need one (:attr:`Method.needs_predictor`)."""

    run: OpenedRun
    alpha: float
    predictor: TrainedPredictor | None = None


@dataclass(frozen=True)
class Jump:
    """α·T̂ of every trained module, computed one module at a time.

    ``change(name)`` is the module's α·T̂ (:data:`nexttools.run.Change`: factors or dense, float32,
    base orientation). ``new_factors(name)``, only for methods that keep the adapter's rank, is the
    jumped LoRA pair (A' ``(r, a)``, B' ``(b, r)``) as the checkpoint stores it, dtype included.
    ``predictor`` is what the manifest records about the predictor used, if any.
    """

    target_step: float
    change: Callable[[str], Change]
    new_factors: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None = None
    predictor: dict[str, Any] | None = field(default=None)


class Method(ABC):
    """One way of predicting T̂. Subclasses set the class attributes and implement :meth:`jump`.

    Attributes:
        name: the ``--method`` value.
        summary: one sentence for ``--help``, the model card and the docs.
        needs_predictor: ``fit`` must have run first.
        lora_only: refuse full-weight runs.
        keeps_rank: the jump is a LoRA pair of the adapter's own rank (``Jump.new_factors``), so it
            can be written into the run's own checkpoint and its optimizer state stays valid.
        backtest_note: why :meth:`backtest` returns None, when it does.
        measured: the jump is α times a change the run really made (not a prediction), so it cannot
            diverge; ``extrapolate``'s jump-size guard skips it (and the reads it would cost).
        anchored: α = 0 leaves the last checkpoint exactly as it is. False for a method that lands on
            a line fitted through the recent checkpoints (``factor-linear``): at α = 0 it moves the run
            onto that line at the last step, which is not the last checkpoint itself.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    needs_predictor: ClassVar[bool] = False
    lora_only: ClassVar[bool] = False
    keeps_rank: ClassVar[bool] = False
    backtest_note: ClassVar[str] = ""
    measured: ClassVar[bool] = False
    anchored: ClassVar[bool] = True

    @abstractmethod
    def jump(self, request: JumpRequest) -> Jump:
        """α·T̂ from the last checkpoint of ``request.run``."""

    def backtest(
        self, trajectory: Trajectory, rows: np.ndarray, predictor: TrainedPredictor
    ) -> dict[int, DeltaArrays] | None:
        """Rank-1 predictions of the target rows ``rows`` at α = 1 using only rows ≤ each one.

        ``predictor`` was trained on the rows before ``rows``. Returns 1-D :class:`DeltaArrays`
        per row (σ̂ ``(M,)``, û ``(Σout,)``, v̂ ``(Σin,)``), or None when the store alone cannot
        tell (:attr:`backtest_note` says why).
        """
        return None


def step_points(steps: np.ndarray) -> np.ndarray:
    """The run's steps as float64 points, with the base (step 0) in front unless a checkpoint is at 0."""
    points = np.asarray(steps, dtype=np.float64)
    return np.concatenate([[0.0], points]) if points[0] > 0 else points


def checkpoint_spacing(steps: np.ndarray, k: int) -> float:
    """Δ, the mean spacing in steps over the last k intervals (fewer when the run is shorter)."""
    points = step_points(steps)[-(k + 1) :]
    if len(points) < 2:
        raise UserError("a jump needs at least one interval between checkpoints (the base counts as step 0)")
    return float(points[-1] - points[0]) / (len(points) - 1)


def target_step(steps: np.ndarray, k: int, alpha: float) -> float:
    """s_c + α·k·Δ: where every method's jump lands (module docstring)."""
    return float(steps[-1]) + alpha * k * checkpoint_spacing(steps, k)


def line_window(run: OpenedRun, method: str) -> list[int]:
    """The rows a method fitting a line in the step reads: the last k+1 checkpoints (all of them on a
    shorter run, at least 2), each checked against its fingerprint now, before anything is written."""
    if run.rows < 2:
        raise UserError(f"{method} fits a line through the checkpoints and needs at least 2")
    rows = list(range(max(0, run.rows - 1 - run.k), run.rows))
    for row in rows:
        run.checkpoint(row)
    return rows


def rank1_change(run: OpenedRun, arrays: DeltaArrays, alpha: float) -> Callable[[str], LowRankFactors]:
    """α σ̂ û v̂ᵀ per module from 1-D rank-1 ``arrays``, û and v̂ renormalised; a zero σ̂ → rank 0.

    Every prediction is checked (finite) up front, so a bad one is refused before anything is written.
    """
    store = run.store
    changes: dict[str, LowRankFactors] = {}
    for j, name in enumerate(store.modules):
        rows, cols = (int(n) for n in store.shapes[j])
        u = arrays.u[store.u_offset[j] : store.u_offset[j + 1]].astype(np.float64)
        v = arrays.v[store.v_offset[j] : store.v_offset[j + 1]].astype(np.float64)
        sigma = float(arrays.sigma[j])
        if not (math.isfinite(sigma) and np.isfinite(u).all() and np.isfinite(v).all()):
            raise UserError(f"the prediction for {name} is not finite; nothing was written")
        u_norm, v_norm = float(np.linalg.norm(u)), float(np.linalg.norm(v))
        if sigma == 0.0 or u_norm == 0.0 or v_norm == 0.0 or alpha == 0.0:
            changes[name] = LowRankFactors(torch.zeros(rows, 0), torch.zeros(cols, 0))
            continue
        left = torch.from_numpy(alpha * sigma * u / u_norm).float()[:, None]
        right = torch.from_numpy(v / v_norm).float()[:, None]
        changes[name] = LowRankFactors(left, right)
    return changes.__getitem__
