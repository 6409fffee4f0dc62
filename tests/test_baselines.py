"""Baselines against naive per-position loops, closed forms and hand-worked cases."""

import math

import pytest
import torch

import icl_lab.baselines as bl
from icl_lab.baselines import dmmse_predict, ridge_bayes_risk, ridge_predict, task_prior_predict, zero_predict


def naive_ridge(x, y, lam):
    B, K, D = x.shape
    out = torch.zeros(B, K, dtype=torch.float64)
    for b in range(B):
        for k in range(1, K):
            X, Y = x[b, :k].double(), y[b, :k].double()
            if lam > 0:
                w = torch.linalg.solve(X.T @ X + lam * torch.eye(D, dtype=torch.float64), X.T @ Y)
            else:
                w = torch.linalg.pinv(X) @ Y  # minimum-norm least squares
            out[b, k] = w @ x[b, k].double()
    return out


def naive_dmmse(x, y, tasks, noise_var):
    B, K, D = x.shape
    out = torch.zeros(B, K, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            sse = torch.tensor([((y[b, :k].double() - x[b, :k].double() @ t.double()) ** 2).sum().item()
                                for t in tasks], dtype=torch.float64)
            if noise_var > 0:
                logw = -sse / (2 * noise_var)
                w = torch.exp(logw - logw.max())
            else:
                w = (sse <= sse.min() + 1e-9).double()
            w = w / w.sum()
            out[b, k] = (w @ tasks.double()) @ x[b, k].double()
    return out


def data(B=6, K=7, D=3, M=5, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = torch.randn(M, D, generator=g)
    idx = torch.randint(0, M, (B,), generator=g)
    x = torch.randn(B, K, D, generator=g)
    y = torch.einsum("bkd,bd->bk", x, tasks[idx]) + noise**0.5 * torch.randn(B, K, generator=g)
    return x, y, tasks


@pytest.mark.parametrize("lam", [0.0, 0.25, 2.0])
def test_ridge_matches_naive_loop(lam):
    x, y, _ = data(noise=0.25)
    assert torch.allclose(ridge_predict(x, y, lam).double(), naive_ridge(x, y, lam), atol=1e-4)


@pytest.mark.parametrize("noise", [0.0, 0.25])
def test_dmmse_matches_naive_loop(noise):
    x, y, tasks = data(noise=noise)
    assert torch.allclose(dmmse_predict(x, y, tasks, noise).double(), naive_dmmse(x, y, tasks, noise), atol=1e-5)


def test_dmmse_chunking_gives_identical_results(monkeypatch):
    x, y, tasks = data(B=40, M=30)
    full = dmmse_predict(x, y, tasks, 0.25)
    monkeypatch.setattr(bl, "MAX_CHUNK_BYTES", 8 * 7 * 30 * 3 * 3)  # three sequences per chunk
    assert torch.equal(dmmse_predict(x, y, tasks, 0.25), full)


def test_dmmse_is_stable_for_tiny_noise():
    x, y, tasks = data(noise=0.0)
    out = dmmse_predict(x, y, tasks, 1e-12)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, dmmse_predict(x, y, tasks, 0.0), atol=1e-5)


def test_first_position_ridge_is_zero_dmmse_is_pool_mean():
    x, y, tasks = data()
    assert torch.equal(ridge_predict(x, y, 0.25)[:, 0], torch.zeros(6))
    assert torch.allclose(dmmse_predict(x, y, tasks, 0.25)[:, 0], task_prior_predict(x, tasks)[:, 0], atol=1e-6)
    assert torch.equal(zero_predict(x, y), torch.zeros(6, 7))


def test_dmmse_m1_has_loss_sigma2_at_every_position():
    noise = 0.3
    x, y, tasks = data(B=40000, K=5, D=3, M=1, noise=noise, seed=1)
    per_token = (dmmse_predict(x, y, tasks, noise) - y).square().mean(0)
    assert torch.allclose(per_token, torch.full((5,), noise), rtol=0.03)


def test_hand_worked_noiseless_m2():
    """σ² = 0, M = 2: k = 1 predicts the pool mean; from k = 2 the task consistent with (x_1, y_1)."""
    tasks = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[[2.0, 3.0], [1.0, 1.0], [-1.0, 4.0]]])
    y = x @ tasks[1]  # the sequence comes from task 2: y = (3, 1, 4)
    pred = dmmse_predict(x, y, tasks, 0.0)
    assert torch.allclose(pred, torch.tensor([[2.5, 1.0, 4.0]]))
    # a context that fits both tasks equally (x_1 on the diagonal) keeps the pool mean
    x_tie = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])
    assert torch.allclose(dmmse_predict(x_tie, x_tie @ tasks[0], tasks, 0.0), torch.tensor([[1.0, 1.0]]))


def test_ridge_risk_formula_and_ols_closed_form():
    D, K, noise = 3, 12, 0.25
    g = torch.Generator().manual_seed(2)
    B = 40000
    w = torch.randn(B, D, generator=g)
    x = torch.randn(B, K, D, generator=g)
    y = torch.einsum("bkd,bd->bk", x, w) + noise**0.5 * torch.randn(B, K, generator=g)
    err = (ridge_predict(x, y, noise).double() - y.double()).square().mean(0)
    risk = ridge_bayes_risk(x, noise).mean(0)
    assert math.isclose(risk[0].item(), D + noise, rel_tol=1e-12)
    assert torch.allclose(err, risk, rtol=0.03)
    # least squares (λ = 0) for k-1 > D+1: risk σ²(1 + D/(k-1-D-1)) (inverse-Wishart mean)
    ols = (ridge_predict(x, y, 0.0).double() - y.double()).square().mean(0)
    for k in range(D + 3, K + 1):
        n = k - 1
        assert math.isclose(ols[k - 1].item(), noise * (1 + D / (n - D - 1)), rel_tol=0.06)


def test_min_norm_least_squares_interpolates_noiseless_data():
    x, y, _ = data(B=4, K=6, D=3, M=1, noise=0.0)
    pred = ridge_predict(x, y, 0.0)
    assert torch.allclose(pred[:, 4:], y[:, 4:], atol=1e-4)  # k-1 >= D: exact
    with pytest.raises(ValueError, match="lam must be >= 0"):
        ridge_predict(x, y, -1.0)
