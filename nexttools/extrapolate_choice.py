"""What ``extrapolate`` writes when the user does not say: the method, α and format, and the guard
against a jump larger than the weights it moves.

**Format: in place by default.** The project's own 3-seed measurement (README) found a restart (merged
model, fresh LoRA, fresh optimizer) losing 31.8 % of the steps with no jump, while the same jumps resumed
in place saved up to 22 %. So without ``--format``: ``base`` for a LoRA run (the run's own checkpoint
resumes on it), ``checkpoint`` for a full-weight run whose last checkpoint is a resumable HF Trainer
folder, else ``merged``; one line says which and why.

**Method and α: the evidence decides.**

- With neither ``--method`` nor ``--alpha`` and a ``backtest`` verdict for this very store, its
  recommendation is used. A "do not extrapolate" verdict ends in one line that says how to override
  (name ``--method`` and ``--alpha``; an explicit choice against the verdict is written, with the
  verdict's warning).
- Without a verdict, ``fit``'s full-space back-test picks the method with the highest skill S at the
  chosen α among those it scored with S ≥ 0 (better than not jumping): S at any α follows exactly from
  the recorded S at fit's α and α* (:func:`skill_at`). One line says that ``backtest`` decides better.
- With neither, the user must choose (``UserError`` naming the three ways).

**The jump-size guard.** A jump whose Frobenius norm exceeds :data:`MAX_JUMP_RATIO` of its module's
base weight norm is refused unless ``--force``. Measured (README, "Quick start"): on the TRL
example's real GRPO run at step 150 every method's jump moves a module by at most 1.9 % of its norm
at α = 1.5 and 3.9 % at α = 3; the diverging ``next`` jumps reported on tiny real runs moved modules
by 5.7–9.7× their norm. 0.5 lies an order of magnitude from both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from nexttools.console import console
from nexttools.errors import UserError
from nexttools.lowrank import LowRankFactors
from nexttools.methods import METHODS
from nexttools.methods.base import Jump
from nexttools.outputs import get_output
from nexttools.run import OpenedRun

DEFAULT_ALPHA = 1.5
"""The paper's default α, used when neither ``--alpha`` nor a verdict gives one."""
MAX_JUMP_RATIO = 0.5
"""Largest ‖α·T̂‖_F / ‖W_0‖_F accepted without ``--force`` (module docstring)."""


@dataclass(frozen=True)
class Choice:
    """The method, α and format to write, and the lines that said why (also kept as warnings)."""

    method: str
    alpha: float
    format: str
    notes: tuple[str, ...]


def skill_at(score: dict[str, Any], alpha: float) -> float | None:
    """Overall full-space skill S at ``alpha`` from a recorded ``SkillScore`` document (S at its own α,
    and α*). With P = Σ‖T̂‖², D = Σ⟨T̂,T⟩, T = Σ‖T‖² and α* = D/P, S(α) = 1 − ‖αT̂ − T‖²/‖T‖² =
    −(P/T)(α² − 2αα*), so S(α) = S(α₀)·(α² − 2αα*)/(α₀² − 2α₀α*) exactly. None when unknown."""
    try:
        alpha0, s0 = float(score["alpha"]), float(score["skill"]["overall"])
        star = float(score["alpha_star"]["overall"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (math.isfinite(s0) and math.isfinite(star)):
        return None
    shape0 = alpha0 * alpha0 - 2.0 * alpha0 * star
    if shape0 == 0.0:
        return s0 if alpha == alpha0 else None
    return s0 * (alpha * alpha - 2.0 * alpha * star) / shape0


def choose(
    method: str | None,
    alpha: float | None,
    output: str | None,
    run: OpenedRun,
    verdict: dict[str, Any] | None,
    fit_record: dict[str, Any] | None,
    dtype: torch.dtype | None = None,
) -> Choice:
    """The (method, α, format) to write for the explicit ``method``/``alpha``/``output`` (None: not
    given), this ``run``, its saved ``verdict`` and ``fit``'s back-test record (module docstring);
    ``dtype`` is ``--dtype``, which an in-place output must be able to keep."""
    notes: list[str] = []
    if method is None and alpha is None and verdict is not None:
        recommendation = verdict.get("recommendation")
        if recommendation is None:
            raise UserError(
                f"`nexttools backtest` judged: do not extrapolate this run ({verdict.get('reason', '')}); "
                "to extrapolate anyway, name --method and --alpha"
            )
        method, alpha = str(recommendation["method"]), float(recommendation["alpha"])
        notes.append(f"following `nexttools backtest`: --method {method} --alpha {alpha:g}")
    alpha = DEFAULT_ALPHA if alpha is None else alpha
    if method is None:
        method = _from_fit(run, alpha, fit_record, notes)
    format_name = output or _in_place(run, method, dtype, notes)
    for note in notes:
        console.print(note, soft_wrap=True, highlight=False)
    return Choice(method, alpha, format_name, tuple(notes))


def _from_fit(run: OpenedRun, alpha: float, fit_record: dict[str, Any] | None, notes: list[str]) -> str:
    """The method ``fit``'s full-space back-test scores best at ``alpha`` with S ≥ 0."""
    skills = (fit_record or {}).get("skill") or {}
    scored = {
        name: skill_at(score, alpha)
        for name, score in skills.items()
        if name in METHODS and score is not None and not (METHODS[name].lora_only and run.kind != "lora")
    }
    usable = {name: s for name, s in scored.items() if s is not None and s >= 0.0}
    if not skills:
        raise UserError(
            "no method given and no back-test to choose one: run `nexttools backtest --eval-cmd ...` "
            "(it decides in function space), or `nexttools fit`, or name --method"
        )
    if not usable:
        shown = ", ".join(
            f"{n} {'< −1' if s < -1 else format(s, '.2f')}" for n, s in scored.items() if s is not None
        )
        raise UserError(
            f"`nexttools fit` found no method better than not jumping at α={alpha:g} "
            f"(skill S: {shown or 'none'}); name --method to extrapolate anyway"
        )
    best = max(usable, key=lambda name: usable[name])
    notes.append(
        f"--method {best}: the best skill S at α={alpha:g} in `nexttools fit`'s parameter-space back-test "
        f"({usable[best]:.2f}); `nexttools backtest` decides better, with your own eval"
    )
    return best


def _in_place(run: OpenedRun, method: str, dtype: torch.dtype | None, notes: list[str]) -> str:
    """``base`` for a LoRA run, ``checkpoint`` for a resumable full-weight one, else ``merged``."""
    wanted = "base" if run.kind == "lora" else "checkpoint"
    try:
        get_output(wanted).check(run, METHODS[method], dtype)
    except UserError as why:
        notes.append(f"--format merged (a restart: it loses steps against resuming in place): {why}")
        return "merged"
    if wanted == "base":
        notes.append(
            "--format base: the jump folded into a new base, on which your run's own last checkpoint "
            "resumes in place (adapter, optimizer, schedule, data position)"
        )
    else:
        notes.append(
            "--format checkpoint: a copy of your run's last checkpoint with the jump, to resume in place"
        )
    return wanted


def check_jump_size(run: OpenedRun, method: str, jump: Jump, *, force: bool) -> list[str]:
    """Refuse a jump whose ‖α·T̂‖_F exceeds :data:`MAX_JUMP_RATIO` of its module's ‖W_0‖_F. One module
    at a time, float64 norms; it reads the base's trained modules once more, so ``force`` skips it
    (and a ``measured`` method, α times a change the run made, cannot diverge and is not checked).
    Returns the warnings to record (none: the check refuses or passes)."""
    if force:
        return []
    too_large = oversized_jump(run, method, jump)
    if too_large is None:
        return []
    raise UserError(f"{too_large}; check `nexttools fit`'s back-test, or pass --force to write it anyway")


def oversized_jump(run: OpenedRun, method: str, jump: Jump) -> str | None:
    """Why the jump is too large to be the run's motion (its worst module's ‖α·T̂‖_F above
    :data:`MAX_JUMP_RATIO` of ‖W_0‖_F), or None when it is not, or when the method is ``measured``."""
    if METHODS[method].measured:
        return None
    worst_name, worst = "", 0.0
    for name in run.modules:
        change = jump.change(name)
        size = _frobenius(change)
        base = float(run.base.get(name).double().norm())
        ratio = size / base if base > 0 else (math.inf if size > 0 else 0.0)
        if not math.isfinite(ratio) or ratio > worst:
            worst_name, worst = name, ratio
        if not math.isfinite(ratio):
            break
    if worst <= MAX_JUMP_RATIO:
        return None
    return (
        f"the jump moves {worst_name} by {worst:.3g}× its own weight norm (limit {MAX_JUMP_RATIO:g}): "
        "a jump this large is a diverging prediction, not the run's motion"
    )


def _frobenius(change: LowRankFactors | torch.Tensor) -> float:
    if isinstance(change, torch.Tensor):
        return float(change.double().norm())
    left, right = change.left.double(), change.right.double()
    return math.sqrt(max(float(torch.trace((left.T @ left) @ (right.T @ right))), 0.0))
