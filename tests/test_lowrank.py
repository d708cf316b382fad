"""The rank-1 engine against float64 ``torch.linalg.svd`` of the dense delta.

Criteria (issue 2): σ relative error ≤ 1e-5, and |u·u_ref|, |v·v_ref| ≥ 1 − 1e-6 when σ₁ is well
separated (σ₂ ≤ 0.9 σ₁, where singular vectors are well defined).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest
import torch

import nexttools.dense_rank1 as dense_rank1
import nexttools.lowrank as lowrank
from nexttools.dense_rank1 import rank1_dense
from nexttools.lowrank import (
    FactorWindow,
    LowRankFactors,
    NonFiniteFactors,
    Rank1,
    align_sign,
    energy_ratio,
    rank1_of_difference,
)

SIGMA_RTOL = 1e-5
VECTOR_TOL = 1e-6
WELL_SEPARATED = 0.9


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These matrices are small: on a shared 2-core box thread hand-offs cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _dense(f: LowRankFactors | None) -> torch.Tensor | None:
    return None if f is None else f.left.double() @ f.right.double().T


def _reference(newer: LowRankFactors | None, older: LowRankFactors | None) -> torch.Tensor:
    dn, do = _dense(newer), _dense(older)
    if dn is None:
        assert do is not None
        return -do
    return dn if do is None else dn - do


def _assert_matches_svd(r: Rank1, delta: torch.Tensor) -> bool:
    """Check r against the float64 SVD of delta; returns whether the vectors were checked."""
    left, svals, right_h = torch.linalg.svd(delta.double(), full_matrices=False)
    assert r.u.dtype == torch.float32 and r.v.dtype == torch.float32
    assert r.u.shape == (delta.shape[0],) and r.v.shape == (delta.shape[1],)
    assert abs(r.sigma - float(svals[0])) <= SIGMA_RTOL * float(svals[0])
    assert abs(float(r.u.double().norm()) - 1) < 1e-6 and abs(float(r.v.double().norm()) - 1) < 1e-6
    # σ u vᵀ's sign is fixed even though (u, v)'s is not: the pair must agree with the SVD's.
    separated = len(svals) == 1 or float(svals[1]) <= WELL_SEPARATED * float(svals[0])
    if separated:
        cu = float(r.u.double() @ left[:, 0])
        cv = float(r.v.double() @ right_h[0])
        assert abs(cu) >= 1 - VECTOR_TOL and abs(cv) >= 1 - VECTOR_TOL
        assert cu * cv > 0
    return separated


def _factors(
    rows: int,
    cols: int,
    rank: int,
    gen: torch.Generator,
    *,
    mix: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> LowRankFactors:
    """Random factors with a decaying spectrum and a dominant first direction; optionally mixed by M.

    ``dtype=torch.bfloat16`` rounds the factors to bf16 (as a bf16 adapter stores them) and returns
    them as float32, as the readers do.
    """
    decay = torch.logspace(0, -2, rank, dtype=torch.float64)
    decay[0] = 3.0
    left = torch.randn(rows, rank, generator=gen, dtype=torch.float64) * decay
    right = torch.randn(cols, rank, generator=gen, dtype=torch.float64) / math.sqrt(cols)
    if mix:
        m = torch.eye(rank, dtype=torch.float64) + mix * torch.randn(
            rank, rank, generator=gen, dtype=torch.float64
        )
        left, right = left @ m, right @ torch.linalg.inv(m).T
    return LowRankFactors(left.to(dtype).float(), right.to(dtype).float())


def _perturbed(f: LowRankFactors, delta: float, gen: torch.Generator, dtype: torch.dtype) -> LowRankFactors:
    """The next checkpoint: every entry moved by ~delta relative to its factor's scale."""
    left = f.left + delta * f.left.std() * torch.randn(f.left.shape, generator=gen)
    right = f.right + delta * f.right.std() * torch.randn(f.right.shape, generator=gen)
    return LowRankFactors(left.to(dtype).float(), right.to(dtype).float())


SHAPES = [
    (1, 7, 1),
    (40, 3, 2),
    (3, 50, 3),
    (257, 64, 8),
    (64, 300, 16),
    (500, 96, 64),
    (96, 700, 64),
    (2, 2, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,cols,rank", SHAPES)
def test_global_delta_matches_dense_svd(rows: int, cols: int, rank: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + cols + rank)
    checked = 0
    for mix in (0.0, 0.3):
        f = _factors(rows, cols, rank, gen, mix=mix, dtype=dtype)
        checked += _assert_matches_svd(rank1_of_difference(f, None), _reference(f, None))
        # A delta given only as "older" is its negative: same σ, same u vᵀ up to the sign of σ u vᵀ.
        checked += _assert_matches_svd(rank1_of_difference(None, f), _reference(None, f))
    assert checked > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("step", [3e-1, 1e-2, 1e-4, 1e-6])
@pytest.mark.parametrize("rows,cols,rank", [(300, 80, 8), (70, 400, 32), (200, 200, 64), (5, 9, 4)])
def test_local_delta_of_nearly_equal_checkpoints(
    rows: int, cols: int, rank: int, step: float, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(rows + 7 * cols + rank)
    older = _factors(rows, cols, rank, gen, mix=0.3, dtype=dtype)
    newer = _perturbed(older, step, gen, dtype)
    reference = _reference(newer, older)
    r = rank1_of_difference(newer, older)
    if not bool(reference.any()):  # bf16 rounding can undo a tiny step entirely
        assert r.is_zero
        return
    _assert_matches_svd(r, reference)


@pytest.mark.parametrize("rows,cols,rank", [(320, 90, 16), (60, 410, 64), (128, 128, 1)])
def test_target_delta_between_distant_checkpoints(rows: int, cols: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(rows * cols + rank)
    earlier = _factors(rows, cols, rank, gen, mix=0.3)
    later = _factors(rows, cols, rank, gen, mix=0.3)
    _assert_matches_svd(rank1_of_difference(later, earlier), _reference(later, earlier))


def test_nearly_equal_checkpoints_take_the_exact_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Gram route must hand strongly cancelling differences to QR (its error estimate works)."""
    gen = torch.Generator().manual_seed(5)
    older = _factors(150, 120, 16, gen)
    routes: list[str] = []
    qr_route = lowrank._qr_route
    monkeypatch.setattr(lowrank, "_qr_route", lambda terms: routes.append("qr") or qr_route(terms))
    for step, expected in ((1e-1, []), (1e-7, ["qr"])):
        routes.clear()
        newer = _perturbed(older, step, gen, torch.float32)
        _assert_matches_svd(rank1_of_difference(newer, older), _reference(newer, older))
        assert routes == expected


def test_one_factor_unchanged_is_exact() -> None:
    """Same B, new A: the stacked left Gram is exactly singular (Cholesky fails) and QR decides."""
    gen = torch.Generator().manual_seed(6)
    older = _factors(90, 60, 8, gen)
    newer = LowRankFactors(
        older.left.clone(), older.right + 0.1 * torch.randn(older.right.shape, generator=gen)
    )
    _assert_matches_svd(rank1_of_difference(newer, older), _reference(newer, older))


def test_ranks_may_differ_between_checkpoints() -> None:
    gen = torch.Generator().manual_seed(7)
    a, b = _factors(100, 70, 8, gen), _factors(100, 70, 24, gen)
    _assert_matches_svd(rank1_of_difference(a, b), _reference(a, b))


@pytest.mark.parametrize("rank", [1, 4, 32])
def test_non_unique_factors_give_the_same_triple(rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    base = _factors(220, 130, rank, gen)
    m = torch.eye(rank, dtype=torch.float64) + 0.5 * torch.randn(
        rank, rank, generator=gen, dtype=torch.float64
    )
    mixed = LowRankFactors(
        (base.left.double() @ m).float(), (base.right.double() @ torch.linalg.inv(m).T).float()
    )
    r1, r2 = rank1_of_difference(base, None), rank1_of_difference(mixed, None)
    _assert_matches_svd(r2, _reference(mixed, None))
    # The two products agree to float32 rounding of the mixed factors, so the triples do too.
    assert abs(r1.sigma - r2.sigma) <= 1e-5 * r1.sigma
    assert abs(float(r1.u @ r2.u)) >= 1 - 1e-6 and abs(float(r1.v @ r2.v)) >= 1 - 1e-6
    assert float(r1.u @ r2.u) * float(r1.v @ r2.v) > 0


def test_zero_deltas() -> None:
    gen = torch.Generator().manual_seed(8)
    f = _factors(40, 30, 4, gen)
    fresh = LowRankFactors(torch.zeros(40, 4), torch.randn(30, 4, generator=gen))  # PEFT's B = 0
    copy = LowRankFactors(f.left.clone(), f.right.clone())
    for r in (
        rank1_of_difference(fresh, None),
        rank1_of_difference(None, fresh),
        rank1_of_difference(f, f),
        rank1_of_difference(copy, f),
        # Different factors, identical product (a scale moved between them): zero, not rounding noise.
        rank1_of_difference(LowRankFactors(f.left * 2, f.right / 2), f),
    ):
        assert r.sigma == 0 and r.is_zero
        assert r.u.shape == (40,) and r.v.shape == (30,) and r.u.dtype == torch.float32
        assert not r.u.any() and not r.v.any()
    # Against a fresh adapter the difference is the other checkpoint's whole delta.
    _assert_matches_svd(rank1_of_difference(f, fresh), _reference(f, None))
    with pytest.raises(ValueError):
        rank1_of_difference(None, None)
    with pytest.raises(ValueError):
        rank1_of_difference(f, _factors(41, 30, 4, gen))


def _inner(a: LowRankFactors, b: LowRankFactors) -> float:
    da, db = _dense(a), _dense(b)
    assert da is not None and db is not None
    return float((da * db).sum())


def test_a_sliding_window_gives_every_delta_and_inner_product_exactly() -> None:
    """extract's access pattern: hold k+2 checkpoints, drop the oldest, push the next; ranks differ."""
    gen = torch.Generator().manual_seed(9)
    k = 3
    steps = [_factors(120, 80, 16, gen, mix=0.3)]
    for i in range(8):
        nxt = _perturbed(steps[-1], 0.05, gen, torch.float32)
        if i == 4:  # a checkpoint of lower rank (the window pads its slot)
            nxt = LowRankFactors(nxt.left[:, :12].contiguous(), nxt.right[:, :12].contiguous())
        steps.append(nxt)
    window = FactorWindow(120, 80, max_rank=16, slots=k + 2)
    for n, f in enumerate(steps):
        for stale in [i for i in range(n) if i < n - k - 1 and i in window]:
            window.drop(stale)
        window.push(n, f)
        assert len(window) == min(n + 1, k + 2)
        for lag in range(min(n, k + 1) + 1):
            expected = _inner(f, steps[n - lag])
            assert window.inner(n, n - lag) == pytest.approx(expected, rel=1e-12)
            assert window.inner(n - lag, n) == window.inner(n, n - lag)
        _assert_matches_svd(window.rank1(n, None), _reference(f, None))
        _assert_matches_svd(window.rank1(None, n), _reference(None, f))
        if n:
            _assert_matches_svd(window.rank1(n, n - 1), _reference(f, steps[n - 1]))
        if n >= k:
            _assert_matches_svd(window.rank1(n, n - k), _reference(f, steps[n - k]))
    held = window.factors(len(steps) - 1)
    assert torch.equal(held.left, steps[-1].left.double()) and torch.equal(
        held.right, steps[-1].right.double()
    )


def test_a_window_started_mid_run_gives_the_same_bits() -> None:
    """An incremental extract starts its window k+1 checkpoints before the first new one: every
    quantity of the new checkpoints must equal, bit for bit, what a window slid from the first
    checkpoint gives, so that the store is byte-identical to a fresh one."""
    # Measured on this machine's MKL: with slots taken first-free, these shapes differed in the last bits.
    rows, cols, rank, k, first_new = 1536, 256, 8, 3, 5
    gen = torch.Generator().manual_seed(3)
    steps = [_factors(rows, cols, rank, gen, mix=0.3)]
    for _ in range(7):
        steps.append(_perturbed(steps[-1], 0.05, gen, torch.float32))

    def new_rows(first: int) -> list[torch.Tensor]:
        window, seen = FactorWindow(rows, cols, max_rank=rank, slots=k + 2), []
        for n in range(first, len(steps)):
            for stale in [i for i in range(first, n) if i < n - k - 1 and i in window]:
                window.drop(stale)
            window.push(n, steps[n])
            if n >= first_new:
                inner = [window.inner(n, n - lag) for lag in range(k + 2)]
                seen.append(torch.tensor(inner))
                for triple in (window.rank1(n, None), window.rank1(n, n - 1), window.rank1(n, n - k)):
                    sigma = torch.tensor([triple.sigma])
                    seen.append(torch.cat([sigma, triple.u.double(), triple.v.double()]))
        return seen

    for slid, started in zip(new_rows(0), new_rows(first_new - k - 1), strict=True):
        assert torch.equal(slid, started)


def test_the_window_refuses_misuse_and_non_finite_factors() -> None:
    gen = torch.Generator().manual_seed(10)
    window = FactorWindow(50, 40, max_rank=4, slots=2)
    window.push(0, _factors(50, 40, 4, gen))
    with pytest.raises(ValueError, match="already held"):
        window.push(0, _factors(50, 40, 4, gen))
    with pytest.raises(ValueError, match="do not fit"):
        window.push(1, _factors(50, 40, 5, gen))
    with pytest.raises(ValueError, match="do not fit"):
        window.push(1, _factors(51, 40, 4, gen))
    for bad in (math.nan, math.inf):
        broken = _factors(50, 40, 4, gen)
        broken.right[7, 2] = bad
        with pytest.raises(NonFiniteFactors):
            window.push(1, broken)
        assert 1 not in window and len(window) == 1  # nothing held, the slot is still free
    window.push(1, _factors(50, 40, 4, gen))
    with pytest.raises(ValueError, match="full"):
        window.push(2, _factors(50, 40, 4, gen))
    window.drop(0)
    later = _factors(50, 40, 4, gen)
    window.push(2, later)  # the freed slot is reused, and the stale blocks of key 0 are gone
    _assert_matches_svd(window.rank1(2, None), _reference(later, None))
    with pytest.raises(KeyError):
        window.inner(2, 0)


def test_never_materialises_rows_by_cols() -> None:
    """A (200000 × 64)·(64 × 150000) delta would need 120 GB dense; from the factors it is quick."""
    gen = torch.Generator().manual_seed(11)
    rows, cols, rank = 200_000, 150_000, 64
    older = LowRankFactors(torch.randn(rows, rank, generator=gen), torch.randn(cols, rank, generator=gen))
    older.left[:, 0] *= 3  # a well-separated σ₁
    newer = LowRankFactors(older.left * 1.01 + 0.01 * torch.randn(rows, rank, generator=gen), older.right)
    start = time.perf_counter()
    g = rank1_of_difference(newer, None)
    d = rank1_of_difference(newer, older)
    assert time.perf_counter() - start < 60
    # Check against what is cheap to know exactly: newer − older = ΔL Rᵀ (R is shared), so the
    # singular values follow from two small QRs in float64, and the vectors from the residuals
    # ‖D v − σ u‖ and ‖Dᵀu − σ v‖, evaluated through the factors.
    right = older.right.double()
    r_right = torch.linalg.qr(right, mode="r")[1]
    for r, left in ((g, newer.left.double()), (d, newer.left.double() - older.left.double())):
        svals = torch.linalg.svdvals(torch.linalg.qr(left, mode="r")[1] @ r_right.T)
        assert abs(r.sigma - float(svals[0])) <= SIGMA_RTOL * float(svals[0])
        assert float(svals[1]) <= WELL_SEPARATED * float(svals[0])
        u, v = r.u.double(), r.v.double()
        assert float((left @ (right.T @ v) - r.sigma * u).norm()) <= 1e-6 * r.sigma
        assert float((right @ (left.T @ u) - r.sigma * v).norm()) <= 1e-6 * r.sigma


def _with_spectrum(rows: int, cols: int, svals: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = len(svals)
    q_left, _ = torch.linalg.qr(torch.randn(rows, n, generator=gen, dtype=torch.float64))
    q_right, _ = torch.linalg.qr(torch.randn(cols, n, generator=gen, dtype=torch.float64))
    return ((q_left * svals) @ q_right.T).float()


@pytest.mark.parametrize(
    "rows,cols,ratio",
    [(600, 300, 2.0), (300, 700, 1.2), (500, 500, 1.01), (1000, 200, 1.0001)],
)
def test_dense_subspace_iteration_matches_svd(rows: int, cols: int, ratio: float) -> None:
    """Chosen spectra: σ₁/σ₂ = ratio, then a slow decay (a noisy full-weight update)."""
    n = min(rows, cols)
    tail = torch.linspace(1.0, 0.05, n - 1, dtype=torch.float64) ** 2
    svals = torch.cat([torch.tensor([ratio], dtype=torch.float64), tail])
    delta = _with_spectrum(rows, cols, svals, seed=rows + cols)
    r = rank1_dense(delta)
    _assert_matches_svd(r, delta)
    again = rank1_dense(delta)
    assert again.sigma == r.sigma and torch.equal(again.u, r.u)  # fixed seed: deterministic
    if ratio >= 1.2:  # separated: the vectors are defined and must agree with the SVD's
        left, _, right_h = torch.linalg.svd(delta.double())
        assert abs(float(r.u.double() @ left[:, 0])) >= 1 - VECTOR_TOL
        assert abs(float(r.v.double() @ right_h[0])) >= 1 - VECTOR_TOL


def test_dense_small_and_zero_and_bf16() -> None:
    gen = torch.Generator().manual_seed(12)
    small = torch.randn(50, 20, generator=gen)
    _assert_matches_svd(rank1_dense(small), small)
    zero = rank1_dense(torch.zeros(300, 200, dtype=torch.bfloat16))
    assert zero.is_zero and zero.u.shape == (300,) and not zero.u.any() and not zero.v.any()
    half = _with_spectrum(400, 300, torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64), 3).bfloat16()
    _assert_matches_svd(rank1_dense(half), half.float())


def test_dense_falls_back_to_svd_when_not_converged(monkeypatch: pytest.MonkeyPatch) -> None:
    delta = _with_spectrum(400, 300, torch.linspace(1.0, 0.9, 60, dtype=torch.float64), 4)
    calls: list[int] = []
    svd = dense_rank1._rank1_svd
    monkeypatch.setattr(dense_rank1, "_DENSE_MAX_STEPS", 1)
    monkeypatch.setattr(dense_rank1, "_rank1_svd", lambda a: calls.append(1) or svd(a))
    _assert_matches_svd(rank1_dense(delta), delta)
    assert calls == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dense_runs_on_the_tensors_device() -> None:
    delta = _with_spectrum(2000, 1500, torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64), 5)
    r = rank1_dense(delta.cuda())
    assert r.u.is_cuda and r.v.is_cuda
    _assert_matches_svd(Rank1(r.sigma, r.u.cpu(), r.v.cpu()), delta)


def test_align_sign_rules() -> None:
    u = torch.tensor([0.6, -0.8, 0.0])
    v = torch.tensor([1.0, 0.0])
    r = Rank1(2.0, u, v)
    flipped = align_sign(r, torch.tensor([-1.0, 0.0, 0.0]))
    assert torch.equal(flipped.u, -u) and torch.equal(flipped.v, -v) and flipped.sigma == 2.0
    assert align_sign(r, torch.tensor([1.0, 0.0, 0.0])) is r
    assert align_sign(r, torch.tensor([0.0, 0.0, 1.0])) is r  # orthogonal: u·ref = 0 ≥ 0 already
    # No reference, or a zero one (the previous G was zero): largest |u| entry made positive.
    for ref in (None, torch.zeros(3)):
        aligned = align_sign(r, ref)
        assert torch.equal(aligned.u, -u) and torch.equal(aligned.v, -v)
    tie = Rank1(1.0, torch.tensor([-0.5, 0.5, 0.5, -0.5]), torch.tensor([1.0]))
    assert float(align_sign(tie, None).u[0]) > 0  # ties: the first largest entry
    zero = Rank1(0.0, torch.zeros(3), torch.zeros(2))
    assert align_sign(zero, None) is zero


def test_aligned_trajectory_has_no_sign_flips() -> None:
    """Consecutive G's of a slowly moving adapter, aligned as DESIGN.md says, never flip."""
    gen = torch.Generator().manual_seed(13)
    steps = [_factors(80, 60, 8, gen, mix=0.3)]
    for _ in range(6):
        steps.append(_perturbed(steps[-1], 0.02, gen, torch.float32))
    previous: torch.Tensor | None = None
    for f in steps:
        g = align_sign(rank1_of_difference(f, None), previous)
        if previous is not None:
            assert float(g.u @ previous) > 0.9
        previous = g.u


@pytest.mark.parametrize("rows,cols,rank", [(100, 60, 1), (90, 200, 12), (64, 64, 64)])
def test_energy_ratio_matches_dense_svd(rows: int, cols: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(rows + cols + rank)
    f = _factors(rows, cols, rank, gen, mix=0.3)
    svals = torch.linalg.svdvals(_reference(f, None))
    assert energy_ratio(f) == pytest.approx(float(svals[0] / svals.sum()), rel=1e-6)
    assert math.isnan(energy_ratio(LowRankFactors(torch.zeros(5, 2), torch.ones(4, 2))))


def test_factor_shapes_are_checked() -> None:
    with pytest.raises(ValueError):
        LowRankFactors(torch.zeros(5, 2), torch.zeros(4, 3))
    f = LowRankFactors(torch.zeros(5, 2), torch.zeros(4, 2))
    assert f.shape == (5, 4) and f.rank == 2
