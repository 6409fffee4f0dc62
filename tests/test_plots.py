"""Figures: the step axis and the LLC panel (flagged estimates must not flatten the curve)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from icl_lab.plots import llc_limits, plot_llc, step_axis  # noqa: E402

STEPS = np.array([0, 1, 2, 5, 10, 50, 100, 500, 1000, 5000])


def _llc(mean: list[float], ok: list[bool]) -> pd.DataFrame:
    return pd.DataFrame({"step": STEPS, "llc_mean": mean, "llc_std": np.full(len(STEPS), 0.5), "ok": ok,
                         "num_chains": 4})


HALF = 3.182446305284263 * 0.5 / 2  # the 95% half-width over 4 chains: t_{0.975, 3}·std/√4


def test_step_axis_shows_no_negative_steps_after_a_log_y_scale():
    # Setting the log y-scale first used to freeze x at the linear autoscale: left limit -250 for 0..5000.
    fig, ax = plt.subplots()
    ax.plot(STEPS, STEPS + 1.0)
    ax.set_yscale("log")
    step_axis(ax)
    lo, hi = ax.get_xlim()
    plt.close(fig)
    assert -1.0 < lo < 0.0 and hi > 5000


def test_llc_limits_from_unflagged_estimates():
    mean = np.array([-2500.0, -400.0, 20.0, 25.0, 28.0])
    std = np.array([1.0, 1.0, 0.5, 0.5, 1.0])
    ok = np.array([False, False, True, True, True])
    lo, hi = llc_limits(mean, std, ok, pad=0.0)
    assert (lo, hi) == (19.5, 29.0)
    # 0 is included when it is near (a lower edge below a quarter of the upper one) ...
    lo, hi = llc_limits(np.array([1.0, 8.0]), np.zeros(2), np.array([True, True]), pad=0.0)
    assert (lo, hi) == (0.0, 8.0)
    # ... all estimates are used when none is unflagged, and an empty curve still gets limits
    assert llc_limits(mean, std, np.zeros(5, bool), pad=0.0) == (-2501.0, 29.0)
    assert llc_limits(np.array([]), np.array([]), np.array([], bool)) == (0.0, 1.0)


def test_plot_llc_clips_flagged_estimates_to_the_edge():
    mean = [-450.0, -2560.0, -400.0, -5.0, 2.0, 3.0, 4.0, 9.0, 7.0, 5.0]
    ok = [False, False, False, False, True, True, True, True, False, True]
    fig, ax = plt.subplots()
    plot_llc(ax, {"seed 0": _llc(mean, ok)}, ["tab:red"])
    lo, hi = ax.get_ylim()
    # the unflagged 95% intervals span 2 − HALF .. 9 + HALF; 0 is near, so 0..9 + HALF, padded by 8%
    assert lo == pytest.approx(-0.08 * (9 + HALF)) and hi == pytest.approx((9 + HALF) * 1.08)
    labels = ax.get_legend_handles_labels()[1]
    assert "seed 0" in labels and "seed 0: flagged" in labels  # the flagged 7.0 is inside, drawn hollow
    below = [lab for lab in labels if "below the axis" in lab]
    assert below == ["seed 0: 4 flagged below the axis (lowest -2.56e+03)"]
    line = next(ln for ln in ax.get_lines() if ln.get_label() == below[0])
    assert np.allclose(line.get_ydata(), lo) and list(line.get_xdata()) == [0, 1, 2, 5]
    plt.close(fig)


def test_checkpoints_on_a_slope_are_diamonds_and_keep_the_axis():
    """An estimate whose only flag is not_at_minimum is a sound sample that reads low: it is marked apart from
    the sampler's failures and, unlike them, counts for the y-limits (a peak on a slope is not hidden)."""
    mean = [-450.0, -5.0, 2.0, 3.0, 4.0, 20.0, 7.0, 5.0, 6.0, 5.0]
    flags = ["negative", "negative", "", "", "", "not_at_minimum", "chains_disagree;not_at_minimum", "", "", ""]
    llc = _llc(mean, [not f for f in flags]).assign(flags=flags)
    fig, ax = plt.subplots()
    plot_llc(ax, {"s": llc}, ["tab:red"])
    lo, hi = ax.get_ylim()
    labels = ax.get_legend_handles_labels()[1]
    plt.close(fig)
    assert hi == pytest.approx((20 + HALF) * 1.08) and lo == pytest.approx(-0.08 * (20 + HALF))  # 20's interval
    assert "s: w* on a slope (not_at_minimum)" in labels and "s: flagged" in labels
    assert any("2 flagged below the axis" in lab for lab in labels)


def test_plot_llc_joint_limits_for_several_curves():
    fig, ax = plt.subplots()
    plot_llc(ax, {"a": _llc(list(np.linspace(1, 4, 10)), [True] * 10),
                  "b": _llc(list(np.linspace(2, 20, 10)), [True] * 10)})
    lo, hi = ax.get_ylim()
    plt.close(fig)
    assert lo < 1.0 and hi > 20.0  # neither curve is clipped by the other's limits


def test_boundary_spans_from_a_stage_table():
    from icl_lab.plots import boundary_spans

    table = pd.DataFrame({"end": [100.0, 1000.0, 5000.0], "end_lo": [0.0, 900.0, np.nan],
                          "end_hi": [150.0, 900.0, np.nan]})
    spans = boundary_spans(table, xmin=1.0)
    assert spans[0] == (1.0, 150.0)  # raised to the log axis' first step
    assert spans[1] == pytest.approx((900 / 1.01, 900 * 1.01))  # a zero-width interval still shows
    assert len(spans) == 2  # the last stage ends with training: no interval
    assert boundary_spans(table.drop(columns=["end_lo", "end_hi"]), 1.0) == []


def test_plot_stages_and_pc_pairs_draw_intervals_and_forms(tmp_path):
    from icl_lab import stages as sg
    from icl_lab import trajectory as tr
    from icl_lab.plots import plot_pc_pairs, plot_stages

    steps = np.array([0, 10, 100, 1000, 10000.0])
    table = sg.stage_table(steps, [1.0, 3.0, 5.0, 4.0, 4.5], [2.0, 1.5, 1.0, 0.9, 0.8], [1000.0])
    table = sg.add_boundary_intervals(table, pd.DataFrame({"step": [1000.0], "lo": [500.0], "hi": [2000.0],
                                                           "missing": [0.1], "method": ["test"]}))
    png, _ = plot_stages(steps, [2.0, 1.5, 1.0, 0.9, 0.8], [1.0, 3.0, 5.0, 4.0, 4.5], None, table,
                         tmp_path / "stages")
    assert png.stat().st_size > 5_000
    t = np.linspace(0, 2 * np.pi, 60)
    preds = np.stack([np.cos(t), np.sin(2 * t), 0.3 * np.sin(3 * t)], 1) @ np.random.default_rng(0).normal(size=(3, 8))
    ed = tr.essential_dynamics(preds.reshape(60, 2, 4), np.arange(60) * 10, n_components=3, sigma=2.0)
    for rule in ("all", "union", None):
        png, _ = plot_pc_pairs(ed, tmp_path / f"ed_{rule}", form_rule=rule)
        assert png.stat().st_size > 5_000
