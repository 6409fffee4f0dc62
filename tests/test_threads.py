"""icl_lab.threads: the even split against numpy's, and thread counts restored."""

import numpy as np
import torch

from icl_lab.threads import split_evenly, thread_pool, torch_threads


def test_split_evenly_matches_numpy_array_split():
    for n in range(1, 12):
        for parts in range(1, n + 1):
            assert split_evenly(n, parts) == [a.tolist() for a in np.array_split(np.arange(n), parts)]


def test_pool_threads_split_the_callers_threads_and_counts_are_restored():
    before = torch.get_num_threads()
    with torch_threads(4):
        with thread_pool(2, "t") as pool:
            assert list(pool.map(lambda _: torch.get_num_threads(), range(2))) == [2, 2]
        assert torch.get_num_threads() == 4
    assert torch.get_num_threads() == before
