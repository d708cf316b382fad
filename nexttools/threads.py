"""Per-module work on every CPU core: one worker thread per core, each running torch single-threaded.

Why threads over modules rather than torch's own intra-op threads: ``extract`` does one wide float64
GEMM per (module, checkpoint), which both parallelise well, and thousands of small O(r³) kernels
(Cholesky, eigh of ≤ 128 × 128 cores, GEMVs), which intra-op threads do not speed up at all. Torch
releases the GIL inside its kernels, so two threads on two modules keep both cores busy through the
small kernels too. Running every kernel single-threaded also makes the results independent of the
number of workers (each module is computed by one thread, in one fixed order), and it spawns no
OpenMP team that could spin-wait on a machine shared with other jobs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def cpu_workers(device: torch.device) -> int:
    """Worker threads for per-module work on ``device``: torch's thread count on CPU (which honours
    ``OMP_NUM_THREADS``), one on an accelerator (its kernels are queued on one stream anyway)."""
    return max(torch.get_num_threads(), 1) if device.type == "cpu" else 1


@contextmanager
def single_threaded_kernels() -> Iterator[None]:
    """Run torch's kernels on the calling thread (intra-op threads = 1), restoring the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_order(work: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``work(item)`` for every item, yielded in the items' order, computed by ``workers`` threads.

    At most ``2·workers`` items are in flight or waiting to be consumed, so memory stays at a few
    modules' worth however slow the consumer is. If the consumer stops early (an error, Ctrl-C), the
    items not yet started are cancelled and the running ones finish before this returns.
    """
    if workers <= 1:
        yield from map(work, items)
        return
    pending: deque[Future[R]] = deque()
    # OpenMP's thread count is per thread: a new thread starts from OMP_NUM_THREADS or the core count,
    # whatever the caller set, so each worker sets its own (measured: without it two workers ran
    # four OpenMP threads on two cores, no faster than one worker).
    executor = ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="nexttools", initializer=torch.set_num_threads, initargs=(1,)
    )
    try:
        for item in items:
            pending.append(executor.submit(work, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
