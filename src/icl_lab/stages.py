"""Milestones and developmental stages from the LLC curve (Hoogland et al. 2024, §3.3; docs/papers.md §D4).

Milestones are the critical points of t ↦ λ̂(w_t) against log step: plateaus, where dλ̂/d log t vanishes, and
turning points (local maxima / minima, where the derivative changes sign). Stages are the intervals between
milestones: type A when the LLC rises over the stage (the model becomes more complex), type B when it falls.
Boundaries are cross-checked against plateaus of the loss (found the same way) and against essential-dynamics
forms (cusps / vertices of the PC-pair curves, :mod:`icl_lab.trajectory`) near each boundary.

Log-step coordinate: x = log(step + offset) with natural log and offset = 1 by default, so step 0 (the
initialisation) stays on the axis at x = 0 and late steps are unaffected (log(t + 1) ≈ log t, t ≫ 1).

Smoothing is optional, light and centred (docs/papers.md §F2 item 11): a Gaussian-weighted *local linear* fit in
x at every checkpoint, which gives the smoothed value and slope together, is exact for linear trends and
therefore never shifts a feature, even on the irregular linear + log checkpoint grid or at the ends of the
curve. It is used only to locate critical points; tables and plots keep the raw values.

Only trustworthy estimates place boundaries (:func:`trusted_mask`: no sampler flag and λ̂ > 0; early,
off-minimum checkpoints give large negative λ̂), and the thresholds are in units of the estimates' standard
errors (:func:`llc_standard_errors`), never fractions of the curve's range; :func:`llc_milestones` does both
from llc.parquet rows. Untrusted estimates are drawn, not used.

Boundary intervals (:func:`chain_boundary_intervals`, :func:`seed_boundary_intervals`; docs/papers.md §D4): 95%
percentile-bootstrap intervals (:func:`icl_lab.intervals.bootstrap_interval`) on the step of every boundary, from
resampling what is exchangeable. Within one run these are the SGLD chains: llc.parquet stores each chain's λ̂
(`llc_per_chain`), and the chains run with the same seed at every checkpoint, so chain c is one unit across all
checkpoints and is resampled as a whole; with few chains (4) the percentile interval is coarse and, like every
percentile bootstrap over n units, about √((n − 1)/n) too narrow. Across runs (≥ MIN_SEEDS_FOR_INTERVALS seeds) the
units are the seeds: the boundaries of the seed-mean λ̂ curve, resampled over seeds. A boundary counts as re-found
in a resample when a milestone of the resampled curve, of any kind, lies within BOUNDARY_MATCH_TOL of it in log
step; the fraction of resamples where none does is reported next to the interval (`missing`), and the interval is
nan when it exceeds half. The thresholds of :func:`find_milestones` are the original estimate's in every resample.

The Timaeus authors picked milestones by hand (their notebooks have no automated plateau finder); the
hyper-parameters of the automation here are explicit arguments of :func:`find_milestones`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from icl_lab.atomic import atomic_write
from icl_lab.intervals import bootstrap_interval
from icl_lab.llc_flags import sampler_ok
from icl_lab.trajectory import ArrayLike, _kernel_rows, _local_linear, _row_chunks, to_numpy

if TYPE_CHECKING:  # pragma: no cover
    from icl_lab.trajectory import EssentialDynamics

__all__ = [
    "BOUNDARY_MATCH_TOL",
    "INTERVAL_COLUMNS",
    "MIN_SEEDS_FOR_INTERVALS",
    "Milestone",
    "add_boundary_intervals",
    "bootstrap_boundaries",
    "chain_boundary_intervals",
    "chain_matrix",
    "seed_boundary_intervals",
    "seed_mean_curve",
    "cross_check",
    "estimate_noise",
    "find_milestones",
    "llc_milestones",
    "llc_standard_errors",
    "loss_moving_steps",
    "log_derivative",
    "log_steps",
    "milestones_frame",
    "save_stage_table",
    "smooth_log",
    "snap_steps",
    "stage_table",
    "trusted_mask",
]

MilestoneKind = Literal["max", "min", "plateau"]


def log_steps(steps: ArrayLike, offset: float = 1.0) -> np.ndarray:
    """x = log(step + offset) (natural log). (T,) → (T,). Requires step + offset > 0."""
    s = to_numpy(steps).reshape(-1)
    if np.any(s + offset <= 0):
        raise ValueError("log_steps: step + offset must be > 0 (use offset >= 1 when step 0 is present)")
    return np.log(s + offset)


def _prepare(steps: ArrayLike, values: ArrayLike, offset: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = to_numpy(steps).reshape(-1)
    v = to_numpy(values).reshape(-1)
    if s.shape != v.shape:
        raise ValueError(f"steps {s.shape} and values {v.shape} must have the same length")
    if s.size < 2:
        raise ValueError("need at least 2 checkpoints")
    if np.any(np.diff(s) <= 0):
        raise ValueError("steps must be strictly increasing (sort them and drop duplicates)")
    if not np.all(np.isfinite(v)):
        raise ValueError("values contain NaN or inf")
    return s, v, log_steps(s, offset)


def _fit(x: np.ndarray, v: np.ndarray, smooth_sigma: float, truncate: float) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed values and slopes d/dx, both (T,).

    smooth_sigma > 0: Gaussian-weighted local linear fit at every x_i (slope b = Σw d̃ y / Σw d̃², d̃ = d − weighted
    mean of d); smooth_sigma = 0: raw values and `np.gradient`. Points with fewer than two neighbours in the window
    fall back to the raw value and the finite difference. Both are linear in v: :func:`_operator_rows` gives the
    rows of the two maps, for standard errors."""
    raw_slope = np.gradient(v, x)
    if smooth_sigma <= 0:
        return v.copy(), raw_slope
    sig = np.full(x.size, float(smooth_sigma))
    a, b, ok = _local_linear(x, v[:, None], sig, truncate)
    return a[:, 0], np.where(ok, b[:, 0], raw_slope)


def _gradient_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` of the matrix G with G @ v = np.gradient(v, x) (second order inside, first order at the ends).
    x: (T,) strictly increasing, T ≥ 2 → (R, T)."""
    T = x.size
    G = np.zeros((rows.size, T))
    r = np.arange(rows.size)
    first, last = rows == 0, rows == T - 1
    inner = ~(first | last)
    G[r[first], 0], G[r[first], 1] = -1.0 / (x[1] - x[0]), 1.0 / (x[1] - x[0])
    G[r[last], T - 2], G[r[last], T - 1] = -1.0 / (x[-1] - x[-2]), 1.0 / (x[-1] - x[-2])
    i, ri = rows[inner], r[inner]
    hm, hp = x[i] - x[i - 1], x[i + 1] - x[i]
    G[ri, i - 1] = -hp / (hm * (hm + hp))
    G[ri, i] = (hp - hm) / (hm * hp)
    G[ri, i + 1] = hm / (hp * (hm + hp))
    return G


def _operator_rows(
    x: np.ndarray, smooth_sigma: float, truncate: float, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows `rows` of the linear maps v ↦ smoothed values and v ↦ slopes of :func:`_fit`: (A, B), each (R, T),
    so that _fit(x, v) = (A_full @ v, B_full @ v). The local linear fit at x_i with weights w_k and offsets
    d_k = x_k − x_i has A_ik = w_k (S2 − S1 d_k) / det and B_ik = w_k (S0 d_k − S1) / det (S_n = Σ w d^n,
    det = S0 S2 − S1²); rows where the fit falls back use the identity and the finite difference."""
    E = np.zeros((rows.size, x.size))
    E[np.arange(rows.size), rows] = 1.0
    G = _gradient_rows(x, rows)
    if smooth_sigma <= 0:
        return E, G
    w, d = _kernel_rows(x, np.full(x.size, float(smooth_sigma)), rows, truncate)
    s0, s1, s2 = w.sum(1, keepdims=True), (w * d).sum(1, keepdims=True), (w * d * d).sum(1, keepdims=True)
    det = s0 * s2 - s1 * s1
    good = ((w > 0).sum(1) >= 2) & (det[:, 0] > 1e-12 * np.maximum(s0[:, 0] * s2[:, 0], 1e-300))
    with np.errstate(divide="ignore", invalid="ignore"):
        A = w * (s2 - s1 * d) / det
        B = w * (s0 * d - s1) / det
    return np.where(good[:, None], A, E), np.where(good[:, None], B, G)


def _slope_se(x: np.ndarray, se: np.ndarray, smooth_sigma: float, truncate: float) -> np.ndarray:
    """Standard error of each slope of :func:`_fit` from independent per-point standard errors se: (T,) → (T,):
    SE(d_i) = sqrt(Σ_k B_ik² se_k²); for the local linear fit Var b_i = Σ_k w_k² d̃_k² se_k² / (Σ_k w_k d̃_k²)²."""
    out = np.empty(x.size)
    for rows in _row_chunks(x.size, x.size):
        _, B = _operator_rows(x, smooth_sigma, truncate, rows)
        out[rows] = np.sqrt((B * B) @ (se * se))
    return out


def _change_se(
    x: np.ndarray, se: np.ndarray, pairs: Sequence[tuple[int, int]], smooth_sigma: float, truncate: float
) -> np.ndarray:
    """Standard error of a_j − a_i (smoothed values of :func:`_fit`) for each index pair (i, j), from independent
    per-point standard errors se: (T,). SE = sqrt(Σ_k (A_jk − A_ik)² se_k²); neighbouring smoothed values share
    most of their data, so the SE of a short change is much smaller than √2 times the SE of one value. → (P,)."""
    if not pairs:
        return np.zeros(0)
    idx = np.unique(np.asarray(pairs, dtype=np.int64).reshape(-1))
    A, _ = _operator_rows(x, smooth_sigma, truncate, idx)
    pos = {int(k): n for n, k in enumerate(idx)}
    diff = np.stack([A[pos[j]] - A[pos[i]] for i, j in pairs])
    return np.sqrt((diff * diff) @ (se * se))


def estimate_noise(steps: ArrayLike, values: ArrayLike, *, offset: float = 1.0) -> float:
    """Robust estimate of the point-to-point noise σ of a curve on an irregular log-step grid.

    Each interior value is compared with the linear interpolation of its two neighbours (exact for
    linear trends): e_i = v_i − ((1 − α) v_{i−1} + α v_{i+1}), Var e_i = σ² (1 + α² + (1 − α)²);
    σ̂ is 1.4826 times the median of |e_i| / sqrt(1 + α² + (1 − α)²). Curvature leaks in only where
    checkpoints are sparse; the median ignores those. Returns 0 for fewer than 3 points."""
    _, v, x = _prepare(steps, values, offset)
    if v.size < 3:
        return 0.0
    alpha = (x[1:-1] - x[:-2]) / (x[2:] - x[:-2])
    e = v[1:-1] - ((1 - alpha) * v[:-2] + alpha * v[2:])
    return float(1.4826 * np.median(np.abs(e) / np.sqrt(1 + alpha**2 + (1 - alpha) ** 2)))


def smooth_log(
    steps: ArrayLike,
    values: ArrayLike,
    smooth_sigma: float = 0.15,
    *,
    offset: float = 1.0,
    truncate: float = 3.0,
) -> np.ndarray:
    """Centred Gaussian local-linear smoothing of a curve in log-step x = log(step + offset); σ in units of x
    (0.15 ≈ ±16 % in step). (T,) → (T,). For overlaying on raw curves and locating critical points."""
    _, v, x = _prepare(steps, values, offset)
    return _fit(x, v, smooth_sigma, truncate)[0]


def log_derivative(
    steps: ArrayLike,
    values: ArrayLike,
    smooth_sigma: float = 0.0,
    *,
    offset: float = 1.0,
    truncate: float = 3.0,
) -> np.ndarray:
    """dλ̂/d log t at the real checkpoint steps (Hoogland et al. §3.3 critical points; docs/papers.md §D4).

    Args:
        steps: (T,) strictly increasing checkpoint steps (step 0 allowed: x = log(step + offset)).
        values: (T,) the curve (LLC, loss, …).
        smooth_sigma: 0 (default) gives second-order finite differences on the irregular grid,
            (`np.gradient(values, x)`); > 0 gives the slope of a Gaussian-weighted local linear fit centred at
            each checkpoint, σ in natural-log units (0.1 ≈ ±10 % in step). Where fewer than two
            checkpoints lie within `truncate`·σ the finite difference is used.
        offset: added to the steps before the log.

    Returns:
        (T,) derivative with respect to log(step + offset).
    """
    _, v, x = _prepare(steps, values, offset)
    return _fit(x, v, smooth_sigma, truncate)[1]


@dataclass(frozen=True)
class Milestone:
    """A critical point of a curve against log step.

    Attributes:
        step: checkpoint step of the milestone (a stage boundary).
        index: its index in the steps array.
        kind: 'max' (derivative + → −), 'min' (− → +) or 'plateau' (flat, same sign on both sides, or a flat
            stretch that reaches the end of the curve).
        value: smoothed curve value there.
        plateau_start, plateau_end: steps bounding the flat stretch (|slope| ≤ tol) that contains it.
    """

    step: float
    index: int
    kind: MilestoneKind
    value: float
    plateau_start: float
    plateau_end: float


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive (start, end) index pairs of the runs of True in a boolean array."""
    if not mask.any():
        return []
    m = np.concatenate([[False], mask, [False]]).astype(np.int8)
    d = np.diff(m)
    starts = np.nonzero(d == 1)[0]
    ends = np.nonzero(d == -1)[0] - 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def find_milestones(
    steps: ArrayLike,
    llc: ArrayLike,
    *,
    se: ArrayLike | float | None = None,
    smooth_sigma: float = 0.15,
    plateau_tol: float | None = None,
    min_plateau_width: float = 0.3,
    noise: float | None = None,
    noise_z: float = 2.0,
    change_z: float = 4.0,
    min_change: float | None = None,
    edge_plateaus: Literal["none", "end", "both"] = "end",
    offset: float = 1.0,
    truncate: float = 3.0,
) -> list[Milestone]:
    """Milestones of an LLC (or loss) curve: critical points of λ̂ against log step (Hoogland et al. §3.3).

    For an LLC curve, pass only the trustworthy estimates and their standard errors (:func:`llc_milestones`
    does both from llc.parquet rows): the thresholds are then in units of the estimates' standard errors, and
    nothing depends on the curve's range, so a stretch of off-minimum estimates cannot set the scale.

    Procedure (docs/papers.md §D4):
      1. x = log(step + offset); smoothed value a(x) and slope d(x) = dλ̂/dx by a centred local-linear
         Gaussian fit of width `smooth_sigma` (see :func:`log_derivative`). Both are linear in the values, so
         their standard errors follow from the per-point standard errors se_k (taken as independent):
         SE(d_i)² = Σ_k B_ik² se_k² (for the local linear fit Σ w_k² d̃_k² se_k² / (Σ w_k d̃_k²)²) and
         SE(a_j − a_i)² = Σ_k (A_jk − A_ik)² se_k², with A, B the fit's weights.
      2. A checkpoint is *flat* when its slope is not significantly non-zero, |d| ≤ noise_z · SE(d), or (range
         path only, see below) when |d| ≤ plateau_tol · (max a − min a).
      3. A run of steep checkpoints is noise, not development, and counted as flat when the change of the
         smoothed curve across it (from the checkpoint before the run to the one after) is within change_z
         standard errors of that change, |a_j − a_i| ≤ change_z · SE(a_j − a_i), or (range path only) below
         `min_change` · (max a − min a).
      4. Flat stretches are maximal runs of flat checkpoints. For each stretch strictly inside the curve, the
         milestone sits at the stretch's centre in x (robust to noise; for a sharp turn the stretch is
         narrow and its centre is the turning point), and the sign of d just outside it decides the kind:
           + then − → 'max';  − then + → 'min';
           same sign  → 'plateau', kept only if the stretch spans at least `min_plateau_width` in x
                        (a brief slow-down is not a milestone).
         A sign change of d between two consecutive steep checkpoints (a sharp peak that the grid
         steps over) also gives a 'max' / 'min', at the more extreme of the two.
      5. Flat stretches touching an end of the curve: with `edge_plateaus` = "end" (default) a final
         stretch of width ≥ `min_plateau_width` gives a 'plateau' milestone where it starts (the step at
         which the curve settles); "both" also marks where an initial flat stretch ends; "none" ignores both.
         The initial one is off by default: log(step + 1) stretches the first few steps, where nothing has
         happened yet, over a wide x range, so it would nearly always be flagged.

    Standard errors, two paths:
      - `se` given (the LLC path): per-point standard errors of the values, e.g. the Monte-Carlo standard error
        of each λ̂ or its std over chains / sqrt(chains). Entries that are not finite and positive (e.g. a
        one-chain estimate) are replaced by :func:`estimate_noise` of the curve. plateau_tol and min_change
        default to 0: no range-based threshold.
      - `se` None (the range path, for curves without per-point errors such as a loss): every point has the
        standard error `noise` (default :func:`estimate_noise`, a robust scatter estimate), and plateau_tol and
        min_change default to 0.05, so that a smooth, noise-free curve, whose estimated noise is ~0, still has
        plateaus where it is nearly flat.
      Passing plateau_tol or min_change explicitly applies them on either path.

    Defaults and why:
      - smooth_sigma 0.15 (≈ ±16 % in step): removes checkpoint-to-checkpoint SGLD noise, while stages span at
        least a factor ~2 in step (0.7 in x), so distinct critical points are not merged;
      - noise_z 2: a slope within two standard errors of 0 is flat. This only splits the curve into flat and
        steep stretches (and sets where a plateau starts); the steep runs that noise produces at this level
        (about 5 % of the slopes for Gaussian errors) are removed by the next test. 0 disables the test;
      - change_z 4: the change test is repeated for every steep run along the curve, tens of nearly
        independent windows on a log-step grid of a few hundred checkpoints, so it needs a margin for
        multiple comparisons: the two-sided Gaussian tail beyond 4 SE is 6e-5 per window, so a curve of pure
        noise rarely gets a milestone, whereas at 2 SE (5 % per window) most such curves would get one. A real
        stage moves the curve by many standard errors of its change (the SE of a change is far below that of
        one point, since the smoothed values share data). 0 disables the test;
      - plateau_tol 0.05 (range path): the curve moves by < 5 % of its total range per e-fold of steps;
      - min_change 0.05 (range path): a stage must move the curve by at least 5 % of its range (Hoogland's
        smallest regression stage, LR3, moves the LLC by about 7 % of its range);
      - min_plateau_width 0.3 (a factor 1.35 in step): shorter slow-downs are not plateaus;
      - offset 1: step 0 maps to x = 0.

    Args:
        steps: (T,) strictly increasing checkpoint steps.
        llc: (T,) curve values (LLC means; or a loss).
        se: (T,) per-point standard errors of the values (or one number for all); None → the range path.
        noise: range path only: known noise σ of every value; None → :func:`estimate_noise`.

    Returns:
        Milestones sorted by step (`index` into `steps`). A constant curve has none.
    """
    s, v, x = _prepare(steps, llc, offset)
    a, d = _fit(x, v, smooth_sigma, truncate)
    T = s.size
    span = float(a.max() - a.min())
    if span <= 1e-12 * max(1.0, float(np.abs(a).max())):  # constant up to rounding
        return []
    if se is not None:
        sev = to_numpy(se).reshape(-1)
        if sev.size == 1:
            sev = np.full(T, sev[0])
        elif sev.shape != (T,):
            raise ValueError(f"se {sev.shape} must be one number or one per checkpoint ({T},)")
        bad = ~(np.isfinite(sev) & (sev > 0))
        if bad.any():
            sev = np.where(bad, estimate_noise(s, v, offset=offset), sev)
        range_default = 0.0
    else:
        sev = np.full(T, estimate_noise(s, v, offset=offset) if noise is None else float(noise))
        range_default = 0.05
    tol = range_default if plateau_tol is None else plateau_tol
    min_move = range_default if min_change is None else min_change
    flat = np.abs(d) <= np.maximum(tol * span, noise_z * _slope_se(x, sev, smooth_sigma, truncate))
    # a steep run whose change is within change_z standard errors (or below min_change of the range) is noise
    runs = _runs(~flat)
    pairs = [(max(j0 - 1, 0), min(j1 + 1, T - 1)) for j0, j1 in runs]
    change_se = _change_se(x, sev, pairs, smooth_sigma, truncate)
    for (j0, j1), (lo_i, hi_i), c_se in zip(runs, pairs, change_se, strict=True):
        change = abs(a[hi_i] - a[lo_i])
        if change < min_move * span or change <= change_z * c_se:
            flat[j0 : j1 + 1] = True
    found: dict[int, Milestone] = {}

    def add(i: int, kind: MilestoneKind, i0: int, i1: int) -> None:
        found.setdefault(
            int(i), Milestone(float(s[i]), int(i), kind, float(a[i]), float(s[i0]), float(s[i1]))
        )

    for i0, i1 in _runs(flat):
        width = x[i1] - x[i0]
        seg = np.arange(i0, i1 + 1)
        if i0 > 0 and i1 < T - 1:
            left, right = np.sign(d[i0 - 1]), np.sign(d[i1 + 1])
            mid = int(seg[np.argmin(np.abs(x[seg] - 0.5 * (x[i0] + x[i1])))])
            if left > 0 > right:
                add(mid, "max", i0, i1)
            elif left < 0 < right:
                add(mid, "min", i0, i1)
            elif width >= min_plateau_width:
                add(mid, "plateau", i0, i1)
        elif width >= min_plateau_width and not (i0 == 0 and i1 == T - 1):
            if i1 == T - 1 and edge_plateaus in ("end", "both"):
                add(i0, "plateau", i0, i1)
            elif i0 == 0 and edge_plateaus == "both":
                add(i1, "plateau", i0, i1)
    for i in range(T - 1):
        if flat[i] or flat[i + 1]:
            continue
        if d[i] > 0 > d[i + 1]:
            j = i if a[i] >= a[i + 1] else i + 1
            add(j, "max", j, j)
        elif d[i] < 0 < d[i + 1]:
            j = i if a[i] <= a[i + 1] else i + 1
            add(j, "min", j, j)
    return [found[k] for k in sorted(found)]


SE_COLUMNS = ("llc_se", "llc_mcse")  # llc.parquet columns holding a standard error of λ̂, preferred first


def trusted_mask(llc: pd.DataFrame) -> np.ndarray:
    """Which rows of an LLC table (llc.parquet: llc_mean, flags, …) may place stage boundaries: (N,) bool, in
    the table's row order.

    A row is trusted when λ̂ is finite and > 0 and the sampler raised no flag (:func:`icl_lab.llc.sampler_ok`
    of `flags`; "not_at_minimum", a property of the checkpoint, does not count). λ̂ ≤ 0 is impossible for an
    LLC: it comes from chains that found lower loss than w*, as early, off-minimum checkpoints do, and such
    estimates can be thousands of times larger in magnitude than the rest of the curve. Without a `flags`
    column the `ok` column decides (no flag of any kind), and without either every positive estimate counts.
    Untrusted rows are still drawn (:func:`icl_lab.plots.plot_stages`), just not used."""
    mean = pd.to_numeric(llc["llc_mean"], errors="coerce").to_numpy(dtype=np.float64)
    keep = np.isfinite(mean) & (mean > 0)
    if "flags" in llc.columns:
        keep &= np.array([sampler_ok(f) for f in llc["flags"]], dtype=bool)
    elif "ok" in llc.columns:
        keep &= llc["ok"].fillna(False).to_numpy(dtype=bool)
    return keep


def llc_standard_errors(llc: pd.DataFrame) -> np.ndarray:
    """Standard error of each λ̂ of an LLC table: (N,), in the table's row order.

    The first finite, positive value of: column `llc_se`, column `llc_mcse` (Monte-Carlo standard error),
    llc_std / sqrt(num_chains) (the spread of the chains' means, taken as independent); NaN when none exists
    (:func:`find_milestones` then uses the curve's estimated scatter for that point)."""
    n = len(llc)

    def col(name: str) -> np.ndarray:
        if name not in llc.columns:
            return np.full(n, np.nan)
        return pd.to_numeric(llc[name], errors="coerce").to_numpy(dtype=np.float64)

    with np.errstate(divide="ignore", invalid="ignore"):
        chains = col("num_chains")
        se = np.where(chains > 0, col("llc_std") / np.sqrt(chains), np.nan)
    for name in reversed(SE_COLUMNS):
        v = col(name)
        se = np.where(np.isfinite(v) & (v > 0), v, se)
    return se


def llc_milestones(llc: pd.DataFrame, **kwargs: Any) -> list[Milestone]:
    """Stage boundaries of an LLC table (llc.parquet rows: step, llc_mean, flags, llc_std, num_chains and
    optionally llc_se / llc_mcse) from its trusted rows only (:func:`trusted_mask`), with thresholds in units of
    their standard errors (:func:`llc_standard_errors`). kwargs go to :func:`find_milestones`; a Milestone's
    `index` counts trusted rows by step. Fewer than 3 trusted rows give no milestones."""
    rows = llc.sort_values("step")
    rows = rows[trusted_mask(rows)]
    if len(rows) < 3:
        return []
    return find_milestones(
        rows["step"].to_numpy(dtype=np.float64),
        rows["llc_mean"].to_numpy(dtype=np.float64),
        se=llc_standard_errors(rows),
        **kwargs,
    )


# ================================================================================================ boundary intervals
# Fixed before any study used them (docs/papers.md §D4).
BOUNDARY_MATCH_TOL = 0.5  # log step (a factor 1.65): wider than cross_check's 0.3, so an interval can exceed it
MIN_SEEDS_FOR_INTERVALS = 3  # seeds needed before the seed bootstrap is made (fewer: too few units to resample)
INTERVAL_COLUMNS = ["end_lo", "end_hi", "end_missing", "end_interval"]  # added to a stage table


def bootstrap_boundaries(
    boundaries: Sequence[Milestone | float],
    n_units: int,
    milestones_of: Callable[[np.ndarray], Sequence[Milestone]],
    *,
    method: str,
    match_tol: float = BOUNDARY_MATCH_TOL,
    n_boot: int = 2000,
    seed: int = 0,
    offset: float = 1.0,
) -> pd.DataFrame:
    """95% percentile-bootstrap intervals on boundary steps (:func:`icl_lab.intervals.bootstrap_interval`).

    Args:
        boundaries: the boundaries found on all units (milestones or steps).
        n_units: number of exchangeable units (chains, seeds); resamples draw n_units of them with replacement.
        milestones_of: (n_units,) int unit indices (with repeats) → the milestones of the curve made from those
            units. It must not depend on their order (it is cached by the sorted indices).
        method: the units, for the table (e.g. "4 chains").
        match_tol: a boundary at x_b = log(step + offset) is re-found in a resample when a milestone lies within
            match_tol of x_b; its statistic is the nearest one's x, nan when none does.
    Returns:
        DataFrame, one row per boundary: step, lo, hi (the interval in steps; nan when fewer than 2 units or more
        than half the resamples miss it), missing (fraction of resamples without it), method.
    """
    cache: dict[tuple[int, ...], np.ndarray] = {}

    def xs(idx: np.ndarray) -> np.ndarray:
        key = tuple(sorted(int(i) for i in idx))
        if key not in cache:
            cache[key] = np.log(np.array([m.step for m in milestones_of(np.asarray(key))], dtype=np.float64)
                                + offset)
        return cache[key]

    units = np.arange(n_units)
    rows = []
    for b in boundaries:
        step = float(b.step if isinstance(b, Milestone) else b)
        xb = float(np.log(step + offset))

        def stat(idx: np.ndarray, xb: float = xb) -> float:
            x = xs(idx)
            if x.size == 0:
                return np.nan
            near = x[np.argmin(np.abs(x - xb))]
            return float(near) if abs(near - xb) <= match_tol else np.nan

        iv, missing = bootstrap_interval(units, stat, n_boot=n_boot, seed=seed)
        rows.append({"step": step, "lo": float(np.exp(iv.lo) - offset), "hi": float(np.exp(iv.hi) - offset),
                     "missing": missing, "method": f"{iv.method} ({method})"})
    return pd.DataFrame(rows, columns=["step", "lo", "hi", "missing", "method"])


def chain_matrix(llc: pd.DataFrame) -> np.ndarray | None:
    """Per-chain λ̂ of an LLC table (llc.parquet column `llc_per_chain`, one list per row): (N, C) in the table's
    row order, or None when the column is missing, a row has none, or rows have different numbers of chains."""
    if "llc_per_chain" not in llc.columns or llc.empty:
        return None
    rows = [np.asarray(v, dtype=np.float64).reshape(-1) if v is not None else np.zeros(0)
            for v in llc["llc_per_chain"]]
    sizes = {r.size for r in rows}
    if len(sizes) != 1 or 0 in sizes:
        return None
    return np.stack(rows)


def chain_boundary_intervals(llc: pd.DataFrame, boundaries: Sequence[Milestone | float], *, n_boot: int = 2000,
                             seed: int = 0, **kwargs: Any) -> pd.DataFrame:
    """Boundary intervals of one LLC curve from its chains (:func:`bootstrap_boundaries`).

    llc: llc.parquet rows (step, llc_mean, flags, llc_per_chain, …); the trusted rows (:func:`trusted_mask`) and
    their standard errors (:func:`llc_standard_errors`) are those of the estimate and stay fixed; a resample
    replaces each trusted λ̂ by the mean over the resampled chains (the same chains at every checkpoint). kwargs go
    to :func:`find_milestones`. Without per-chain values (:func:`chain_matrix` None) or with one chain, the
    intervals are nan and `method` says why."""
    rows = llc.sort_values("step")
    rows = rows[trusted_mask(rows)]
    chains = chain_matrix(rows)
    if chains is None or chains.shape[1] < 2 or len(rows) < 3:
        why = "no per-chain λ̂" if chains is None else ("one chain" if chains.shape[1] < 2 else "< 3 trusted rows")
        return pd.DataFrame([{"step": float(b.step if isinstance(b, Milestone) else b), "lo": np.nan, "hi": np.nan,
                              "missing": np.nan, "method": f"none ({why})"} for b in boundaries],
                            columns=["step", "lo", "hi", "missing", "method"])
    steps = rows["step"].to_numpy(dtype=np.float64)
    se = llc_standard_errors(rows)

    def milestones_of(idx: np.ndarray) -> list[Milestone]:
        return find_milestones(steps, chains[:, idx].mean(axis=1), se=se, **kwargs)

    return bootstrap_boundaries(boundaries, chains.shape[1], milestones_of, method=f"{chains.shape[1]} chains",
                                n_boot=n_boot, seed=seed, offset=kwargs.get("offset", 1.0))


def seed_mean_curve(llcs: Sequence[pd.DataFrame], idx: Sequence[int] | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seed-mean λ̂ curve of several runs' LLC tables (the units `idx`, with repeats; None: all).

    A step enters when every unit has a trusted estimate there (:func:`trusted_mask`); the value is the mean over
    units and its standard error sqrt(Σ se_u²) / U from each estimate's own (:func:`llc_standard_errors`).
    Returns (steps (S,), mean (S,), se (S,))."""
    idx = list(range(len(llcs))) if idx is None else [int(i) for i in idx]
    frames = []
    for u in idx:
        t = llcs[u].sort_values("step")
        t = t[trusted_mask(t)]
        frames.append(pd.Series(t["llc_mean"].to_numpy(np.float64), index=t["step"].to_numpy(np.float64)).to_frame()
                      .assign(se=llc_standard_errors(t)))
    common = sorted(set.intersection(*(set(f.index) for f in frames))) if frames else []
    if not common:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    vals = np.stack([f.loc[common].iloc[:, 0].to_numpy() for f in frames])
    ses = np.stack([f.loc[common, "se"].to_numpy() for f in frames])
    se = np.sqrt(np.nansum(ses**2, axis=0)) / len(frames)
    se[~np.isfinite(ses).all(axis=0)] = np.nan
    return np.asarray(common), vals.mean(axis=0), se


def seed_boundary_intervals(llcs: Sequence[pd.DataFrame], *, n_boot: int = 2000, seed: int = 0,
                            **kwargs: Any) -> tuple[list[Milestone], pd.DataFrame]:
    """Boundaries of the seed-mean λ̂ curve (:func:`seed_mean_curve`) with intervals from resampling the seeds
    (:func:`bootstrap_boundaries`). llcs: one llc.parquet table per seed (≥ 2; studies require
    MIN_SEEDS_FOR_INTERVALS). kwargs go to :func:`find_milestones`. Returns (milestones, intervals)."""
    if len(llcs) < 2:
        raise ValueError(f"seed_boundary_intervals needs at least 2 seeds, got {len(llcs)}")

    def milestones_of(idx: np.ndarray) -> list[Milestone]:
        steps, mean, se = seed_mean_curve(llcs, idx)
        return find_milestones(steps, mean, se=se, **kwargs) if steps.size >= 3 else []

    found = milestones_of(np.arange(len(llcs)))
    return found, bootstrap_boundaries(found, len(llcs), milestones_of, method=f"{len(llcs)} seeds", n_boot=n_boot,
                                       seed=seed, offset=kwargs.get("offset", 1.0))


def add_boundary_intervals(table: pd.DataFrame, intervals: pd.DataFrame) -> pd.DataFrame:
    """A stage table with each stage's END boundary interval (INTERVAL_COLUMNS: end_lo, end_hi, end_missing,
    end_interval = the method); matched on the step (a boundary from :func:`llc_milestones` is a trusted
    checkpoint, where :func:`stage_table` keeps it). The last stage ends with training: no interval."""
    out = table.copy()
    by_step = {float(r.step): r for r in intervals.itertuples()}
    lo, hi, miss, method = [], [], [], []
    for n, end in enumerate(out["end"].to_numpy(dtype=np.float64)):
        r = by_step.get(float(end)) if n < len(out) - 1 else None
        lo.append(np.nan if r is None else r.lo)
        hi.append(np.nan if r is None else r.hi)
        miss.append(np.nan if r is None else r.missing)
        method.append("" if r is None else r.method)
    out["end_lo"], out["end_hi"], out["end_missing"], out["end_interval"] = lo, hi, miss, method
    return out


# ================================================================================================ where to estimate
def snap_steps(wanted: ArrayLike, available: ArrayLike, offset: float = 1.0) -> np.ndarray:
    """Each wanted step moved to the nearest available one in log(step + offset); sorted, unique. (W,), (A,) →
    (≤ W,) int64."""
    w = to_numpy(wanted).reshape(-1).astype(np.float64)
    a = np.unique(to_numpy(available).reshape(-1).astype(np.float64))
    if a.size == 0 or w.size == 0:
        return np.zeros(0, dtype=np.int64)
    near, _ = _nearest(w, a, offset)
    return np.unique(near).astype(np.int64)


def loss_moving_steps(steps: ArrayLike, loss: ArrayLike, n_loss: int, n_log: int, offset: float = 1.0) -> np.ndarray:
    """A sparse set of checkpoints at which to estimate λ̂, placed where the loss moves (docs/llc.md,
    "What this costs").

    Rule: with c_i = Σ_{k ≤ i} |ℓ_k − ℓ_{k−1}| / Σ_k |ℓ_k − ℓ_{k−1}| (the share of the loss curve's total variation
    done by checkpoint i), the first checkpoint with c_i ≥ (j − ½)/n_loss for j = 1..n_loss; then n_log
    log-spaced steps from the first positive checkpoint to the last, snapped to checkpoints (stages that do not show
    in the loss, Hoogland et al. §4, still get estimates); and the last checkpoint. Duplicates merge, so fewer
    than n_loss + n_log + 1 may come back.

    steps: (T,) strictly increasing checkpoint steps; loss: (T,) the test loss there. Returns sorted int64 steps.
    """
    s, lo, _ = _prepare(steps, loss, offset)
    if n_loss < 1 or n_log < 0:
        raise ValueError(f"loss_moving_steps: n_loss must be >= 1 and n_log >= 0, got {n_loss}, {n_log}")
    tv = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(lo)))])
    picks = [s[-1]]
    if tv[-1] > 0:
        c = tv / tv[-1]
        picks += [s[int(np.argmax(c >= (j - 0.5) / n_loss))] for j in range(1, n_loss + 1)]
    pos = s[s > 0]
    if n_log and pos.size:
        picks += list(snap_steps(np.geomspace(pos[0], s[-1], n_log), s, offset))
    return np.unique(np.asarray(picks, dtype=np.float64)).astype(np.int64)


def milestones_frame(milestones: Sequence[Milestone]) -> pd.DataFrame:
    """Milestones as a DataFrame (columns step, index, kind, value, plateau_start, plateau_end)."""
    cols = ["step", "index", "kind", "value", "plateau_start", "plateau_end"]
    return pd.DataFrame([asdict(m) for m in milestones], columns=cols)


def _as_steps(points: Any) -> np.ndarray:
    """Steps from Milestones, numbers, an EssentialDynamics (its cusp/vertex steps) or None."""
    if points is None:
        return np.zeros(0)
    if hasattr(points, "event_steps"):
        return np.asarray(points.event_steps(), dtype=np.float64)
    out = [p.step if isinstance(p, Milestone) else float(p) for p in points]
    return np.asarray(sorted(out), dtype=np.float64)


def _nearest(targets: np.ndarray, candidates: np.ndarray, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """For each target step: the nearest candidate step in log(step + offset), and the distance in log."""
    if candidates.size == 0:
        return np.full(targets.size, np.nan), np.full(targets.size, np.nan)
    xt = np.log(targets + offset)[:, None]
    xc = np.log(candidates + offset)[None, :]
    dist = np.abs(xt - xc)
    j = np.argmin(dist, axis=1)
    return candidates[j], dist[np.arange(targets.size), j]


def _coverage(events: np.ndarray, lo: float, hi: float, tol: float, offset: float) -> float:
    """Fraction of [lo, hi] (log-step coordinates) lying within `tol` of some event step."""
    if events.size == 0 or hi <= lo:
        return 0.0
    xe = np.sort(np.log(events + offset))
    covered, cur_a, cur_b = 0.0, None, None
    for a, b in zip(np.maximum(xe - tol, lo), np.minimum(xe + tol, hi), strict=True):
        if b <= a:
            continue
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                covered += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        covered += cur_b - cur_a
    return float(covered / (hi - lo))


def cross_check(
    boundaries: Sequence[Milestone | float] | np.ndarray,
    loss_plateaus: Sequence[Milestone | float] | np.ndarray | None,
    ed_events: Sequence[float] | np.ndarray | EssentialDynamics | None,
    tol_in_log_steps: float = 0.3,
    *,
    steps: ArrayLike | None = None,
    offset: float = 1.0,
) -> pd.DataFrame:
    """Corroborate LLC stage boundaries with loss milestones and ED forms (Hoogland et al. §3.3, §4).

    Args:
        boundaries: LLC milestones (or their steps).
        loss_plateaus: milestones of the loss curve (e.g. :func:`find_milestones` on the loss), or steps.
        ed_events: steps of ED cusps / vertices, or an :class:`~icl_lab.trajectory.EssentialDynamics`.
        tol_in_log_steps: a boundary is corroborated when the nearest event is within this distance in
            log(step + offset) (0.3 ≈ a factor 1.35 in step).
        steps: the run's checkpoint steps; when given, the columns loss_chance / ed_chance say which fraction
            of the log-step range lies within tolerance of some event, i.e. the probability that a boundary
            placed at random would be "corroborated" too. Dense events (e.g. many vertices of a noisy,
            under-smoothed ED curve) corroborate everything and mean little.

    Returns:
        DataFrame, one row per boundary: boundary (step), loss_step, loss_dlog, loss_agrees, ed_step, ed_dlog,
        ed_agrees (nearest event of each kind, its distance in log step, and whether it is within tolerance),
        plus loss_chance, ed_chance when `steps` is given.
    """
    b = _as_steps(boundaries)
    le, ee = _as_steps(loss_plateaus), _as_steps(ed_events)
    ls, ld = _nearest(b, le, offset)
    es, edd = _nearest(b, ee, offset)
    df = pd.DataFrame(
        {
            "boundary": b,
            "loss_step": ls,
            "loss_dlog": ld,
            "loss_agrees": np.nan_to_num(ld, nan=np.inf) <= tol_in_log_steps,
            "ed_step": es,
            "ed_dlog": edd,
            "ed_agrees": np.nan_to_num(edd, nan=np.inf) <= tol_in_log_steps,
        }
    )
    if steps is not None:
        x = log_steps(steps, offset)
        lo, hi = float(x.min()), float(x.max())
        df["loss_chance"] = _coverage(le, lo, hi, tol_in_log_steps, offset)
        df["ed_chance"] = _coverage(ee, lo, hi, tol_in_log_steps, offset)
    return df


def stage_table(
    steps: ArrayLike,
    llc: ArrayLike,
    loss: ArrayLike | None,
    boundaries: Sequence[Milestone | float] | np.ndarray,
    *,
    loss_plateaus: Sequence[Milestone | float] | np.ndarray | Literal["auto"] | None = None,
    ed_events: Sequence[float] | np.ndarray | EssentialDynamics | None = None,
    tol_in_log_steps: float = 0.3,
    offset: float = 1.0,
    trusted: ArrayLike | None = None,
) -> pd.DataFrame:
    """The stage table (Hoogland et al. Tables 1-2): one row per interval between successive boundaries.

    Stages run from the first checkpoint to the first boundary, between boundaries, and from the last
    boundary to the last checkpoint. Each boundary is snapped to the nearest trusted checkpoint step (in log
    step).

    Args:
        steps: (T,) strictly increasing checkpoint steps.
        llc: (T,) LLC estimates (raw means; deltas use these raw values at the stage ends).
        loss: (T,) test loss at the same checkpoints, or None (delta_loss NaN).
        boundaries: milestones (e.g. :func:`find_milestones`) or steps.
        loss_plateaus, ed_events, tol_in_log_steps: optional cross-checks of each stage's END boundary (see
            :func:`cross_check`); adds columns loss_step, loss_agrees, ed_step, ed_agrees and the chance
            levels loss_chance, ed_chance (fraction of the log-step range within tolerance of an event).
            loss_plateaus="auto" finds them on `loss` with :func:`find_milestones` and its defaults (the range
            path: a loss has no per-point standard errors).
        trusted: (T,) bool, which λ̂ are trustworthy (:func:`trusted_mask`); None → all. Only trusted λ̂ enter
            the table: each stage's LLC change runs from its first to its last trusted checkpoint (columns
            llc_start_step, llc_end_step; the stage ends themselves when they are trusted, as boundaries
            from :func:`llc_milestones` are), and is NaN, with type '?', when the stage holds fewer than two.
            The loss columns still use the stage ends.

    Returns:
        DataFrame with columns stage (1, 2, …), start, end (steps), delta_loss (= loss(end) − loss(start)),
        delta_llc (= λ̂(llc_end_step) − λ̂(llc_start_step)), rel_delta_llc (delta_llc / range of the trusted λ̂,
        to spot negligible stages), type ('A' if delta_llc > 0, the LLC rises; 'B' if ≤ 0; '?' if NaN),
        end_kind (the milestone kind at the end boundary, 'end' for the last stage), llc_start, llc_end,
        llc_start_step, llc_end_step, loss_start, loss_end, and the cross-check columns when requested.
    """
    s, lam, x = _prepare(steps, llc, offset)
    if loss is None:
        lo = np.full(s.size, np.nan)
    else:
        lo = to_numpy(loss).reshape(-1)
        if lo.shape != s.shape:
            raise ValueError(f"loss {lo.shape} and steps {s.shape} must have the same length")
    ok = np.ones(s.size, dtype=bool) if trusted is None else np.asarray(trusted, dtype=bool).reshape(-1)
    if ok.shape != s.shape:
        raise ValueError(f"trusted {ok.shape} and steps {s.shape} must have the same length")
    kinds: dict[int, str] = {}
    idx: list[int] = []
    candidates = np.nonzero(ok)[0]
    for bnd in boundaries if candidates.size else []:
        st = bnd.step if isinstance(bnd, Milestone) else float(bnd)
        i = int(candidates[np.argmin(np.abs(x[candidates] - np.log(st + offset)))])
        if 0 < i < s.size - 1 and i not in kinds:
            idx.append(i)
            kinds[i] = bnd.kind if isinstance(bnd, Milestone) else "boundary"
    idx = sorted(idx)
    edges = [0, *idx, s.size - 1]
    span = float(lam[ok].max() - lam[ok].min()) if ok.any() else 0.0
    rows = []
    for n in range(len(edges) - 1):
        i, j = edges[n], edges[n + 1]
        inside = candidates[(candidates >= i) & (candidates <= j)]
        ti, tj = (int(inside[0]), int(inside[-1])) if inside.size >= 2 else (-1, -1)
        dl = float(lam[tj] - lam[ti]) if ti >= 0 else np.nan
        rows.append(
            {
                "stage": n + 1,
                "start": s[i],
                "end": s[j],
                "delta_loss": float(lo[j] - lo[i]),
                "delta_llc": dl,
                "rel_delta_llc": dl / span if span > 0 else dl * 0.0,
                "type": "A" if dl > 0 else ("B" if dl <= 0 else "?"),
                "end_kind": kinds.get(j, "end"),
                "llc_start": float(lam[ti]) if ti >= 0 else np.nan,
                "llc_end": float(lam[tj]) if ti >= 0 else np.nan,
                "llc_start_step": s[ti] if ti >= 0 else np.nan,
                "llc_end_step": s[tj] if ti >= 0 else np.nan,
                "loss_start": float(lo[i]),
                "loss_end": float(lo[j]),
            }
        )
    df = pd.DataFrame(rows)
    if isinstance(loss_plateaus, str):
        if loss_plateaus != "auto" or loss is None:
            raise ValueError("loss_plateaus='auto' needs a loss curve")
        loss_plateaus = find_milestones(s, lo, offset=offset)
    if loss_plateaus is not None or ed_events is not None:
        cc = cross_check(
            df["end"].to_numpy(), loss_plateaus, ed_events, tol_in_log_steps, steps=s, offset=offset
        )
        last = df.index == df.index[-1]
        for col in ("loss_step", "loss_agrees", "ed_step", "ed_agrees", "loss_chance", "ed_chance"):
            df[col] = cc[col].to_numpy()
        # the end of training is not a boundary: nothing to corroborate there
        df.loc[last, ["loss_step", "ed_step"]] = np.nan
        df.loc[last, ["loss_agrees", "ed_agrees"]] = False
    return df


def save_stage_table(df: pd.DataFrame, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a stage table as Parquet and CSV next to each other (`path` with or without a .parquet/.csv
    suffix). Each is written atomically (`icl_lab.atomic.atomic_write`), so a reader never sees a half-written
    table. Returns (parquet_path, csv_path)."""
    p = Path(path)
    if p.suffix.lower() in {".parquet", ".csv"}:
        p = p.with_suffix("")
    out = [p.parent / f"{p.name}.parquet", p.parent / f"{p.name}.csv"]
    atomic_write(out[0], lambda tmp: df.to_parquet(tmp, index=False))
    atomic_write(out[1], lambda tmp: df.to_csv(tmp, index=False))
    return out[0], out[1]
