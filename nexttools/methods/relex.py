"""``relex``: RELEX's rule (arXiv 2605.21468), a rank-1 SVD over time and a line in the step.

Per module, the window's global deltas ΔW_i (the last k+1 checkpoints, at least 2), flattened, are the
rows of M ``(T, out·in)``. RELEX takes M's top right-singular vector v (unit, ``out·in``) through the
T × T Gram G = M Mᵀ (top eigenpair λ, e: v = Mᵀe/√λ), the temporal coefficients c = M v = √λ·e, fits
them by least squares as a line in the step, and moves along v. Every method here jumps from W_c to
the common target step t, so the jump is the fitted line's rise along v:

    α·T̂ = (ĉ(t) − ĉ(s_c))·v = Σ_i w_i ΔW_i,   w = (ĉ(t) − ĉ(s_c))·e/√λ,

which gives W_c at α = 0 and keeps what ΔW_c holds outside v (RELEX's own θ_0 + ĉ(t)·v would drop it,
a change the run made that no jump should undo). Exact without forming an out × in matrix: for a
LoRA run G_ij = Σ (L_iᵀL_j) ⊙ (R_iᵀR_j) from the factors (ΔW = L Rᵀ) in float64, and the jump is the
rows' factors side by side (rank ≤ T·r); for a full-weight run G is accumulated over flat blocks of
the files in float64, and the jump is the dense combination. RELEX's ablation found no gain from a
higher rank or a nonlinear fit, so rank 1 and a line are its definition here.
"""

from __future__ import annotations

import torch

from nexttools.checkpoints.weights import ModelWeights
from nexttools.methods.base import Jump, JumpRequest, Method, line_window, target_step
from nexttools.run import Change, OpenedRun

_BLOCK_BYTES = 32 << 20  # per file, for a full-weight run's Gram


def gram(run: OpenedRun, name: str, rows: list[int]) -> torch.Tensor:
    """G_ij = ⟨ΔW_i, ΔW_j⟩_F over ``rows``, float64 ``(T, T)``, without forming ΔW (module docstring)."""
    count = len(rows)
    out = torch.zeros(count, count, dtype=torch.float64)
    if run.kind == "lora":
        factors = [run.factors(row, name) for row in rows]
        lefts = [f.left.double() for f in factors]
        rights = [f.right.double() for f in factors]
        for i in range(count):
            for j in range(i, count):
                value = float(((lefts[i].T @ lefts[j]) * (rights[i].T @ rights[j])).sum())
                out[i, j] = out[j, i] = value
        return out
    sources = [run.base, *(run.checkpoint(row) for row in rows)]
    assert all(isinstance(s, ModelWeights) for s in sources), (
        "a full-weight run's checkpoints are model folders"
    )
    streams = [source.blocks(name, _BLOCK_BYTES) for source in sources if isinstance(source, ModelWeights)]
    for pieces in zip(*streams, strict=True):
        base = pieces[0].double()
        deltas = torch.stack([piece.double() - base for piece in pieces[1:]])
        out += deltas @ deltas.T
    return out


def relex_weights(gram_matrix: torch.Tensor, steps: torch.Tensor, target: float) -> torch.Tensor:
    """w, float64 ``(T,)``: the jump Σ w_i ΔW_i from the window's Gram and steps (module docstring).

    Zero when the window did not move (λ = 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram_matrix)
    top, e = float(eigenvalues[-1]), eigenvectors[:, -1]
    if top <= 0.0:
        return torch.zeros_like(e)
    coefficients = top**0.5 * e
    centred = steps - steps.mean()
    slope = float((centred * (coefficients - coefficients.mean())).sum() / centred.square().sum())
    rise = slope * (target - float(steps[-1]))
    return rise * e / top**0.5


class Relex(Method):
    name = "relex"
    summary = (
        "RELEX: the window's top direction over time (a rank-1 SVD of the last k+1 global deltas), "
        "its coefficient fitted as a line in the step"
    )
    backtest_note = "its direction spans whole matrices, which the rank-1 store does not hold"

    def jump(self, request: JumpRequest) -> Jump:
        run = request.run
        rows = line_window(run, self.name)
        target = target_step(run.steps, run.k, request.alpha)
        steps = torch.tensor([float(run.steps[row]) for row in rows], dtype=torch.float64)

        def change(name: str) -> Change:
            weights = relex_weights(gram(run, name, rows), steps, target)
            return run.combination(name, {row: float(w) for row, w in zip(rows, weights, strict=True)})

        return Jump(target_step=target, change=change)
