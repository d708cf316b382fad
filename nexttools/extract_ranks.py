"""The modules of an ``extract`` split across torchrun ranks, and gathered in order on rank 0.

Rank ``r`` computes modules ``r, r + N, r + 2N, ...`` (:meth:`Ranks.mine`), each with the same code
and single-threaded kernels as a one-process run, so every row is bit-identical to it. The modules
go in rounds of N: in each, every rank computes its module, all ranks check together that none
failed (:func:`~nexttools.ranks.together`), and the others send theirs to rank 0, which yields the
round in module order to the one store writer. Memory on rank 0 is therefore a round of modules,
and no rank is more than one round ahead of another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from nexttools.ranks import Ranks, together
from nexttools.store import KINDS, DeltaArrays, DeltaKind
from nexttools.threads import in_order

# One module's rows per kind and Gram band (None when the store is up to date) and energy ratio.
ModuleResult = tuple[dict[DeltaKind, DeltaArrays] | None, np.ndarray | None, float | None]


def module_results(
    one_module: Callable[[int], ModuleResult],
    shapes: tuple[tuple[int, int], ...],
    checkpoints: int,
    lags: int,
    *,
    with_rows: bool,
    ranks: Ranks,
    workers: int,
) -> Iterator[ModuleResult]:
    """``one_module(j)`` for every module ``j`` in order, on rank 0; nothing on the other ranks.

    ``shapes`` are the modules' (out, in), ``checkpoints`` and ``lags`` the rows' and the Gram band's
    lengths: with them rank 0 knows the size of what it receives. ``with_rows``: the results carry
    rows and a band (else only the energy ratio).
    """
    count = len(shapes)
    mine = in_order(one_module, ranks.mine(count), workers)
    for start in range(0, count, ranks.world):
        index = start + ranks.rank
        result: ModuleResult | None = None
        with together(ranks):
            if index < count:
                result = next(mine)
        if not ranks.writer:
            if result is not None:
                ranks.send(_arrays(result, with_rows), to=0)
            continue
        for j in range(start, min(start + ranks.world, count)):
            if j == index:
                assert result is not None
                yield result
            else:
                layout = _layout(shapes[j], checkpoints, lags, with_rows)
                yield _result(ranks.receive(layout, source=ranks.owner(j)), with_rows)


def _layout(
    shape: tuple[int, int], checkpoints: int, lags: int, with_rows: bool
) -> list[tuple[tuple[int, ...], np.dtype]]:
    """The (shape, dtype) of every array :func:`_arrays` sends for one module, in order."""
    layout: list[tuple[tuple[int, ...], np.dtype]] = [((1,), np.dtype(np.float64))]
    if with_rows:
        out_dim, in_dim = shape
        f32 = np.dtype(np.float32)
        for _kind in KINDS:
            layout += [((checkpoints,), f32), ((checkpoints, out_dim), f32), ((checkpoints, in_dim), f32)]
        layout.append(((checkpoints, lags), np.dtype(np.float64)))
    return layout


def _arrays(result: ModuleResult, with_rows: bool) -> list[np.ndarray]:
    """One module's result as flat arrays: the energy ratio (NaN for none), then rows and band."""
    rows, gram, energy = result
    arrays = [np.array([np.nan if energy is None else energy], dtype=np.float64)]
    if with_rows:
        assert rows is not None and gram is not None
        for kind in KINDS:
            arrays += [rows[kind].sigma, rows[kind].u, rows[kind].v]
        arrays.append(gram)
    return arrays


def _result(arrays: list[np.ndarray], with_rows: bool) -> ModuleResult:
    """The inverse of :func:`_arrays`."""
    energy = float(arrays[0][0])
    if not with_rows:
        return None, None, energy
    rows = {kind: DeltaArrays(*arrays[1 + 3 * i : 4 + 3 * i]) for i, kind in enumerate(KINDS)}
    return rows, arrays[-1], energy
