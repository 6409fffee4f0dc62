"""The transient-ridge study: Carroll et al. (2025), "Dynamics of Transient Structure in In-Context Linear Regression
Transformers" (docs/papers.md §E, small-scale targets §G7-G8).

One run per task diversity M (and M = ∞) and seed; the runs of one seed have nested task pools that share a root
task: pool(M) is the first M rows of one master sequence (`icl_lab.tasks.task_pool`, docs/papers.md §A2). Per M:

- the OOD loss (fresh tasks, the run's fixed 'ood' eval set, the same sequences for every M of a seed) against the
  training step, and its critical step t^crit_M (`critical_step`; Carroll et al. §3, Fig. 1 top-left;
  docs/papers.md §E3);
- the joint trajectory PCA of all runs' checkpoints on B root-task sequences, with the idealised predictors dMMSE_M
  and ridge projected as points (`icl_lab.trajectory.joint_trajectory_pca`; §4.2, Fig. 1 right, docs/papers.md §E2);
- the LLC of the final checkpoint (Eq. 9, §5 Fig. 3 bottom; docs/papers.md §E5) of the first `llc_seeds` seeds'
  runs, at the library's validated defaults `LLCConfig()` (ε = 1e-4, γ = 0.01·nβ, burn-in min_burnin(ε, γ),
  4 chains × 500 draws, minibatch 256; docs/llc.md "Defaults, and what they are validated on"), checked once on a
  γ-plateau (γ/2 and 2γ) at the final checkpoint of the largest M and shared by every run (`icl_lab.llc_run`).
  One such estimate costs tens of minutes on 2 CPU cores (docs/llc.md "What this costs"), so only the final
  checkpoint is estimated, and the quick scale skips the LLC (`llc=False`; its report says so).

Power and intervals (every interval is a 95% one from `icl_lab.intervals`; the report names the method):

- Seeds: 3 per M at the small and quick scales, trained 3 at a time as one ensemble (`ensemble`; the runs differ
  only in seed and M, and `run_configs` puts each M's seeds together).
- t_crit per M: the point estimate is `critical_step` of the seed-mean OOD curve; its interval is the percentile
  bootstrap over seeds (`bootstrap_t_crit`: resample seeds, average their curves, take t_crit where the mean curve
  is U-shaped), with the fraction of resamples whose mean curve is not U-shaped (no t_crit).
- λ̂ per M: the mean over the LLC seeds with a Student-t interval over them; with one LLC seed, the MCSE interval
  of its estimate (t with ESS − 1 degrees of freedom).

Pre-registered checks. The rule of every check is in `expectations` and the report's table; its thresholds are
fields of `TransientRidgeConfig` (with their reasons; saved in study_config.json before anything trains). Changed
in this version, and why (docs/papers.md §E3-E5, §G7-G8):
- `u_min_drop` (1% of the starting OOD loss) was added after a float-jitter dip at M = 4 in the first small-scale
  run. It stays, now as a named threshold: a fall smaller than that is not the paper's "falls towards ridge's"
  (§E3); the report states it with `u_min_rise` (10% of the drop given back) beside every U-shape verdict.
- The LLC crossing accepted the first M with λ̂ ≥ λ̂_∞ within a factor 4 of the smallest U-shaped M, a window
  chosen after a result. §E5 says the low-M LLC "crosses λ̂_∞ at the onset of transience"; the finest resolution
  the measurement has is the M grid, so the rule is now: the crossing M is the smallest U-shaped M or one of its
  two neighbours on the grid.
- The PCA bend passed at bend = d(γ(t_crit), ridge) / d(γ(T), ridge) < 1, which a straight path from start to
  dMMSE_M passing near ridge also satisfies (a bend of 0.90 passed). §E3 contrasts "straight to dMMSE" with
  "deflected via ridge", so the statistic is now the deflection: d(γ(t_crit), ridge) divided by the distance from
  ridge to the chord γ(0)→γ(T) (1 or more on a straight path), and it must be at most `max_deflection` = 0.5,
  a named threshold (the curve comes at least twice as close to ridge as the straight path would).
- "t_crit grows with M" also asks, where the bootstrap intervals exist, that t_crit's interval at the largest
  U-shaped M lies above that at the smallest.
- The Spearman bounds (`t_crit_rho`, `llc_rho` = 0.5), the LLC plateau tolerance (`llc_plateau_tol` = 25%) and the
  ridge tolerance (`ridge_tol` = 10%) were constants in the code; they are now named fields.

Scales (`TransientRidgeConfig.for_scale`): 'small' (default; its training is sized for 90 minutes on 2 CPU cores,
the LLC estimates come on top, see the README); 'paper' gives the paper's sizes as far as the main text states
them (D = 8, K = 16, σ² = 0.125, a 2-layer model of about 2.65M parameters, M = 1 ... 2^15 on a √2 grid and ∞)
for a GPU or a cluster (executor 'ray' or 'slurm'); `quick=True` is a minutes-long small version without the LLC.
Runs train through `icl_lab.sweep.train_named_runs`; finished runs, LLC calibration and LLC estimates on disk are
reused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from icl_lab.config import LLCConfig, RunConfig
from icl_lab.intervals import Interval, bootstrap_interval, mcse_interval, t_interval
from icl_lab.llc_run import LLCPlan, LLCSettings, SharedSettings
from icl_lab.plots import m_label, plot_joint_pca
from icl_lab.plots.power import intervals_vs_m_figure
from icl_lab.plots.studies import llc_vs_m_figure, ood_figure, pca_distance_figure, t_crit_figure
from icl_lab.report import Section
from icl_lab.store import Run, write_json, write_parquet
from icl_lab.studies.common import (
    Check,
    LLCStudyConfig,
    MsStudyConfig,
    fmt_ms,
    joint_pca,
    n_parameters,
    scale_frame,
    spearman,
)
from icl_lab.studies.runner import Study, run_study

__all__ = ["CriticalStep", "TransientRidge", "TransientRidgeConfig", "bootstrap_t_crit",
           "critical_step", "expectations", "llc_interval", "per_seed_ood", "ridge_approach", "run_name", "run_study",
           "t_crit_of_mean"]


def _sqrt2_grid(top_exponent: int) -> list[int]:
    """round(2^(j/2)) for j = 0 .. 2·top_exponent, without repeats: 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, ...
    (Carroll et al.'s grid is 'roughly geometric with ratio √2'; the exact one is in their App. A, not in
    docs/papers.md)."""
    return sorted({round(2 ** (j / 2)) for j in range(2 * top_exponent + 1)})


# The paper's sizes (docs/papers.md §E1): D = 8, K = 16, σ² = 0.125, M = 1 ... 2^15 and ∞. [EXT] App. A (architecture,
# optimiser, steps) is not in docs/papers.md: the model is the 'hoogland' layout (2 layers) widened to d_model 256, MLP
# 2048, which has 2.64M parameters (the paper: 2.65M); optimiser and schedule are Hoogland et al.'s (Adam, lr 3e-3,
# one-cycle triangle, batch 256, 500k steps; docs/papers.md §D1), checkpoints a union of linear and log spacing (§E1).
# LLC: the validated defaults (ε = 1e-4, γ = 0.01·nβ, burn-in min_burnin(ε, γ), 500 draws; docs/llc.md) with the
# sizes of the authors' stored regression sweep config (8 chains, minibatch 1024, n = 32,768; docs/papers.md §D2
# [EXT]); llc_run.settings_check checks them once (γ/2 and 2γ, the papers' settings, a known-λ network) at the
# final checkpoint of M = ∞.
PAPER = dict(Ms=_sqrt2_grid(15) + [None], D=8, K=16, noise_var=0.125, preset="hoogland",
             model_overrides=dict(d_model=256, n_heads=4, d_head=64, d_mlp=2048),
             batch_size=256, steps=500_000, n_checkpoints_linear=100, n_checkpoints_log=100, n_evals=500,
             eval_size=8192, pca_batch=512, llc_n=32_768,
             sampler=LLCConfig(num_chains=8, batch_size=1024), step_sizes=[1e-4],
             device="cuda", workers=4)
# A minutes-long version of the small scale: 6 Ms, 3,000 steps, lighter evaluation, the same 3 seeds, no LLC (one
# estimate at the validated defaults alone costs several times the quick budget on 2 CPU cores).
QUICK = dict(Ms=[1, 4, 8, 16, 64, None], steps=3000, n_checkpoints_linear=6, n_checkpoints_log=10, n_evals=30,
             eval_size=1024, pca_batch=128, llc=False)
SEEDS = 3  # per M at the small and quick scales (docs/papers.md §G: "a few seeds")


class TransientRidgeConfig(MsStudyConfig, LLCStudyConfig):
    """Settings of the study. The defaults are the 'small' scale, training sized for 90 minutes on 2 CPU
    cores; `for_scale` gives 'paper' and `quick`.

    Small scale, and why: the task-diversity study's setting (D = 4, K = 8, σ² = 0.125, the 2-layer 'hoogland' preset
    with 51.7k parameters, batch 32, lr 3e-3 with the triangle schedule): Carroll et al.'s noise σ² = 0.125 and
    K = 2D at half their dimension (docs/papers.md §E1: D = 8, K = 16). The threshold moves to smaller M at small scale
    and with fewer steps (docs/papers.md §G, §C2); Carroll et al. see the full transient at about 1/20 to 1/3 of their
    threshold and partial effects just below and above (§G7), so the Ms run from 1 to 2^5 on a √2 grid, then 2^6,
    2^7 and ∞ for the ridge-like end. 3 seeds per M, trained as 3-member ensembles; the runs of one seed have
    nested pools that share the root task. Whether this setting shows transience at all is what the study measures.

    The LLC: `LLCConfig()`, the validated defaults, at the final checkpoint of the first seed's runs
    (`llc_seeds` = 1), ε = 1e-4 checked on a γ-plateau once (`step_sizes` = [1e-4]).
    """

    SMALL: ClassVar[dict[str, Any]] = dict(
        Ms=[1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 64, 128, None], steps=12_000, n_checkpoints_log=20,
        seeds=list(range(SEEDS)), ensemble=SEEDS, sampler=LLCConfig(), step_sizes=[1e-4])
    PAPER: ClassVar[dict[str, Any]] = PAPER
    QUICK: ClassVar[dict[str, Any]] = QUICK
    MIN_FINITE: ClassVar[int] = 3
    TOO_FEW: ClassVar[str] = ("at least three finite task diversities are needed (low, intermediate, high; e.g. "
                              "1,4,16,inf)")
    study: Literal["transient-ridge"] = "transient-ridge"
    n_evals: int = Field(60, ge=1, description="extra OOD evaluations, evenly spaced (the OOD-loss curve)")
    pca_batch: int = Field(256, ge=1, description="B root-task sequences of the joint PCA (paper 512; ≥ 16 suffices)")
    pca_components: int = Field(2, ge=2, description="v, the essential subspace (paper 2; App. C 4)")
    pca_sigma: float = Field(1.0, ge=0, description="light smoothing of the PC curves along checkpoints (0: raw)")
    llc_seeds: int = Field(1, ge=1, description="the first N seeds' runs get a final-checkpoint LLC (one estimate "
                           "at the validated defaults costs tens of minutes on 2 CPU cores: docs/llc.md)")
    n_boot: int = Field(2000, ge=100, description="bootstrap resamples of the seeds for t_crit's 95% intervals")
    # -- the checks' thresholds, fixed before the run (module docstring: "Pre-registered checks")
    u_min_rise: float = Field(0.1, gt=0, lt=1, description="U-shape: the fraction of the initial drop given back by "
                              "the end (a smaller rise is late-training jitter, not 'then rises towards dMMSE_M')")
    u_min_drop: float = Field(0.01, ge=0, lt=1, description="U-shape: the least drop, as a fraction of the starting "
                              "OOD loss (a smaller dip is not 'falls towards ridge's'; set after a float-jitter dip at "
                              "M = 4, see the module docstring)")
    t_crit_rho: float = Field(0.5, gt=0, le=1, description="t_crit grows with M: Spearman ρ(M, t_crit) over the "
                              "U-shaped Ms at least this (a clear monotone trend)")
    max_deflection: float = Field(0.5, gt=0, lt=1, description="bend towards ridge: d(γ(t_crit), ridge) at most this "
                                  "fraction of the distance from ridge to the straight path γ(0)→γ(T)")
    llc_rho: float = Field(0.5, gt=0, le=1, description="λ̂ rises with M: Spearman ρ(M, λ̂) over the lower half of "
                           "the finite Ms at least this")
    llc_plateau_tol: float = Field(0.25, gt=0, lt=1, description="λ̂ plateaus: the three largest Ms within this "
                                   "fraction of their mean")
    ridge_tol: float = Field(0.1, gt=0, lt=1, description="the largest M is ridge-like: final OOD loss within this "
                             "fraction of ridge's")

    @model_validator(mode="after")
    def _check_llc_seeds(self) -> TransientRidgeConfig:
        if self.llc and self.llc_seeds > len(self.seeds):
            raise ValueError(f"llc_seeds = {self.llc_seeds} exceeds the {len(self.seeds)} seed(s) {self.seeds}")
        return self

    @property
    def seeds_with_llc(self) -> list[int]:
        """The seeds whose runs get a final-checkpoint LLC (none when llc is False)."""
        return self.seeds[:self.llc_seeds] if self.llc else []

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // self.n_evals)

    def run_config(self, M: int | None, seed: int) -> RunConfig:
        return self.build_run(run_name(M, seed), M, seed, eval_every=self.eval_every)

    def run_configs(self) -> dict[str, RunConfig]:
        """Every run, M = ∞ first, then the finite Ms from the largest down (the order only matters for scheduling
        in a process pool)."""
        return {run_name(M, s): self.run_config(M, s) for M in reversed(self.Ms) for s in self.seeds}


def run_name(M: int | None, seed: int) -> str:
    return f"M{'inf' if M is None else M}-seed{seed}"


# ================================================================================================ the criteria
@dataclass(frozen=True)
class CriticalStep:
    """The critical step of one OOD-loss curve (see `critical_step`)."""

    t_crit: int  # argmin over the evaluated steps of the OOD loss (ties: the earliest)
    loss_start: float  # L(t_0), the first evaluated step (step 0 for a run's metrics)
    loss_min: float  # L(t_crit)
    loss_end: float  # L(T), the last evaluated step
    drop: float  # L(t_0) − L(t_crit) ≥ 0
    rise: float  # L(T) − L(t_crit) ≥ 0
    rise_fraction: float  # rise / drop: the fraction of the initial improvement given back (0 if drop = 0)
    u_shape: bool  # interior minimum, drop ≥ min_drop · loss_start and rise_fraction ≥ min_rise
    kind: Literal["u-shape", "monotone", "no-dip"]  # 'no-dip': the minimum is at the first step

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def critical_step(steps, ood_loss, min_rise: float = 0.1, min_drop: float = 0.01) -> CriticalStep:
    """t^crit_M = argmin over training steps of the OOD loss L^{q_∞}(w_t) (Carroll et al. §3 and App. B.2;
    docs/papers.md §E3), over the evaluated steps `steps` (T,) with losses `ood_loss` (T,); ties go to the earliest
    step.

    The curve is U-shaped (transient) when its minimum is interior (neither the first nor the last step), it fell
    from the start to the minimum by at least `min_drop` of the starting loss (drop = L(t_0) − L(t_crit)
    ≥ min_drop · L(t_0)), and it gave back at least `min_rise` of that drop by the end (rise = L(T) − L(t_crit)
    ≥ min_rise · drop). A curve that keeps falling (minimum at the end, or a rise below `min_rise` of the drop) is
    'monotone' — t_crit is then the end of training or close to it — and one whose minimum is its first value, or
    that never fell by `min_drop`, is 'no-dip' (the OOD loss only rises; a dip of float jitter in the first steps
    is not a descent). The rules are relative, so they do not depend on the loss scale; `min_rise` (default 10%)
    sets how much of a rise counts as one rather than late-training jitter, `min_drop` (default 1%) how much of a
    fall counts as one.
    """
    s, loss = np.asarray(steps, dtype=float), np.asarray(ood_loss, dtype=float)
    if s.ndim != 1 or loss.ndim != 1 or len(s) != len(loss):
        raise ValueError(f"steps and ood_loss must be 1-D of one length, got shapes {s.shape} and {loss.shape}")
    if len(s) < 3:
        raise ValueError(f"an OOD-loss curve needs at least 3 evaluated steps, got {len(s)}")
    if not (np.all(np.isfinite(s)) and np.all(np.diff(s) > 0)):
        raise ValueError(f"steps must be finite and strictly increasing, got {s.tolist()}")
    if not np.all(np.isfinite(loss)):
        raise ValueError(f"ood_loss must be finite, got non-finite values at steps {s[~np.isfinite(loss)].tolist()}")
    if not 0 < min_rise < 1:
        raise ValueError(f"min_rise must lie in (0, 1), got {min_rise}")
    if not 0 <= min_drop < 1:
        raise ValueError(f"min_drop must lie in [0, 1), got {min_drop}")
    i = int(np.argmin(loss))  # np.argmin returns the first of equal minima
    drop, rise = float(loss[0] - loss[i]), float(loss[-1] - loss[i])
    frac = rise / drop if drop > 0 else 0.0
    fell = drop > 0 and drop >= min_drop * abs(float(loss[0]))
    u = 0 < i < len(s) - 1 and fell and frac >= min_rise
    kind = "u-shape" if u else ("no-dip" if i == 0 or not fell else "monotone")
    return CriticalStep(int(s[i]), float(loss[0]), float(loss[i]), float(loss[-1]), drop, rise, frac, u, kind)


def ridge_approach(curve, ridge, dmmse, t_index: int) -> dict[str, float]:
    """How close one joint-PCA trajectory comes to the ridge point (Carroll et al. Fig. 1 right, §4.2).

    curve (T, v): γ_M(t) in the essential subspace; ridge, dmmse (v,): the projected idealised predictors; t_index:
    the row of t^crit. Returns the Euclidean distances in that subspace: 'ridge_at_crit' = ‖γ(t_crit) − ridge‖,
    'ridge_at_end' = ‖γ(T) − ridge‖, 'ridge_min' = min_t ‖γ(t) − ridge‖, 'dmmse_at_end' = ‖γ(T) − dMMSE_M‖,
    'bend' = ridge_at_crit / ridge_at_end (< 1: the curve was nearer ridge at t_crit than where it ended),
    'ridge_to_chord' = the distance from ridge to the segment γ(0)→γ(T) (the straight path), and
    'deflection' = ridge_at_crit / ridge_to_chord (≥ 1 for any point of the straight path; < 1: the curve left it
    towards ridge, §E3 "deflected via ridge"; inf when ridge lies on the chord).
    """
    c = np.asarray(curve, dtype=float)
    r, d = np.asarray(ridge, dtype=float), np.asarray(dmmse, dtype=float)
    if c.ndim != 2 or r.shape != (c.shape[1],) or d.shape != (c.shape[1],):
        raise ValueError(f"curve must be (T, v) and the points (v,), got {c.shape}, {r.shape}, {d.shape}")
    if not 0 <= t_index < len(c):
        raise ValueError(f"t_index must index the curve's {len(c)} rows, got {t_index}")
    dist_r = np.linalg.norm(c - r, axis=1)
    at_crit, at_end = float(dist_r[t_index]), float(dist_r[-1])
    chord = c[-1] - c[0]
    u = float(np.clip(np.dot(r - c[0], chord) / np.dot(chord, chord), 0.0, 1.0)) if np.any(chord) else 0.0
    to_chord = float(np.linalg.norm(c[0] + u * chord - r))
    return {
        "ridge_at_crit": at_crit,
        "ridge_at_end": at_end,
        "ridge_min": float(dist_r.min()),
        "dmmse_at_end": float(np.linalg.norm(c[-1] - d)),
        "bend": at_crit / at_end if at_end > 0 else math.inf,
        "ridge_to_chord": to_chord,
        "deflection": at_crit / to_chord if to_chord > 0 else math.inf,
    }


# ================================================================================================ power
def per_seed_ood(cfg: TransientRidgeConfig, runs: dict[str, Run], M: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(steps (T,), losses (S, T)): the OOD loss of each seed's run at M, at the steps every seed evaluated."""
    frames = [runs[run_name(M, s)].metrics[["step", "ood_loss"]].set_index("step")["ood_loss"] for s in cfg.seeds]
    table = pd.concat(frames, axis=1)
    if table.isna().to_numpy().any() or len(table) < 3:
        raise ValueError(f"M = {m_label(M)}: the seeds' runs were not evaluated at the same steps")
    return table.index.to_numpy(dtype=float), table.to_numpy(dtype=float).T


def t_crit_of_mean(steps, losses, min_rise: float = 0.1, min_drop: float = 0.01) -> float:
    """t_crit of the seed-mean OOD curve (`critical_step`) where it is U-shaped, else nan (no transient minimum);
    steps (T,), losses (S, T)."""
    c = critical_step(steps, np.mean(losses, axis=0), min_rise, min_drop)
    return float(c.t_crit) if c.u_shape else math.nan


def bootstrap_t_crit(steps, losses, min_rise: float = 0.1, min_drop: float = 0.01, n_boot: int = 2000,
                     seed: int = 0) -> tuple[Interval, float]:
    """The percentile-bootstrap 95% interval of t_crit over seeds (`intervals.bootstrap_interval`; Efron &
    Tibshirani §13.3): steps (T,), losses (S, T) one OOD curve per seed; each resample of seeds is averaged and
    `t_crit_of_mean` applied. Returns (interval around t_crit of all seeds' mean, fraction of resamples whose mean
    curve is not U-shaped). A curve that is not U-shaped has estimate nan; fewer than 2 seeds, or more than half
    the resamples without a U-shape, give a nan interval."""
    x = np.asarray(losses, dtype=float)
    if x.ndim != 2 or x.shape[1] != len(steps):
        raise ValueError(f"losses must be (seeds, len(steps)) = (S, {len(steps)}), got {x.shape}")
    return bootstrap_interval(x, lambda v: t_crit_of_mean(steps, v, min_rise, min_drop), n_boot=n_boot, seed=seed)


def llc_interval(llc_mean, llc_mcse, ess) -> Interval:
    """λ̂ at one M over its LLC seeds: llc_mean, llc_mcse, ess (S,) per seed's estimate. Two or more finite estimates:
    their mean with a Student-t interval over seeds; one: the MCSE interval of that estimate (t with ESS − 1 d.o.f.;
    `intervals.mcse_interval`)."""
    m, se, e = (np.asarray(v, dtype=float).ravel() for v in (llc_mean, llc_mcse, ess))
    ok = np.isfinite(m)
    if ok.sum() >= 2:
        return t_interval(m[ok])
    if ok.sum() == 1:
        i = int(np.flatnonzero(ok)[0])
        return mcse_interval(float(m[i]), float(se[i]), float(e[i]))
    return Interval(math.nan, math.nan, math.nan, 0.95, "no estimate")


# ================================================================================================ the analysis
def ood_curves(cfg: TransientRidgeConfig, runs: dict[str, Run]) -> dict[int | None, pd.DataFrame]:
    """Per M: the OOD loss against step, averaged over seeds (columns step, ood_loss; one row per evaluated step).
    Every run of a seed is evaluated on the same fixed OOD set (fresh tasks; `tasks.eval_sets`), so the curves of
    different M are comparable point by point."""
    out = {}
    for M in cfg.Ms:
        frames = [runs[run_name(M, s)].metrics[["step", "ood_loss"]].set_index("step") for s in cfg.seeds]
        mean = pd.concat(frames, axis=1).mean(axis=1)
        if mean.isna().any() or len(mean) < 3:
            raise ValueError(f"M = {m_label(M)}: the seeds' runs were not evaluated at the same steps")
        out[M] = pd.DataFrame({"step": mean.index.to_numpy(), "ood_loss": mean.to_numpy()})
    return out


def pca_approach(cfg: TransientRidgeConfig, jp, crit: dict[int | None, CriticalStep]
                 ) -> dict[int | None, dict[str, float]]:
    """`ridge_approach` of every run's (smoothed) curve in the essential subspace, at the checkpoint nearest t_crit."""
    out = {}
    for M in cfg.Ms:
        name = f"M={m_label(M)}"
        steps = jp.steps[name]
        t_index = int(np.argmin(np.abs(steps - crit[M].t_crit)))
        dmmse = jp.references["ridge"] if M is None else jp.references[f"dMMSE_{m_label(M)}"]
        out[M] = ridge_approach(jp.smoothed[name], jp.references["ridge"], dmmse, t_index)
    return out


LLC_SKIPPED = "LLC not estimated: skipped at this scale (llc = False; the quick scale skips it by design)"


def final_llc(cfg: TransientRidgeConfig, runs: dict[str, Run], shared: SharedSettings | None
              ) -> tuple[pd.DataFrame, str]:
    """The LLC (Eq. 9) of the final checkpoint of every run of the LLC seeds (`cfg.seeds_with_llc`) at the shared
    settings, calibrated once at the final checkpoint of the largest-M run of the first seed (M = ∞ where
    present). Returns (rows: M, seed, llc_mean, llc_std, llc_mcse, ess, ok, flags; a note for the report); without
    a setting (or with the LLC skipped: shared None) the rows are NaN and the note says why."""
    chosen = None if shared is None else shared.settings
    if chosen is None:
        rows = [{"M": M, "seed": s, "llc_mean": math.nan, "llc_std": math.nan, "llc_mcse": math.nan,
                 "ess": math.nan, "ok": False, "flags": "no setting"}
                for M in cfg.Ms for s in (cfg.seeds_with_llc or cfg.seeds[:1])]
        return pd.DataFrame(rows), (LLC_SKIPPED if shared is None else f"LLC not estimated: {shared.reason}")
    rows = []
    for M in cfg.Ms:
        for s in cfg.seeds_with_llc:
            run = runs[run_name(M, s)]
            llc = run.llc
            row = llc[(llc["step"] == run.checkpoint_steps[-1]) & (llc["settings_hash"] == chosen.digest())].iloc[-1]
            rows.append({"M": M, "seed": s, "llc_mean": float(row["llc_mean"]), "llc_std": float(row["llc_std"]),
                         "llc_mcse": float(row.get("llc_mcse", math.nan)), "ess": float(row.get("ess", math.nan)),
                         "ok": bool(row["ok"]), "flags": str(row["flags"])})
    sampler = chosen.sampler
    nbeta = f"{sampler.nbeta:g}" if sampler.nbeta is not None else "n / log n"
    gamma = f"{sampler.localization:g}" if sampler.localization is not None else "0.01·nβ"
    note = (f"Calibrated at the final checkpoint of {shared.run} (table and figure: runs/{shared.run}/"
            f"llc_calibration.parquet, figures/llc_calibration.png; the γ-plateau check, γ/2 and 2γ, is in that "
            f"table): {shared.reason}. Shared settings: ε = {sampler.step_size:g}, γ = {gamma}, nβ = {nbeta}, "
            f"{sampler.num_chains} chains × {sampler.num_draws} draws after {sampler.num_burnin} burn-in, minibatch "
            f"{sampler.batch_size}, n = {chosen.n}; the final checkpoint of seed(s) {cfg.seeds_with_llc} only. "
            "The defaults LLCConfig() read deep linear networks of known learning coefficient within 10% "
            "(docs/llc.md, 'Defaults, and what they are validated on'); λ̂ at γ = 1000-style settings (the earlier "
            "studies) or at the papers' γ/nβ = 0.1 is not comparable with these values")
    return pd.DataFrame(rows), note


def collect(cfg: TransientRidgeConfig, runs: dict[str, Run], crit: dict[int | None, CriticalStep],
            approach: dict[int | None, dict[str, float]], llc: pd.DataFrame,
            t_crit_ci: dict[int | None, tuple[Interval, float]] | None = None) -> pd.DataFrame:
    """One row per M (M = inf for ∞; seeds averaged): the critical step of the seed-mean OOD curve with its
    bootstrap interval over seeds (`t_crit_ci`: t_crit_lo, t_crit_hi, t_crit_no_u = the fraction of resamples
    without a U-shape; nan without it), the OOD levels of ridge and dMMSE_M on the same set, the final
    in-distribution Δ(PT, dMMSE_M) and Δ(PT, Ridge), the joint-PCA distances (first seed) and the final LLC (mean
    over the LLC seeds, llc_lo / llc_hi its 95% interval, `llc_interval`; std: the chains' std, averaged)."""
    rows = []
    for M in cfg.Ms:
        final = []
        for s in cfg.seeds:
            run = runs[run_name(M, s)]
            m = run.metrics
            last = m[m["step"] == cfg.steps].iloc[-1]
            final.append({"id_loss": last["id_loss"], "id_delta_dmmse": last["id_delta_dmmse"],
                          "id_delta_ridge": last["id_delta_ridge"], "ood_loss_final": last["ood_loss"],
                          **{k: run.baselines[k] for k in ("ood_ridge_loss", "ood_dmmse_loss", "id_dmmse_loss",
                                                           "id_ridge_loss", "ood_zero_loss")}})
        lm = llc[llc["M"].apply(lambda v, M=M: v == M if M is not None else v is None or pd.isna(v))]
        c = crit[M]
        ci, no_u = (t_crit_ci or {}).get(M, (Interval(math.nan, math.nan, math.nan, 0.95, "none"), math.nan))
        li = llc_interval(lm["llc_mean"], lm.get("llc_mcse", pd.Series(math.nan, index=lm.index)),
                          lm.get("ess", pd.Series(math.nan, index=lm.index)))
        rows.append({"M": np.inf if M is None else float(M), **pd.DataFrame(final).mean().to_dict(),
                     "t_crit": c.t_crit, "t_crit_lo": ci.lo, "t_crit_hi": ci.hi, "t_crit_no_u": no_u,
                     "t_crit_interval": ci.method, "kind": c.kind, "u_shape": c.u_shape, "ood_loss_start": c.loss_start,
                     "ood_loss_min": c.loss_min, "ood_loss_end": c.loss_end, "rise_fraction": c.rise_fraction,
                     **{f"pca_{k}": v for k, v in approach[M].items()},
                     "llc_mean": float(lm["llc_mean"].mean()), "llc_std": float(lm["llc_std"].mean()),
                     "llc_lo": li.lo, "llc_hi": li.hi, "llc_interval": li.method,
                     "llc_ok": bool(lm["ok"].all()),
                     "llc_flags": ";".join(sorted({f for fl in lm["flags"] for f in str(fl).split(";") if f}))})
    return pd.DataFrame(rows)


# ================================================================================================ expectations
def expectations(cfg: TransientRidgeConfig, summary: pd.DataFrame) -> list[Check]:
    """docs/papers.md §E3-E5 / §G7-G8 against the measurements (seed means, with t_crit's bootstrap intervals where
    the summary has them). The rules are fixed here and their thresholds in the config, before looking at any
    result (module docstring: "Pre-registered checks"); 'intermediate' means strictly between the smallest finite M
    and the largest M of the grid."""
    s = summary.set_index("M")
    finite = [m for m in s.index if np.isfinite(m)]
    top = s.index[-1]  # ∞ where present, else the largest finite M
    u_ms = [m for m in finite if s.loc[m, "u_shape"] and finite[0] < m < top]  # intermediate U-shaped Ms
    rows: list[Check] = []

    def add(what: str, source: str, expected: str, measured: str, ok: bool | None) -> None:
        rows.append(Check(what, expected, measured, ok, source=source))

    def curve(m) -> str:
        r = s.loc[m]
        return (f"M = {m_label(m)}: {r['ood_loss_start']:.3g} → {r['ood_loss_min']:.3g} at step {int(r['t_crit'])} "
                f"→ {r['ood_loss_end']:.3g} "
                + ("(no fall)" if r["kind"] == "no-dip" else f"(gives back {r['rise_fraction']:.0%})"))

    # -- U-shape (E3, G7)
    ends_monotone = not s.loc[finite[0], "u_shape"] and not s.loc[top, "u_shape"]  # else: unclear
    add("OOD loss against step is U-shaped at intermediate M (falls towards ridge, then rises towards dMMSE_M)",
        "§E3, §G7 (Fig. 1 top-left)",
        f"at least one finite M strictly between {m_label(finite[0])} and {m_label(top)} has an interior minimum, "
        f"falls by ≥ {cfg.u_min_drop:.0%} of its starting loss and gives back ≥ {cfg.u_min_rise:.0%} of that drop; "
        f"the smallest M and M = {m_label(top)} do not",
        f"U-shaped at M = {fmt_ms(u_ms)}; " + "; ".join(curve(m) for m in s.index),
        bool(u_ms) if (not u_ms or ends_monotone) else None)
    # -- t_crit grows with M (E3, G7)
    if len(u_ms) >= 2:
        t = [float(s.loc[m, "t_crit"]) for m in u_ms]
        rho = spearman(u_ms, t)
        alpha = float(np.polyfit(np.log(u_ms), np.log(np.maximum(t, 1.0)), 1)[0])
        lo_last = float(s.loc[u_ms[-1], "t_crit_lo"]) if "t_crit_lo" in s else math.nan
        hi_first = float(s.loc[u_ms[0], "t_crit_hi"]) if "t_crit_hi" in s else math.nan
        have_ci = math.isfinite(lo_last) and math.isfinite(hi_first)
        apart = lo_last > hi_first if have_ci else t[-1] > t[0]
        add("t^crit_M grows with M", "§E3, §G7 (§G6: t* ~ M^0.47 in Raventós et al.)",
            f"over the U-shaped Ms: Spearman ρ(M, t_crit) ≥ {cfg.t_crit_rho:g}, and t_crit's 95% bootstrap interval "
            "at the largest lies above that at the smallest (without intervals: t_crit at the largest > at the "
            "smallest)",
            "t_crit: " + ", ".join(f"{m_label(m)}: {int(v)}{_ci_text(s, m)}" for m, v in zip(u_ms, t, strict=True))
            + f"; ρ = {rho:.2f}; fitted exponent t_crit ~ M^{alpha:.2f}"
            + ("" if have_ci else "; no bootstrap intervals (fewer than 2 seeds, or most resamples not U-shaped)"),
            bool(rho >= cfg.t_crit_rho and apart))
    else:
        add("t^crit_M grows with M", "§E3, §G7", "over the U-shaped Ms (needs at least two)",
            f"{len(u_ms)} U-shaped M ({fmt_ms(u_ms)}); t_crit at every M: "
            + ", ".join(f"{m_label(m)}: {int(s.loc[m, 't_crit'])}" for m in s.index), None)
    # -- joint PCA (E2-E3, G7)
    vals = [(m, s.loc[m, "pca_deflection"], s.loc[m, "pca_dmmse_at_end"], s.loc[m, "pca_ridge_at_end"])
            for m in u_ms]
    add("in the joint trajectory PCA, intermediate-M trajectories bend towards ridge before heading to dMMSE_M",
        "§E2-E3, §G7 (Fig. 1 right)",
        "for every U-shaped M, in the PC plane (first seed): deflected via ridge, d(γ(t_crit), ridge) ≤ "
        f"{cfg.max_deflection:g} × the distance from ridge to the straight path γ(0)→γ(T), and the end nearer "
        "dMMSE_M than ridge",
        "; ".join(f"M = {m_label(m)}: deflection {b:.2f}, end to dMMSE_M {d:.3g} vs to ridge {r:.3g}"
                  for m, b, d, r in vals)
        or "no U-shaped M; deflections at every M: "
        + ", ".join(f"{m_label(m)}: {s.loc[m, 'pca_deflection']:.2f}" for m in s.index),
        all(b <= cfg.max_deflection and d < r for _, b, d, r in vals) if vals else None)
    # -- LLC (E5, G8)
    lam = s["llc_mean"]
    if lam.notna().all():
        lower = [m for m in finite if m <= float(np.median(finite))]
        rho = spearman(lower, [lam[m] for m in lower])
        last3 = lam.iloc[-3:]
        spread = float((last3.max() - last3.min()) / abs(last3.mean()))
        flagged = [m for m in s.index if not s.loc[m, "llc_ok"]]
        add("LLC at the end of training rises with M, then plateaus (large M and ∞ share λ̂_∞)", "§E5, §G8 (Fig. 3)",
            f"Spearman ρ(M, λ̂) ≥ {cfg.llc_rho:g} over the lower half of the finite Ms ({fmt_ms(lower)}) with λ̂ at "
            f"the smallest M < at M = {m_label(top)}, and the three largest Ms within {cfg.llc_plateau_tol:.0%} of "
            "their mean",
            "λ̂: " + ", ".join(f"{m_label(m)}: {v:.3g}" for m, v in lam.items())
            + f"; ρ (lower half) = {rho:.2f}; spread of the last three = {spread:.0%}"
            + (f"; diagnostics flagged at M = {fmt_ms(flagged)}" if flagged else ""),
            bool(rho >= cfg.llc_rho and lam.iloc[0] < lam.iloc[-1] and spread <= cfg.llc_plateau_tol))
        cross = next((m for m in finite if lam[m] >= lam.iloc[-1]), None)
        onset = u_ms[0] if u_ms else None
        add("the low-M LLC crosses λ̂_∞ near the onset of transience", "§E5, §G8",
            f"the first M with λ̂ ≥ λ̂(M = {m_label(top)}) is the smallest U-shaped M or one of its two neighbours "
            "on the M grid (the grid is the resolution of 'at the onset')",
            f"first crossing at M = {m_label(cross) if cross is not None else 'none'}; smallest U-shaped M = "
            f"{m_label(onset) if onset is not None else 'none'}",
            None if cross is None or onset is None else bool(abs(finite.index(cross) - finite.index(onset)) <= 1))
    else:
        add("LLC at the end of training rises with M, then plateaus", "§E5, §G8", "λ̂ at every M",
            "not estimated (see the LLC section)", None)
    # -- end points (E3)
    lo = finite[0]
    a, b = s.loc[lo, "id_delta_dmmse"], s.loc[lo, "id_delta_ridge"]
    add("low M: the final model approximates dMMSE_M", "§E3 (M ≤ 128 in the paper)",
        f"in-distribution Δ(PT, dMMSE_M) < Δ(PT, Ridge) at M = {m_label(lo)}", f"{a:.3g} vs {b:.3g}", bool(a < b))
    l_top, g_top = s.loc[top, "ood_loss_final"], s.loc[top, "ood_ridge_loss"]
    add(f"M = {m_label(top)}: the final model is ridge-like", "§E3 (M ≥ 362 in the paper)",
        f"final OOD loss within {cfg.ridge_tol:.0%} of ridge's",
        f"{l_top:.3g} vs ridge {g_top:.3g} ({100 * (l_top / g_top - 1):+.1f}%)",
        bool(l_top <= (1 + cfg.ridge_tol) * g_top))
    return rows


def _ci_text(s: pd.DataFrame, m: float) -> str:
    """' [lo, hi]' of t_crit's bootstrap interval at M = m, or '' where there is none."""
    if "t_crit_lo" not in s or not (np.isfinite(s.loc[m, "t_crit_lo"]) and np.isfinite(s.loc[m, "t_crit_hi"])):
        return ""
    return f" [{s.loc[m, 't_crit_lo']:.0f}, {s.loc[m, 't_crit_hi']:.0f}]"


# ================================================================================================ the report
class TransientRidge(Study):
    name = "transient-ridge"
    title = "Transient ridge: dynamics of transient structure in in-context linear regression"
    config = TransientRidgeConfig
    scale_note = ("The sizes of this study next to the paper's. At small scale everything is scaled down (model, D, K, "
                  "steps, M range), so the task-diversity threshold, and with it the window of transient M, moves to "
                  "smaller M (docs/papers.md §G: the paper's full transient spans M = 16-128, about 1/20 to 1/3 of its "
                  "threshold near 362). Compare the qualitative pattern, not the numbers.")
    reused = "finished runs, the LLC calibration and LLC estimates on disk are reused and cost nothing"

    def checks_note(self) -> str:
        cfg = self.cfg
        return ("The rules are fixed in code (`expectations` in icl_lab.studies.transient_ridge) and their "
                "thresholds in the config (saved in study_config.json before the run; the module docstring says which "
                f"changed and why), not tuned to these results; seed means over {len(cfg.seeds)} seed(s); t_crit "
                f"intervals are 95% percentile bootstraps over seeds ({cfg.n_boot} resamples); 'intermediate' M lies "
                "strictly between the smallest finite M and the largest M of the grid.")

    def llc_plan(self, runs: dict[str, Run]) -> LLCPlan | None:
        cfg = self.cfg
        if not cfg.llc:
            return None
        named = [run_name(M, s) for M in cfg.Ms for s in cfg.seeds_with_llc]
        final = {name: [runs[name].checkpoint_steps[-1]] for name in named}
        return LLCPlan(LLCSettings(sampler=cfg.sampler, n=cfg.llc_n, data="id", seed=0), cfg.step_sizes,
                       calibrate=run_name(cfg.Ms[-1], cfg.seeds[0]), steps_by_run=final)

    def analyse(self, runs: dict[str, Run], shared: SharedSettings | None, out: Path) -> dict[str, Any]:
        cfg = self.cfg
        curves = ood_curves(cfg, runs)
        crit = {M: critical_step(c["step"], c["ood_loss"], cfg.u_min_rise, cfg.u_min_drop) for M, c in curves.items()}
        ci = {M: bootstrap_t_crit(*per_seed_ood(cfg, runs, M), cfg.u_min_rise, cfg.u_min_drop, n_boot=cfg.n_boot)
              for M in cfg.Ms}
        jp = joint_pca({M: runs[run_name(M, cfg.seeds[0])] for M in cfg.Ms}, cfg.pca_batch, "ridge",
                       cfg.pca_components, cfg.pca_sigma)
        llc, llc_note = final_llc(cfg, runs, shared)
        summary = collect(cfg, runs, crit, pca_approach(cfg, jp, crit), llc, ci)
        write_parquet(out / "summary.parquet", summary)
        write_json(out / "critical_steps.json", {m_label(M): {
            **c.to_json(), "interval": {"lo": ci[M][0].lo, "hi": ci[M][0].hi, "level": ci[M][0].level,
                                        "method": ci[M][0].method, "not_u_shaped_fraction": ci[M][1]}}
            for M, c in crit.items()})
        return {"runs": runs, "curves": curves, "crit": crit, "jp": jp, "summary": summary, "llc_note": llc_note}

    def checks(self, r: dict[str, Any]) -> list[Check]:
        return expectations(self.cfg, r["summary"])

    def figures(self, r: dict[str, Any], figs: Path) -> dict[str, Path]:
        cfg, summary, jp, s0 = self.cfg, r["summary"], r["jp"], self.cfg.seeds[0]
        crit = {M: r["crit"][M] for M in cfg.Ms}
        metrics = {M: r["runs"][run_name(M, s0)].metrics for M in cfg.Ms}
        ridge = r["runs"][run_name(cfg.Ms[0], s0)].baselines["ood_ridge_loss"]
        pngs = {"ood": ood_figure({M: r["curves"][M] for M in cfg.Ms}, crit, metrics, ridge, s0,
                                  figs / "ood_loss_vs_step")[0],
                "tcrit": t_crit_figure(summary, figs / "t_crit_vs_M")[0],
                "pca": plot_joint_pca(jp, figs / "joint_pca",
                                      ref_runs={f"dMMSE_{m_label(M)}": f"M={m_label(M)}" for M in cfg.finite_Ms},
                                      title=f"Joint trajectory PCA on {cfg.pca_batch} root-task sequences (seed {s0}; "
                                            "○ start, ★ end; ◆ dMMSE_M, ■ ridge)")[0],
                "pca_dist": pca_distance_figure(jp, crit, figs / "pca_distance_to_ridge")[0],
                "tcrit_ci": intervals_vs_m_figure(
                    summary["M"].tolist(), [t if u else math.nan for t, u in zip(summary["t_crit"], summary["u_shape"],
                                                                                  strict=True)],
                    summary["t_crit_lo"], summary["t_crit_hi"], figs / "t_crit_intervals",
                    ylabel="t_crit (training step)", log_y=True, method=f"bootstrap over {len(cfg.seeds)} seeds",
                    title="t_crit of the seed-mean OOD curve (U-shaped Ms) with its 95% bootstrap interval over "
                          "seeds")[0]}
        if summary["llc_mean"].notna().any():
            pngs["llc"] = llc_vs_m_figure(summary, figs / "llc_vs_M")[0]
        return pngs

    def sections(self, r: dict[str, Any], pngs: dict[str, Path]) -> list[Section]:
        cfg, s = self.cfg, r["summary"].set_index("M")
        ridge = float(s["ood_ridge_loss"].iloc[0])
        rows = [{"M": m_label(m), "kind": s.loc[m, "kind"], "t_crit": int(s.loc[m, "t_crit"]),
                 "OOD loss at 0": s.loc[m, "ood_loss_start"], "min": s.loc[m, "ood_loss_min"],
                 "end": s.loc[m, "ood_loss_end"], "given back": s.loc[m, "rise_fraction"],
                 "dMMSE_M OOD": s.loc[m, "ood_dmmse_loss"], "ridge OOD": s.loc[m, "ood_ridge_loss"]} for m in s.index]
        sections = [Section("OOD loss over training and t_crit", (
            "Carroll et al. Fig. 1, left. Left panel: the loss on fresh tasks (the same fixed set for every M) against "
            "the step, one curve per M (viridis; ∞ black), t_crit = argmin over the evaluated steps of the OOD loss "
            f"(§3, App. B.2) circled, ridge's level (red dashed, {ridge:.3g}). A curve is U-shaped when its minimum is "
            f"interior, it falls by at least {cfg.u_min_drop:.0%} of its starting loss and gives back at least "
            f"{cfg.u_min_rise:.0%} of that drop by the end (`critical_step`). Middle and right: the in-distribution "
            f"distances to dMMSE_M and to ridge over training. Measured: U-shaped at M = {fmt_ms(_u_ms(s))}."),
            figures=[pngs["ood"]], tables=[pd.DataFrame(rows)])]
        ci_rows = [{"M": m_label(m), "U-shaped (seed mean)": bool(s.loc[m, "u_shape"]),
                    "t_crit": int(s.loc[m, "t_crit"]),
                    "95% lo": s.loc[m, "t_crit_lo"], "95% hi": s.loc[m, "t_crit_hi"],
                    "resamples not U-shaped": s.loc[m, "t_crit_no_u"], "interval": s.loc[m, "t_crit_interval"]}
                   for m in s.index]
        sections.append(Section("t_crit against M", (
            "First figure, left: t_crit against M (filled: U-shaped; hollow: not U-shaped, t_crit is then at or near "
            "the end of training, or step 0). Right: how much of the initial OOD improvement each run gave back by "
            f"the end. Second figure and the table: t_crit of the seed-mean curve with its 95% percentile-bootstrap "
            f"interval over the {len(cfg.seeds)} seeds (each resample of seeds is averaged and `critical_step` "
            "applied; t_crit counts only where the resampled mean is U-shaped), and the fraction of resamples "
            "without a U-shape (no t_crit); with more than half of them the interval is undefined."),
            figures=[pngs["tcrit"], pngs["tcrit_ci"]], tables=[pd.DataFrame(ci_rows)]))
        evr = r["jp"].explained_variance_ratio
        rows = [{"M": m_label(m), "deflection (d_ridge at t_crit / d_ridge to the straight path)":
                 s.loc[m, "pca_deflection"], "bend (d_ridge at t_crit / at end)": s.loc[m, "pca_bend"],
                 "min d to ridge": s.loc[m, "pca_ridge_min"], "end: d to ridge": s.loc[m, "pca_ridge_at_end"],
                 "end: d to dMMSE_M": s.loc[m, "pca_dmmse_at_end"]} for m in s.index]
        sections.append(Section("Joint trajectory PCA", (
            "Carroll et al. §4.2 and Fig. 1, right (docs/papers.md §E2): every checkpoint of every run predicts on "
            f"the same {cfg.pca_batch} sequences of the root task (row 0 of the master task sequence, in every pool); "
            f"the rows are stacked over runs and one mean-centred PCA is fitted (v = {cfg.pca_components}: "
            + ", ".join(f"PC{i + 1} {100 * v:.1f}%" for i, v in enumerate(evr))
            + " of the variance); dMMSE_M (diamonds, in the run's colour) and ridge (square) are projected, "
            "not fitted. "
            f"Curves are lightly smoothed (σ = {cfg.pca_sigma:g} checkpoints). The second figure and the table "
            "measure the bend: distances in the PC plane to ridge and to dMMSE_M (first seed)."),
            figures=[pngs["pca"], pngs["pca_dist"]], tables=[pd.DataFrame(rows)]))
        title = "LLC against M at the end of training"
        if "llc" not in pngs:
            return [*sections, Section(title, r["llc_note"])]
        rows = [{"M": m_label(m), "λ̂": s.loc[m, "llc_mean"], "95% lo": s.loc[m, "llc_lo"],
                 "95% hi": s.loc[m, "llc_hi"], "interval": s.loc[m, "llc_interval"],
                 "std over chains": s.loc[m, "llc_std"], "diagnostics": s.loc[m, "llc_flags"] or "ok"}
                for m in s.index]
        return [*sections, Section(title, (
            "Carroll et al. Fig. 3, bottom (Eq. 9): λ̂ of each final model on its own training distribution "
            f"(docs/papers.md §E5). {r['llc_note']}. Intervals: 95%, Student-t over the LLC seeds where there are "
            "two or more, else the MCSE interval of the one estimate (t with ESS − 1 degrees of freedom)."),
            figures=[pngs["llc"]], tables=[pd.DataFrame(rows)])]

    def differs(self, r: dict[str, Any]) -> str:
        cfg = self.cfg
        return ("Scale: the paper's transient window (M = 16-128, threshold near 362 at D = 8, K = 16, a 2.65M-"
                f"parameter model) is not comparable in absolute M with this one ({cfg.D}-dimensional tasks, "
                f"K = {cfg.K}, {cfg.steps:,} steps): here U-shaped curves were found at M = "
                f"{fmt_ms(_u_ms(r['summary'].set_index('M')))}.")

    def appendix(self, r: dict[str, Any]) -> list[Section]:
        table = r["summary"].copy()
        table.insert(0, "M", [m_label(m) for m in table.pop("M")])
        return [Section("Numbers per M", (
            "Seed means; ood = fresh tasks, id = the pool's tasks; losses are plain squared error (no /D). Also in "
            "summary.parquet and critical_steps.json."), tables=[table])]

    def intro(self, r: dict[str, Any]) -> str:
        cfg = self.cfg
        return (f"Carroll et al. (2025) at scale '{cfg.scale}'{' (quick)' if cfg.quick else ''}: {len(cfg.Ms)} runs × "
                f"seeds {cfg.seeds}, M in {fmt_ms(cfg.Ms)} (nested pools sharing the root task), gaussian tasks, "
                f"σ² = {cfg.noise_var:g}, D = {cfg.D}, K = {cfg.K}, {cfg.steps:,} steps. U-shaped OOD loss at M = "
                f"{fmt_ms(_u_ms(r['summary'].set_index('M')))}.")

    def scale_table(self) -> pd.DataFrame:
        """This run's sizes next to the paper's (docs/papers.md §E1; [EXT] where App. A is needed)."""
        cfg = self.cfg
        rc = cfg.run_config(cfg.finite_Ms[0], cfg.seeds[0])
        m, finite = rc.model, cfg.finite_Ms
        rows = [
            ("model", f"preset '{cfg.preset}'{' + ' + str(cfg.model_overrides) if cfg.model_overrides else ''}: "
             f"{m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads × {m.d_head}, MLP {m.d_mlp}, "
             f"{n_parameters(rc):,} parameters", "2-layer transformer, 2.65M parameters (details in App. A)"),
            ("D, K, σ² (tasks w ~ N(0, I_D))", f"{cfg.D}, {cfg.K}, {cfg.noise_var:g}", "8, 16, 0.125"),
            ("task diversities M (nested pools, one root task)", f"{fmt_ms(finite)}" + (" and ∞" if None in cfg.Ms
                                                                                        else ""),
             "1 … 2^15 on a ~√2 grid, and ∞"),
            ("training", f"{cfg.steps:,} steps at batch {cfg.batch_size}, AdamW (weight decay {cfg.weight_decay:g}), "
             f"lr {cfg.lr:g}, {cfg.schedule} schedule", "App. A (not in docs/papers.md)"),
            ("OOD loss curve", f"every {cfg.eval_every:,} steps and at each checkpoint, {cfg.eval_size:,} fixed "
             "sequences", "fixed test set D^(∞)"),
            ("checkpoints", f"{cfg.n_checkpoints_linear} linear ∪ {cfg.n_checkpoints_log} log-spaced",
             "union of linear and log intervals (App. A.4)"),
            ("joint PCA", f"B = {cfg.pca_batch} root-task sequences, v = {cfg.pca_components}, smoothing σ = "
             f"{cfg.pca_sigma:g} checkpoints", "B = 512, v = 2 (App. C: 4), lightly smoothed"),
            ("LLC", (f"final checkpoint of seed(s) {cfg.seeds_with_llc}, n = {cfg.llc_n:,}, ε = "
                     f"{cfg.sampler.step_size:g}, γ = "
                     + (f"{cfg.sampler.localization:g}" if cfg.sampler.localization is not None else "0.01·nβ")
                     + f", {cfg.sampler.num_chains} chains × {cfg.sampler.num_draws} draws, checked once")
             if cfg.llc else "skipped (llc = False)", "Eq. 9, SGLD (App. F)"),
            ("seeds", ", ".join(map(str, cfg.seeds)), "not stated in docs/papers.md"),
        ]
        return scale_frame(cfg, rows, "Carroll et al.")


def _u_ms(s: pd.DataFrame) -> list[float]:
    """The Ms whose OOD loss is U-shaped (s: the summary indexed by M)."""
    return [m for m in s.index if s.loc[m, "u_shape"]]


STUDY = TransientRidge
