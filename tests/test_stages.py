"""Milestones, stage tables and stage figures (icl_lab.stages) on synthetic curves with known boundaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

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
    assert len(sg.find_milestones(steps, noisy, noise_z=0.0, min_change=0.0)) > 2


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
    png, pdf = sg.plot_stages(
        steps, np.exp(-x), llc, 0.3 * np.ones_like(llc), table, tmp_path / "fig",
        smoothed_llc=sg.smooth_log(steps, llc), milestones=ms,
    )  # fmt: skip
    for p in (png, pdf):
        assert p.exists() and p.stat().st_size > 1000
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"
