"""Task pools and batches for in-context linear regression (docs/papers.md §A1-A2).

Every source of randomness has its own generator (:mod:`icl_lab.seeding`). Batches are generated whole, as
tensor ops on the target device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from icl_lab.config import TaskConfig
from icl_lab.seeding import derive_seed as derive_seed  # transitional re-export: callers import from seeding
from icl_lab.seeding import make_generator

__all__ = ["POOL_BLOCK", "Batch", "draw_tasks", "eval_sets", "root_task_batch", "sample_batch", "task_pool"]

POOL_BLOCK = 256  # tasks per independently seeded block of the master sequence


def draw_tasks(family: str, n: int, D: int, generator: torch.Generator, device: str | torch.device = "cpu"
               ) -> Tensor:
    """n fresh tasks (n, D): N(0, I_D) ('gaussian') or that normalised to the unit sphere ('unit_norm')."""
    w = torch.randn(n, D, generator=generator, device=device)
    if family == "unit_norm":
        w = w / w.norm(dim=-1, keepdim=True)
    elif family != "gaussian":
        raise ValueError(f"unknown task family {family!r}; allowed: 'gaussian', 'unit_norm'")
    return w


def task_pool(family: str, M: int, D: int, seed: int, device: str | torch.device = "cpu") -> Tensor:
    """The first M rows of the run's master task sequence (M, D) (Carroll et al. §2, nested pools).

    The sequence is drawn in blocks of POOL_BLOCK rows, block b from its own generator, so pool(M) is exactly
    the prefix of pool(M') for M < M' and every pool holds the root task pool[0].
    """
    blocks = []
    for b in range((M + POOL_BLOCK - 1) // POOL_BLOCK):
        g = make_generator(seed, f"pool/{b}")
        blocks.append(draw_tasks(family, POOL_BLOCK, D, g))
    return torch.cat(blocks)[:M].to(device)


@dataclass
class Batch:
    """x: (B, K, D), y: (B, K), w: (B, D); task_index: (B,) for finite pools, else None."""

    x: Tensor
    y: Tensor
    w: Tensor
    task_index: Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]


def sample_batch(task: TaskConfig, pool: Tensor | None, batch_size: int, generator: torch.Generator) -> Batch:
    """One batch: a task per sequence (uniform from `pool`, or fresh if pool is None), x ~ N(0, I), y = xw + ε.

    Runs on the generator's device. Draw order is fixed (task, x, noise), which keeps streams reproducible.
    """
    device = generator.device
    B, K, D = batch_size, task.K, task.D
    if pool is None:
        idx = None
        w = draw_tasks(task.family, B, D, generator, device)
    else:
        idx = torch.randint(0, pool.shape[0], (B,), generator=generator, device=device)
        w = pool[idx]
    x = torch.randn(B, K, D, generator=generator, device=device)
    y = torch.einsum("bkd,bd->bk", x, w)
    if task.noise_var > 0:
        y = y + task.noise_var**0.5 * torch.randn(B, K, generator=generator, device=device)
    return Batch(x, y, w, idx)


def eval_sets(task: TaskConfig, pool: Tensor | None, size: int, seed: int, device: str | torch.device = "cpu"
              ) -> dict[str, Batch]:
    """The fixed evaluation sets: 'id' (pool tasks, fresh x and noise) and 'ood' (fresh tasks of the family).

    For M = inf the two coincide in distribution; both are still drawn, from different generators.
    """
    return {
        "id": sample_batch(task, pool, size, make_generator(seed, "eval/id", device)),
        "ood": sample_batch(task, None, size, make_generator(seed, "eval/ood", device)),
    }


def root_task_batch(task: TaskConfig, pool: Tensor, size: int, seed: int, device: str | torch.device = "cpu"
                    ) -> Batch:
    """`size` sequences of the root task pool[0] (Carroll et al. §4.2, the joint-PCA input D^(1))."""
    return sample_batch(task, pool[:1], size, make_generator(seed, "eval/root", device))
