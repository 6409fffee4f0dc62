"""Matplotlib figures of a run, written as PNG and PDF. Steps are plotted where they were recorded, on a
symmetric-log x axis (linear below 1) so that step 0, the initialisation, is shown without shifting any step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from icl_lab.llc import sampler_ok  # noqa: E402
from icl_lab.store import Run, atomic_write  # noqa: E402

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


def plot_llc(ax: plt.Axes, curves: Mapping[str, pd.DataFrame], colours: Sequence | None = None) -> None:
    """LLC mean ± std over chains against the true checkpoint steps (raw, not smoothed), one curve per entry of
    `curves` (label -> the rows of an llc.parquet: step, llc_mean, llc_std, ok).

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
    for (label, (steps, mean, std, ok, sampled_ok)), colour in zip(rows.items(), colours, strict=True):
        shown = np.clip(mean, lo, hi)
        ax.fill_between(steps, np.clip(mean - std, lo, hi), np.clip(mean + std, lo, hi), color=colour, alpha=0.2,
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
    ax.set_ylabel("estimated LLC λ̂ (mean ± std over chains)")
    ax.legend(fontsize=7)


def _llc_arrays(llc: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, std, ok, sampled_ok) of the finite estimates, by step: ok = no flag, sampled_ok = no flag but
    the checkpoint's own (llc.sampler_ok of `flags`); a missing `ok` column counts as unflagged."""
    llc = llc.sort_values("step")
    llc = llc[np.isfinite(llc["llc_mean"].to_numpy(dtype=float))]
    ok = llc["ok"].to_numpy(dtype=bool) if "ok" in llc else np.ones(len(llc), bool)
    sampled_ok = np.array([sampler_ok(f) for f in llc["flags"]], dtype=bool) if "flags" in llc else ok
    return (llc["step"].to_numpy(), llc["llc_mean"].to_numpy(dtype=float),
            np.nan_to_num(llc["llc_std"].to_numpy(dtype=float)), ok, sampled_ok)


def llc_limits(mean: np.ndarray, std: np.ndarray, ok: np.ndarray, pad: float = 0.08) -> tuple[float, float]:
    """y-limits holding mean ± std of the estimates marked ok (plot_llc passes those without a sampler flag; all
    of them if none is), with 0 shown when it is near, padded by `pad` of the range. mean, std, ok: (N,)."""
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
