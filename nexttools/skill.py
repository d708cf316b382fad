"""The full-space back-test: how much of the true change each method predicts, as it is applied.

For a held-out store row r (checkpoint r, whose k-checkpoint future is known), every registered
method makes its α = 1 jump from the run as it stood at checkpoint r (:meth:`OpenedRun.up_to`):
T̂_r of every module, at the rank the method applies it (``last-interval`` at full rank, ``next``
rank 1, ...). The truth is the whole change T_r = W_(r+k) − W_r, not its rank-1 part. Summed over
the held-out (module, row) pairs of a module kind, or over all of them ("overall"):

    S(α) = 1 − Σ‖α T̂ − T‖² / Σ‖T‖²   the skill of the jump α·T̂ against the k-checkpoint truth:
                                       1 is perfect, 0 is no better than not jumping, < 0 harmful;
    α*   = Σ⟨T̂, T⟩ / Σ‖T̂‖²           the α that maximises S (the step length the run asks for).

Both come from three sums, Σ⟨T̂, T⟩, Σ‖T̂‖² and Σ‖T‖², computed exactly from the LoRA factors
(:mod:`nexttools.frobenius`); a full-weight run's changes are dense tensors. Unlike the rank-1
cosine, S scores what the jump actually adds to the weights, and it did track the jump's worth in
function space where the cosine did not (README, "Back-test").

For ``next`` the predictor is the one ``fit`` trained on the rows before the held-out ones; the
other methods read only checkpoints ≤ r.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nexttools.errors import UserError
from nexttools.frobenius import inner, squared_norm
from nexttools.methods import METHODS, Jump, JumpRequest
from nexttools.predictor import TrainedPredictor
from nexttools.run import OpenedRun
from nexttools.store.trajectory import module_kind
from nexttools.threads import cpu_workers, in_order, single_threaded_kernels


@dataclass(frozen=True)
class SkillScore:
    """S at the requested α and α*, per module kind and ``"overall"`` (NaN where nothing moved)."""

    alpha: float
    skill: dict[str, float]
    alpha_star: dict[str, float]


@dataclass
class _Sums:
    dot: float = 0.0  # Σ⟨T̂, T⟩
    predicted: float = 0.0  # Σ‖T̂‖²
    true: float = 0.0  # Σ‖T‖²

    def skill(self, alpha: float) -> float:
        if self.true <= 0:
            return math.nan
        return 1.0 - (alpha * alpha * self.predicted - 2.0 * alpha * self.dot + self.true) / self.true

    def alpha_star(self) -> float:
        return self.dot / self.predicted if self.predicted > 0 else math.nan


def full_space_backtest(
    run: OpenedRun, rows: Sequence[int], predictor: TrainedPredictor, alpha: float
) -> tuple[dict[str, SkillScore | None], dict[str, str]]:
    """S(``alpha``) and α* of every registered method on the held-out store rows ``rows``.

    Returns the scores (None for a method that cannot jump from every one of those rows) and, for
    those, one line saying why. Reads each module's factors (or tensors) of the rows involved once.
    """
    jumps: dict[str, dict[int, Jump]] = {}
    notes: dict[str, str] = {}
    for name, method in METHODS.items():
        if method.lora_only and run.kind != "lora":
            notes[name] = "it applies to LoRA runs only"
            continue
        try:
            jumps[name] = {
                r: method.jump(JumpRequest(run=run.up_to(r), alpha=1.0, predictor=predictor)) for r in rows
            }
        except UserError as error:
            notes[name] = str(error)
    sums: dict[str, dict[str, _Sums]] = {name: {} for name in jumps}
    k = run.k
    for r in rows:  # opened (and verified) once, before any worker thread reads them
        run.checkpoint(r)
        run.checkpoint(r + k)

    def module_terms(module: str) -> list[tuple[str, float, float, float]]:
        """(method, ⟨T̂, T⟩, ‖T̂‖², ‖T‖²) of ``module`` for every held-out row, in order."""
        terms = []
        for r in rows:
            truth = run.combination(module, {r + k: 1.0, r: -1.0})
            true_norm = squared_norm(truth)
            for name, by_row in jumps.items():
                predicted = by_row[r].change(module)
                terms.append((name, inner(predicted, truth), squared_norm(predicted), true_norm))
        return terms

    # A LoRA run's terms are thousands of small factor products: one module per worker thread, each
    # with single-threaded kernels (nexttools.threads). Under OpenMP they took 16 s alone on the
    # Qwen-shaped store and 117 s beside one busy process. A full-weight run's dense modules are large
    # kernels that OpenMP does split well, and its weight cache holds one module at a time: in turn.
    lora = run.kind == "lora"
    workers = cpu_workers(torch.device("cpu")) if lora else 1
    with single_threaded_kernels() if lora else contextlib.nullcontext():
        for module, terms in zip(run.modules, in_order(module_terms, run.modules, workers), strict=True):
            for name, dot, predicted_norm, true_norm in terms:  # summed in module order: deterministic
                for key in (module_kind(module), "overall"):
                    total = sums[name].setdefault(key, _Sums())
                    total.dot += dot
                    total.predicted += predicted_norm
                    total.true += true_norm
    scores: dict[str, SkillScore | None] = {name: None for name in METHODS}
    for name, by_kind in sums.items():
        order = [key for key in by_kind if key != "overall"] + ["overall"]
        scores[name] = SkillScore(
            alpha=alpha,
            skill={key: by_kind[key].skill(alpha) for key in order},
            alpha_star={key: by_kind[key].alpha_star() for key in order},
        )
    return scores, notes
