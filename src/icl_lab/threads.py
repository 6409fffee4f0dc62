"""How many CPU threads torch uses, and thread pools whose threads each use fewer.

The models here are small: at minibatch 32-256 one forward + backward keeps one core busy and a second one poorly
(its matmuls and attention kernels are too small to split well). So where there is independent work (ensemble
members, LLC chains), the cores go further on separate pieces of it, one intra-op thread each, than on every op
together. torch's thread count is per OS thread (OpenMP and MKL keep it thread-locally), so each pool thread sets
its own; setting it also changes torch's process-wide default for threads started later, which is restored when
the pool closes.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

__all__ = ["split_evenly", "thread_pool", "torch_threads"]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads on this thread, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def thread_pool(workers: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """A pool of `workers` threads that split this thread's torch threads between them (at least one each)."""
    before = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=torch.set_num_threads,
                              initargs=(max(1, before // workers),))
    try:
        yield pool
    finally:
        pool.shutdown()
        torch.set_num_threads(before)


def split_evenly(n: int, parts: int) -> list[list[int]]:
    """0..n-1 in `parts` contiguous runs whose lengths differ by at most one (longer ones first)."""
    q, r = divmod(n, parts)
    bounds = [i * q + min(i, r) for i in range(parts + 1)]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]
