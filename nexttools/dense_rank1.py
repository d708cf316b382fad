"""Top singular triple of a dense delta (full-weight runs), float32-accurate, on the tensor's device.

LoRA deltas never come here: :mod:`nexttools.lowrank` computes theirs exactly from the factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nexttools.lowrank import Rank1, zero_rank1

# Dense subspace iteration: block size, step budget, residual tolerance relative to σ, and the min
# side at or below which a direct SVD is cheaper.
_DENSE_BLOCK = 8
_DENSE_MAX_STEPS = 100
_DENSE_RESIDUAL = 1e-6
_DENSE_SVD_MAX_SIDE = 128


def rank1_dense(delta: Tensor) -> Rank1:
    """Float32-accurate top triple of a dense (rows, cols) delta, on the tensor's device.

    Block subspace iteration with a block of 8 and Rayleigh–Ritz: each step costs two (rows×cols)×8
    GEMMs and converges like (σ₉/σ₁)², so a poor σ₁/σ₂ gap (e.g. 1.01) does not slow it down as it
    would slow a single-vector power method. It stops when the true residual ‖Δv − σu‖ ≤ 1e-6·σ
    (Δᵀu = σv holds by construction); if that is not reached in 100 steps it falls back to
    ``torch.linalg.svd``, which it also uses outright for small matrices (min side ≤ 128), where it is
    cheaper. Deterministic: the start block comes from a fixed seed. A zero matrix gives the zero triple.
    """
    if delta.ndim != 2:
        raise ValueError(f"rank1_dense needs a 2-D matrix, got shape {tuple(delta.shape)}")
    a = delta.to(torch.float32)
    rows, cols = a.shape
    if not bool(a.any()):
        return zero_rank1(rows, cols, a.device)
    if min(rows, cols) <= _DENSE_SVD_MAX_SIDE:
        return _rank1_svd(a.to(torch.float64))
    generator = torch.Generator(device=a.device).manual_seed(0)
    basis = torch.randn(cols, _DENSE_BLOCK, generator=generator, device=a.device, dtype=torch.float32)
    basis, _ = torch.linalg.qr(basis)
    for _ in range(_DENSE_MAX_STEPS):
        image, _ = torch.linalg.qr(a @ basis)  # (rows, b) orthonormal
        # (cols, b) = Δᵀ·image, so Δ ≈ image @ backᵀ on this subspace. Written as (imageᵀΔ)ᵀ: with a
        # transposed Δ, CPU torch was measured ~20× slower on these skinny products.
        back = (image.T @ a).T
        basis, svals, small_vh = torch.linalg.svd(back, full_matrices=False)
        sigma = float(svals[0])
        if not sigma > 0:
            break
        u = image @ small_vh[0]
        v = basis[:, 0]
        residual = float(torch.linalg.vector_norm(a @ v - sigma * u))
        if residual <= _DENSE_RESIDUAL * sigma:
            return Rank1(sigma, u / torch.linalg.vector_norm(u), v / torch.linalg.vector_norm(v))
    return _rank1_svd(a)


def _rank1_svd(a: Tensor) -> Rank1:
    """Top triple from a full thin SVD (small matrices, or the subspace iteration's fallback)."""
    left, svals, right_h = torch.linalg.svd(a, full_matrices=False)
    sigma = float(svals[0])
    if not sigma > 0:
        return zero_rank1(a.shape[0], a.shape[1], a.device)
    return Rank1(sigma, left[:, 0].to(torch.float32), right_h[0].to(torch.float32))
