"""The studies' figures (icl_lab.studies.*): each function takes what the study's analysis returned and a path,
and saves PNG + PDF through `save_figure`. A study's `figures` method only calls these.

Objects from the studies (CriticalStep, Crossover) are read by their fields, not imported, so that the studies
can import this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import colormaps

from icl_lab.plots import (
    BASELINE_STYLE,
    m_axis,
    m_label,
    m_positions,
    per_token_columns,
    plot_llc,
    save_figure,
    step_axis,
)
from icl_lab.store import Run

__all__ = [
    "attention_figure",
    "crossover_figure",
    "delta_vs_m_figure",
    "indicator_figure",
    "llc_vs_m_figure",
    "m_colours",
    "ms_delta_figure",
    "ms_llc_figure",
    "ms_loss_figure",
    "ood_figure",
    "pc_scores_figure",
    "pca_distance_figure",
    "per_token_figure",
    "probe_figure",
    "seeds_figure",
    "short_m_star",
    "t_crit_figure",
    "training_curves_figure",
]


def m_colours(finite: Sequence, infinite: Any = None) -> dict:
    """One viridis colour per finite M (in the order given), black for M = ∞ (keyed by `infinite`)."""
    return {m: plt.cm.viridis(i / max(len(finite) - 1, 1) * 0.9) for i, m in enumerate(finite)} | {infinite: "k"}


# ================================================================================================ low diversity
def ms_loss_figure(grid: Mapping[str, Mapping[int, Run]], pool_gaps: Mapping[str, Mapping[int, float]], K: int,
                   path: Path) -> tuple[Path, Path]:
    """Per row (`grid` is {label: {seed: run}}, e.g. "M=2, pos_emb"): mean loss and ℓ_1 in and out of distribution
    against step with the dMMSE and least-squares levels, and the final per-token loss against k with dMMSE's
    (dashed), least squares' (dash-dot) and, for rows in `pool_gaps` ({label: {seed: ‖w₁−w₂‖²/4}}), the gap
    (dotted)."""
    fig, axes = plt.subplots(len(grid), 3, figsize=(15, 3.8 * len(grid)), squeeze=False, constrained_layout=True)
    for r, (label, by_seed) in enumerate(grid.items()):
        colours = plt.cm.tab10(np.arange(len(by_seed)) % 10)
        for c, set_name in enumerate(("id", "ood")):
            ax = axes[r, c]
            for (seed, run), col in zip(by_seed.items(), colours, strict=True):
                m = run.metrics
                ax.plot(m["step"], m[f"{set_name}_loss"], color=col, lw=1.5, label=f"seed {seed}")
                ax.plot(m["step"], m[f"{set_name}_loss_k1"], color=col, lw=0.8, ls=":")
                for key in ("dmmse", "ridge"):
                    ax.axhline(run.baselines[f"{set_name}_{key}_loss"], color=BASELINE_STYLE[key][0], ls="--", lw=0.8)
            ax.set_yscale("log")
            step_axis(ax)
            ax.set_title(f"{label} {'in-distribution' if set_name == 'id' else 'OOD (fresh unit-norm tasks)'}: "
                         "mean loss (solid), ℓ_1 (dotted)", fontsize=9)
        ax = axes[r, 2]
        k = np.arange(1, K + 1)
        for (seed, run), col in zip(by_seed.items(), colours, strict=True):
            last = run.metrics.iloc[-1]
            ax.plot(k, [last[c] for c in per_token_columns(run.metrics, "id_loss")], "o-", color=col, ms=3,
                    label=f"model, seed {seed}")
            ax.plot(k, [run.baselines[f"id_dmmse_loss_k{i}"] for i in k], color=col, ls="--", lw=0.8)
            ax.plot(k, [run.baselines[f"id_ridge_loss_k{i}"] for i in k], color=col, ls="-.", lw=0.8)
            if label in pool_gaps:
                ax.axhline(pool_gaps[label][seed], color=col, ls=":", lw=0.8)
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_xlabel("position k")
        ax.set_title(f"{label}: final per-token loss (in-distribution); dashed: dMMSE, dash-dot: least squares"
                     + (", dotted: ‖w₁−w₂‖²/4" if label in pool_gaps else ""), fontsize=9)
        axes[r, 0].legend(fontsize=7)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def ms_delta_figure(grid: Mapping[str, Mapping[int, pd.DataFrame]], path: Path) -> tuple[Path, Path]:
    """Per row label (`grid` is {label: {seed: metrics}}): Δ(model, dMMSE) and Δ(model, least squares) against
    step, in distribution (solid) and on fresh tasks (dashed)."""
    fig, axes = plt.subplots(1, len(grid), figsize=(6 * len(grid), 4), squeeze=False, constrained_layout=True)
    for c, (label, by_seed) in enumerate(grid.items()):
        ax = axes[0, c]
        first = next(iter(by_seed))
        for seed, m in by_seed.items():
            for key, colour in (("delta_dmmse", "tab:green"), ("delta_ridge", "tab:blue")):
                for set_name, ls in (("id", "-"), ("ood", "--")):
                    ref = "dMMSE" if key == "delta_dmmse" else "least sq."
                    name = f"Δ({ref}), {set_name}" if seed == first else None
                    ax.plot(m["step"], m[f"{set_name}_{key}"], color=colour, ls=ls, lw=1, alpha=0.8, label=name)
        ax.set_yscale("log")
        step_axis(ax)
        ax.set_title(f"{label}: distance of the model's predictions to dMMSE and least squares", fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def ms_llc_figure(grid: Mapping[str, Mapping[str, pd.DataFrame]], path: Path) -> tuple[Path, Path]:
    """Per row label (`grid` is {label: {curve label: finite LLC estimates}}): the LLC over training, one curve per
    curve label, with the tilted λ̂ (column llc_tilted, where present) as crosses on a dashed line."""
    fig, axes = plt.subplots(1, len(grid), figsize=(6 * len(grid), 4), squeeze=False, constrained_layout=True)
    for c, (label, curves) in enumerate(grid.items()):
        ax = axes[0, c]
        colours = list(plt.cm.tab10(np.arange(len(curves)) % 10))
        plot_llc(ax, curves, colours)
        for (name, llc), colour in zip(curves.items(), colours, strict=True):
            if "llc_tilted" in llc and np.isfinite(llc["llc_tilted"].to_numpy(dtype=float)).any():
                ax.plot(llc["step"], llc["llc_tilted"], "x--", color=colour, lw=0.8, ms=4, label=f"{name}: tilted")
        ax.legend(fontsize=6)
        ax.set_title(f"{label}: LLC over training (raw, same settings and data at every estimate; hollow: diagnostic "
                     "flag, diamonds: w* on a slope; crosses: tilted λ̂)", fontsize=8)
    return save_figure(fig, path)


def probe_figure(probes: pd.DataFrame, path: Path) -> tuple[Path, Path]:
    """Held-out accuracy of the task-identity probe against the position k, one curve per probed checkpoint."""
    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    kcols = [c for c in probes.columns if c.startswith("k")]
    for _, row in probes.iterrows():
        group = f"{row.group}, " if "group" in row and row.group != "main" else ""
        ax.plot(range(1, len(kcols) + 1), row[kcols].to_numpy(dtype=float), "o-", ms=3,
                label=f"{group}M={row.M} seed {row.seed} step {row.step}")
    ax.axhline(0.5, color="0.5", ls="--", lw=0.8)
    ax.set_xlabel("position k")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("linear probe for the task identity (final residual stream at x_k)", fontsize=9)
    ax.legend(fontsize=6)
    return save_figure(fig, path)


def attention_figure(patterns: Mapping[int, np.ndarray], title: str, path: Path) -> tuple[Path, Path]:
    """Mean attention pattern per layer and head (columns) at each step (rows); `patterns` is {step: (L, H, T, T)}."""
    steps = list(patterns)
    L, H = patterns[steps[0]].shape[:2]
    fig, axes = plt.subplots(len(steps), L * H, figsize=(1.9 * L * H, 1.9 * len(steps)), squeeze=False,
                             constrained_layout=True)
    for r, step in enumerate(steps):
        pat = patterns[step]
        for l in range(L):
            for h in range(H):
                ax = axes[r, l * H + h]
                ax.imshow(pat[l, h], cmap="magma", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"L{l} H{h}", fontsize=8)
                if l == h == 0:
                    ax.set_ylabel(f"step {step}", fontsize=8)
    fig.suptitle(f"{title}: attention (rows: query token, cols: key token; x_1, y_1, x_2, ...)")
    return save_figure(fig, path)


# ================================================================================================ stages
def _bands(ax, table: pd.DataFrame, xmin: float) -> None:
    """Stage bands as in Hoogland et al. Fig. 1 (orange: LLC rising, type A; blue: falling, type B)."""
    na = nb = 0
    for row in table.itertuples():
        if row.type == "A":
            colour, na = colormaps["Oranges"](0.25 + 0.2 * (na % 2)), na + 1
        else:
            colour, nb = colormaps["Blues"](0.25 + 0.2 * (nb % 2)), nb + 1
        ax.axvspan(max(float(row.start), xmin), float(row.end), color=colour, alpha=0.45, lw=0, zorder=0)


def indicator_figure(curves: pd.DataFrame, table: pd.DataFrame, ridge: Mapping[str, float],
                     icl_columns: Mapping[float, str], *, noise_var: float, early: int, late: int,
                     ln_threshold: float, title: str, path: Path) -> tuple[Path, Path]:
    """Per-stage indicators against step with the stage bands (Hoogland et al. Fig. 5 and §D.3.4): E[ŷ²] with σ²;
    the ICL score per input scale g (`icl_columns`: {g: column}) with ridge's (dashed); RMS of each LN weight vector;
    the fraction of LN weights with |w| < ln_threshold."""
    s = curves["step"].to_numpy(float)
    xmin = float(s[s > 0].min()) if (s > 0).any() else 1.0
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    ax = axes[0, 0]
    ax.plot(s, curves["yhat_sq"], "o-", color="k", ms=2.5, lw=1.2, label="E[ŷ²] (g = 1)")
    ax.axhline(noise_var, color="tab:red", ls="--", lw=1, label=f"σ² = {noise_var:g}")
    ax.set_yscale("log")
    ax.set_title("LR1 indicator: E[ŷ²] over sequences and positions (the prior predictor gives 0)", fontsize=9)
    ax = axes[0, 1]
    colours = plt.cm.plasma(np.linspace(0.1, 0.8, len(icl_columns)))
    for (g, col), c in zip(icl_columns.items(), colours, strict=True):
        ax.plot(s, curves[col], "o-", color=c, ms=2.5, lw=1.2, label=f"g = {g:g}")
        ax.axhline(ridge[col], color=c, ls="--", lw=0.9)
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set_title(f"ICL score ℓ_{late} − ℓ_{early} on x ~ N(0, g I) (dashed: ridge; lower = better ICL)",
                 fontsize=9)
    lns = [c.split(":", 1)[1] for c in curves.columns if c.startswith("ln_rms:")]
    ln_colours = plt.cm.tab10(np.arange(len(lns)) % 10)
    for name, c in zip(lns, ln_colours, strict=True):
        axes[1, 0].plot(s, curves[f"ln_rms:{name}"], "o-", color=c, ms=2, lw=1.2, label=name)
        axes[1, 1].plot(s, curves[f"ln_small:{name}"], "o-", color=c, ms=2, lw=1.2, label=name)
    axes[1, 0].set_title("LayerNorm weights: RMS ‖w‖/√d of each LN (1 at initialisation)", fontsize=9)
    axes[1, 1].set_title(f"LayerNorm collapse: fraction of weights with |w_i| < {ln_threshold:g}", fontsize=9)
    axes[1, 1].set_ylim(-0.02, 1.02)
    for ax in axes.flat:
        _bands(ax, table, xmin)
        step_axis(ax)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: indicators over training, with the LLC stages (orange: type A, blue: B)", fontsize=10)
    return save_figure(fig, path)


def pc_scores_figure(ed, table: pd.DataFrame, title: str, path: Path) -> tuple[Path, Path]:
    """PC scores of the essential dynamics against step (Hoogland et al. Fig. 6): raw (dots) and smoothed (lines),
    with the LLC stage boundaries (dashed) and the ED cusps / vertices (ticks at the top)."""
    s = ed.steps.astype(float)
    n = ed.smoothed.shape[1]
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.2 * n), sharex=True, constrained_layout=True, squeeze=False)
    events = ed.event_steps()
    for i in range(n):
        ax = axes[i, 0]
        ax.plot(s, ed.scores[:, i], ".", color="0.6", ms=3)
        ax.plot(s, ed.smoothed[:, i], "-", color="tab:purple", lw=1.4)
        for b in table["end"].iloc[:-1]:
            ax.axvline(float(b), color="k", ls="--", lw=0.9)
        for e in events:
            ax.axvline(float(e), ymin=0.9, ymax=1.0, color="tab:red", lw=1.5)
        ax.set_ylabel(f"PC{i + 1} ({100 * ed.explained_variance_ratio[i]:.0f}%)")
        step_axis(ax)
    fig.suptitle(f"{title}: PC scores over training; dashed: LLC stage boundaries; red ticks: ED "
                 "cusps / vertices", fontsize=9)
    return save_figure(fig, path)


def seeds_figure(used: Mapping[str, pd.DataFrame], tables: Mapping[str, pd.DataFrame], path: Path
                 ) -> tuple[Path, Path]:
    """LLC (top) and test loss (bottom) of every seed against step, with each seed's boundaries as ticks."""
    fig, axes = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, constrained_layout=True)
    colours = plt.cm.tab10(np.arange(len(used)) % 10)
    plot_llc(axes[0], dict(used), colours)
    for (name, u), c in zip(used.items(), colours, strict=True):
        axes[1].plot(u["step"], u["loss"], "-", color=c, lw=1.2, label=name)
        for b in tables[name]["end"].iloc[:-1]:
            axes[0].axvline(float(b), ymin=0.92, ymax=1.0, color=c, lw=2)
    axes[0].set_ylabel("λ̂")
    axes[1].set_ylabel("test loss")
    axes[1].set_yscale("log")
    for ax in axes:
        step_axis(ax)
        ax.legend(fontsize=7)
    fig.suptitle("every seed: LLC and loss over training (ticks: each seed's stage boundaries)", fontsize=9)
    return save_figure(fig, path)


# ================================================================================================ task diversity
def short_m_star(c) -> str:
    """M* of a task-diversity Crossover in a few characters (for legends and titles)."""
    if c.M_star is None:
        edge = f"> {m_label(c.Ms[-1])}" if c.side == "above" else f"≤ {m_label(c.Ms[0])}"
        return f"none in range ({edge})"
    return f"{c.M_star:.3g} = 2^{math.log2(c.M_star):.2f}"


def _batch_colours(Bs) -> np.ndarray:
    return plt.cm.coolwarm(np.linspace(0.1, 0.95, len(Bs))) if len(Bs) > 1 else plt.cm.coolwarm([0.95])


def _shade(ax, M_star: float | None, Ms) -> None:
    """Grey shading past the threshold and a dashed line at M* (Raventós et al. Fig. 2)."""
    if M_star is None:
        return
    x = math.log2(M_star)
    right = float(m_positions(list(Ms)).max()) + 0.5
    ax.axvspan(x, right, color="0.88", zorder=0, lw=0)
    ax.axvline(x, color="0.35", ls="--", lw=1)


def delta_vs_m_figure(summary: pd.DataFrame, mean: pd.DataFrame, D: int, crossover, path: Path
                      ) -> tuple[Path, Path]:
    """Raventós et al. Fig. 2: rows T_Pretrain / T_True; columns L/D (PT, dMMSE, ridge), Δ(PT, dMMSE)/D,
    Δ(PT, Ridge)/D against M on a log2 axis (∞ at the right), one series per batch size (pale blue → red); the
    dotted grey curve is Δ(Ridge, dMMSE)/D; grey shading past M*. `mean` is `summary` averaged over seeds."""
    spread = summary.groupby(["B", "M"])
    Bs = sorted(mean["B"].unique())
    Ms = sorted(mean["M"].unique())
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for r, (s, title) in enumerate((("id", "T_Pretrain (pool tasks)"), ("ood", "T_True (fresh tasks)"))):
        for B, colour in zip(Bs, _batch_colours(Bs), strict=True):
            rows = mean[mean["B"] == B].sort_values("M")
            x = m_positions(rows["M"].to_numpy())
            lo = spread[[f"{s}_loss", f"{s}_delta_dmmse", f"{s}_delta_ridge"]].min().loc[B].loc[rows["M"]]
            hi = spread[[f"{s}_loss", f"{s}_delta_dmmse", f"{s}_delta_ridge"]].max().loc[B].loc[rows["M"]]
            for c, key in enumerate(("loss", "delta_dmmse", "delta_ridge")):
                col = f"{s}_{key}"
                axes[r, c].plot(x, rows[col] / D, "o-", color=colour, ms=4, lw=1.5, label=f"PT, B = {B}")
                if summary["seed"].nunique() > 1:
                    axes[r, c].fill_between(x, lo[col] / D, hi[col] / D, color=colour, alpha=0.2, lw=0)
        base = mean[mean["B"] == Bs[-1]].sort_values("M")
        x = m_positions(base["M"].to_numpy())
        axes[r, 0].plot(x, base[f"{s}_dmmse_loss"] / D, "s--", color="tab:green", ms=3, lw=1, label="dMMSE")
        axes[r, 0].plot(x, base[f"{s}_ridge_loss"] / D, "s--", color="tab:blue", ms=3, lw=1, label="ridge")
        fin = base[np.isfinite(base["M"])]
        for c in (1, 2):
            axes[r, c].plot(m_positions(fin["M"].to_numpy()), fin[f"{s}_delta_ridge_dmmse"] / D, ":", color="0.4",
                            lw=1.2, label="Δ(Ridge, dMMSE)")
        labels = ("normalised loss L/D", "Δ(PT, dMMSE)/D", "Δ(PT, Ridge)/D")
        for c in range(3):
            ax = axes[r, c]
            _shade(ax, crossover.M_star, Ms)
            ax.set_yscale("log")
            m_axis(ax, Ms)
            ax.set_ylabel(labels[c])
            ax.set_title(f"{title}: {labels[c]}", fontsize=9)
        axes[r, 0].legend(fontsize=7)
        axes[r, 2].legend(fontsize=7)
    fig.suptitle(f"Final models against task diversity (Raventós et al. Fig. 2 style); grey: M past the threshold "
                 f"M* = {short_m_star(crossover)}", fontsize=10)
    return save_figure(fig, path)


def crossover_figure(mean: pd.DataFrame, analysis: Mapping[tuple[int, int], Any], path: Path) -> tuple[Path, Path]:
    """Left: the criterion, log2(Δ_2B / Δ_B) of Δ^{T_True}_{PT,Ridge} against M (> 0: doubling B moves the PT
    away from ridge), with M* marked, for each consecutive pair of batch sizes (M = ∞: open marker, shown but not
    used). Right: the same ratio for the other three distances, for the first pair. `mean`: averaged over seeds."""
    Ms = sorted(mean["M"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), constrained_layout=True)
    colours = _batch_colours(list(analysis) + [None])[1:]
    ratio = lambda b1, b2, col: (mean[mean["B"] == b2].set_index("M")[col]
                                 / mean[mean["B"] == b1].set_index("M")[col]).sort_index()
    for ((b1, b2), c), colour in zip(analysis.items(), colours, strict=True):
        rr = ratio(b1, b2, "ood_delta_ridge")
        x, y, fin = m_positions(rr.index.to_numpy()), np.log2(rr.to_numpy()), np.isfinite(rr.index.to_numpy())
        axes[0].plot(x[fin], y[fin], "o-", color=colour, label=f"B = {b1} → {b2}: M* = {short_m_star(c)}")
        axes[0].plot(x[~fin], y[~fin], "o", mfc="none", color=colour)  # M = ∞: shown, not used by the criterion
        if c.M_star is not None:
            axes[0].axvline(math.log2(c.M_star), color=colour, ls="--", lw=1)
    first = next(iter(analysis))
    _shade(axes[0], analysis[first].M_star, Ms)
    axes[0].set_title("criterion: log₂ Δ_True(PT, Ridge) at 2B over at B (> 0 below M*, < 0 above)", fontsize=9)
    styles = {"id_delta_ridge": ("T_Pretrain, Δ(PT, Ridge)", "tab:blue", "--"),
              "id_delta_dmmse": ("T_Pretrain, Δ(PT, dMMSE)", "tab:green", "--"),
              "ood_delta_dmmse": ("T_True, Δ(PT, dMMSE)", "tab:green", "-"),
              "ood_delta_ridge": ("T_True, Δ(PT, Ridge) (the criterion)", "tab:blue", "-")}
    for col, (label, colour, ls) in styles.items():
        rr = ratio(*first, col)
        axes[1].plot(m_positions(rr.index.to_numpy()), np.log2(rr.to_numpy()), "o", color=colour, ls=ls, ms=3,
                     label=label)
    _shade(axes[1], analysis[first].M_star, Ms)
    axes[1].set_title(f"all four distances, B = {first[0]} → {first[1]} (< 0: doubling B moves the PT closer)",
                      fontsize=9)
    for ax in axes:
        ax.axhline(0, color="k", lw=0.8)
        m_axis(ax, Ms)
        ax.set_ylabel("log₂(Δ at 2B / Δ at B)")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def per_token_figure(mean: pd.DataFrame, path: Path) -> tuple[Path, Path]:
    """Final per-token loss ℓ_k against the position k, one curve per M (viridis, ∞ black), rows T_Pretrain /
    T_True, a column per batch size; thin dotted: dMMSE of the same M; thick dashed: ridge (on T_True, the same
    eval set for every M). `mean`: the summary averaged over seeds."""
    Bs = sorted(mean["B"].unique())
    Ms = sorted(mean["M"].unique())
    colour = m_colours([m for m in Ms if np.isfinite(m)], np.inf)
    fig, axes = plt.subplots(2, len(Bs), figsize=(5.5 * len(Bs), 8), squeeze=False, constrained_layout=True)
    for r, (s, title) in enumerate((("id", "T_Pretrain"), ("ood", "T_True"))):
        for c, B in enumerate(Bs):
            ax = axes[r, c]
            rows = mean[mean["B"] == B].set_index("M")
            cols = per_token_columns(rows, f"{s}_loss")
            k = np.arange(1, len(cols) + 1)
            for m in Ms:
                ax.plot(k, rows.loc[m, cols].to_numpy(dtype=float), "o-", ms=2.5, lw=1.2, color=colour[m],
                        label=f"M = {m_label(m)}")
                if np.isfinite(m):
                    dm = [col.replace(f"{s}_loss", f"{s}_dmmse_loss") for col in cols]
                    ax.plot(k, rows.loc[m, dm].to_numpy(dtype=float), ":", lw=0.8, color=colour[m])
            ridge = [col.replace(f"{s}_loss", f"{s}_ridge_loss") for col in cols]
            ax.plot(k, rows[ridge].mean().to_numpy(dtype=float), "--", color="tab:red", lw=2, label="ridge")
            ax.set_yscale("log")
            ax.set_xticks(k)
            ax.set_xlabel("position k (k − 1 examples in context)")
            ax.set_ylabel("ℓ_k (squared error)")
            ax.set_title(f"{title}, B = {B}: final per-token loss; dotted: dMMSE of each M", fontsize=9)
            ax.grid(alpha=0.3, which="both")
    axes[0, -1].legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def training_curves_figure(metrics: Mapping[int, Mapping[int | None, pd.DataFrame]], D: int, M_star: float | None,
                           seed: int, path: Path) -> tuple[Path, Path]:
    """Δ_True(PT, Ridge)/D against the training step, one curve per M (dashed past M*), a panel per batch
    size (Raventós et al. Fig. 4, left); `metrics` is {B: {M: metrics of the given seed}}, M = None for ∞."""
    Ms = list(next(iter(metrics.values())))
    colour = m_colours([m for m in Ms if m is not None])
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False,
                             constrained_layout=True)
    for c, (B, by_m) in enumerate(metrics.items()):
        ax = axes[0, c]
        for M, m in by_m.items():
            above = M_star is not None and (M is None or M > M_star)
            ax.plot(m["step"], m["ood_delta_ridge"] / D, color=colour[M], lw=1.3, ls="--" if above else "-",
                    label=f"M = {m_label(M)}" + (" (> M*)" if above else ""))
        ax.set_yscale("log")
        step_axis(ax)
        ax.set_xlim(left=0)
        ax.set_ylabel("Δ_True(PT, Ridge)/D")
        ax.set_title(f"B = {B}: distance to ridge on fresh tasks over training (seed {seed})", fontsize=9)
    axes[0, -1].legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


# ================================================================================================ transient ridge
def ood_figure(curves: Mapping[int | None, pd.DataFrame], crit: Mapping[int | None, Any],
               metrics: Mapping[int | None, pd.DataFrame], ridge: float, seed: int, path: Path) -> tuple[Path, Path]:
    """Carroll et al. Fig. 1, left: the OOD loss against step for every M (seed mean `curves`; viridis, ∞ black) with
    t^crit (`crit`: CriticalStep per M) circled and the `ridge` level dashed; the in-distribution distances
    Δ(PT, dMMSE_M) and Δ(PT, Ridge) over training (`metrics` of the given seed), t^crit circled and the end starred."""
    colour = m_colours([m for m in curves if m is not None])
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6), constrained_layout=True)
    for M, c in curves.items():
        t = crit[M].t_crit
        axes[0].plot(c["step"], c["ood_loss"], color=colour[M], lw=1.3,
                     label=f"M = {m_label(M)}" + (" (U)" if crit[M].u_shape else ""))
        axes[0].plot(t, crit[M].loss_min, "o", mfc="none", mec=colour[M], ms=7)
        m = metrics[M]
        at = m[m["step"] == m["step"].iloc[np.argmin(np.abs(m["step"].to_numpy() - t))]].iloc[0]
        for ax, col in ((axes[1], "id_delta_dmmse"), (axes[2], "id_delta_ridge")):
            ax.plot(m["step"], m[col], color=colour[M], lw=1.2)
            ax.plot(at["step"], at[col], "o", mfc="none", mec=colour[M], ms=6)
            ax.plot(m["step"].iloc[-1], m[col].iloc[-1], "*", color=colour[M], ms=9)
    axes[0].axhline(ridge, color="tab:red", ls="--", lw=1.5, label="ridge")
    axes[0].set_title("OOD loss (fresh tasks) against step; ○ t_crit = argmin", fontsize=9)
    axes[0].set_ylabel("OOD loss")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].set_title(f"in-distribution Δ(PT, dMMSE_M) (seed {seed}); ○ t_crit, ★ end", fontsize=9)
    axes[2].set_title(f"in-distribution Δ(PT, Ridge) (seed {seed}); ○ t_crit, ★ end", fontsize=9)
    for ax in axes:
        ax.set_yscale("log")
        step_axis(ax)
        ax.set_xlim(left=0)
    return save_figure(fig, path)


def t_crit_figure(summary: pd.DataFrame, path: Path) -> tuple[Path, Path]:
    """Left: t^crit_M against M (log axes; filled: U-shaped OOD curve, hollow: monotone or no dip, where t_crit is
    the end of training or the start). Right: the fraction of the initial OOD-loss drop given back by the end."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    x = m_positions(summary["M"].to_numpy())
    u = summary["u_shape"].to_numpy(dtype=bool)
    axes[0].plot(x, summary["t_crit"], "-", color="0.6", lw=1)
    axes[0].plot(x[u], summary["t_crit"][u], "o", color="tab:purple", ms=7, label="U-shaped: t_crit = argmin")
    axes[0].plot(x[~u], summary["t_crit"][~u], "o", mfc="none", color="tab:purple", ms=7, label="not U-shaped")
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[0].set_ylabel("t_crit (training step)")
    axes[0].set_title("critical step of the OOD loss against M (Carroll et al. §3)", fontsize=9)
    axes[1].bar(x, summary["rise_fraction"], width=0.35, color=np.where(u, "tab:purple", "0.7"))
    axes[1].set_ylabel("(L(T) − L(t_crit)) / (L(0) − L(t_crit))")
    axes[1].set_title("share of the OOD-loss drop given back by the end", fontsize=9)
    for ax in axes:
        m_axis(ax, summary["M"].to_numpy())
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)


def pca_distance_figure(jp, crit: Mapping[int | None, Any], path: Path) -> tuple[Path, Path]:
    """Distance in the essential subspace from each run's (smoothed) curve to the ridge point (left) and to its
    dMMSE_M point (right) against step; ○ the checkpoint nearest t^crit (`crit`: CriticalStep per M, in order)."""
    colour = m_colours([m for m in crit if m is not None])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    for M, c in crit.items():
        name = f"M={m_label(M)}"
        z, steps = jp.smoothed[name], jp.steps[name]
        i = int(np.argmin(np.abs(steps - c.t_crit)))
        dm = jp.references["ridge"] if M is None else jp.references[f"dMMSE_{m_label(M)}"]
        for ax, ref in ((axes[0], jp.references["ridge"]), (axes[1], dm)):
            d = np.linalg.norm(z - ref, axis=1)
            ax.plot(steps, d, color=colour[M], lw=1.2, label=name)
            ax.plot(steps[i], d[i], "o", mfc="none", mec=colour[M], ms=6)
    axes[0].set_title("distance to the ridge point in the PC plane; ○ t_crit", fontsize=9)
    axes[1].set_title("distance to the dMMSE_M point in the PC plane; ○ t_crit", fontsize=9)
    for ax in axes:
        step_axis(ax)
        ax.set_ylabel("Euclidean distance (PC units)")
    axes[0].legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def llc_vs_m_figure(summary: pd.DataFrame, path: Path) -> tuple[Path, Path]:
    """Carroll et al. Fig. 3, bottom: λ̂ of the final models against M (± the chains' std; hollow: a diagnostic
    flag), λ̂ at the largest M (∞ where present) dashed."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    x = m_positions(summary["M"].to_numpy())
    ok = summary["llc_ok"].to_numpy(dtype=bool)
    ax.errorbar(x, summary["llc_mean"], yerr=summary["llc_std"], color="tab:blue", lw=1, capsize=2)
    ax.plot(x[~ok], summary["llc_mean"][~ok], "o", mfc="white", color="tab:blue", ms=7, label="diagnostic flag")
    ax.plot(x[ok], summary["llc_mean"][ok], "o", color="tab:blue", ms=6, label="λ̂ (final checkpoint)")
    top = m_label(summary["M"].iloc[-1])
    ax.axhline(summary["llc_mean"].iloc[-1], color="k", ls="--", lw=1, label=f"λ̂ at M = {top}")
    m_axis(ax, summary["M"].to_numpy())
    ax.set_ylabel("λ̂ (LLC)")
    ax.set_title("LLC of the final models against M (one shared SGLD setting)", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
