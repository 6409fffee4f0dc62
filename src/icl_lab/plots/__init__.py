"""Every matplotlib figure of the toolkit, written as PNG and PDF through `save_figure` (atomic).

Analysis modules (trajectory, stages, llc) return data; the functions here draw it. Steps are plotted where they
were recorded, on a symmetric-log x axis (linear below 1) so that step 0, the initialisation, is shown without
shifting any step (the stage figure, a log axis, leaves step 0 out).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Circle  # noqa: E402

from icl_lab.atomic import atomic_write  # noqa: E402
from icl_lab.intervals import t_half_width  # noqa: E402
from icl_lab.llc_flags import sampler_ok, stable_rows  # noqa: E402
from icl_lab.store import Run  # noqa: E402
from icl_lab.trajectory import ArrayLike, EssentialDynamics, JointTrajectoryPCA, osculating_circles, to_numpy  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from icl_lab.llc import Calibration
    from icl_lab.stages import Milestone

__all__ = [
    "BASELINE_STYLE",
    "SET_TITLE",
    "boundary_spans",
    "llc_half_width",
    "llc_limits",
    "m_axis",
    "m_label",
    "m_positions",
    "per_token_columns",
    "plot_calibration",
    "plot_joint_pca",
    "plot_llc",
    "plot_losses",
    "plot_pc_pairs",
    "plot_run",
    "plot_stages",
    "save_figure",
    "step_axis",
]

BASELINE_STYLE = {"dmmse": ("tab:green", "dMMSE"), "ridge": ("tab:blue", "ridge / least squares"),
                  "zero": ("0.5", "predict 0")}
SET_TITLE = {"id": "in-distribution (pool tasks)", "ood": "out-of-distribution (fresh tasks)"}


def save_figure(fig: plt.Figure, path: str | Path, *, dpi: int = 130) -> tuple[Path, Path]:
    """Save `fig` as PNG and PDF beside each other (a .png / .pdf suffix of `path` is dropped), each written
    atomically; closes pyplot figures. Returns (png_path, pdf_path)."""
    base = Path(path)
    if base.suffix.lower() in {".png", ".pdf"}:
        base = base.with_suffix("")
    out = []
    for ext in ("png", "pdf"):
        target = base.parent / f"{base.name}.{ext}"
        atomic_write(target, lambda p, e=ext: fig.savefig(p, format=e, dpi=dpi, bbox_inches="tight"))
        out.append(target)
    if plt.fignum_exists(fig.number if hasattr(fig, "number") else -1):
        plt.close(fig)
    return out[0], out[1]


def step_axis(ax: plt.Axes) -> None:
    """Symmetric-log step axis (linear below 1), autoscaled in that scale.

    A log y-scale set before it freezes the x-limits at the linear autoscale (from about -5% of the last step,
    so a third of the panel showed negative steps); re-enabling x autoscaling recomputes them on the symlog scale.
    """
    ax.set_xscale("symlog", linthresh=1.0)
    ax.autoscale(enable=True, axis="x")
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3, which="both")


def per_token_columns(df: pd.DataFrame, prefix: str) -> list[str]:
    cols = [c for c in df.columns if c.startswith(prefix + "_k")]
    return sorted(cols, key=lambda c: int(c.rsplit("_k", 1)[1]))


def plot_losses(ax: plt.Axes, metrics: pd.DataFrame, baselines: dict[str, float], set_name: str,
                per_token: bool = True) -> None:
    """Mean loss (black) and per-token losses ℓ_k (viridis, k = 1 dark) of one eval set, with baseline levels."""
    steps = metrics["step"].to_numpy()
    if per_token:
        cols = per_token_columns(metrics, f"{set_name}_loss")
        colours = plt.cm.viridis(np.linspace(0, 0.95, len(cols)))
        for col, c in zip(cols, colours, strict=True):
            k = col.rsplit("_k", 1)[1]
            ax.plot(steps, metrics[col], color=c, lw=0.8, alpha=0.8, label=f"ℓ_{k}" if k in {"1", "2"} else None)
    ax.plot(steps, metrics[f"{set_name}_loss"], color="k", lw=2, label="mean loss")
    for key, (colour, label) in BASELINE_STYLE.items():
        level = baselines.get(f"{set_name}_{key}_loss")
        if level is not None:
            ax.axhline(level, color=colour, ls="--", lw=1.2, label=f"{label} ({level:.3g})")
    ax.set_yscale("log")
    step_axis(ax)
    ax.set_ylabel("squared error")
    ax.set_title(SET_TITLE.get(set_name, set_name))


def llc_half_width(llc: pd.DataFrame) -> np.ndarray:
    """(T,) half-widths of the 95% intervals of llc.parquet rows: t_{0.975, C−1}·llc_std/√C over the C chains
    (column num_chains; 4 chains when absent). The band every LLC figure draws."""
    chains = llc["num_chains"].to_numpy(dtype=float) if "num_chains" in llc else np.full(len(llc), 4.0)
    return np.nan_to_num(t_half_width(llc["llc_std"].to_numpy(dtype=float), chains))


def plot_llc(ax: plt.Axes, curves: Mapping[str, pd.DataFrame], colours: Sequence | None = None) -> None:
    """LLC mean with its 95% interval over chains (`llc_half_width`) against the true checkpoint steps (raw, not
    smoothed), one curve per entry of `curves` (label -> the rows of an llc.parquet: step, llc_mean, llc_std,
    num_chains, ok).

    Estimates with a diagnostic flag (`ok` False) are drawn hollow: diamonds when the only flag is the checkpoint's
    own "not_at_minimum" (w* on a slope: the sample is sound but reads low by the slope term, column llc_slope),
    circles for a sampler flag. The y-axis is scaled to the estimates without a sampler flag, and flagged estimates
    beyond it are drawn at its edge as triangles (their values are in llc.parquet and the legend gives the
    extreme): an early checkpoint that is not near a minimum gives a large negative λ̂ (the chains descend below
    L_n(w*)), which would otherwise flatten the rest of the curve.
    """
    colours = list(colours) if colours is not None else list(plt.cm.tab10(np.arange(len(curves)) % 10))
    rows = {label: _llc_arrays(llc) for label, llc in curves.items()}
    lo, hi = llc_limits(*(np.concatenate([r[i] for r in rows.values()]) for i in (1, 2, 4)))
    for (label, (steps, mean, half, ok, sampled_ok)), colour in zip(rows.items(), colours, strict=True):
        shown = np.clip(mean, lo, hi)
        ax.fill_between(steps, np.clip(mean - half, lo, hi), np.clip(mean + half, lo, hi), color=colour, alpha=0.2,
                        lw=0)
        ax.plot(steps, shown, "-", color=colour, lw=1.2)
        ax.plot(steps[ok], mean[ok], "o", color=colour, ms=3.5, label=label)
        slope = ~ok & sampled_ok  # only "not_at_minimum": a sound sample of a checkpoint on a slope (reads low)
        if slope.any():
            ax.plot(steps[slope], mean[slope], "D", mfc="white", color=colour, ms=3.5,
                    label=f"{label}: w* on a slope (not_at_minimum)")
        inside = ~sampled_ok & (mean >= lo) & (mean <= hi)
        if inside.any():
            ax.plot(steps[inside], mean[inside], "o", mfc="white", color=colour, ms=4, label=f"{label}: flagged")
        below, above = mean < lo, mean > hi  # only estimates with a sampler flag can be off the axis
        if below.any():
            ax.plot(steps[below], shown[below], "v", mfc="white", color=colour, ms=5,
                    label=f"{label}: {below.sum()} flagged below the axis (lowest {mean[below].min():.3g})")
        if above.any():
            ax.plot(steps[above], shown[above], "^", mfc="white", color=colour, ms=5,
                    label=f"{label}: {above.sum()} flagged above the axis (highest {mean[above].max():.3g})")
    ax.set_ylim(lo, hi)
    step_axis(ax)
    ax.set_ylabel("estimated LLC λ̂ (mean, 95% interval over chains)")
    ax.legend(fontsize=7)


def _llc_arrays(llc: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, half-width of the 95% interval, ok, sampled_ok) of the finite estimates, by step: ok = no flag,
    sampled_ok = no flag but
    the checkpoint's own (llc.sampler_ok of `flags`); a missing `ok` column counts as unflagged."""
    llc = llc.sort_values("step")
    llc = llc[np.isfinite(llc["llc_mean"].to_numpy(dtype=float))]
    ok = llc["ok"].to_numpy(dtype=bool) if "ok" in llc else np.ones(len(llc), bool)
    sampled_ok = np.array([sampler_ok(f) for f in llc["flags"]], dtype=bool) if "flags" in llc else ok
    return llc["step"].to_numpy(), llc["llc_mean"].to_numpy(dtype=float), llc_half_width(llc), ok, sampled_ok


def llc_limits(mean: np.ndarray, std: np.ndarray, ok: np.ndarray, pad: float = 0.08) -> tuple[float, float]:
    """y-limits holding mean ± std (the interval half-widths plot_llc and plot_stages pass) of the estimates marked
    ok (plot_llc passes those without a sampler flag; all of them if none is), with 0 shown when it is near, padded
    by `pad` of the range. mean, std, ok: (N,)."""
    if mean.size == 0:
        return 0.0, 1.0
    use = ok if ok.any() else np.ones_like(ok)
    lo, hi = float(np.min((mean - std)[use])), float(np.max((mean + std)[use]))
    if lo > 0 and lo < 0.25 * hi:
        lo = 0.0
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    return lo - pad * span, hi + pad * span


def plot_run(run: Run, path: str | Path | None = None) -> list[Path]:
    """Loss curves on both eval sets (and the LLC curve, if estimated) of one run."""
    metrics, baselines, llc = run.metrics, run.baselines, run.llc
    if metrics.empty:
        raise ValueError(f"{run.path} has no metrics yet; train it first")
    ncols = 3 if llc is not None and len(llc) else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.2), constrained_layout=True)
    for ax, name in zip(axes[:2], ("id", "ood"), strict=True):
        plot_losses(ax, metrics, baselines, name)
    axes[0].legend(fontsize=7, loc="lower left")
    if ncols == 3:
        plot_llc(axes[2], {"LLC": llc}, ["tab:red"])
        axes[2].set_title("local learning coefficient (hollow: diagnostic flag; diamonds: w* on a slope)", fontsize=9)
    t = run.config.task
    fig.suptitle(f"{run.path.name}: M={t.M if t.M is not None else '∞'}, D={t.D}, K={t.K}, σ²={t.noise_var}, "
                 f"{t.family}, preset {run.config.model.preset}, seed {run.config.seed}")
    return save_figure(fig, path or run.path / "figures" / "curves")


# ------------------------------------------------------------------------------------------------ task-diversity axis
def m_label(M: float | int | None) -> str:
    """'∞' for M = None / inf, '2^j' for powers of two, else the integer."""
    if M is None or not np.isfinite(M):
        return "∞"
    M = int(M)
    j = M.bit_length() - 1
    return f"2^{j}" if M == 1 << j else str(M)


def m_positions(Ms: list | np.ndarray, gap: float = 1.5) -> np.ndarray:
    """x positions of task diversities on a log2 axis: log2 M for finite M, and M = ∞ (None or inf) placed `gap`
    beyond the largest finite M, as in Raventós et al.'s figures (x axis 2^0 ... 2^20, ∞)."""
    vals = np.array([np.inf if m is None else float(m) for m in Ms])
    finite = vals[np.isfinite(vals)]
    top = np.log2(finite.max()) if finite.size else 0.0
    return np.where(np.isfinite(vals), np.log2(np.where(np.isfinite(vals), vals, 1.0)), top + gap)


def m_axis(ax: plt.Axes, Ms: list | np.ndarray, gap: float = 1.5, max_ticks: int = 12) -> None:
    """Ticks and label of a task-diversity axis drawn with `m_positions` (every other tick when crowded)."""
    vals = sorted({np.inf if m is None else float(m) for m in Ms})
    pos = m_positions(vals, gap)
    finite = [i for i, v in enumerate(vals) if np.isfinite(v)]
    every = max(1, int(np.ceil(len(finite) / max_ticks)))
    keep = set(finite[::every]) | {i for i, v in enumerate(vals) if not np.isfinite(v)}
    ticks = [i for i in range(len(vals)) if i in keep]
    ax.set_xticks(pos[ticks], [m_label(vals[i]) for i in ticks], fontsize=7)
    ax.set_xlabel("task diversity M (log₂ axis)")
    ax.grid(alpha=0.3)


# ------------------------------------------------------------------------------------------------ LLC calibration
def plot_calibration(cal: Calibration, path: str | Path) -> list[Path]:
    """Left: λ̂ ± std over chains against ε (log axis), one line per (γ, nβ), flagged points hollow, the pick
    circled. Right: the chain-mean loss trace in λ units, nβ(ℓ_t − ℓ_n(w*)), against step (burn-in shaded), one
    line per ε of the picked (γ, nβ) (a `llc.calibrate` result). Saves PNG + PDF; returns both paths."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_l, ax_t = fig.subplots(1, 2)
    tab = cal.table
    stable = stable_rows(tab)
    for (gamma, nb), group in tab.groupby(["localization", "nbeta"], sort=False):
        group = group.sort_values("step_size")
        role = " (check)" if "role" in group.columns and (group["role"] == "check").all() else ""
        line = ax_l.errorbar(group["step_size"], group["llc_mean"], yerr=group["llc_std"].fillna(0), marker="o",
                             mfc="none", capsize=2, label=f"γ = {gamma:.3g} (γ/nβ = {gamma / nb:.3g}){role}")
        good = group[stable[group.index]]
        ax_l.plot(good["step_size"], good["llc_mean"], "o", color=line[0].get_color())
    if cal.index is not None:
        row = tab.loc[cal.index]
        ax_l.plot([row["step_size"]], [row["llc_mean"]], "o", ms=14, mfc="none", mec="k", label="picked")
    ax_l.set_xscale("log")
    ax_l.set_xlabel("step size ε")
    ax_l.set_ylabel("λ̂ (mean ± std over chains)")
    plateau = "on a γ-plateau" if cal.on_plateau else "no γ-plateau"
    ax_l.set_title(f"calibration, nβ = {tab['nbeta'].iloc[0]:.4g} (filled: no sampler flag; {plateau})", fontsize=10)
    ax_l.legend(fontsize=8)
    ref = tab.loc[cal.index] if cal.index is not None else tab.iloc[0]
    sel = tab[(tab["localization"] == ref["localization"]) & (tab["nbeta"] == ref["nbeta"])]
    burnin = 0
    for i, row in sel.sort_values("step_size").iterrows():
        res = cal.results[i]
        if "diverged" in res.diagnostics:  # its trace runs off any useful scale; the left panel shows the flag
            continue
        full = np.concatenate([res.burnin_trace, res.loss_trace], axis=1)
        burnin = res.burnin_trace.shape[1]
        ax_t.plot(res.nbeta * (full.mean(axis=0) - res.init_loss), lw=1, label=f"ε = {row['step_size']:g}")
    if burnin:
        ax_t.axvspan(0, burnin, color="0.9", zorder=0)
    ax_t.set_xlabel("SGLD step (shaded: burn-in)")
    ax_t.set_ylabel("nβ (ℓ_t − ℓ_n(w*)), chain mean")
    ax_t.set_yscale("symlog", linthresh=1.0)
    if ax_t.get_legend_handles_labels()[0]:  # every grid point may have diverged
        ax_t.legend(fontsize=8)
    return list(save_figure(fig, path, dpi=150))


# ------------------------------------------------------------------------------------------------ stages
def boundary_spans(table: pd.DataFrame, xmin: float) -> list[tuple[float, float]]:
    """The finite 95% boundary intervals of a stage table (columns end_lo, end_hi of
    :func:`icl_lab.stages.add_boundary_intervals`; none without them) as (lo, hi) step spans, lo raised to xmin > 0
    for a log axis; a zero-width interval is widened to ±1% so that it still shows."""
    if not {"end_lo", "end_hi"} <= set(table.columns):
        return []
    spans = []
    for lo, hi in zip(table["end_lo"].to_numpy(float), table["end_hi"].to_numpy(float), strict=True):
        if np.isfinite(lo) and np.isfinite(hi) and hi > 0:
            lo, hi = max(lo, xmin), max(hi, xmin)
            spans.append((lo / 1.01, hi * 1.01) if hi <= lo else (lo, hi))
    return spans


def plot_stages(
    steps: ArrayLike,
    loss: ArrayLike,
    llc: ArrayLike,
    llc_err: ArrayLike | None,
    table: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    smoothed_llc: ArrayLike | None = None,
    milestones: Sequence[Milestone] | None = None,
    loss_label: str = "test loss",
    title: str | None = None,
    trusted: ArrayLike | None = None,
) -> tuple[Path, Path]:
    """Hoogland et al. Fig. 1: loss (top) and LLC with its 95% interval (bottom; llc_err: the half-widths,
    `llc_half_width`) against step on a log x-axis,
    with stage bands (orange hues: LLC rising, type A; blue hues: falling, type B; grey: unknown) and stage
    labels.

    Where the table carries boundary intervals (end_lo, end_hi: :func:`icl_lab.stages.add_boundary_intervals`) each
    is drawn as a hatched span around its boundary (:func:`boundary_spans`). Raw values are plotted; `smoothed_llc`
    (e.g. :func:`icl_lab.stages.smooth_log`) is overlaid as a thin line if given, and `milestones` as dashed
    vertical lines. `trusted` ((T,) bool, :func:`icl_lab.stages.trusted_mask`; None → all) marks the estimates the
    stages come from: they are joined by the line and drawn as filled dots; the others are drawn as hollow grey
    circles, the LLC axis is scaled to the trusted estimates' intervals (as in :func:`plot_llc`), and untrusted
    estimates beyond it sit at its edge as hollow grey triangles (the legend gives the extreme). Step 0 cannot sit on
    a log axis: points with step ≤ 0 are left out of the plot and a band starting at 0 is drawn from the first
    positive step. Saves PNG + PDF."""
    s = to_numpy(steps).reshape(-1)
    lo = to_numpy(loss).reshape(-1)
    lam = to_numpy(llc).reshape(-1)
    pos = s > 0
    if not pos.any():
        raise ValueError("plot_stages: need at least one positive step for a log axis")
    xmin = float(s[pos].min())
    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    ax_loss, ax_llc = fig.subplots(2, 1, sharex=True)
    ok = np.ones(s.size, dtype=bool) if trusted is None else np.asarray(trusted, dtype=bool).reshape(-1)
    sd = np.zeros_like(lam) if llc_err is None else np.nan_to_num(to_numpy(llc_err).reshape(-1))
    fin = np.isfinite(lam)
    y_lo, y_hi = llc_limits(lam[pos & fin], sd[pos & fin], ok[pos & fin])
    shown = np.clip(lam, y_lo, y_hi)
    ax_loss.plot(s[pos], lo[pos], "-", color="black", lw=1.4)
    good = pos & ok & fin
    ax_llc.plot(s[good], lam[good], "o-", color="black", lw=1.4, ms=2.5, label="LLC (mean over chains)")
    if llc_err is not None:
        ax_llc.fill_between(
            s[good], (lam - sd)[good], (lam + sd)[good], color="0.6", alpha=0.4, lw=0, label="95% interval"
        )
    bad = pos & ~ok & fin
    inside = bad & (lam >= y_lo) & (lam <= y_hi)
    if inside.any():
        ax_llc.plot(s[inside], lam[inside], "o", mfc="white", color="0.5", ms=4,
                    label="not used for stages (sampler flag or λ̂ ≤ 0)")  # fmt: skip
    for off, marker, where in ((lam < y_lo, "v", "below"), (lam > y_hi, "^", "above")):
        off = off & bad
        if off.any():
            extreme = f"lowest {lam[off].min():.3g}" if where == "below" else f"highest {lam[off].max():.3g}"
            ax_llc.plot(s[off], shown[off], marker, mfc="white", color="0.5", ms=5,
                        label=f"{off.sum()} not used, {where} the axis ({extreme})")  # fmt: skip
    if smoothed_llc is not None:
        sm = to_numpy(smoothed_llc).reshape(-1)
        ax_llc.plot(s[pos], sm[pos], "--", color="tab:red", lw=1.0, label="smoothed (for milestones)")
    oranges, blues = colormaps["Oranges"], colormaps["Blues"]
    na = nb = 0
    for _, row in table.iterrows():
        if row["type"] == "A":
            colour = oranges(0.25 + 0.2 * (na % 2))
            na += 1
        elif row["type"] == "?":
            colour = "0.85"
        else:
            colour = blues(0.25 + 0.2 * (nb % 2))
            nb += 1
        lo_x = max(float(row["start"]), xmin)
        hi_x = max(float(row["end"]), xmin)
        for ax in (ax_loss, ax_llc):
            ax.axvspan(lo_x, hi_x, color=colour, alpha=0.5, lw=0, zorder=0)
        ax_loss.text(
            np.sqrt(lo_x * hi_x),
            1.01,
            f"{int(row['stage'])}{row['type']}",
            transform=ax_loss.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    for m in milestones or []:
        if m.step > 0:
            for ax in (ax_loss, ax_llc):
                ax.axvline(m.step, color="0.3", ls=":", lw=0.8)
    for n, (lo_b, hi_b) in enumerate(boundary_spans(table, xmin)):
        for ax in (ax_loss, ax_llc):
            ax.axvspan(lo_b, hi_b, facecolor="none", edgecolor="0.25", hatch="////", lw=0, alpha=0.6, zorder=1,
                       label="95% interval of a boundary" if n == 0 and ax is ax_llc else None)
    ax_llc.set_ylim(y_lo, y_hi)
    ax_llc.set_xscale("log")
    ax_llc.set_xlabel("step")
    ax_loss.set_ylabel(loss_label)
    ax_llc.set_ylabel("LLC λ̂")
    ax_llc.legend(fontsize=7, loc="best")
    fig.suptitle(title or "Loss and LLC over training, with stages (orange: LLC rising, blue: falling)")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ essential dynamics

def _time_colours(steps: np.ndarray) -> np.ndarray:
    t = np.log10(np.asarray(steps, dtype=np.float64) + 1.0)
    span = t.max() - t.min()
    return (t - t.min()) / span if span > 0 else np.zeros_like(t)


def plot_pc_pairs(
    ed: EssentialDynamics,
    path: str | os.PathLike[str],
    *,
    osculating: bool = False,
    show_raw: bool = True,
    title: str | None = None,
    form_rule: Literal["all", "union"] | None = "all",
) -> tuple[Path, Path]:
    """Grid of PC-pair plots γ_{i,j} of an ED result (Hoogland et al. Fig. 2), coloured by log step.

    Smoothed curve coloured by time (viridis over log10(step + 1)), raw scores faint grey, cusps as red
    crosses, vertices as black open circles; with `osculating`, the osculating circle at each vertex (dashed)
    and the evolute near it. With `form_rule`, the ED forms (:meth:`EssentialDynamics.event_steps` under that rule;
    "all": every PC pair agrees, the paper's) are gold stars on every pair; None draws none. Saves PNG + PDF;
    returns their paths."""
    if ed.smoothed.shape[1] < 2:
        raise ValueError("plot_pc_pairs: need at least 2 components")
    pairs = sorted(ed.features) or [(0, 1)]
    ncols = min(3, len(pairs))
    nrows = int(np.ceil(len(pairs) / ncols))
    fig = Figure(figsize=(4.2 * ncols, 4.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    col = _time_colours(ed.steps)
    norm = Normalize(0.0, 1.0)
    evr = ed.explained_variance_ratio
    lc = None
    forms = np.searchsorted(ed.steps, ed.event_steps(form_rule)) if form_rule is not None and ed.features \
        else np.array([], dtype=int)  # the same checkpoints on every pair
    for n, (i, j) in enumerate(pairs):
        ax = axes[n // ncols][n % ncols]
        z = ed.smoothed[:, [i, j]]
        if show_raw:
            ax.plot(ed.scores[:, i], ed.scores[:, j], ".", color="0.75", ms=2, zorder=1)
        seg = np.stack([z[:-1], z[1:]], axis=1)
        lc = LineCollection(seg, cmap="viridis", norm=norm, linewidths=1.8, zorder=2)
        lc.set_array(0.5 * (col[:-1] + col[1:]))
        ax.add_collection(lc)
        feats = ed.features.get((i, j))
        if forms.size:
            ax.plot(z[forms, 0], z[forms, 1], "*", color="gold", mec="black", ms=12, zorder=5,
                    label=f"form ({'all pairs' if form_rule == 'all' else 'union of pairs'})")
        if feats is not None:
            if feats.cusps.size:
                ax.plot(
                    z[feats.cusps, 0],
                    z[feats.cusps, 1],
                    "x",
                    color="red",
                    ms=9,
                    mew=2,
                    zorder=4,
                    label="cusp",
                )
            if feats.vertices.size:
                ax.plot(
                    z[feats.vertices, 0],
                    z[feats.vertices, 1],
                    "o",
                    mfc="none",
                    mec="black",
                    ms=7,
                    zorder=4,
                    label="vertex",
                )
            if osculating and feats.vertices.size and len(z) >= 3:
                centres, radii = osculating_circles(z)
                for v in feats.vertices:
                    if np.isfinite(radii[v]):
                        ax.add_patch(
                            Circle(
                                tuple(centres[v]),
                                radii[v],
                                fill=False,
                                ls="--",
                                lw=0.8,
                                color="tab:purple",
                                alpha=0.7,
                                zorder=3,
                            )
                        )
        ax.autoscale_view()
        if osculating and feats is not None and feats.vertices.size:
            # circles can be huge; keep the view on the curve
            pad = 0.1 * (np.ptp(z, axis=0) + 1e-12)
            ax.set_xlim(z[:, 0].min() - pad[0], z[:, 0].max() + pad[0])
            ax.set_ylim(z[:, 1].min() - pad[1], z[:, 1].max() + pad[1])
        ax.set_xlabel(f"PC{i + 1} ({100 * evr[i]:.1f}%)")
        ax.set_ylabel(f"PC{j + 1} ({100 * evr[j]:.1f}%)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    for n in range(len(pairs), nrows * ncols):
        axes[n // ncols][n % ncols].set_visible(False)
    if lc is not None:
        cb = fig.colorbar(lc, ax=axes, shrink=0.8)
        lo, hi = np.log10(ed.steps.min() + 1), np.log10(ed.steps.max() + 1)
        ticks = np.linspace(0, 1, 5)
        cb.set_ticks(ticks)
        cb.set_ticklabels([f"{10 ** (lo + t * (hi - lo)) - 1:.3g}" for t in ticks])
        cb.set_label("step")
    fig.suptitle(title or "Essential dynamics: PC pairs of the behavioural trajectory")
    return save_figure(fig, path)


def _ref_marker(name: str) -> str:
    n = name.lower()
    if "dmmse" in n:
        return "D"
    if "ridge" in n:
        return "s"
    if "lsq" in n or "least" in n:
        return "^"
    return "P"


def plot_joint_pca(
    jp: JointTrajectoryPCA,
    path: str | os.PathLike[str],
    *,
    pcs: tuple[int, int] = (0, 1),
    smoothed: bool = True,
    ref_runs: Mapping[str, str] | None = None,
    title: str | None = None,
) -> tuple[Path, Path]:
    """Joint trajectory PCA figure (Carroll et al. Fig. 1, right): one curve per run in the (PC_i, PC_j)
    plane, open circle at the first checkpoint and star at the last; references as points (names containing
    'dmmse' as diamonds, 'ridge' as a square, 'lsq'/'least' as a triangle). `ref_runs` maps a reference name
    to a run name whose colour it takes (e.g. {"dMMSE_2": "M=2"}); others are white.
    Saves PNG + PDF; returns their paths."""
    i, j = pcs
    fig = Figure(figsize=(6.0, 5.0), layout="constrained")
    ax = fig.subplots()
    curves = jp.smoothed if smoothed else jp.curves
    cm = colormaps["tab10"]
    run_colour = {name: cm(n % 10) for n, name in enumerate(curves)}
    for name, z in curves.items():
        colour = run_colour[name]
        ax.plot(z[:, i], z[:, j], "-", color=colour, lw=1.5, label=str(name))
        ax.plot(z[0, i], z[0, j], "o", mfc="none", mec=colour, ms=7)
        ax.plot(z[-1, i], z[-1, j], "*", color=colour, ms=12)
    for name, r in jp.references.items():
        face = run_colour.get((ref_runs or {}).get(name, ""), "white")
        ax.plot(
            r[i], r[j], _ref_marker(name), ms=10, mec="black", mfc=face, mew=1.5, ls="none", label=str(name)
        )
    evr = jp.explained_variance_ratio
    ax.set_xlabel(f"PC{i + 1} ({100 * evr[i]:.1f}%)")
    ax.set_ylabel(f"PC{j + 1} ({100 * evr[j]:.1f}%)")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or "Joint trajectory PCA (○ start, ★ end)")
    return save_figure(fig, path)
