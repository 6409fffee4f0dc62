"""intervals: the t quantile against scipy, coverage of t_interval, and the bootstrap's behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest

from icl_lab.intervals import bootstrap_interval, mcse_interval, t_cdf, t_interval, t_quantile

stats = pytest.importorskip("scipy.stats", reason="scipy (the dev extra) is the independent reference")


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 19, 99, 1e4])
@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_matches_scipy(p, df):
    assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8)
    assert t_quantile(1 - p, df) == pytest.approx(stats.t.ppf(1 - p, df), rel=1e-8)


@pytest.mark.parametrize("t", [-5.0, -1.2, 0.0, 0.3, 2.5, 40.0])
def test_t_cdf_matches_scipy(t):
    for df in (1, 3, 10.5, 200):
        assert t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-12)


def test_four_chains_use_t3():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    iv = t_interval(x)
    half = 3.182446305284263 * x.std(ddof=1) / 2
    assert iv.estimate == 2.5 and iv.lo == pytest.approx(2.5 - half) and iv.hi == pytest.approx(2.5 + half)
    assert "3 d.o.f." in iv.method


def test_t_interval_coverage_is_95_percent():
    rng = np.random.default_rng(0)
    draws = rng.normal(1.0, 2.0, (4000, 4))
    hits = [(iv.lo <= 1.0 <= iv.hi) for iv in map(t_interval, draws)]
    assert 0.94 < np.mean(hits) < 0.96, np.mean(hits)
    # ±2 SE over 4 chains covers only about 86%
    se = draws.std(axis=1, ddof=1) / 2
    two_se = np.mean(np.abs(draws.mean(1) - 1.0) <= 2 * se)
    assert 0.84 < two_se < 0.88, two_se


def test_t_interval_degenerate():
    assert math.isnan(t_interval(np.array([])).estimate)
    one = t_interval(np.array([3.0, np.nan]))
    assert one.estimate == 3.0 and math.isnan(one.lo)


def test_mcse_interval():
    iv = mcse_interval(10.0, 0.5, 400.0)
    assert iv.hi - 10.0 == pytest.approx(stats.t.ppf(0.975, 399) * 0.5)
    assert math.isnan(mcse_interval(10.0, float("nan"), 400.0).lo)


def test_bootstrap_interval_of_a_mean_and_undefined_fraction():
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 1.0, 200)
    iv, undefined = bootstrap_interval(x, np.mean, seed=3)
    assert undefined == 0.0 and iv.lo < 5.0 < iv.hi
    assert iv.half_width == pytest.approx(1.96 / math.sqrt(200), rel=0.15)
    again, _ = bootstrap_interval(x, np.mean, seed=3)
    assert again == iv  # seeded
    # a statistic undefined in most resamples gives no interval and says how often
    iv2, und2 = bootstrap_interval(np.arange(10.0), lambda s: s.mean() if len(set(s)) == 10 else np.nan, seed=0)
    assert und2 > 0.99 and math.isnan(iv2.lo)


def test_t_half_width_elementwise():
    from icl_lab.intervals import t_half_width

    out = t_half_width(np.array([2.0, 2.0, 1.0, np.nan]), np.array([4, 9, 1, 4]))
    assert out[0] == pytest.approx(stats.t.ppf(0.975, 3) * 2.0 / 2.0)
    assert out[1] == pytest.approx(stats.t.ppf(0.975, 8) * 2.0 / 3.0)
    assert np.isnan(out[2]) and np.isnan(out[3])
