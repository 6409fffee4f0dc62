"""95% intervals, numpy only: Student-t intervals over chains or seeds, MCSE intervals, percentile bootstrap.

A report that says "two standard errors" over 4 chains claims about 86% coverage, not 95%: with C independent
chain means the interval is mean ± t_{0.975, C−1}·SE, and t_{0.975, 3} = 3.18. Every interval icl-lab reports is a
95% interval from one of the three functions here, and says which.

- `t_interval(values)`: mean ± t_{(1+level)/2, n−1}·std/√n over n independent values (chains, seeds).
- `mcse_interval(mean, mcse, ess)`: mean ± t_{(1+level)/2, ESS−1}·MCSE, for a Monte-Carlo mean whose standard
  error comes from the effective sample size (convergence.mcse_mean).
- `bootstrap_interval(samples, statistic)`: the percentile bootstrap (Efron & Tibshirani 1993, §13.3) of any
  statistic of n exchangeable units (seeds, chains, sequences), seeded, with the fraction of resamples in which
  the statistic was undefined (nan), e.g. no crossing found.

The t quantile is computed here (bisection on the CDF through the regularised incomplete beta function, by the
continued fraction of Numerical Recipes §6.4) so that scipy stays a test-only dependency; tests/test_intervals.py
checks it against scipy.stats.t.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "bootstrap_interval", "mcse_interval", "t_cdf", "t_half_width", "t_interval", "t_quantile"]

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with a `level` interval [lo, hi] and the method that made it (for reports)."""

    estimate: float
    lo: float
    hi: float
    level: float
    method: str

    def __str__(self) -> str:
        return f"{self.estimate:.4g} [{self.lo:.4g}, {self.hi:.4g}]"

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
            last = d * c
        if abs(last - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with df > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(df):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df > 0 degrees of freedom (bisection on t_cdf to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(values: np.ndarray, level: float = LEVEL) -> Interval:
    """values: (n,) independent estimates (per-chain λ̂, per-seed statistics); nan ones are dropped.
    mean ± t_{(1+level)/2, n−1}·std(ddof=1)/√n; fewer than 2 finite values give a nan interval."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    n = x.size
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, level, "t over 0 values")
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, level, "t over 1 value")
    half = t_quantile((1.0 + level) / 2.0, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, level, f"t, {n - 1} d.o.f. ({n} values)")


def t_half_width(std: np.ndarray, n: np.ndarray, level: float = LEVEL) -> np.ndarray:
    """Half-widths t_{(1+level)/2, n−1}·std/√n of `level` t intervals, elementwise (std: sample std over n values,
    e.g. llc.parquet's llc_std and num_chains). nan where n < 2 or std is not finite."""
    std = np.asarray(std, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), std.shape)
    q = {k: t_quantile((1.0 + level) / 2.0, k - 1) for k in np.unique(n[np.isfinite(n) & (n >= 2)])}
    t = np.array([q.get(k, np.nan) for k in n.ravel()], dtype=np.float64).reshape(std.shape)
    with np.errstate(all="ignore"):
        return t * std / np.sqrt(n)


def mcse_interval(mean: float, mcse: float, ess: float, level: float = LEVEL) -> Interval:
    """mean ± t_{(1+level)/2, ESS−1}·MCSE (a Monte-Carlo mean with its MCSE from the effective sample size)."""
    if not (math.isfinite(mean) and math.isfinite(mcse) and math.isfinite(ess)) or ess <= 1:
        return Interval(mean, math.nan, math.nan, level, "MCSE (undefined)")
    half = t_quantile((1.0 + level) / 2.0, ess - 1.0) * mcse
    return Interval(mean, mean - half, mean + half, level, f"MCSE, ESS {ess:.0f}")


def bootstrap_interval(samples: np.ndarray, statistic: Callable[[np.ndarray], float], *, n_boot: int = 2000,
                       seed: int = 0, level: float = LEVEL) -> tuple[Interval, float]:
    """Percentile bootstrap over the first axis of `samples` (n exchangeable units, e.g. seeds × ...).

    statistic(resample) -> float, where resample has the shape of samples (units drawn with replacement);
    it may return nan where it is undefined. Returns (interval of the finite resampled values around
    statistic(samples), fraction of resamples that gave nan). Fewer than 2 units, or fewer than half the resamples
    defined, give a nan interval (the fraction says why).
    """
    x = np.asarray(samples)
    n = x.shape[0]
    estimate = float(statistic(x))
    if n < 2:
        return Interval(estimate, math.nan, math.nan, level, f"bootstrap over {n} unit"), math.nan
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(x[rng.integers(0, n, n)]) for _ in range(n_boot)], dtype=np.float64)
    finite = stats[np.isfinite(stats)]
    undefined = 1.0 - finite.size / n_boot
    method = f"percentile bootstrap, {n_boot} resamples of {n} units"
    if finite.size < n_boot / 2:
        return Interval(estimate, math.nan, math.nan, level, method), undefined
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
    return Interval(estimate, float(lo), float(hi), level, method), undefined
