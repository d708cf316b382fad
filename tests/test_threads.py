"""nexttools.threads: results in order, bounded look-ahead, errors propagate and stop the rest."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from nexttools.threads import cpu_workers, in_order, single_threaded_kernels


def test_results_come_in_order_from_several_threads_with_bounded_look_ahead() -> None:
    started: list[int] = []
    names: set[str] = set()
    lock = threading.Lock()

    def work(item: int) -> int:
        with lock:
            started.append(item)
            names.add(threading.current_thread().name)
        time.sleep(0.01 * (item % 3))  # out-of-order completion
        return item * item

    consumed = []
    for value in in_order(work, range(20), workers=2):
        consumed.append(value)
        if len(consumed) == 1:
            time.sleep(0.2)  # a slow consumer: the workers may not run ahead by more than 2·workers
            with lock:
                assert len(started) <= 1 + 2 * 2
    assert consumed == [i * i for i in range(20)]
    assert len(names) == 2 and all(name.startswith("nexttools") for name in names)


def test_workers_run_torch_single_threaded() -> None:
    seen = list(in_order(lambda _: torch.get_num_threads(), range(4), workers=2))
    assert seen == [1, 1, 1, 1]


def test_an_error_propagates_and_cancels_what_has_not_started() -> None:
    started: list[int] = []

    def work(item: int) -> int:
        started.append(item)
        if item == 3:
            raise ValueError("module 3 is broken")
        time.sleep(0.01)
        return item

    with pytest.raises(ValueError, match="module 3"):
        list(in_order(work, range(100), workers=2))
    assert len(started) < 20  # the rest was cancelled, not computed


def test_one_worker_is_a_plain_loop_and_the_kernel_setting_is_restored() -> None:
    assert list(in_order(lambda x: (x, threading.current_thread().name), [1, 2], workers=1)) == [
        (1, threading.current_thread().name),
        (2, threading.current_thread().name),
    ]
    before = torch.get_num_threads()
    with single_threaded_kernels():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert cpu_workers(torch.device("cuda", 0)) == 1
    assert cpu_workers(torch.device("cpu")) == max(torch.get_num_threads(), 1)
