"""The low-diversity study: how the user's 2-layer model solves M = 1 and M = 2 (docs/papers.md §F1, §G3-G4).

For M in {1, 2} × seeds: train the `seed` preset on unit-norm, noiseless tasks with a linear + log checkpoint
schedule; estimate the LLC at every checkpoint with settings calibrated once and shared by every checkpoint
and run; essential dynamics per run and a joint trajectory PCA per seed (the M = 1 and M = 2 pools of one seed
are nested, so they share the root task); stage tables; attention patterns at stage boundaries; probes for
the task identity; one HTML report with an expectations table whose verdicts are measured, not assumed.
Runs and LLC estimates already on disk are reused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from icl_lab.config import LLCConfig, RunConfig
from icl_lab.interp import attention_patterns, probe_residual
from icl_lab.llc_run import LLCPlan, LLCSettings, SharedSettings, finite_llc
from icl_lab.plots import per_token_columns, plot_joint_pca, plot_pc_pairs, plot_stages
from icl_lab.plots.studies import attention_figure, ms_delta_figure, ms_llc_figure, ms_loss_figure, probe_figure
from icl_lab.report import Section
from icl_lab.seeding import make_generator
from icl_lab.stages import save_stage_table
from icl_lab.store import Run
from icl_lab.studies.common import (
    Check,
    LLCStudyConfig,
    MsStudyConfig,
    checkpoint_predictions,
    joint_pca,
    llc_stages,
    sampler_worked,
)
from icl_lab.studies.runner import Study, run_study
from icl_lab.tasks import sample_batch, task_pool
from icl_lab.trajectory import essential_dynamics

__all__ = ["LowDiversity", "LowDiversityConfig", "expectations", "run_name", "run_study"]


class LowDiversityConfig(MsStudyConfig, LLCStudyConfig):
    """Settings of the study: the `seed` preset on unit-norm, noiseless tasks at a constant learning rate;
    `for_scale(quick=True)` gives the minutes-long version.

    5 linear + 16 log-spaced checkpoints (20 distinct, about 0.2 decades apart on the log axis) with the LLC at each,
    4 chains × 200 draws (fewer draws left post-drop estimates flagged not_stationary / chains_disagree), burn-in at
    least 50 and raised by the calibration to min_burnin(ε, γ) ≈ 3/(εγ) per step size.
    """

    SMALL: ClassVar[dict[str, Any]] = dict(
        Ms=[1, 2], seeds=[0, 1, 2], family="unit_norm", D=8, K=16, noise_var=0.0, preset="seed", steps=5000,
        schedule="constant", n_checkpoints_linear=5, n_checkpoints_log=16, eval_size=1024, llc_n=4096,
        sampler=LLCConfig(num_chains=4, num_draws=200, num_burnin=50, batch_size=32, localization=1000.0))
    QUICK: ClassVar[dict[str, Any]] = dict(
        seeds=[0], steps=1500, n_checkpoints_linear=6, n_checkpoints_log=12, eval_size=512, llc_n=1024,
        sampler=LLCConfig(num_chains=2, num_draws=80, num_burnin=30, batch_size=32, localization=1000.0),
        step_sizes=[3e-5, 1e-4, 3e-4], ed_batch=64)
    INFINITE: ClassVar[bool] = False
    study: Literal["low-diversity"] = "low-diversity"
    ed_batch: int = Field(256, ge=1, description="fixed sequences whose predictions form the ED trajectory")

    def run_config(self, M: int, seed: int) -> RunConfig:
        return self.build_run(run_name(M, seed), M, seed)

    def run_configs(self) -> dict[str, RunConfig]:
        return {run_name(M, s): self.run_config(M, s) for M in self.Ms for s in self.seeds}


def run_name(M: int, seed: int) -> str:
    return f"M{M}-seed{seed}"


def _fixed_batch(run: Run, n: int):
    task = run.config.task
    pool = task_pool(task.family, task.M or 1, task.D, run.config.seed)
    return sample_batch(task, pool, n, make_generator(run.config.seed, "ed"))


def _essential_dynamics(run: Run, n: int):
    batch = _fixed_batch(run, n)
    preds = checkpoint_predictions(run, batch.x, batch.y)
    return essential_dynamics(preds, np.array(run.checkpoint_steps), n_components=3, sigma=1.0)


def _stages(run: Run, ed) -> Any:
    """The stage table of a run's LLC curve (saved as RUN/stages.{parquet,csv}), with its milestones."""
    llc = finite_llc(run)
    loss = run.metrics.set_index("step").loc[llc["step"]]["id_loss"].to_numpy()
    stages = llc_stages(llc, loss, ed_events=ed)
    save_stage_table(stages.table, run.path / "stages")
    return stages


def _boundary_steps(run: Run, table: pd.DataFrame, limit: int = 4) -> list[int]:
    steps = run.checkpoint_steps
    chosen = [steps[1]] + [int(e) for e in table["end"].iloc[:-1]] + [steps[-1]]
    chosen = sorted(set(chosen))
    if len(chosen) > limit:
        chosen = [chosen[0], *chosen[1:-1][-(limit - 2):], chosen[-1]]
    return chosen


def _attention_patterns(run: Run, table: pd.DataFrame) -> dict[int, np.ndarray]:
    """{step: mean attention (L, H, T, T) over 64 in-distribution sequences} at the stage boundaries."""
    batch = _fixed_batch(run, 64)
    return {step: attention_patterns(run.load_checkpoint(step), batch.x, batch.y).mean(1).numpy()
            for step in _boundary_steps(run, table)}


def _probes(cfg: LowDiversityConfig, runs: dict[str, Run]) -> pd.DataFrame:
    """Task-identity probe accuracy per position from the final residual at x positions (M >= 2 runs)."""
    rows = []
    for M in [m for m in cfg.Ms if m >= 2]:
        for seed in cfg.seeds:
            run = runs[run_name(M, seed)]
            batch = _fixed_batch(run, 2048)
            for step in (run.checkpoint_steps[len(run.checkpoint_steps) // 2], run.checkpoint_steps[-1]):
                acc = probe_residual(run.load_checkpoint(step), batch.x, batch.y, batch.task_index, classify=True)
                rows.append({"M": M, "seed": seed, "step": step, **{f"k{k + 1}": float(a) for k, a in enumerate(acc)}})
    return pd.DataFrame(rows)


def _pool_gap(run: Run) -> float:
    """‖w_1 − w_2‖²/4 of a run's M = 2 pool: the loss of the optimal (pool-mean) prediction at k = 1."""
    t = run.config.task
    pool = task_pool(t.family, 2, t.D, run.config.seed)
    return float((pool[0] - pool[1]).square().sum() / 4)


# ------------------------------------------------------------------------------------------------ expectations
def _llc_wiggles(llc: pd.DataFrame, metrics: pd.DataFrame) -> tuple[str, bool | None]:
    """How many steps of the LLC curve exceed the chains' standard error, and whether they follow the loss of the
    checkpoint: with a constant learning rate each checkpoint sits at a different height above the minimum, and λ̂,
    defined at a minimum, moves with it; with an `llc_slope` column, also how much of it the slope term S explains.
    Returns (measured text, verdict on λ̂ itself: at most half the changes beyond 2 se)."""
    llc = llc[np.isfinite(llc["llc_mean"])].sort_values("step")
    if len(llc) < 3:
        return f"{len(llc)} finite estimates", None
    lam = llc["llc_mean"].to_numpy()
    se = (llc["llc_std"] / np.sqrt(llc["num_chains"])).fillna(0).to_numpy()
    loss = metrics.set_index("step").loc[llc["step"], "id_loss"].to_numpy()
    d_lam, d_loss = np.diff(lam), np.diff(loss)
    tol = 2 * np.hypot(se[1:], se[:-1])  # 2 standard errors of each change
    beyond = np.abs(d_lam) > tol
    corr = _corr(d_lam, d_loss)
    text = (f"{int(beyond.sum())} of {len(d_lam)} changes beyond 2 se (rms change {np.sqrt(np.mean(d_lam**2)):.2g}, "
            f"rms se {np.sqrt(np.mean(se**2)):.2g}); corr(Δλ̂, Δ loss of the checkpoint) = {corr:.2f}")
    if "llc_slope" in llc and np.isfinite(slope := llc["llc_slope"].to_numpy(dtype=float)).all():
        # the slope term S (λ̂ reads low by |S|/2 to |S| on a slope, docs/llc.md): how much of the zig-zag it explains
        d_free = np.diff(lam - slope / 2)
        free_beyond = np.abs(d_free) > tol
        text += (f"; corr(Δλ̂, ΔS) = {_corr(d_lam, np.diff(slope)):.2f}, and λ̂ − S/2 has {int(free_beyond.sum())} "
                 f"of {len(d_free)} changes beyond 2 se (rms change {np.sqrt(np.mean(d_free**2)):.2g})")
    return text, bool(beyond.mean() <= 0.5)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two (N,) arrays; nan when either is constant."""
    return float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else float("nan")


def expectations(cfg: LowDiversityConfig, runs: dict[str, Run], probes: pd.DataFrame) -> list[Check]:
    """docs/papers.md §G3-G4 checked against the measurements, one row per (expectation, run)."""
    rows: list[Check] = []

    def add(what: str, run: str, expected: str, measured: str, ok: bool | None) -> None:
        rows.append(Check(what, expected, measured, ok, run=run))

    for name, run in runs.items():
        M = run.config.task.M
        m = run.metrics
        first, last = m.iloc[0], m.iloc[-1]
        llc = finite_llc(run)
        lam = llc["llc_mean"].to_numpy()
        k_cols = per_token_columns(m, "id_loss")
        # λ̂ is defined at a local minimum: before the loss has fallen (mid-descent) chains find lower loss and the
        # "negative" flag is the expected outcome there, so the sampler's quality is judged after the first drop.
        drop = m["step"][m["id_loss"] < 0.1 * first["id_loss"]]
        t_drop = int(drop.iloc[0]) if len(drop) else int(m["step"].iloc[-1])
        after = run.llc[run.llc["step"] >= t_drop]
        mixed = after["flags"].map(sampler_worked)
        frac = float(mixed.mean()) if len(after) else float("nan")
        add("LLC chains stationary and mixed once the loss has dropped", name,
            f"no not_stationary / chains_disagree / diverged flag at steps ≥ {t_drop} (loss < 10% of initial)",
            f"{int(mixed.sum())} of {len(after)} checkpoints", bool(frac >= 0.9) if len(after) else None)
        add("LLC curve smooth at the chains' resolution once the loss has dropped", name,
            "most changes between consecutive checkpoints within 2·√(se₁² + se₂²)", *_llc_wiggles(after, m))
        before = run.llc[run.llc["step"] < t_drop]
        neg_late = after[after["llc_mean"] < 0]["step"].tolist()
        add("λ̂ negative only where w* is not yet a minimum", name, f"λ̂ ≥ 0 at steps ≥ {t_drop}",
            f"{int((before['llc_mean'] < 0).sum())} of {len(before)} earlier checkpoints negative; later negative at "
            f"steps {neg_late}", not neg_late)
        if M == 1:
            add("loss falls from about 1 to about 0", name, "initial ≈ 1, final < 1% of initial",
                f"{first['id_loss']:.3g} → {last['id_loss']:.2e}", last["id_loss"] < 0.01 * first["id_loss"])
            spread = float(np.ptp([last[c] for c in k_cols]))
            add("per-token loss flat in k (no ICL needed)", name, "max − min of final ℓ_k ≪ initial loss",
                f"spread {spread:.2e}", spread < 0.01 * first["id_loss"])
            add("LLC rises while the map is learned, then settles", name,
                "max λ̂ after step 0 > λ̂(0); last 3 within 25% of each other",
                f"λ̂: {lam[0]:.3g} → max {lam.max():.3g} → last {lam[-3:].round(2).tolist()}",
                bool(lam.max() > lam[0] and np.ptp(lam[-3:]) <= 0.25 * abs(lam[-3:]).mean()))
        if M == 2:
            gap = _pool_gap(run)
            l1, rest = last[k_cols[0]], max(last[c] for c in k_cols[1:])
            add("final ℓ_1 ≈ ‖w₁−w₂‖²/4 (pool-mean prediction)", name, f"{gap:.3g} (±20%)", f"{l1:.3g}",
                abs(l1 - gap) <= 0.2 * gap)
            add("final ℓ_k ≈ 0 for k ≥ 2 (task identified from one example)", name, f"< 5% of {gap:.3g}",
                f"max ℓ_k (k≥2) = {rest:.2e}", rest < 0.05 * gap)
            plateau = m[(m["id_loss_k2"] > 0.5 * gap) & (m["id_loss"] < 1.5 * gap) & (m["id_loss"] > 0.5 * gap)]
            add("two-step learning: plateau near ‖w₁−w₂‖²/4 before the drop", name,
                "a checkpoint with mean loss within ×1.5 of ‖w₁−w₂‖²/4 and ℓ_2 not yet low",
                f"{len(plateau)} checkpoints (steps {plateau['step'].tolist()[:6]})", len(plateau) > 0)
            d_id = last["id_delta_dmmse"]
            add("predictions converge to dMMSE in distribution", name, "Δ(model, dMMSE) < 5% of ‖w₁−w₂‖²/4",
                f"{d_id:.2e}", d_id < 0.05 * gap)
            d_ood_dmmse, d_ood_ls = last["ood_delta_dmmse"], last["ood_delta_ridge"]
            add("OOD: stays dMMSE-like, not least-squares-like", name, "Δ_OOD(model, dMMSE) < Δ_OOD(model, LS)",
                f"{d_ood_dmmse:.3g} vs {d_ood_ls:.3g}", d_ood_dmmse < d_ood_ls)
            after = m[m["step"] > 0]
            closer_to_ls = after[after["ood_delta_ridge"] < after["ood_delta_dmmse"]]
            add("no transient ridge (low-M regime, Carroll et al.)", name,
                "after step 0, never closer to least squares than to dMMSE on fresh tasks",
                f"{len(closer_to_ls)} of {len(after)} checkpoints closer to least squares"
                + (f" (steps {closer_to_ls['step'].tolist()[:5]})" if len(closer_to_ls) else ""),
                len(closer_to_ls) == 0)
            drop = m.index[m["id_loss_k2"] < 0.5 * gap]
            if len(drop):
                t_drop = int(m.loc[drop[0], "step"])
                before = lam[llc["step"].to_numpy() <= t_drop]
                add("LLC rises (type A) around the drop", name, "λ̂ at the end > λ̂ just before the drop",
                    f"drop at step {t_drop}; λ̂ {before[-1]:.3g} → {lam[-1]:.3g}", lam[-1] > before[-1])
            else:
                add("LLC rises (type A) around the drop", name, "a drop of ℓ_2 below half the gap",
                    "no drop within training", None)
    for _, row in probes.iterrows():
        kcols = [c for c in probes.columns if c.startswith("k")]
        if row.step == runs[run_name(int(row.M), int(row.seed))].checkpoint_steps[-1]:
            acc1, acc2 = row[kcols[0]], row[kcols[1:]].min()
            add("the model knows which task from k = 2 on (probe)", run_name(int(row.M), int(row.seed)),
                "probe accuracy ≈ chance at k = 1, > 95% for k ≥ 2", f"k=1: {acc1:.2f}; min k≥2: {acc2:.2f}",
                bool(acc2 > 0.95))
    return rows


class LowDiversity(Study):
    name = "low-diversity"
    title = "Low task diversity: how the seed model solves M = 1 and M = 2"
    config = LowDiversityConfig
    reused = "finished runs and LLC estimates are reused and cost nothing"

    def checks_note(self) -> str:
        return ("Each row is measured on the run named; where a check fails, the figures below show what happened "
                "instead.")

    def llc_plan(self, runs: dict[str, Run]) -> LLCPlan:
        """Calibrate once, at the final checkpoint of the highest-M run of the first seed."""
        cfg = self.cfg
        return LLCPlan(LLCSettings(sampler=cfg.sampler, n=cfg.llc_n, data="id", seed=0), cfg.step_sizes,
                       run_name(max(cfg.Ms), cfg.seeds[0]))

    def analyse(self, runs: dict[str, Run], shared: SharedSettings, out: Path) -> dict[str, Any]:
        cfg = self.cfg
        if shared.settings is None:
            raise ValueError(f"LLC calibration of {shared.run} at step {shared.step} failed: {shared.reason}")
        eds = {name: _essential_dynamics(run, cfg.ed_batch) for name, run in runs.items()}
        joint = {s: joint_pca({M: runs[run_name(M, s)] for M in cfg.Ms}, cfg.ed_batch, "least squares", label=str)
                 for s in cfg.seeds}
        stages = {name: _stages(run, eds[name]) for name, run in runs.items()}
        return {"runs": runs, "eds": eds, "joint": joint, "stages": stages, "probes": _probes(cfg, runs),
                "settings": shared.settings}

    def checks(self, r: dict[str, Any]) -> list[Check]:
        return expectations(self.cfg, r["runs"], r["probes"])

    def figures(self, r: dict[str, Any], figs: Path) -> dict[str, Any]:
        cfg, runs, s0 = self.cfg, r["runs"], self.cfg.seeds[0]
        grid = {M: {s: runs[run_name(M, s)] for s in cfg.seeds} for M in cfg.Ms}
        pngs: dict[str, Any] = {}
        for name, run in runs.items():
            llc, stages, t = finite_llc(run), r["stages"][name], run.config.task
            loss = run.metrics.set_index("step").loc[llc["step"]]["id_loss"].to_numpy()
            pngs[f"stages_{name}"] = plot_stages(
                llc["step"].to_numpy(), loss, llc["llc_mean"].to_numpy(), llc["llc_std"].to_numpy(), stages.table,
                figs / f"stages_{name}", milestones=stages.milestones, loss_label="in-distribution loss",
                title=f"{run.path.name}: M={t.M}, seed {run.config.seed}", trusted=stages.trusted)[0]
        for M in cfg.Ms:
            run = grid[M][s0]
            patterns = _attention_patterns(run, r["stages"][run_name(M, s0)].table)
            pngs[f"attention_M{M}"] = (attention_figure(patterns, run.path.name, figs / f"attention_M{M}"),
                                       list(patterns))
        gaps = {s: _pool_gap(grid[2][s]) for s in cfg.seeds} if 2 in grid else {}
        pngs["loss"] = ms_loss_figure(grid, gaps, cfg.K, figs / "loss_curves")[0]
        pngs["delta"] = ms_delta_figure({M: {s: run.metrics for s, run in g.items()} for M, g in grid.items()},
                                        figs / "delta")[0]
        pngs["llc"] = ms_llc_figure({M: {f"seed {s}": finite_llc(run) for s, run in g.items()}
                                     for M, g in grid.items()}, figs / "llc_curves")[0]
        for M in cfg.Ms:
            pngs[f"ed_M{M}"] = plot_pc_pairs(r["eds"][run_name(M, s0)], figs / f"ed_M{M}", title=f"M={M}, seed {s0}")[0]
        for s, jp in r["joint"].items():
            pngs[f"joint_pca_seed{s}"] = plot_joint_pca(
                jp, figs / f"joint_pca_seed{s}", ref_runs={f"dMMSE_{M}": f"M={M}" for M in cfg.Ms},
                title=f"joint trajectory PCA on root-task sequences, seed {s}")[0]
        if len(r["probes"]):
            pngs["probes"] = probe_figure(r["probes"], figs / "probes")[0]
        return pngs

    def sections(self, r: dict[str, Any], pngs: dict[str, Any]) -> list[Section]:
        cfg, runs, eds, joint, probes, s0 = self.cfg, r["runs"], r["eds"], r["joint"], r["probes"], self.cfg.seeds[0]
        sections = []
        finals = pd.DataFrame([{"run": n, "final id loss": run.metrics.iloc[-1]["id_loss"],
                                "final ood loss": run.metrics.iloc[-1]["ood_loss"],
                                "dMMSE id": run.baselines["id_dmmse_loss"],
                                "least sq. ood": run.baselines["ood_ridge_loss"],
                                "zero ood": run.baselines["ood_zero_loss"]} for n, run in runs.items()])
        sections.append(Section("Loss against step, and the final per-token loss", (
            "Left and middle: mean loss (solid) and the loss at the first position ℓ_1 (dotted) on a fixed "
            "in-distribution set (the pool's tasks, fresh inputs) and on fresh unit-norm tasks, with the dMMSE "
            "(green) and least-squares (blue) levels of each seed's data. Right: the final per-token loss against the "
            "position k, against the dMMSE per-token loss (dashed) and, for M = 2, ‖w₁−w₂‖²/4 (dotted)."),
            figures=[pngs["loss"]], tables=[finals]))
        sections.append(Section("Distance to the Bayes-optimal predictors", (
            "Δ(model, dMMSE) and Δ(model, least squares): mean squared difference of predictions on the same inputs, "
            "in distribution (solid) and on fresh tasks (dashed)."), figures=[pngs["delta"]]))
        llc_rows = []
        for n, run in runs.items():
            llc = run.llc.sort_values("step")
            llc_rows.append({"run": n, "λ̂ step 0": llc["llc_mean"].iloc[0], "λ̂ max": llc["llc_mean"].max(),
                             "λ̂ final": llc["llc_mean"].iloc[-1], "std final": llc["llc_std"].iloc[-1],
                             "diagnostics ok": f"{llc['ok'].mean():.0%}",
                             "flags seen": ", ".join(sorted({f for fl in llc["flags"] for f in str(fl).split(";")
                                                             if f}))})
        sections.append(Section("LLC over training", (
            "λ̂ = nβ(E[L] − L(w*)) at every checkpoint with one set of SGLD settings, calibrated once, on one fixed "
            "dataset; mean ± std over chains, raw (no smoothing), at the true checkpoint steps. Where the curve "
            "zig-zags after the loss has dropped, compare each change with the chains' standard error and with the "
            "change in the checkpoint's own loss (the row 'LLC curve smooth at the chains' resolution' in the "
            "expectations table): with a constant learning rate the checkpoints sit at different heights above the "
            "minimum, and λ̂, defined at a minimum, moves with them; that is the trajectory, not sampling noise."),
            figures=[pngs["llc"]], tables=[pd.DataFrame(llc_rows)]))
        for M in cfg.Ms:
            name = run_name(M, s0)
            sections.append(Section(f"Stages, M = {M} (seed {s0})", (
                "Loss (top) and LLC (bottom) with the stage boundaries found at critical points of λ̂ against log step "
                "(orange: LLC rises, type A; blue: falls, type B). The table cross-checks each boundary with loss "
                "plateaus and essential-dynamics cusps/vertices (agreement within 0.3 in log step; the chance columns "
                "give how often a random step would agree)."),
                figures=[pngs[f"stages_{name}"]], tables=[r["stages"][name].table]))
        for M in cfg.Ms:
            ed = eds[run_name(M, s0)]
            png = pngs[f"ed_M{M}"]
            ev = ", ".join(f"{v:.1%}" for v in ed.explained_variance_ratio)
            sections.append(Section(f"Essential dynamics, M = {M} (seed {s0})", (
                f"PCA of the concatenated predictions on {cfg.ed_batch} fixed sequences at every checkpoint; explained "
                f"variance of the PCs: {ev}. Cusps (red crosses) and vertices (circles) are candidate forms; "
                "their steps: "
                f"{ed.event_steps().astype(int).tolist()}."), figures=[png]))
        for s, jp in joint.items():
            png = pngs[f"joint_pca_seed{s}"]
            ev = ", ".join(f"{v:.1%}" for v in jp.explained_variance_ratio)
            sections.append(Section(f"Joint trajectory PCA (seed {s})", (
                f"One PCA fitted on the checkpoints of the M = {cfg.Ms} runs, evaluated on {cfg.ed_batch} sequences "
                "of the shared root task; dMMSE_M (diamonds) and least squares (triangle) are projected, not fitted. "
                "Explained "
                f"variance: {ev}."), figures=[png]))
        for M in cfg.Ms:
            paths, steps = pngs[f"attention_M{M}"]
            sections.append(Section(f"Attention patterns, M = {M} (seed {s0})", (
                f"Mean attention per layer and head over 64 in-distribution sequences at steps {steps} (the first "
                "checkpoint after initialisation, the stage boundaries, and the final step). Tokens alternate "
                "x_1, y_1, "
                "x_2, y_2, …; predictions are read at the x tokens."), figures=[paths[0]]))
        if len(probes):
            sections.append(Section("Probes for the task identity", (
                "Held-out accuracy of a linear classifier reading the final residual stream at x_k, trained on half of "
                "2,048 sequences, at the middle and final checkpoints. Chance is 50%."),
                figures=[pngs["probes"]], tables=[probes.round(3)]))
        cal = runs[run_name(max(cfg.Ms), s0)].path / "figures" / "llc_calibration.png"
        if cal.exists():
            sections.append(Section("LLC calibration", (
                "λ̂ against the SGLD step size ε at the final checkpoint of the calibration run, with the loss traces; "
                "the chosen ε is the largest in the stable plateau (no diagnostic flag; neighbours agree within 10% or "
                "two standard errors); each ε burns in for at least min_burnin(ε, γ) ≈ 3/(εγ) steps."), figures=[cal]))
        return sections

    def intro(self, r: dict[str, Any]) -> str:
        cfg, settings = self.cfg, r["settings"]
        return (f"Seed preset (the user's 2-layer model, D={cfg.D}, K={cfg.K}) trained on unit-norm, noiseless tasks "
                f"with M in {cfg.Ms}, seeds {cfg.seeds}, {cfg.steps} steps at batch {cfg.batch_size}, "
                f"constant lr {cfg.lr}. LLC settings (calibrated once, shared by every checkpoint and run): "
                f"{settings.sampler.model_dump()} on n = {settings.n} fixed in-distribution sequences.")


STUDY = LowDiversity
