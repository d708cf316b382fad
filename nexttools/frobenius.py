"""Frobenius inner products of weight changes, exact and without forming out × in matrices.

A :data:`~nexttools.run.Change` is factors (ΔW = L Rᵀ, ``L (out, q)``, ``R (in, q)``) or a dense
``(out, in)`` tensor. For two factored changes

    ⟨L₁R₁ᵀ, L₂R₂ᵀ⟩_F = tr(R₁L₁ᵀL₂R₂ᵀ) = Σ_ij (L₁ᵀL₂)_ij (R₁ᵀR₂)_ij,

which costs q₁q₂(out + in) instead of out·in·(q₁ + q₂); a factored and a dense change meet as
Σ L ∘ (D R). Everything is computed in float64, so that a skill score 1 − ‖T̂ − T‖²/‖T‖² close to 1
is not lost to cancellation; dense tensors are converted a block of rows at a time.
"""

from __future__ import annotations

import torch

from nexttools.lowrank import LowRankFactors
from nexttools.run import Change

_ROWS = 1024


def inner(a: Change, b: Change) -> float:
    """⟨a, b⟩_F of two changes of the same module (either may be factors or dense), float64."""
    if isinstance(a, LowRankFactors) and isinstance(b, LowRankFactors):
        left = a.left.to(torch.float64).T @ b.left.to(torch.float64)
        right = a.right.to(torch.float64).T @ b.right.to(torch.float64)
        return float((left * right).sum())
    if isinstance(a, LowRankFactors):
        a, b = b, a
    assert isinstance(a, torch.Tensor)
    total = 0.0
    for start in range(0, a.shape[0], _ROWS):  # float64 a block of rows at a time: bounded memory
        block = a[start : start + _ROWS].to(torch.float64)
        if isinstance(b, LowRankFactors):
            left = b.left[start : start + _ROWS].to(torch.float64)
            total += float((left * (block @ b.right.to(torch.float64))).sum())
        else:
            total += float((block * b[start : start + _ROWS].to(torch.float64)).sum())
    return total


def squared_norm(a: Change) -> float:
    """‖a‖²_F, float64."""
    return inner(a, a)
