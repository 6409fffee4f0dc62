"""Figures of point estimates with their 95% intervals against task diversity M (`icl_lab.intervals`): per-M
statistics with a Student-t or bootstrap interval over seeds, and a threshold (M*) with its bootstrap interval as
a band. Each function saves PNG + PDF through `save_figure`, like every study figure (docs/papers.md §C2, §E3)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from icl_lab.plots import m_axis, m_positions, save_figure

__all__ = ["intervals_vs_m_figure"]


def intervals_vs_m_figure(Ms: Sequence[Any], estimates: Sequence[float], lo: Sequence[float], hi: Sequence[float],
                          path: Path, *, ylabel: str, title: str, method: str, per_seed: np.ndarray | None = None,
                          zero_line: bool = False, log_y: bool = False, threshold: Any = None) -> tuple[Path, Path]:
    """One panel: `estimates` (n,) at the task diversities `Ms` (n,; None or inf for ∞) with 95% interval bars
    [lo, hi] (nan: no bar, and the point is drawn hollow), `method` naming the interval in the legend.

    per_seed (S, n): the per-seed values, drawn as small grey dots behind the estimates. zero_line: a dashed line at
    y = 0. log_y: a symlog y axis (steps). threshold: an `icl_lab.intervals.Interval` on M (M* with its bootstrap
    interval), drawn as a vertical line with a shaded band where its bounds are finite."""
    x = m_positions(list(Ms))
    est, lo_, hi_ = (np.asarray(v, dtype=float) for v in (estimates, lo, hi))
    if not (est.shape == lo_.shape == hi_.shape == x.shape):
        raise ValueError(f"Ms, estimates, lo and hi must have one length, got {x.shape}, {est.shape}, {lo_.shape}, "
                         f"{hi_.shape}")
    fig, ax = plt.subplots(figsize=(7.5, 4.2), constrained_layout=True)
    if per_seed is not None:
        seeds = np.asarray(per_seed, dtype=float)
        for row in seeds.reshape(-1, len(x)):
            ax.plot(x, row, ".", color="0.65", ms=4, zorder=1)
        ax.plot([], [], ".", color="0.65", label="per seed")
    bar = np.isfinite(lo_) & np.isfinite(hi_)
    ax.errorbar(x[bar], est[bar], yerr=[est[bar] - lo_[bar], hi_[bar] - est[bar]], fmt="o", color="tab:purple",
                capsize=3, ms=6, zorder=3, label=f"estimate, 95% interval ({method})")
    free = ~bar & np.isfinite(est)
    if free.any():
        ax.plot(x[free], est[free], "o", mfc="none", color="tab:purple", ms=6, zorder=3, label="no interval")
    if zero_line:
        ax.axhline(0.0, color="0.3", ls="--", lw=1)
    if log_y:
        ax.set_yscale("symlog", linthresh=1.0)
    if threshold is not None and threshold.estimate is not None and math.isfinite(threshold.estimate):
        ax.axvline(math.log2(threshold.estimate), color="tab:red", lw=1.2, label=f"M* = {threshold.estimate:.3g}")
        if math.isfinite(threshold.lo) and math.isfinite(threshold.hi):
            ax.axvspan(math.log2(threshold.lo), math.log2(threshold.hi), color="tab:red", alpha=0.12,
                       label=f"M* 95% interval [{threshold.lo:.3g}, {threshold.hi:.3g}]")
    m_axis(ax, list(Ms))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
