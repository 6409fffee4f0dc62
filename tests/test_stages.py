"""Milestones, stage tables and stage figures (icl_lab.stages) on synthetic curves with known boundaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from icl_lab import plots
from icl_lab import stages as sg

W = 0.4  # width of each tanh step, in natural-log steps


def _grid():
    """A linear + log checkpoint schedule over 1e5 steps, like the training runs use (step 0 included)."""
    log = np.round(np.geomspace(1, 1e5, 150))
    lin = np.round(np.linspace(0, 1e5, 50))
    return np.unique(np.concatenate([[0.0], log, lin]))


def _step(x, centre, amp):
    return amp * (1 + np.tanh((x - centre) / W)) / 2


def _rise_plateau_fall(x):
    """Rise at log t = 3, plateau (a maximum) around 5, fall at 7, flat until the end (log 1e5 ≈ 11.5)."""
    return _step(x, 3.0, 10.0) - _step(x, 7.0, 6.0)


def _dense_reference(f, tol=0.05):
    """Closed-form locations on a fine grid: argmax of f, and where |f'| / range falls below tol after 7."""
    xx = np.linspace(0, np.log(1e5 + 1), 200_001)
    ff = f(xx)
    d = np.gradient(ff, xx) / (ff.max() - ff.min())
    onset = xx[np.nonzero((np.abs(d) > tol) & (xx > 7))[0][-1] + 1]
    return xx[np.argmax(ff)], onset


def _logs(ms):
    return np.log(np.array([m.step for m in ms]) + 1.0)


# -------------------------------------------------------------------------------------- log derivative


def test_log_derivative_exact_for_linear_and_quadratic_in_log_step():
    steps = _grid()
    x = np.log(steps + 1)
    np.testing.assert_allclose(sg.log_derivative(steps, 3.0 * x + 2.0), 3.0, atol=1e-9)
    np.testing.assert_allclose(sg.log_derivative(steps, 3.0 * x + 2.0, smooth_sigma=0.2), 3.0, atol=1e-9)
    # np.gradient is second order on irregular grids: exact for quadratics in the interior
    np.testing.assert_allclose(sg.log_derivative(steps, x**2)[1:-1], 2 * x[1:-1], atol=1e-9)
    # step 0 is handled with log(step + 1); log(step) would need offset 0 and fail
    with pytest.raises(ValueError):
        sg.log_derivative(steps, x, offset=0.0)
    with pytest.raises(ValueError, match="increasing"):
        sg.log_derivative(steps[::-1], x)


def test_smoothing_in_log_step_is_centred_and_never_shifts():
    steps = _grid()
    x = np.log(steps + 1)
    for centre in (4.0, 6.5, 9.0):  # sparse log region, transition, dense linear region
        bump = np.exp(-0.5 * ((x - centre) / 0.5) ** 2)
        sm = sg.smooth_log(steps, bump, 0.15)
        assert abs(x[np.argmax(sm)] - x[np.argmax(bump)]) < 1e-12
        assert np.abs(sm - bump).max() < 0.05  # light
    np.testing.assert_allclose(sg.smooth_log(steps, np.full(steps.size, 2.5)), 2.5)
    np.testing.assert_allclose(sg.smooth_log(steps, 0.7 * x - 1), 0.7 * x - 1, atol=1e-9)  # incl. the ends
    noisy = np.random.default_rng(0).normal(size=steps.size)
    np.testing.assert_array_equal(sg.smooth_log(steps, noisy, 0.0), noisy)


def test_estimate_noise_recovers_sigma():
    steps = _grid()
    rng = np.random.default_rng(1)
    v = _rise_plateau_fall(np.log(steps + 1)) + rng.normal(0, 0.2, steps.size)
    assert 0.15 < sg.estimate_noise(steps, v) < 0.25


# ------------------------------------------------------------------------------------------ milestones


def test_milestones_of_rise_plateau_fall_plateau():
    steps = _grid()
    x = np.log(steps + 1)
    ms = sg.find_milestones(steps, _rise_plateau_fall(x))
    peak, onset = _dense_reference(_rise_plateau_fall)
    assert [m.kind for m in ms] == ["max", "plateau"]
    np.testing.assert_allclose(_logs(ms), [peak, onset], atol=0.15)
    assert ms[0].plateau_start < ms[0].step < ms[0].plateau_end
    assert ms[1].plateau_end == steps[-1]
    # without the end-of-run plateau only the interior critical point remains
    only = sg.find_milestones(steps, _rise_plateau_fall(x), edge_plateaus="none")
    assert [m.kind for m in only] == ["max"] and only[0].step == ms[0].step


def test_milestones_of_rise_plateau_rise_and_a_dip():
    steps = _grid()
    x = np.log(steps + 1)
    ms = sg.find_milestones(steps, _step(x, 3.0, 5.0) + _step(x, 8.0, 5.0), edge_plateaus="none")
    assert [m.kind for m in ms] == ["plateau"]
    np.testing.assert_allclose(_logs(ms), [5.5], atol=0.1)  # midway between the two steps, by symmetry
    ms = sg.find_milestones(steps, -_step(x, 3.0, 4.0) + _step(x, 6.0, 8.0), edge_plateaus="none")
    assert [m.kind for m in ms] == ["min"]
    np.testing.assert_allclose(_logs(ms), [4.5], atol=0.15)


def test_milestones_survive_two_percent_noise():
    steps = _grid()
    x = np.log(steps + 1)
    peak, onset = _dense_reference(_rise_plateau_fall)
    for seed in range(3):
        noisy = _rise_plateau_fall(x) + np.random.default_rng(seed).normal(0, 0.2, steps.size)
        ms = sg.find_milestones(steps, noisy)
        assert [m.kind for m in ms] == ["max", "plateau"], seed
        np.testing.assert_allclose(_logs(ms), [peak, onset], atol=0.35)
    # without the noise-aware criteria the same curve breaks into spurious milestones
    noisy = _rise_plateau_fall(x) + np.random.default_rng(0).normal(0, 0.2, steps.size)
    assert len(sg.find_milestones(steps, noisy, noise_z=0.0, change_z=0.0, min_change=0.0)) > 2


def test_constant_and_monotone_curves_have_no_interior_milestones():
    steps = _grid()
    x = np.log(steps + 1)
    assert sg.find_milestones(steps, np.full(steps.size, 3.0)) == []
    assert sg.find_milestones(steps, 2.0 * x, edge_plateaus="both") == []
    frame = sg.milestones_frame(sg.find_milestones(steps, _rise_plateau_fall(x)))
    assert list(frame["kind"]) == ["max", "plateau"]


# ----------------------------------------------------------------------------------------- stage table


def test_stage_table_types_and_deltas():
    steps = _grid()
    x = np.log(steps + 1)
    llc = _rise_plateau_fall(x)
    loss = 1.0 / (1.0 + np.exp(x - 4.0)) + 0.1
    ms = sg.find_milestones(steps, llc)
    df = sg.stage_table(steps, llc, loss, ms)
    assert list(df["stage"]) == [1, 2, 3]
    assert list(df["type"]) == ["A", "B", "B"]
    assert list(df["end_kind"]) == ["max", "plateau", "end"]
    assert df["start"].iloc[0] == steps[0] and df["end"].iloc[-1] == steps[-1]
    np.testing.assert_array_equal(df["start"].iloc[1:].to_numpy(), df["end"].iloc[:-1].to_numpy())
    for _, row in df.iterrows():
        i, j = np.searchsorted(steps, row["start"]), np.searchsorted(steps, row["end"])
        assert row["delta_llc"] == pytest.approx(llc[j] - llc[i])
        assert row["delta_loss"] == pytest.approx(loss[j] - loss[i])
    assert df["delta_llc"].sum() == pytest.approx(llc[-1] - llc[0])
    np.testing.assert_allclose(df["delta_llc"].iloc[:2], [10.0, -6.0], atol=0.1)  # the two tanh amplitudes
    assert abs(df["rel_delta_llc"].iloc[2]) < 0.01  # the settled end is negligible, and says so


def test_stage_table_from_plain_steps_and_cross_checks():
    steps = _grid()
    x = np.log(steps + 1)
    llc = _rise_plateau_fall(x)
    b = float(np.exp(5.0) - 1)
    df = sg.stage_table(
        steps, llc, None, [b, 1e9], ed_events=[b * 1.2, 20.0], loss_plateaus=[b * 3.0], tol_in_log_steps=0.3
    )
    assert len(df) == 2  # the out-of-range boundary is dropped
    assert df["delta_loss"].isna().all()
    assert list(df["type"]) == ["A", "B"]
    assert bool(df["ed_agrees"].iloc[0]) and not bool(df["loss_agrees"].iloc[0])  # log 1.2 < 0.3 < log 3
    assert df["ed_step"].iloc[0] == pytest.approx(b * 1.2)
    assert np.isnan(df["ed_step"].iloc[-1]) and not df["ed_agrees"].iloc[-1]
    assert 0 < df["ed_chance"].iloc[0] < 0.2 and (df["ed_chance"] == df["ed_chance"].iloc[0]).all()
    # loss plateaus found the same way on the loss curve: a loss with a plateau right at the boundary
    loss = 1.0 - _step(x, 3.0, 0.4) - _step(x, 7.0, 0.4)
    auto = sg.stage_table(steps, llc, loss, [b], loss_plateaus="auto")
    assert bool(auto["loss_agrees"].iloc[0])
    assert auto["delta_loss"].iloc[0] == pytest.approx(
        loss[np.searchsorted(steps, auto["end"].iloc[0])] - 1.0, abs=0.01
    )


def test_cross_check_distances_in_log_step():
    cc = sg.cross_check([100.0, 10_000.0], [130.0], np.array([9_000.0, 50.0]), 0.2, offset=0.0)
    np.testing.assert_allclose(cc["loss_dlog"], [np.log(1.3), np.log(10_000 / 130)])
    np.testing.assert_allclose(cc["ed_step"], [50.0, 9_000.0])
    assert list(cc["loss_agrees"]) == [False, False]
    assert list(cc["ed_agrees"]) == [False, True]
    empty = sg.cross_check([100.0], None, None)
    assert empty["loss_step"].isna().all() and not empty["ed_agrees"].any()
    # chance level: the fraction of the log-step range within tolerance of an event (overlaps merged)
    steps = np.exp(np.linspace(0.0, 10.0, 50))
    ev = np.exp([2.0, 5.0, 5.2, 9.9])
    cc = sg.cross_check([10.0], ev, ev[:2], 0.5, steps=steps, offset=0.0)
    assert cc["loss_chance"].iloc[0] == pytest.approx((1.0 + 1.2 + 0.6) / 10.0)
    assert cc["ed_chance"].iloc[0] == pytest.approx(2.0 / 10.0)


# ---------------------------------------------------------------------------------------- disk, figure


def test_save_stage_table_round_trips(tmp_path):
    steps = _grid()
    x = np.log(steps + 1)
    llc = _rise_plateau_fall(x)
    df = sg.stage_table(steps, llc, np.exp(-x), sg.find_milestones(steps, llc), ed_events=[150.0])
    pq, csv = sg.save_stage_table(df, tmp_path / "stages.csv")
    assert pq.name == "stages.parquet" and csv.name == "stages.csv"
    pd.testing.assert_frame_equal(pd.read_parquet(pq), df)
    pd.testing.assert_frame_equal(pd.read_csv(csv), df, check_dtype=False)
    sg.save_stage_table(df.iloc[:1], tmp_path / "stages")  # overwrite in place
    assert len(pd.read_parquet(pq)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.csv", "stages.parquet"]  # no temp files


def test_plot_stages_writes_png_and_pdf(tmp_path):
    steps = _grid()
    x = np.log(steps + 1)
    llc = _rise_plateau_fall(x)
    ms = sg.find_milestones(steps, llc)
    table = sg.stage_table(steps, llc, np.exp(-x), ms)
    png, pdf = plots.plot_stages(
        steps, np.exp(-x), llc, 0.3 * np.ones_like(llc), table, tmp_path / "fig",
        smoothed_llc=sg.smooth_log(steps, llc), milestones=ms,
    )  # fmt: skip
    for p in (png, pdf):
        assert p.exists() and p.stat().st_size > 1000
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"


# ------------------------------------------------------------------------- trusted estimates, SE thresholds


def _truth(x):
    """A rise at log t = 3.5 (+10), a maximum around 5.3, a fall at 7 (−6), then flat: λ̂ > 0 throughout."""
    return 1.0 + _step(x, 3.5, 10.0) - _step(x, 7.0, 6.0)


def _se(x):
    """Per-point standard errors that grow with λ̂ (as the chains' spread does): 0.07 to 0.27."""
    return 0.05 + 0.02 * _truth(x)


EARLY = 5  # steps ≤ EARLY hold the off-minimum estimates of early training


def _llc_rows(seed: int, early: str = "negative", *, noise_scale: float = 1.0) -> pd.DataFrame:
    """llc.parquet-like rows of the _truth curve with Gaussian noise of the stated SE (4 chains: llc_std = 2 SE),
    and an early section of large estimates: 'negative' (−2000…, flagged), 'unflagged' (the same values with no
    flag), 'flagged_positive' (+5000…, with sampler flags)."""
    steps = _grid()
    x = np.log(steps + 1)
    se = noise_scale * _se(x)
    lam = _truth(x) + np.random.default_rng(seed).normal(0.0, se)
    flags = np.full(steps.size, "", dtype=object)
    e = steps <= EARLY
    if early == "flagged_positive":
        lam[e], flags[e] = 5000.0 * np.exp(-steps[e] / 2) + 50, "exceeds_half_d;not_stationary"
    else:
        lam[e] = -2000.0 * np.exp(-steps[e] / 2) - 5
        flags[e] = "negative" if early == "negative" else ""
    flags[1] = flags[1] + (";" if flags[1] else "") + "not_at_minimum"  # w* flags never decide
    return pd.DataFrame({"step": steps, "llc_mean": lam, "llc_std": 2.0 * se, "num_chains": 4, "flags": flags})


def _reference(se_scale: float = 1.0):
    """Milestones of the noise-free curve after the early section, with the same standard errors: where the
    SE-based thresholds put them when noise does not move them. Also the grid index of the true maximum."""
    steps = _grid()
    x = np.log(steps + 1)
    keep = steps > EARLY
    ref = sg.find_milestones(steps[keep], _truth(x[keep]), se=se_scale * _se(x[keep]))
    return ref, int(np.argmax(_truth(x)))


@pytest.mark.parametrize("early", ["negative", "unflagged", "flagged_positive"])
def test_llc_milestones_ignore_a_large_early_section(early):
    steps = _grid()
    ref, i_peak = _reference()
    assert [m.kind for m in ref] == ["max", "plateau"]
    for seed in range(3):
        rows = _llc_rows(seed, early)
        ms = sg.llc_milestones(rows)
        assert [m.kind for m in ms] == ["max", "plateau"], (early, seed)
        idx = np.searchsorted(steps, [m.step for m in ms])
        assert abs(idx[0] - i_peak) <= 2, (early, seed)  # the maximum, within two checkpoints
        assert abs(idx[1] - np.searchsorted(steps, ref[1].step)) <= 2, (early, seed)  # where it settles
    # the same rows through the old path (every finite value, range-based thresholds): the early section sets
    # the range, the real features are a few per mille of it, and the only milestone sits in the early section
    rows = _llc_rows(0, early)
    old = sg.find_milestones(rows["step"], rows["llc_mean"])
    assert not any(m.kind == "max" for m in old)
    assert all(m.step < 30 for m in old)


def test_trusted_mask_uses_sampler_flags_and_positivity():
    rows = pd.DataFrame({
        "llc_mean": [2.0, 2.0, 2.0, 2.0, -1.0, 0.0, np.nan, np.inf, 2.0, 2.0],
        "flags": ["", None, "not_at_minimum", "negative;not_at_minimum", "", "", "", "", "chains_disagree",
                  "diverged"],
    })  # fmt: skip
    np.testing.assert_array_equal(sg.trusted_mask(rows), [1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    # without a flags column the ok column decides (it cannot tell a w* flag from a sampler flag)
    old = pd.DataFrame({"llc_mean": [2.0, 2.0, -2.0], "ok": [True, False, True]})
    np.testing.assert_array_equal(sg.trusted_mask(old), [True, False, False])
    np.testing.assert_array_equal(sg.trusted_mask(old[["llc_mean"]]), [True, True, False])


def test_llc_standard_errors_prefer_se_columns():
    rows = pd.DataFrame({"llc_std": [2.0, 2.0, 2.0, np.nan], "num_chains": [4, 4, 4, 4]})
    np.testing.assert_allclose(sg.llc_standard_errors(rows), [1.0, 1.0, 1.0, np.nan])
    rows["llc_mcse"] = [0.3, np.nan, 0.3, 0.3]
    np.testing.assert_allclose(sg.llc_standard_errors(rows), [0.3, 1.0, 0.3, 0.3])
    rows["llc_se"] = [0.2, 0.2, np.nan, 0.0]  # missing or non-positive: the next source
    np.testing.assert_allclose(sg.llc_standard_errors(rows), [0.2, 0.2, 0.3, 0.3])


@pytest.mark.parametrize("smooth_sigma", [0.0, 0.15])
def test_slope_and_change_standard_errors_match_monte_carlo(smooth_sigma):
    """SE(d) and SE(a_j − a_i) propagated from per-point SEs through the fit's weights, against the spread of
    the fit over many noise draws (the fit applied independently of the weight rows)."""
    from icl_lab.trajectory import _local_linear

    steps = _grid()
    x = np.log(steps + 1)
    se = _se(x)
    noise = np.random.default_rng(3).normal(0.0, 1.0, (x.size, 4000)) * se[:, None]
    grad = np.gradient(noise, x, axis=0)
    if smooth_sigma > 0:
        a, b, ok = _local_linear(x, noise, np.full(x.size, smooth_sigma), 3.0)
        d = np.where(ok[:, None], b, grad)
    else:
        a, d = noise, grad
    np.testing.assert_allclose(sg._slope_se(x, se, smooth_sigma, 3.0), d.std(1), rtol=0.06)
    pairs = [(20, 24), (60, 61), (100, 140)]
    expected = [(a[j] - a[i]).std() for i, j in pairs]
    np.testing.assert_allclose(sg._change_se(x, se, pairs, smooth_sigma, 3.0), expected, rtol=0.06)
    # the weight rows are the fit: A v and B v reproduce the smoothed values and slopes
    v = _truth(x) + noise[:, 0]
    A, B = sg._operator_rows(x, smooth_sigma, 3.0, np.arange(x.size))
    fit_a, fit_d = sg._fit(x, v, smooth_sigma, 3.0)
    np.testing.assert_allclose(A @ v, fit_a, atol=1e-9)
    np.testing.assert_allclose(B @ v, fit_d, atol=1e-9)


def test_flagged_points_are_drawn_but_never_place_boundaries():
    """A late flagged outlier (chains disagree) changes nothing; the same outlier unflagged adds a milestone."""
    rows = _llc_rows(0)
    base = sg.llc_milestones(rows)
    spike = rows.copy()
    j = int(np.searchsorted(spike["step"], 20_000))
    spike.loc[j, "llc_mean"] += 3.0
    spike.loc[j, "flags"] = "chains_disagree"
    assert not sg.trusted_mask(spike)[j]
    assert [(m.kind, m.step) for m in sg.llc_milestones(spike)] == [(m.kind, m.step) for m in base]
    spike.loc[j, "flags"] = ""
    assert len(sg.llc_milestones(spike)) > len(base)


def test_thresholds_scale_with_the_standard_errors():
    steps = _grid()
    x = np.log(steps + 1)
    # doubling the noise and the stated SE together: the same milestones, no spurious ones
    for scale in (1.0, 2.0):
        for seed in range(3):
            assert [m.kind for m in sg.llc_milestones(_llc_rows(seed, noise_scale=scale))] == ["max", "plateau"]
    # a flat curve of pure noise has no milestone when the SE is stated right, at either noise level ...
    for sigma in (0.1, 0.2):
        for seed in range(5):
            flat = 5.0 + np.random.default_rng(seed).normal(0.0, sigma, x.size)
            assert sg.find_milestones(steps, flat, se=sigma) == [], (sigma, seed)
    # ... and several when the SE is understated five-fold: the thresholds really are in units of se
    flat = 5.0 + np.random.default_rng(0).normal(0.0, 0.1, x.size)
    assert len(sg.find_milestones(steps, flat, se=0.02)) >= 2
    # a small real step (+0.3 at log t = 6) is found with small SEs and is noise at SEs of its own size
    small = 5.0 + _step(x, 6.0, 0.3)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        found = sg.find_milestones(steps, small + rng.normal(0.0, 0.005, x.size), se=0.005)
        assert [m.kind for m in found] == ["plateau"], seed  # where the curve settles after the step
        assert 6.0 < np.log(found[0].step + 1) < 7.5
        assert sg.find_milestones(steps, small + rng.normal(0.0, 0.3, x.size), se=0.3) == [], seed


def test_se_is_validated_and_missing_entries_fall_back_to_the_scatter():
    steps = _grid()
    x = np.log(steps + 1)
    v = _truth(x) + np.random.default_rng(0).normal(0.0, 0.1, x.size)
    with pytest.raises(ValueError, match="se"):
        sg.find_milestones(steps, v, se=np.ones(5))
    scatter = sg.estimate_noise(steps, v)
    a = sg.find_milestones(steps, v, se=np.full(x.size, np.nan))
    b = sg.find_milestones(steps, v, se=scatter)
    assert [(m.kind, m.step) for m in a] == [(m.kind, m.step) for m in b] and len(a) >= 2
    assert sg.llc_milestones(_llc_rows(0).iloc[:8]) == []  # fewer than 3 trusted rows: no milestones


def test_stage_table_uses_only_trusted_llc_and_still_tiles_the_run():
    rows = _llc_rows(0, "unflagged")  # λ̂ ≤ 0 without a flag: untrusted all the same
    steps, lam = rows["step"].to_numpy(), rows["llc_mean"].to_numpy()
    trusted = sg.trusted_mask(rows)
    ms = sg.llc_milestones(rows)
    df = sg.stage_table(steps, lam, np.exp(-np.log(steps + 1)), ms, trusted=trusted)
    assert list(df["type"][:2]) == ["A", "B"] and list(df["end_kind"]) == ["max", "plateau", "end"]
    assert df["start"].iloc[0] == 0 and df["end"].iloc[-1] == steps[-1]  # every checkpoint is in a stage
    first = steps[trusted][0]
    assert first > EARLY and df["llc_start_step"].iloc[0] == first  # λ̂ changes start at the first trusted one
    assert df["llc_start"].iloc[0] == pytest.approx(lam[trusted][0])
    assert df["delta_llc"].sum() == pytest.approx(lam[trusted][-1] - lam[trusted][0])
    np.testing.assert_allclose(df["delta_llc"].iloc[:2], [10.0, -6.0], atol=0.6)
    assert df["rel_delta_llc"].abs().max() < 1.0  # relative to the trusted range, not to −2000
    # the old table on every finite value would report stage 1 as a rise of ~2000
    assert sg.stage_table(steps, lam, None, ms)["delta_llc"].iloc[0] > 1000
    # a stage with fewer than two trusted estimates has no LLC change and no type
    late = sg.stage_table(steps, lam, None, ms, trusted=trusted & (steps >= ms[0].step))
    assert late["type"].iloc[0] == "?" and np.isnan(late["delta_llc"].iloc[0])
    assert list(late["type"][1:2]) == ["B"] and late["end"].iloc[0] == ms[0].step


def test_plot_stages_draws_untrusted_points_hollow_and_off_scale(tmp_path, monkeypatch):
    rows = _llc_rows(0)
    steps, lam = rows["step"].to_numpy(), rows["llc_mean"].to_numpy()
    trusted = sg.trusted_mask(rows)
    ms = sg.llc_milestones(rows)
    table = sg.stage_table(steps, lam, np.exp(-np.log(steps + 1)), ms, trusted=trusted)
    figs = []
    save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: (figs.append(fig), save(fig, path))[1])
    png, pdf = plots.plot_stages(steps, np.exp(-np.log(steps + 1)), lam, rows["llc_std"], table, tmp_path / "fig",
                              milestones=ms, trusted=trusted)  # fmt: skip
    assert png.exists() and pdf.exists()
    ax = figs[0].axes[1]
    lo, hi = ax.get_ylim()
    assert -5 < lo < 1 and 10 < hi < 15  # scaled to the trusted estimates, not to −2000
    hollow = [ln for ln in ax.get_lines() if ln.get_markerfacecolor() == "white"]
    shown = np.concatenate([ln.get_xdata() for ln in hollow])
    np.testing.assert_array_equal(np.sort(shown), steps[(steps > 0) & ~trusted])  # every untrusted one, drawn


# ------------------------------------------------------------------------- bootstrap intervals on boundaries


def _chain_rows(seed: int, chain_sd: float, *, shift: float = 0.0, chains: int = 4) -> pd.DataFrame:
    """llc.parquet-like rows with per-chain λ̂: each chain is the _truth curve (its features moved by `shift` in
    log step) plus a chain offset and independent per-checkpoint noise, both of sd `chain_sd`."""
    steps = _grid()[_grid() > EARLY]
    x = np.log(steps + 1)
    rng = np.random.default_rng(seed)
    per = _truth(x - shift)[:, None] + chain_sd * (rng.normal(size=chains)[None, :] + rng.normal(size=(x.size, chains)))
    return pd.DataFrame({"step": steps, "llc_mean": per.mean(1), "llc_std": per.std(1, ddof=1), "num_chains": chains,
                         "flags": "", "llc_per_chain": list(per)})


def test_chain_matrix_reads_per_chain_values_and_refuses_ragged_rows():
    rows = _chain_rows(0, 0.1)
    np.testing.assert_allclose(sg.chain_matrix(rows).mean(1), rows["llc_mean"])
    assert sg.chain_matrix(rows.drop(columns="llc_per_chain")) is None
    ragged = rows.copy()
    ragged.at[ragged.index[3], "llc_per_chain"] = np.ones(3)
    assert sg.chain_matrix(ragged) is None


def test_chain_intervals_cover_the_boundary_and_widen_with_chain_noise():
    steps = _grid()[_grid() > EARLY]
    i_peak = int(np.argmax(_truth(np.log(steps + 1))))
    widths = {}
    for sd in (0.05, 0.4):
        rows = _chain_rows(1, sd)
        ms = sg.llc_milestones(rows)
        peak = next(m for m in ms if m.kind == "max")
        iv = sg.chain_boundary_intervals(rows, [peak], n_boot=400)
        r = iv.iloc[0]
        assert r["lo"] <= peak.step <= r["hi"], sd
        assert r["lo"] <= steps[i_peak + 3] and r["hi"] >= steps[i_peak - 3], sd  # the true maximum, near
        assert r["method"].startswith("percentile bootstrap") and "4 chains" in r["method"]
        assert 0.0 <= r["missing"] < 0.5
        widths[sd] = np.log(r["hi"] + 1) - np.log(r["lo"] + 1)
    assert widths[0.4] > 2 * widths[0.05]


def test_chain_intervals_say_why_when_chains_are_missing():
    rows = _chain_rows(0, 0.1).drop(columns="llc_per_chain")
    iv = sg.chain_boundary_intervals(rows, [1000.0])
    assert np.isnan(iv.loc[0, "lo"]) and iv.loc[0, "method"] == "none (no per-chain λ̂)"


def test_seed_intervals_follow_the_spread_of_the_seeds():
    same = [_chain_rows(s, 0.05) for s in range(5)]
    spread = [_chain_rows(s, 0.05, shift=d) for s, d in enumerate([-0.6, -0.3, 0.0, 0.3, 0.6])]
    width = {}
    for name, llcs in (("same", same), ("spread", spread)):
        ms, iv = sg.seed_boundary_intervals(llcs, n_boot=300)
        assert [m.kind for m in ms][:1] == ["max"], name
        r = iv.iloc[0]
        assert r["lo"] <= ms[0].step <= r["hi"] and "5 seeds" in r["method"]
        width[name] = np.log(r["hi"] + 1) - np.log(r["lo"] + 1)
    assert width["spread"] > 0.3 and width["spread"] > 3 * width["same"]
    steps, mean, se = sg.seed_mean_curve(same, [0, 0, 1])
    np.testing.assert_allclose(mean, (2 * same[0]["llc_mean"] + same[1]["llc_mean"]) / 3)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        sg.seed_boundary_intervals(same[:1])


def test_stage_table_gets_the_end_boundary_intervals():
    rows = _chain_rows(2, 0.1)
    ms = sg.llc_milestones(rows)
    table = sg.stage_table(rows["step"], rows["llc_mean"], None, ms, trusted=sg.trusted_mask(rows))
    iv = sg.chain_boundary_intervals(rows, ms, n_boot=200)
    out = sg.add_boundary_intervals(table, iv)
    assert list(out.columns[-4:]) == sg.INTERVAL_COLUMNS
    np.testing.assert_allclose(out["end_lo"].iloc[:-1], iv["lo"])
    assert np.isnan(out["end_lo"].iloc[-1]) and out["end_interval"].iloc[-1] == ""


# ------------------------------------------------------------------------- where to estimate the LLC


def test_loss_moving_steps_crowd_where_the_loss_falls():
    steps = _grid()
    x = np.log(steps + 1)
    loss = 2.0 - _step(x, 6.0, 1.5)  # all the change within a few W of log t = 6
    picks = sg.loss_moving_steps(steps, loss, n_loss=4, n_log=0)
    assert picks[-1] == steps[-1] and set(picks) <= set(steps.astype(int))
    inner = np.log(picks[:-1] + 1)
    assert len(inner) == 4 and np.all(np.abs(inner - 6.0) < 2.5 * W)  # 4 points in the drop
    assert np.all(np.diff(inner) > 0)
    with_log = sg.loss_moving_steps(steps, loss, n_loss=4, n_log=3)
    assert {1, int(steps[-1])} <= set(with_log) and set(picks) <= set(with_log)  # log coverage from step 1
    assert len(with_log) <= 4 + 3 + 1
    flat = sg.loss_moving_steps(steps, np.ones(steps.size), n_loss=4, n_log=0)
    np.testing.assert_array_equal(flat, [steps[-1]])  # nothing moves: only the last checkpoint
    with pytest.raises(ValueError, match="n_loss must be >= 1"):
        sg.loss_moving_steps(steps, loss, n_loss=0, n_log=1)


def test_snap_steps_moves_to_the_nearest_checkpoint_in_log_step():
    np.testing.assert_array_equal(sg.snap_steps([0, 9, 30, 50, 1e6], [0, 10, 100, 1000]), [0, 10, 100, 1000])
    assert sg.snap_steps([], [1, 2]).size == 0
    np.testing.assert_array_equal(sg.snap_steps([30, 31], [0, 10, 100]), [10])  # log 31 is nearer log 11 than 101


def test_llc_stages_and_seed_stages_carry_intervals_and_name_the_form_rule():
    from icl_lab.studies.common import llc_stages, seed_stages

    rows = _chain_rows(3, 0.1)
    loss = np.linspace(2.0, 1.0, len(rows))
    ed_forms = [float(rows["step"].iloc[40])]
    res = llc_stages(rows, loss, ed_events=ed_forms, n_boot=200)
    inner = res.table.iloc[:-1]
    assert len(inner) == len(res.milestones) == len(res.intervals) >= 1
    assert np.isfinite(inner["end_lo"]).all() and (inner["end_lo"] <= inner["end"]).all()
    assert (inner["end"] <= inner["end_hi"]).all() and res.form_rule == "all"
    losses = {f"s{i}": pd.Series(loss, index=rows["step"].to_numpy()) for i in range(3)}
    llcs = {f"s{i}": _chain_rows(i, 0.1) for i in range(3)}
    seeds = seed_stages(llcs, losses, n_boot=200)
    assert seeds is not None and "3 seeds" in seeds.table["end_interval"].iloc[0]
    assert seed_stages(dict(list(llcs.items())[:2]), losses) is None  # fewer than 3 seeds: no seed bootstrap
