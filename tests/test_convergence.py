"""Convergence statistics (convergence.py) against closed forms and independent implementations.

Reference values:
- stationary AR(1), x_t = φ x_{t−1} + sqrt(1 − φ²) e_t, x_0 ~ N(0, 1): ρ_t = φ^t, so the integrated autocorrelation
  time is τ = 1 + 2 Σ_{t≥1} φ^t = (1 + φ)/(1 − φ) and ESS ≈ C·T/τ; Var(mean of T draws) =
  [τ − 2φ(1 − φ^T)/(T(1 − φ)²)] / T.
- sampling error of the ESS estimate: Var(τ̂)/τ² ≈ 2(2M + 1)/N for a window of M lags over N draws (Sokal, "Monte
  Carlo methods in statistical mechanics", 1997); Geyer's window grows with τ, so the tolerances below are
  set per φ at about 4 standard deviations of ESS/(C·T/τ) over seeds, with T chosen to keep them near 10-15%.
- split-R̂ of (C, T) equals the plain Gelman-Rubin R̂ of the (2C, T/2) half-chains (BDA3 §11.4).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from icl_lab.convergence import (
    autocovariance,
    bulk_ess,
    ess,
    llc_mcse,
    mcse_mean,
    rank_normalize,
    rank_rhat,
    split_chains,
    split_rhat,
    summarize,
)


def ar1(phi: float, shape: tuple[int, ...], T: int, rng: np.random.Generator) -> np.ndarray:
    """Stationary AR(1) chains with unit marginal variance: (*shape, T)."""
    e = rng.standard_normal((T, *shape))
    x = np.empty_like(e)
    x[0] = e[0]
    s = math.sqrt(1 - phi * phi)
    for t in range(1, T):
        x[t] = phi * x[t - 1] + s * e[t]
    return np.moveaxis(x, 0, -1)


def gelman_rubin(trace: np.ndarray) -> float:
    """Plain (non-split) Gelman-Rubin R̂, written out from BDA3 §11.4: (C, T) → float."""
    C, T = trace.shape
    means = [sum(row) / T for row in trace.tolist()]
    grand = sum(means) / C
    B = T / (C - 1) * sum((m - grand) ** 2 for m in means)
    W = sum(sum((v - m) ** 2 for v in row) / (T - 1) for row, m in zip(trace.tolist(), means, strict=True)) / C
    return math.sqrt(((T - 1) / T * W + B / T) / W)


# --- effective sample size ----------------------------------------------------------------------------------------

# (φ, T, tolerance on ESS/(C·T/τ)): sd of that ratio over 300 seeds measured 0.023 (φ = 0, T = 5000),
# 0.028 (φ = 0.5, T = 10000), 0.036 (φ = 0.9, T = 40000); each tolerance is about 4 of them. The lower tail is
# heavier than a normal one (a long initial positive sequence by chance): for φ = 0, 0.2% of 2000 seeds fall outside.
AR1_CASES = [(0.0, 5_000, 0.10), (0.5, 10_000, 0.12), (0.9, 40_000, 0.15)]


def ess_ratio(phi: float, T: int, seed: int, C: int = 4) -> float:
    """ESS of C stationary AR(1) chains over its closed form C·T/τ."""
    tau = (1 + phi) / (1 - phi)
    return ess(ar1(phi, (C,), T, np.random.default_rng(seed))) / (C * T / tau)


@pytest.mark.parametrize(("phi", "T", "tol"), AR1_CASES)
def test_ess_matches_ar1_closed_form(phi, T, tol):
    assert ess_ratio(phi, T, seed=0) == pytest.approx(1.0, abs=tol)


def test_bulk_ess_of_gaussian_ar1_and_invariance():
    x = ar1(0.5, (4,), 10_000, np.random.default_rng(1))
    # the rank normal scores of Gaussian draws are nearly the draws themselves
    assert bulk_ess(x) == pytest.approx(4 * 10_000 / 3, rel=0.12)
    assert bulk_ess(np.exp(x)) == bulk_ess(x)  # ranks only
    assert rank_rhat(np.exp(x)) == rank_rhat(x)


def test_single_chain():
    x = np.random.default_rng(2).standard_normal(20_000)  # same N as the φ = 0 case above: same sd of ESS/N
    assert ess(x) == pytest.approx(20_000, rel=0.10)
    assert ess(x[None, :]) == ess(x)
    assert mcse_mean(x) == pytest.approx(1 / math.sqrt(20_000), rel=0.10)
    assert split_rhat(x) < 1.01  # split-R̂ is defined for one chain: its two halves


def test_ess_cap_for_antithetic_chains():
    """ρ_1 ≈ −1 makes τ̂ ≤ 0; the estimate stops at N·log10(N) (Stan's cap)."""
    x = np.tile([1.0, -1.0], (2, 50)) + 1e-3 * np.random.default_rng(3).standard_normal((2, 100))
    N = 2 * 100
    assert ess(x) == pytest.approx(N * math.log10(N))


def test_autocovariance_against_direct_sum():
    x = np.random.default_rng(4).standard_normal((3, 37))
    T = x.shape[1]
    c = x - x.mean(axis=1, keepdims=True)
    direct = np.array([[np.dot(row[: T - t], row[t:]) / T for t in range(T)] for row in c])
    np.testing.assert_allclose(autocovariance(x), direct, atol=1e-12)
    signal = pytest.importorskip("scipy.signal")
    for row, got in zip(c, autocovariance(x), strict=True):
        full = signal.correlate(row, row, mode="full", method="direct") / T  # lags −(T−1)..T−1
        np.testing.assert_allclose(got, full[T - 1:], atol=1e-12)


def test_rank_normalize_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(5).integers(0, 20, size=(3, 40)).astype(float)  # many ties
    S = x.size
    want = stats.norm.ppf((stats.rankdata(x, method="average") - 0.375) / (S + 0.25)).reshape(x.shape)
    np.testing.assert_allclose(rank_normalize(x), want, atol=1e-12)


# --- Monte-Carlo standard error -----------------------------------------------------------------------------------


@pytest.mark.parametrize("phi", [0.5, 0.9])
def test_mcse_matches_spread_of_grand_means(phi):
    """400 replications of 4 AR(1) chains: mean MCSE vs the sd of the grand means (relative sd of that sd ≈
    1/sqrt(2·399) = 3.5%, so 15% is 4 sd) and vs the exact sd of the grand mean (mean of 400 MCSEs: < 1% noise)."""
    C, T, R = 4, 2_000, 400
    X = ar1(phi, (R, C), T, np.random.default_rng(6))
    mcse = np.array([mcse_mean(x) for x in X])
    spread = X.mean(axis=(1, 2)).std(ddof=1)
    tau = (1 + phi) / (1 - phi)
    exact = math.sqrt((tau - 2 * phi * (1 - phi**T) / (T * (1 - phi) ** 2)) / T / C)
    assert mcse.mean() == pytest.approx(spread, rel=0.15)
    assert mcse.mean() == pytest.approx(exact, rel=0.05)


def test_llc_mcse_and_summarize():
    x = ar1(0.9, (4,), 2_000, np.random.default_rng(7))
    s = summarize(x)
    assert set(s) == {"rhat", "ess", "mcse"}
    assert s == {"rhat": split_rhat(x), "ess": ess(x), "mcse": mcse_mean(x)}
    assert llc_mcse(x, nbeta=250.0) == pytest.approx(250.0 * s["mcse"])
    assert s["mcse"] == pytest.approx(math.sqrt(19 / (4 * 2_000)), rel=0.25)


# --- R̂ ------------------------------------------------------------------------------------------------------------


def test_split_rhat_is_gelman_rubin_of_halves():
    x = np.random.default_rng(8).standard_normal((3, 41))  # odd T: the middle draw is dropped
    halves = split_chains(x)
    assert halves.shape == (6, 20)
    np.testing.assert_array_equal(halves[:3], x[:, :20])
    np.testing.assert_array_equal(halves[3:], x[:, 21:])
    assert split_rhat(x) == pytest.approx(gelman_rubin(halves), rel=1e-12)


def test_rhat_well_mixed():
    x = np.random.default_rng(9).standard_normal((4, 5_000))
    assert split_rhat(x) < 1.01
    assert rank_rhat(x) < 1.01


def test_rhat_shifted_chain():
    x = np.random.default_rng(10).standard_normal((4, 2_000))
    x[2] += 2.0
    assert split_rhat(x) > 1.1
    assert rank_rhat(x) > 1.1
    assert gelman_rubin(x) > 1.1


def test_split_rhat_catches_a_shared_trend_plain_rhat_misses():
    """All chains drift together (a sampler still moving): equal chain means, so plain R̂ ≈ 1; the halves differ."""
    C, T = 4, 2_000
    x = np.random.default_rng(11).standard_normal((C, T)) + np.linspace(-1.5, 1.5, T)
    assert gelman_rubin(x) < 1.01
    assert split_rhat(x) > 1.1


def test_rank_rhat_catches_a_scale_difference_split_rhat_misses():
    x = np.random.default_rng(12).standard_normal((4, 2_000))
    x[3] *= 4.0  # same mean, so split-R̂ sees nothing; the folded draws |x − median| differ
    assert split_rhat(x) < 1.01
    assert rank_rhat(x) > 1.1


# --- edge cases ---------------------------------------------------------------------------------------------------


def test_constant_trace_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = np.full((3, 10), 0.7)
        assert split_rhat(x) == 1.0
        assert rank_rhat(x) == 1.0
        assert ess(x) == 30.0
        assert bulk_ess(x) == 30.0
        assert mcse_mean(x) == 0.0
        assert summarize(x) == {"rhat": 1.0, "ess": 30.0, "mcse": 0.0}
        assert ess(np.full((1, 10), 0.7), split=False) == 10.0
        # each chain constant, at different values
        y = np.repeat([[0.0], [1.0]], 10, axis=1)
        assert split_rhat(y) == math.inf
        assert math.isfinite(ess(y)) and ess(y) > 0
        assert mcse_mean(y) > 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_gives_nan(bad):
    x = np.random.default_rng(13).standard_normal((2, 20))
    x[1, 5] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for f in (split_rhat, rank_rhat, ess, bulk_ess, mcse_mean):
            assert math.isnan(f(x))
        assert math.isnan(llc_mcse(x, 10.0))
        assert all(math.isnan(v) for v in summarize(x).values())


def test_overflowing_or_underflowing_variance_gives_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scale in (1e200, 1e-200):  # squares over- / underflow
            x = scale * np.tile([1.0, -1.0, 2.0, 0.5], (2, 5))
            assert math.isnan(split_rhat(x))
            assert math.isnan(ess(x))
            assert math.isnan(mcse_mean(x))


def test_too_few_draws():
    x = np.random.default_rng(14).standard_normal((2, 5))
    assert math.isnan(split_rhat(x[:, :3]))
    assert math.isfinite(split_rhat(x[:, :4]))
    assert math.isnan(ess(x))  # split halves of 2 draws
    assert math.isfinite(ess(x, split=False))
    assert math.isfinite(ess(np.random.default_rng(14).standard_normal((2, 6))))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="shape"):
        ess(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="no draws"):
        split_rhat(np.zeros((2, 0)))
