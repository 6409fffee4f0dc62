"""MCMC convergence statistics of sampler traces (R̂, effective sample size, Monte-Carlo standard error), numpy only.

A trace is a (C, T) float array: C chains, T post-burn-in draws (a 1-D array is one chain). References:

- BDA3: Gelman, Carlin, Stern, Dunson, Vehtari & Rubin, "Bayesian Data Analysis", 3rd ed., §11.4 (split-R̂) and
  §11.5 (effective sample size).
- Vehtari, Gelman, Simpson, Carpenter & Bürkner, "Rank-normalization, folding, and localization: an improved R̂ for
  assessing convergence of MCMC", Bayesian Analysis 16(2), 2021 (rank-normalised R̂ and bulk-ESS).
- Stan Reference Manual, "Posterior Analysis" chapter, sections "Potential scale reduction" and "Effective sample
  size" (multi-chain autocorrelation, Geyer's initial positive and monotone sequences, the cap on ESS).
- Geyer, "Practical Markov chain Monte Carlo", Statistical Science 7(4), 1992 (initial sequence estimators).

Which statistic is which:

- `split_rhat`: classic split-R̂ on the raw values (BDA3 §11.4). `rank_rhat`: Vehtari et al.'s rank-normalised
  split-R̂, the larger of the bulk (rank-normalised draws) and tail (rank-normalised folded draws) values.
- `ess`: ESS of the mean of the raw values on split chains (Stan's ess_mean / ess_basic) — the one that gives the
  Monte-Carlo error of the mean. `bulk_ess`: the same estimator on rank-normalised split chains (Vehtari et al.'s
  bulk-ESS; invariant to monotone transformations, not a statement about the error of the mean).
- `mcse_mean`: sqrt(var⁺ / ESS), var⁺ = (n−1)/n·W + B/n on the same split chains as `ess`.

For the local learning coefficient λ̂ = nβ·(mean(trace) − ℓ_n(w*)) of a (C, T) trace of losses, ℓ_n(w*) is a
constant, so the Monte-Carlo standard error of λ̂ is nβ·mcse_mean(trace): `llc_mcse`.

Conventions, the same for every function: non-finite input (nan/inf anywhere) returns nan rather than raising, and
so do finite draws whose variance over- or underflows float64; a trace that is constant overall returns R̂ = 1,
ESS = the number of draws, MCSE = 0; chains that are each constant but at different values return R̂ = inf. Arrays
that are not 1-D or 2-D, or are empty, raise ValueError. No numpy warnings are emitted.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

__all__ = [
    "autocovariance",
    "bulk_ess",
    "ess",
    "llc_mcse",
    "mcse_mean",
    "rank_normalize",
    "rank_rhat",
    "split_chains",
    "split_rhat",
    "summarize",
]

_STD_NORMAL = NormalDist()


def _as_trace(trace: np.ndarray) -> np.ndarray:
    """trace: (C, T) or (T,) → (C, T) float64; ValueError for other shapes or no draws."""
    x = np.asarray(trace, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"a trace is a (C, T) array of C chains and T draws, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"the trace has no draws: shape {x.shape}")
    return x


def split_chains(trace: np.ndarray) -> np.ndarray:
    """Each chain cut into its first and second halves, the middle draw dropped when T is odd (BDA3 §11.4).

    trace: (C, T) → (2C, T // 2), rows [first halves of chains 0..C−1, second halves of chains 0..C−1].
    """
    x = _as_trace(trace)
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half:]], axis=0)


def autocovariance(trace: np.ndarray) -> np.ndarray:
    """Biased autocovariance of each chain, acov_c(t) = (1/T) Σ_{s<T−t} (x_s − x̄)(x_{s+t} − x̄), by zero-padded FFT.

    trace: (C, T) → (C, T); column 0 is each chain's variance with divisor T.
    """
    x = _as_trace(trace)
    T = x.shape[1]
    centred = x - x.mean(axis=1, keepdims=True)
    size = 1 << (2 * T - 1).bit_length()  # ≥ 2T − 1: no circular wrap-around
    f = np.fft.rfft(centred, n=size, axis=1)
    return np.fft.irfft(f * np.conj(f), n=size, axis=1)[:, :T] / T


def _rhat_of(chains: np.ndarray) -> float:
    """Potential scale reduction sqrt(var⁺ / W) of (M, n) chains, var⁺ = (n−1)/n·W + B/n (BDA3 §11.4)."""
    n = chains.shape[1]
    if (chains == chains[:, :1]).all():  # exact test: the mean of equal floats need not equal them
        return 1.0 if (chains == chains.flat[0]).all() else math.inf
    with np.errstate(over="ignore", invalid="ignore"):  # finite draws near the float limit: nan below, not a warning
        W = float(chains.var(axis=1, ddof=1).mean())
        B_over_n = float(chains.mean(axis=1).var(ddof=1))
    if not (math.isfinite(W) and math.isfinite(B_over_n)) or W <= 0:  # over- or underflow
        return math.nan
    return math.sqrt(((n - 1) / n * W + B_over_n) / W)


def split_rhat(trace: np.ndarray) -> float:
    """Classic split-R̂ on the raw values (BDA3 §11.4): R̂ of the 2C half-chains of `split_chains`.

    trace: (C, T). Catches chains that disagree and, through the split, trends within a chain. nan when T < 4 or
    the trace is not finite; 1.0 for a constant trace, inf when the halves are constant at different values.
    """
    x = _as_trace(trace)
    if x.shape[1] < 4 or not np.isfinite(x).all():
        return math.nan
    return _rhat_of(split_chains(x))


def rank_normalize(trace: np.ndarray) -> np.ndarray:
    """Normal scores of the pooled ranks, z = Φ⁻¹((r − 3/8) / (S + 1/4)), ties given their average rank.

    trace: (C, T) → (C, T), S = C·T (Vehtari et al. 2021, with Blom's offset 3/8). Assumes finite input.
    """
    x = _as_trace(trace)
    flat = x.ravel()
    S = flat.size
    order = np.argsort(flat, kind="stable")
    sorted_vals = flat[order]
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])  # first sorted index of each tie group
    ends = np.r_[starts[1:], S]
    avg_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(S)
    ranks[order] = np.repeat(avg_rank, ends - starts)
    u = (ranks - 0.375) / (S + 0.25)
    z = np.array([_STD_NORMAL.inv_cdf(p) for p in u.tolist()])
    return z.reshape(x.shape)


def rank_rhat(trace: np.ndarray) -> float:
    """Rank-normalised split-R̂ (Vehtari et al. 2021): max(bulk-R̂, tail-R̂).

    trace: (C, T). Bulk: split-R̂ of the rank-normalised draws; tail: split-R̂ of the rank-normalised folded draws
    |x − median(x)|, which catches chains that differ in scale only. Invariant to monotone transformations of the
    draws. nan when T < 4 or the trace is not finite; 1.0 for a constant trace.
    """
    x = _as_trace(trace)
    if x.shape[1] < 4 or not np.isfinite(x).all():
        return math.nan
    halves = split_chains(x)
    bulk = _rhat_of(rank_normalize(halves))
    tail = _rhat_of(rank_normalize(np.abs(halves - np.median(halves))))
    return max(bulk, tail)


def _ess_and_var(chains: np.ndarray) -> tuple[float, float]:
    """(ESS, var⁺) of (M, n) finite chains, n ≥ 3, by the multi-chain estimator of the Stan Reference Manual.

    ρ̂_t = 1 − (W − mean_c acov_c(t)) / var⁺ with W the mean within-chain variance (divisor n − 1), acov_c the biased
    autocovariance, var⁺ = (n−1)/n·W + B/n (B/n = 0 for M = 1). τ̂ = −1 + 2 Σ_{k<K} P̂_k + max(ρ̂_{2K}, 0), P̂_k =
    ρ̂_{2k} + ρ̂_{2k+1} made monotone non-increasing (Geyer's initial monotone sequence), K the first pair with
    P̂_K ≤ 0 (initial positive sequence); the lone ρ̂_{2K} term is Stan's. ESS = M·n / max(τ̂, 1/log10(M·n)), i.e.
    capped at M·n·log10(M·n) as in Stan.
    """
    M, n = chains.shape
    total = M * n
    if (chains == chains.flat[0]).all():  # exact test: the variance of equal floats can round to a tiny positive
        return float(total), 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # finite draws near the float limit: nan below, not a warning
        W = float(chains.var(axis=1, ddof=1).mean())
        var_plus = (n - 1) / n * W + (float(chains.mean(axis=1).var(ddof=1)) if M > 1 else 0.0)
        if not math.isfinite(var_plus) or var_plus <= 0:  # over- or underflow
            return math.nan, math.nan
        rho = 1.0 - (W - autocovariance(chains).mean(axis=0)) / var_plus  # (n,)
    if not np.isfinite(rho).all():
        return math.nan, math.nan
    rho[0] = 1.0
    n_pairs = n // 2
    pairs = rho[0:2 * n_pairs:2] + rho[1:2 * n_pairs:2]
    stop = np.flatnonzero(~(pairs > 0))
    K = int(stop[0]) if stop.size else n_pairs
    tau = -1.0 + 2.0 * float(np.minimum.accumulate(pairs[:K]).sum())
    if 2 * K < n and rho[2 * K] > 0:
        tau += float(rho[2 * K])
    tau = max(tau, 1.0 / math.log10(total))
    return total / tau, var_plus


def _chains_for_ess(trace: np.ndarray, split: bool) -> np.ndarray | None:
    """The (M, n) chains the ESS is computed on, or None when the trace is not finite or n < 3."""
    x = _as_trace(trace)
    if not np.isfinite(x).all():
        return None
    chains = split_chains(x) if split else x
    return chains if chains.shape[1] >= 3 else None


def ess(trace: np.ndarray, *, split: bool = True) -> float:
    """Effective sample size of the mean of the raw draws, all chains together (BDA3 §11.5; Stan Reference Manual).

    trace: (C, T). Computed on the 2C half-chains when `split` (Stan's default), else on the C chains; FFT
    autocovariances per chain, the multi-chain ρ̂_t, Geyer's initial positive and monotone sequences, capped at
    N·log10(N), N the number of draws used (see `_ess_and_var`). Works for C = 1. nan when the trace is not finite
    or the chains used have fewer than 3 draws; N for a constant trace.
    """
    chains = _chains_for_ess(trace, split)
    return math.nan if chains is None else _ess_and_var(chains)[0]


def bulk_ess(trace: np.ndarray) -> float:
    """Bulk-ESS (Vehtari et al. 2021): `ess` of the rank-normalised split chains.

    trace: (C, T). Measures mixing in the bulk of the distribution, invariant to monotone transformations; for the
    error of the mean use `ess` / `mcse_mean`. nan when the trace is not finite or T < 6.
    """
    chains = _chains_for_ess(trace, True)
    return math.nan if chains is None else _ess_and_var(rank_normalize(chains))[0]


def mcse_mean(trace: np.ndarray, *, split: bool = True) -> float:
    """Monte-Carlo standard error of the grand mean of the draws: sqrt(var⁺ / ESS) (BDA3 §11.5).

    trace: (C, T). var⁺ = (n−1)/n·W + B/n and ESS = `ess(trace, split=split)`, both on the same chains. Works for
    C = 1. nan when `ess` is nan; 0.0 for a constant trace.
    """
    chains = _chains_for_ess(trace, split)
    if chains is None:
        return math.nan
    n_eff, var_plus = _ess_and_var(chains)
    return math.sqrt(var_plus / n_eff)


def llc_mcse(trace: np.ndarray, nbeta: float) -> float:
    """Monte-Carlo standard error of λ̂ = nβ·(mean(trace) − ℓ_n(w*)) from its (C, T) loss trace: nβ·mcse_mean(trace).

    ℓ_n(w*) is a constant of the estimate, so it adds no Monte-Carlo error.
    """
    return abs(float(nbeta)) * mcse_mean(trace)


def summarize(trace: np.ndarray) -> dict[str, float]:
    """{"rhat": split_rhat, "ess": ess, "mcse": mcse_mean} of a (C, T) trace, split chains throughout."""
    chains = _chains_for_ess(trace, True)
    n_eff, var_plus = (math.nan, math.nan) if chains is None else _ess_and_var(chains)
    return {"rhat": split_rhat(trace), "ess": n_eff, "mcse": math.sqrt(var_plus / n_eff)}
