"""Bayes-optimal and reference predictors, vectorised over positions (docs/papers.md §B).

All take a batch x: (B, K, D), y: (B, K) and return predictions (B, K), where prediction k uses only
(x_<k, y_<k) and x_k. Computations run in float64 and return the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "MAX_CHUNK_BYTES",
    "dmmse_predict",
    "ridge_bayes_risk",
    "ridge_predict",
    "task_prior_predict",
    "zero_predict",
]

MAX_CHUNK_BYTES = 1 << 27  # bound on the (B_chunk, K, M) float64 buffers of dMMSE


def _exclusive_cumsum(t: Tensor, dim: int) -> Tensor:
    """Σ_{j<k} t_j along `dim` (the k-th entry excludes t_k)."""
    return t.cumsum(dim) - t


def zero_predict(x: Tensor, y: Tensor) -> Tensor:
    """The predict-0 baseline (B, K); its loss is E[y²] = ‖w‖² + σ²."""
    return x.new_zeros(x.shape[:-1])


def task_prior_predict(x: Tensor, tasks: Tensor) -> Tensor:
    """The task-prior predictor w̄ᵀx_k with w̄ the pool mean (Hoogland LR1; dMMSE at k = 1). (B, K)."""
    return x @ tasks.mean(0).to(x.dtype)


def dmmse_predict(x: Tensor, y: Tensor, tasks: Tensor, noise_var: float) -> Tensor:
    """Posterior-mean prediction under a uniform prior over the rows of `tasks` (M, D) (Raventós Eq. 2).

    ŵ_k = Σ_i softmax_i(−SSE_i,k / (2σ²)) w_i with SSE_i,k = Σ_{j<k} (y_j − w_iᵀx_j)², computed with
    log-sum-exp. σ² = 0 is the exact limit: the uniform average over the tasks with the smallest SSE (ties
    within a relative tolerance of float rounding), so k = 1 gives the pool mean. Memory is bounded by
    chunking over the batch so that each (B_chunk, K, M) buffer stays under MAX_CHUNK_BYTES.
    """
    if noise_var < 0:
        raise ValueError(f"noise_var must be >= 0, got {noise_var}")
    K, M = x.shape[1], tasks.shape[0]
    return _map_chunks(lambda xc, yc: _dmmse_chunk(xc, yc, tasks, noise_var), x, y, row_bytes=8 * K * M * 3)


def _map_chunks(fn, x: Tensor, y: Tensor, row_bytes: int) -> Tensor:
    """Apply fn(x_chunk, y_chunk) -> (b, K) over batch chunks whose buffers stay under MAX_CHUNK_BYTES."""
    chunk = max(1, MAX_CHUNK_BYTES // max(row_bytes, 1))
    out = [fn(x[i:i + chunk], y[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
    return torch.cat(out).to(x.dtype)


def _dmmse_chunk(x: Tensor, y: Tensor, tasks: Tensor, noise_var: float) -> Tensor:
    x64, y64, t64 = x.double(), y.double(), tasks.to(x.device).double()
    residual = y64.unsqueeze(-1) - x64 @ t64.T  # (b, K, M)
    sse = _exclusive_cumsum(residual.square(), dim=1)  # (b, K, M)
    if noise_var > 0:
        weights = torch.softmax(-sse / (2 * noise_var), dim=-1)
    else:
        # σ² → 0: the posterior concentrates uniformly on the exact minimisers of SSE.
        energy = _exclusive_cumsum(y64.square(), dim=1).unsqueeze(-1)  # scale for the tie tolerance
        best = sse.min(dim=-1, keepdim=True).values
        ties = sse <= best + 1e-9 * (1.0 + energy)
        weights = ties.double() / ties.sum(-1, keepdim=True)
    w_hat = weights @ t64  # (b, K, D)
    return (w_hat * x64).sum(-1)


def ridge_predict(x: Tensor, y: Tensor, lam: float) -> Tensor:
    """Ridge posterior mean under w ~ N(0, I) with λ = σ² (Raventós Eq. 3); λ = 0 is min-norm least squares.

    ŵ_k = (X_<kᵀX_<k + λI)⁻¹ X_<kᵀ Y_<k from prefix sums of x_j x_jᵀ and x_j y_j, one batched solve over all
    (b, k). For λ = 0 the pseudo-inverse of X_<kᵀX_<k (by a batched eigendecomposition) gives X_<k⁺ Y_<k,
    the minimum-norm interpolant. ŵ_1 = 0, so the prediction at k = 1 is 0.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    K, D = x.shape[1:]
    return _map_chunks(lambda xc, yc: _ridge_chunk(xc, yc, lam), x, y, row_bytes=8 * K * D * (3 * D + 2))


def _ridge_chunk(x: Tensor, y: Tensor, lam: float) -> Tensor:
    x64, y64 = x.double(), y.double()
    D = x.shape[-1]
    xtx = _exclusive_cumsum(x64.unsqueeze(-1) * x64.unsqueeze(-2), dim=1)  # (B, K, D, D)
    xty = _exclusive_cumsum(x64 * y64.unsqueeze(-1), dim=1)  # (B, K, D)
    if lam > 0:
        eye = torch.eye(D, dtype=torch.float64, device=x.device)
        w_hat = torch.linalg.solve(xtx + lam * eye, xty.unsqueeze(-1)).squeeze(-1)
    else:
        evals, evecs = torch.linalg.eigh(xtx)
        scale = evals.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        keep = evals > 1e-10 * scale
        inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
        coef = (evecs.transpose(-1, -2) @ xty.unsqueeze(-1)).squeeze(-1) * inv
        w_hat = (evecs @ coef.unsqueeze(-1)).squeeze(-1)
    return (w_hat * x64).sum(-1)


def ridge_bayes_risk(x: Tensor, noise_var: float) -> Tensor:
    """Conditional Bayes risk of ridge at each position given the inputs, under w ~ N(0, I), λ = σ² > 0.

    risk_k = σ² + σ² tr[(X_<kᵀX_<k + σ²I)⁻¹]  (docs/papers.md §B3 [DERIVED]); at k = 1 this is D + σ². (B, K)
    """
    if noise_var <= 0:
        raise ValueError("ridge_bayes_risk needs noise_var > 0")
    x64 = x.double()
    D = x.shape[-1]
    xtx = _exclusive_cumsum(x64.unsqueeze(-1) * x64.unsqueeze(-2), dim=1)
    eye = torch.eye(D, dtype=torch.float64, device=x.device)
    inv = torch.linalg.inv(xtx + noise_var * eye)
    return noise_var + noise_var * inv.diagonal(dim1=-2, dim2=-1).sum(-1)
