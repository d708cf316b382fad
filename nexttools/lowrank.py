"""Top singular triple ("rank-1") of weight deltas: exactly from LoRA factors, or of a dense matrix.

A LoRA delta is ΔW = left @ right.T with r columns; the deltas NExt needs (README, "How it works,
exactly": G_i = ΔW_i, L_i = ΔW_i − ΔW_{i−1}, T_i = ΔW_{i+k} − ΔW_i) are differences of two such
products, so they are ``P C Qᵀ`` with the stacked factors P = [L_new, L_old] (rows, 2r),
Q = [R_new, R_old] (cols, 2r) and C = diag(I, −I). Their top triple is computed from 2r×2r
quantities; no rows×cols matrix is built.

Route choice, measured on one Qwen2.5-1.5B-shaped layer (q,k,v,o,gate,up,down, r = 64, 15 checkpoints)
on the shared 2-core CPU: the Gram route below costs ~120 ms per layer-checkpoint for all 7 modules
(G, L and T), where the QR route would cost ~16 s per layer for its L and T pairs alone, and a dense
float64 SVD of a single gate_proj delta takes ~8 s.

* **Gram route (the fast path).** Every checkpoint's factors enter the Gram band and five deltas
  (G_i, L_i, L_{i+1}, T_i, T_{i−k}); a :class:`FactorWindow` copies them to float64 once and computes
  their Gram blocks with every checkpoint within k+1 of them in one GEMM per side. A difference then
  needs only O(r³) work on those blocks: Cholesky Gp = FᵀF of the stacked left Gram, the top
  eigenpair (λ, a) of the symmetric core S = F C Gq C Fᵀ (λ = σ²), and then, with *no inverse square
  root*, v ∝ Q C Fᵀa and u ∝ D v = P C Qᵀv (two GEMVs). GEMM runs far faster than Householder QR.
* **Its weakness** is the one the brief warns about: Gram matrices square the condition number, so
  when the delta cancels heavily (consecutive checkpoints nearly equal, or very non-canonical factors
  B M, M⁻¹A) float64 keeps only about half its digits in those directions. The error is therefore
  *estimated for each delta*: the first-order error of σ² is γ·(κ_p² + κ_q²), where γ ≈ ε₆₄·√n is the
  GEMM rounding level and κ² = Σ_j w_j²‖col_j‖² / ‖Σ_j w_j col_j‖² measures how much the stacked
  columns cancel in forming u and v (≈ 1/δ² for checkpoints a relative step δ apart). Float32 GEMMs
  were measured ~2.6× faster than float64, but their γ (~1e-6) misses the 1e-5 σ target on ordinary
  non-canonical factors, so the Grams are float64.
* **QR route (the exact fallback).** When the estimate exceeds 1e-8 (σ error ≲ 1e-8 is still far
  inside float32 precision), when the stacked Gram is numerically singular (Cholesky fails, e.g. one
  factor unchanged), the delta is recomputed from Householder QR of the stacked float64 factors and the
  SVD of the small core: backward stable column by column, so its error is ε₆₄·κ, not
  ε₆₄·κ². It is 5-10× slower but rare on real runs. Its result below its own rounding floor is a
  numerically zero delta.

Zero deltas (a zero factor, an identical checkpoint, or a difference below the rounding floor) give
``Rank1`` with σ = 0 and u = v = 0, as the store schema requires (``docs/store.md``).

Dense deltas (full-weight runs) use :func:`nexttools.dense_rank1.rank1_dense`, a block subspace
iteration in float32 on the tensor's own device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from nexttools.checkpoints.factors import LowRankFactors

_EPS64 = float(torch.finfo(torch.float64).eps)
# Relative first-order error of σ² above which the Gram route hands the delta to the QR route.
_GRAM_TOLERANCE = 1e-8


@dataclass(frozen=True, eq=False)
class Rank1:
    """Top singular triple of a delta: ΔW ≈ sigma · u vᵀ.

    sigma: float ≥ 0; u: (rows,) float32 unit vector; v: (cols,) float32 unit vector.
    A zero delta is ``sigma == 0`` with ``u`` and ``v`` all zeros (masked out of training).
    """

    sigma: float
    u: Tensor
    v: Tensor

    @property
    def is_zero(self) -> bool:
        """True for a zero delta (σ = 0, u = v = 0)."""
        return self.sigma == 0.0


def zero_rank1(rows: int, cols: int, device: torch.device | str = "cpu") -> Rank1:
    """The Rank1 of a zero (rows, cols) delta: σ = 0, u = v = 0 (float32)."""
    zeros = torch.zeros(rows + cols, dtype=torch.float32, device=device)
    return Rank1(0.0, zeros[:rows], zeros[rows:])


class NonFiniteFactors(ValueError):
    """A pushed factor holds NaN or Inf (found from its self Gram, at no extra cost)."""


@dataclass(frozen=True, eq=False)
class _Term:
    """One held checkpoint entering a delta with ``sign`` (+1 newer, −1 older).

    left_t: (r, rows), right_t: (r, cols) float64 views into the window's buffers; gram_left,
    gram_right: (r, r) self Gram blocks.
    """

    key: int
    sign: float
    left_t: Tensor
    right_t: Tensor
    gram_left: Tensor
    gram_right: Tensor


class FactorWindow:
    """One module's LoRA factors at a sliding window of checkpoints, with every Gram block between them.

    Every quantity ``extract`` needs of a module (its G, L and T deltas, and the Gram band
    ⟨ΔW_i, ΔW_j⟩ that ``consistency`` reads) involves two checkpoints at most k+1 apart, so the
    float64 work splits in two:

    * :meth:`push` copies a checkpoint's factors once into a slot (key mod slots when free) of two
      float64 buffers, ``(slots·r_max, rows)`` and ``(slots·r_max, cols)`` (transposed: one row
      block per slot), and then runs one GEMM per side, ``X_newᵀ [X_held …]``: its self Gram and its
      cross Gram with every held checkpoint. These are exactly the products of ``extract``'s floor,
      each pair once; one wide GEMM in this layout was measured ~1.8× faster per flop than the same
      products one pair at a time (28 vs 15 GFLOP/s on a (8960, 64) float64 factor, one core). A NaN
      or Inf anywhere in the factors shows in the self Gram's diagonal, so checking finiteness costs
      nothing more.
    * :meth:`rank1` and :meth:`inner` then need only O(r³) work on those blocks and two GEMVs (the
      Gram route), or the QR fallback on the held float64 factors.

    Keys are the caller's (extract uses the checkpoint's row). The caller :meth:`drop` s a key before
    pushing into a full window. Memory: the two buffers, 8·slots·r_max·(rows + cols) bytes, plus the
    (r, slots·r_max) Gram blocks of each held key.
    """

    def __init__(
        self, rows: int, cols: int, max_rank: int, slots: int, device: torch.device | str = "cpu"
    ) -> None:
        self.rows, self.cols, self.max_rank, self.slots = rows, cols, max_rank, slots
        self.device = torch.device(device)
        # Zeros, not empty: a slot of a smaller-rank checkpoint leaves rows unused, and the wide GEMM
        # reads them (into output columns nobody looks at, but garbage could be NaN and slow).
        self._left_t = torch.zeros(slots * max_rank, rows, dtype=torch.float64, device=self.device)
        self._right_t = torch.zeros(slots * max_rank, cols, dtype=torch.float64, device=self.device)
        self._slot: dict[int, int] = {}
        self._rank: dict[int, int] = {}
        # (a, b) -> (L_aᵀL_b, R_aᵀR_b), stored once for a pushed after (or equal to) b.
        self._cross: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self._zero: set[int] = set()

    def __contains__(self, key: int) -> bool:
        return key in self._slot

    def __len__(self) -> int:
        return len(self._slot)

    def push(self, key: int, factors: LowRankFactors) -> None:
        """Hold ``factors`` under ``key`` and compute its Gram blocks with every held checkpoint.

        Raises :class:`NonFiniteFactors` (nothing held) for NaN or Inf entries, ValueError for a
        duplicate key, a full window, or factors of another shape or a rank above ``max_rank``.
        """
        if key in self._slot:
            raise ValueError(f"key {key} is already held")
        if factors.shape != (self.rows, self.cols) or factors.rank > self.max_rank:
            raise ValueError(
                f"factors of shape {factors.shape} and rank {factors.rank} do not fit a "
                f"({self.rows}, {self.cols}) window of rank ≤ {self.max_rank}"
            )
        free = sorted(set(range(self.slots)) - set(self._slot.values()))
        if not free:
            raise ValueError(f"the window's {self.slots} slots are full; drop a key first")
        # A key's own slot, key mod slots, whenever it is free (always, for keys held as a sliding
        # range): then a key's GEMM reads the same buffer rows, into the same output columns, whatever
        # was pushed before it. MKL's last bits depend on where operands and output columns sit
        # (alignment, the kernel's blocking): with the first free slot instead, a store brought up
        # to date differed from a fresh one (measured: global v by 1.5e-8, Gram entries by 2e-17).
        slot = key % self.slots if key % self.slots in free else free[0]
        rank = factors.rank
        rows = slice(slot * self.max_rank, slot * self.max_rank + rank)
        self._left_t[rows].copy_(factors.left.T)
        self._right_t[rows].copy_(factors.right.T)
        end = (max([slot, *self._slot.values()]) + 1) * self.max_rank
        left = self._left_t[rows] @ self._left_t[:end].T  # (rank, end)
        right = self._right_t[rows] @ self._right_t[:end].T
        own = slice(rows.start, rows.stop)
        diagonal = left[:, own].diagonal() + right[:, own].diagonal()
        if not bool(torch.isfinite(diagonal).all()):
            raise NonFiniteFactors(f"factors pushed as key {key} hold NaN or Inf")
        self._slot[key], self._rank[key] = slot, rank
        # Exactly zero product: a factor with no non-zero entry (e.g. PEFT's B = 0 at step 0).
        if float(left[:, own].trace()) == 0 or float(right[:, own].trace()) == 0:
            self._zero.add(key)
        for other, other_slot in self._slot.items():
            start = other_slot * self.max_rank
            cols = slice(start, start + self._rank[other])
            self._cross[(key, other)] = (left[:, cols], right[:, cols])

    def drop(self, key: int) -> None:
        """Release ``key``'s slot and its Gram blocks (no later delta needs it)."""
        del self._slot[key], self._rank[key]
        self._zero.discard(key)
        for pair in [pair for pair in self._cross if key in pair]:
            del self._cross[pair]

    def factors(self, key: int) -> LowRankFactors:
        """The held factors of ``key`` as float64 views ((rows, r), (cols, r)): valid until dropped."""
        left_t, right_t = self._views(key)
        return LowRankFactors(left_t.T, right_t.T)

    def inner(self, a: int, b: int) -> float:
        """⟨ΔW_a, ΔW_b⟩_F = Σ (L_aᵀL_b) ∘ (R_aᵀR_b), float64, from the held blocks."""
        left, right = self._blocks(a, b)
        return float((left * right).sum())

    def rank1(self, newer: int | None, older: int | None) -> Rank1:
        """Exact top singular triple of ΔW_newer − ΔW_older (``None`` is a zero delta); see the module
        docstring for the two routes. u: (rows,), v: (cols,) float32 on the window's device."""
        if newer is None and older is None:
            raise ValueError("rank1 needs at least one of newer/older")
        if newer == older:
            return zero_rank1(self.rows, self.cols, self.device)
        terms = [self._term(key, sign) for key, sign in ((newer, 1.0), (older, -1.0)) if key is not None]
        terms = [t for t in terms if t.key not in self._zero]
        if not terms or (len(terms) == 2 and self._identical(*terms)):
            return zero_rank1(self.rows, self.cols, self.device)
        result = self._gram_route(terms)
        if result is None:
            result = _qr_route(terms)
        if result is None:
            return zero_rank1(self.rows, self.cols, self.device)
        sigma, u, v = result
        return Rank1(sigma, u.to(torch.float32), v.to(torch.float32))

    def _views(self, key: int) -> tuple[Tensor, Tensor]:
        start = self._slot[key] * self.max_rank
        rows = slice(start, start + self._rank[key])
        return self._left_t[rows], self._right_t[rows]

    def _blocks(self, a: int, b: int) -> tuple[Tensor, Tensor]:
        """(L_aᵀL_b, R_aᵀR_b): (r_a, r_b) float64."""
        if (a, b) in self._cross:
            return self._cross[(a, b)]
        left, right = self._cross[(b, a)]
        return left.T, right.T

    def _term(self, key: int, sign: float) -> _Term:
        left_t, right_t = self._views(key)
        gram_left, gram_right = self._blocks(key, key)
        return _Term(key, sign, left_t, right_t, gram_left, gram_right)

    def _identical(self, a: _Term, b: _Term) -> bool:
        """Bit-identical factors (a checkpoint saved twice). Unequal Grams prove a difference cheaply."""
        if a.gram_left.shape != b.gram_left.shape:
            return False
        if not (torch.equal(a.gram_left, b.gram_left) and torch.equal(a.gram_right, b.gram_right)):
            return False
        return torch.equal(a.left_t, b.left_t) and torch.equal(a.right_t, b.right_t)

    def _stacked_grams(self, terms: list[_Term]) -> tuple[Tensor, Tensor, Tensor]:
        """Gp = PᵀP and C Gq C with Gq = QᵀQ (float64, (2r, 2r) or (r, r)), and the signs c = diag(C).

        C Gq C is built from the blocks directly: C is ±I for one term (so C Gq C = Gq), and for two
        (newer, older) it only negates the cross blocks.
        """
        if len(terms) == 1:
            (t,) = terms
            c = torch.full((t.gram_left.shape[0],), t.sign, dtype=torch.float64, device=self.device)
            return t.gram_left, t.gram_right, c
        a, b = terms
        cross_left, cross_right = self._blocks(a.key, b.key)
        gp = torch.cat([torch.cat([a.gram_left, cross_left], 1), torch.cat([cross_left.T, b.gram_left], 1)])
        minus = -cross_right
        cgqc = torch.cat([torch.cat([a.gram_right, minus], 1), torch.cat([minus.T, b.gram_right], 1)])
        c = torch.ones(gp.shape[0], dtype=torch.float64, device=self.device)
        c[a.gram_left.shape[0] :] = -1.0
        return gp, cgqc, c

    def _gram_route(self, terms: list[_Term]) -> tuple[float, Tensor, Tensor] | None:
        """Top triple from Gram blocks, or None when its error estimate says the QR route must decide."""
        gp, cgqc, c = self._stacked_grams(terms)
        chol, info = torch.linalg.cholesky_ex(gp)
        if int(info) != 0:
            return None
        core = chol.T @ cgqc @ chol  # F C Gq C Fᵀ with F = cholᵀ: (2r, 2r), its eigenvalues are σᵢ²
        # Only the top eigenvector's *direction* is taken from here (float32 eigh is ~1.6× faster and
        # its ε₃₂/gap error is far inside the tolerance); σ is measured afterwards as ‖D v‖ in float64.
        # eigh reads only the lower triangle, so the core needs no symmetrising.
        evals, evecs = torch.linalg.eigh(core.to(torch.float32))
        if not float(evals[-1]) > 0:
            return None
        y = chol @ evecs[:, -1].to(torch.float64)
        w = c * y  # v ∝ Q w
        v = _combine(terms, w, "right")
        v_norm = float(torch.linalg.vector_norm(v))
        if not v_norm > 0:
            return None
        v = v / v_norm
        z = cgqc @ y / v_norm  # C Qᵀ v = C Gq C y / ‖Q w‖, so that D v = P z
        u = _combine(terms, z, "left")
        sigma = float(torch.linalg.vector_norm(u))
        if not sigma > 0:
            return None
        # First-order rounding error of σ² (relative): γ·(κ_p² + κ_q²), κ² = Σ_j w_j²‖q_j‖² / ‖Σ_j w_j q_j‖²
        # the cancellation in forming Q w (and P z). Rounding errors of the Gram entries are
        # independent, so they add in quadrature (ℓ2), like γ = ε·√n itself; the 1e-8 tolerance leaves a
        # margin of 1000× below the 1e-5 target for the cases where they happen to align.
        gamma = _EPS64 * math.sqrt(max(self.rows, self.cols))
        kappa_q2 = float((w.square() * cgqc.diagonal()).sum()) / v_norm**2  # diag(C Gq C) = diag(Gq)
        kappa_p2 = float((z.square() * gp.diagonal()).sum()) / sigma**2
        # Second-order (normwise) term: a perturbation of the whole core of relative size γ·tr·tr/σ².
        normwise = gamma * float(gp.trace()) * float(cgqc.trace()) / sigma**2
        if gamma * (kappa_p2 + kappa_q2) > _GRAM_TOLERANCE or normwise > 1e-4:
            return None
        return sigma, u / sigma, v


def _combine(terms: list[_Term], coeffs: Tensor, side: str) -> Tensor:
    """Σ_j coeffs_j · column_j of the stacked left (``side="left"``) or right factors: (rows,) or (cols,)."""
    out: Tensor | None = None
    start = 0
    for t in terms:
        mat = t.left_t if side == "left" else t.right_t
        part = mat.T @ coeffs[start : start + mat.shape[0]]
        out = part if out is None else out + part
        start += mat.shape[0]
    assert out is not None
    return out


def rank1_of_difference(newer: LowRankFactors | None, older: LowRankFactors | None) -> Rank1:
    """Exact top singular triple of ``newer − older`` (``None`` is a zero delta), from the factors.

    A two-slot :class:`FactorWindow` for one delta; ``extract`` keeps one window per module instead,
    so that each checkpoint's float64 copy and Gram blocks serve every delta it enters. Cost
    O((rows + cols)·r²), memory O((rows + cols)·r). Raises ValueError when both are None, the shapes
    differ (a programming error) or a factor is not finite.
    """
    if newer is None and older is None:
        raise ValueError("rank1_of_difference needs at least one of newer/older")
    if newer is not None and older is not None and newer.shape != older.shape:
        raise ValueError(f"delta shapes differ: {newer.shape} vs {older.shape}")
    some = newer if newer is not None else older
    assert some is not None
    rows, cols = some.shape
    if newer is older:
        return zero_rank1(rows, cols, some.left.device)
    held = [f for f in (newer, older) if f is not None]
    window = FactorWindow(rows, cols, max(f.rank for f in held), len(held), some.left.device)
    keys: list[int | None] = []
    for f in (newer, older):
        if f is None:
            keys.append(None)
        else:
            window.push(len(keys), f)
            keys.append(len(keys))
    return window.rank1(keys[0], keys[1])


def _qr_route(terms: list[_Term]) -> tuple[float, Tensor, Tensor] | None:
    """Top triple from Householder QR of the stacked float64 factors and the SVD of the small core.

    Backward stable column by column. Returns None when σ is below the rounding floor
    8·ε₆₄·Σ_j ‖p_j‖‖q_j‖, i.e. the delta is zero to within float64 arithmetic on the given factors.
    """
    p = torch.cat([t.left_t for t in terms]).T
    q = torch.cat([t.right_t for t in terms]).T
    c = torch.cat(
        [torch.full((t.left_t.shape[0],), t.sign, dtype=torch.float64, device=p.device) for t in terms]
    )
    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q)
    core = (rp * c[None, :]) @ rq.T
    left_vecs, svals, right_vecs_h = torch.linalg.svd(core)
    sigma = float(svals[0])
    floor = (
        8 * _EPS64 * float((torch.linalg.vector_norm(p, dim=0) * torch.linalg.vector_norm(q, dim=0)).sum())
    )
    if not sigma > floor:
        return None
    u = qp @ left_vecs[:, 0]
    v = qq @ right_vecs_h[0]
    return sigma, u / torch.linalg.vector_norm(u), v / torch.linalg.vector_norm(v)


def energy_ratio(f: LowRankFactors) -> float:
    """σ₁ / Σσᵢ of ΔW = left @ right.T (paper §3.2: how much of the update rank-1 captures).

    Exact from QR of the float64 factors and the singular values of the r×r core. NaN for a zero
    delta, where the ratio is undefined.
    """
    _, rp = torch.linalg.qr(f.left.to(torch.float64), mode="r")
    _, rq = torch.linalg.qr(f.right.to(torch.float64), mode="r")
    svals = torch.linalg.svdvals(rp @ rq.T)
    total = float(svals.sum())
    return float(svals[0]) / total if total > 0 else math.nan


def align_sign(r: Rank1, reference_u: Tensor | None) -> Rank1:
    """Flip (u, v) → (−u, −v) so that u·reference_u ≥ 0 (README, "How it works, exactly").

    With no reference, or a zero one, the largest-|u| entry (first on ties) is made positive.
    A zero triple is returned as is. σ u vᵀ is unchanged by the flip.
    """
    if r.is_zero:
        return r
    if reference_u is not None and bool(reference_u.any()):
        dot = float(torch.dot(r.u.double(), reference_u.to(r.u.device, torch.float64)))
        return Rank1(r.sigma, -r.u, -r.v) if dot < 0 else r
    return Rank1(r.sigma, -r.u, -r.v) if float(r.u[int(r.u.abs().argmax())]) < 0 else r
