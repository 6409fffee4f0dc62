import pytest
import torch

from icl_lab.config import TaskConfig
from icl_lab.tasks import (
    POOL_BLOCK,
    derive_seed,
    draw_tasks,
    eval_sets,
    make_generator,
    root_task_batch,
    sample_batch,
    task_pool,
)


def test_nested_pools_are_prefixes_and_share_the_root_task():
    big = task_pool("gaussian", 700, 8, seed=1)
    for M in (1, 2, 5, 255, 256, 257, 600):
        assert torch.equal(task_pool("gaussian", M, 8, seed=1), big[:M])
    assert not torch.equal(task_pool("gaussian", 4, 8, seed=2), big[:4])


def test_unit_norm_and_gaussian_families():
    g = make_generator(0, "x")
    w = draw_tasks("unit_norm", 1000, 8, g)
    assert torch.allclose(w.norm(dim=-1), torch.ones(1000), atol=1e-6)
    w = draw_tasks("gaussian", 20000, 8, make_generator(0, "y"))
    assert abs(w.square().sum(-1).mean().item() - 8.0) < 0.15  # E‖w‖² = D
    with pytest.raises(ValueError, match="unknown task family 'sphere'"):
        draw_tasks("sphere", 3, 2, g)


def test_seeds_are_label_specific_and_stable():
    # derive_seed's golden values are in test_seeding; here: tasks draw from their own labelled streams
    assert derive_seed(0, "pool/0") != derive_seed(0, "train") != derive_seed(1, "train")
    pool = task_pool("gaussian", 5, 3, seed=7)
    assert torch.equal(pool, draw_tasks("gaussian", POOL_BLOCK, 3, make_generator(7, "pool/0"))[:5])
    with torch.random.fork_rng():  # the global RNG's state does not matter
        torch.manual_seed(1)
        assert torch.equal(task_pool("gaussian", 5, 3, seed=7), pool)
    # drawing from one stream never moves another
    a = make_generator(0, "train")
    b = make_generator(0, "eval/id")
    x1 = torch.randn(3, generator=b)
    torch.randn(100, generator=a)
    b2 = make_generator(0, "eval/id")
    assert torch.equal(torch.randn(3, generator=b2), x1)


def test_batch_shapes_labels_and_noise():
    task = TaskConfig(D=3, K=5, M=4, noise_var=0.25, family="gaussian")
    pool = task_pool(task.family, 4, 3, seed=0)
    b = sample_batch(task, pool, 20000, make_generator(0, "train"))
    assert b.x.shape == (20000, 5, 3) and b.y.shape == (20000, 5) and b.w.shape == (20000, 3)
    assert torch.equal(b.w, pool[b.task_index])
    resid = b.y - torch.einsum("bkd,bd->bk", b.x, b.w)
    assert abs(resid.var().item() - 0.25) < 0.01
    counts = torch.bincount(b.task_index, minlength=4).float() / 20000
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.02)
    noiseless = sample_batch(TaskConfig(D=3, K=5, M=None), None, 8, make_generator(0, "t"))
    assert noiseless.task_index is None
    assert torch.allclose(noiseless.y, torch.einsum("bkd,bd->bk", noiseless.x, noiseless.w))


def test_eval_sets_are_fixed_and_in_or_out_of_distribution():
    task = TaskConfig(D=4, K=6, M=2)
    pool = task_pool(task.family, 2, 4, seed=0)
    s1, s2 = eval_sets(task, pool, 64, seed=0), eval_sets(task, pool, 64, seed=0)
    assert torch.equal(s1["id"].x, s2["id"].x) and torch.equal(s1["ood"].y, s2["ood"].y)
    assert all(any(torch.equal(w, p) for p in pool) for w in s1["id"].w)
    assert not any(torch.allclose(w, p) for w in s1["ood"].w for p in pool)
    root = root_task_batch(task, pool, 16, seed=0)
    assert torch.equal(root.w, pool[:1].expand(16, -1))
