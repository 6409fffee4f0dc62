"""The developmental-stages study: Hoogland et al. (2024), "The developmental landscape of in-context learning"
(docs/papers.md §D, small-scale targets §G9).

At M = ∞ (a fresh gaussian task w ~ N(0, I_D) for every sequence, label noise σ² > 0), train one long run per seed
(Hoogland et al. train 5 seeds and tabulate seed 1) and measure, at every checkpoint:

- the LLC λ̂(w_t) (Eqs. 5-6) with one set of SGLD settings, checked once at a mid/late checkpoint of the first
  seed and shared by every checkpoint and seed (`icl_lab.llc_run`; docs/papers.md §D2, §F3): at small scale the
  library's validated defaults `LLCConfig()` at a sparse set of checkpoints placed where the loss moves, at paper
  scale the paper's settings at the authors' LLC grid (comparable with the published curve);
- essential dynamics (Eq. 7, §D3): a PCA of the predictions on a fixed batch over checkpoints, smoothed, with cusps
  and vertices of the PC-pair curves and the forms where all PC pairs agree (`icl_lab.trajectory.find_forms`;
  Carroll et al. §4.2; the looser union is the option form_rule='union', which the report names);
- the stage table (Table 2, §D4): milestones are critical points of λ̂ against log step (`icl_lab.stages`), each
  boundary with a 95% percentile-bootstrap interval over the SGLD chains and, with ≥ 3 seeds, the seed-mean curve's
  boundaries with intervals over seeds; each boundary cross-checked against milestones of the loss and against ED
  forms; type A where the LLC rises, type B where it falls;
- per-stage indicators (§D4, Fig. 5): E[ŷ²] (LR1 learns the prior ŷ = 0, so E[ŷ²] dips below σ²), the ICL score
  ℓ_late − ℓ_early (Eq. 2, after Olsson et al. 2022; it falls as in-context learning improves) on inputs
  x ~ N(0, g I_D) for several g (LR3 gets worse at ICL for g > 1), and the LayerNorm weights (LR3/LR4: "layer
  norm collapse", most of all in the unembedding LN): RMS of each LN's weight vector and the fraction of its
  entries near 0.

One HTML report: the figures with a paragraph of measured numbers under each, and an expectations table whose
rules are fixed in `expectations` (never tuned to agree); where small-scale results differ from the paper's, the
report says so with numbers.

Scales (`StagesConfig.for_scale`): 'small' (default; 3 seeds trained as one ensemble, the LLC at the validated
defaults at a sparse checkpoint set, see StagesConfig); 'paper' reproduces the published L2H4 run over the full 500k
steps (the 'hoogland' preset at D = 4, K = 8, σ² = 0.125, batch 256, 5 seeds; see PAPER) on a GPU or a cluster:
training goes through the ray or slurm executor (`icl-lab study stages --scale paper --executor slurm --dry-run`
validates it and lists the jobs without running anything), the LLC estimates through local workers on `device`;
`quick=True` is a minutes-long small version without the LLC. Finished runs, the calibration and finished LLC
estimates are reused. The rules of the checks are RULES, fixed before the runs.

Helpers that would fit shared modules, kept here for now: `icl_score`, `ln_weight_vectors`, `ln_weight_stats`
(interp.py) and `stage_changes` (stages.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from icl_lab.baselines import ridge_predict
from icl_lab.config import LLCConfig, RunConfig
from icl_lab.evaluate import per_token_loss, predict
from icl_lab.llc_run import LLCPlan, LLCSettings, SharedSettings, finite_llc
from icl_lab.plots import llc_half_width, plot_pc_pairs, plot_stages
from icl_lab.plots.studies import indicator_figure, pc_scores_figure, seeds_figure
from icl_lab.report import Section
from icl_lab.seeding import make_generator
from icl_lab.stages import (
    BOUNDARY_MATCH_TOL,
    INTERVAL_COLUMNS,
    MIN_SEEDS_FOR_INTERVALS,
    SE_COLUMNS,
    loss_moving_steps,
    save_stage_table,
    snap_steps,
    stage_table,
)
from icl_lab.store import Run, write_parquet
from icl_lab.studies.common import (
    Check,
    LLCStudyConfig,
    StageResult,
    fmt_steps,
    llc_stages,
    n_parameters,
    sampler_worked,
    scale_frame,
    seed_stages,
)
from icl_lab.studies.runner import Study, run_study
from icl_lab.tasks import sample_batch
from icl_lab.train import checkpoint_steps
from icl_lab.trajectory import FORM_RULES, FORM_WINDOW, essential_dynamics

__all__ = [
    "PAPER_SAMPLER",
    "PAPER_STAGES",
    "RULES",
    "Stages",
    "StagesConfig",
    "developmental_curves",
    "expectations",
    "icl_score",
    "ln_weight_stats",
    "ln_weight_vectors",
    "run_name",
    "run_study",
    "stage_changes",
]

ArrayLike = Any  # array-like: numpy array, torch tensor, list

# Hoogland et al. Table 2 (regression transformer, seed 1; docs/papers.md §D4): (stage, end step, type, Δℓ̂, Δλ̂).
PAPER_STAGES = [("LR1", 1_000, "A", -0.32, 21.4), ("LR2", 40_000, "A", -2.21, 149.0),
                ("LR3", 126_000, "B", -0.07, -12.3), ("LR4", 320_000, "B", -0.05, -44.1),
                ("LR5", 500_000, "A", -0.029, 3.56)]

# The paper's run (docs/papers.md §D1; benchmarks/llc_published.py reproduces its first 20k steps): the 'hoogland'
# preset (2 layers, 4 heads, d 64, MLP 64) at D = 4, K = 8, σ² = 0.125, M = ∞ [EXT: timaeus-research/icl L2H4Minf],
# Adam lr 3e-3 with the linear one-cycle schedule (triangle, 50% warm-up), batch 256, 500k steps, 5 seeds,
# checkpoints at 100 log- and 10,000 linear-spaced steps (the authors' training schedule, so every published step
# is a checkpoint up to rounding). The LLC at the paper's SGLD settings (ε = 3e-4, nβ = 200/3, γ = 20/3, i.e.
# γ/nβ = 0.1; 4 chains × 1,000 draws after 500 burn-in, minibatch 256, n = 4,096: the benchmark's, which reproduced
# the published curve), so the curve is comparable with the published one, at the authors' LLC grid: the 100
# log-spaced checkpoints and 200 linear-spaced ones (llc_at 'grid'). The calibration grid is that one ε: it checks
# it against γ/2 and 2γ (the γ-plateau), it does not choose another.
PAPER_SAMPLER = LLCConfig(step_size=3e-4, nbeta=200 / 3, localization=20 / 3, num_chains=4, num_draws=1000,
                          num_burnin=500, batch_size=256)
PAPER = dict(D=4, K=8, seeds=[0, 1, 2, 3, 4], batch_size=256, steps=500_000, lr=3e-3, n_checkpoints_linear=10_000,
             n_checkpoints_log=100, eval_size=8192, llc_n=4096, sampler=PAPER_SAMPLER, step_sizes=[3e-4],
             llc_at="grid", llc_linear=200, ed_batch=512, device="cuda", workers=4, ensemble=1)
# A few minutes on 2 cores: one seed, 3,000 steps, about 20 checkpoints, no LLC (one estimate at the validated
# defaults costs tens of minutes on 2 CPU cores; docs/llc.md, "What this costs"): the report says the LLC was
# skipped and every LLC-based check is 'unclear'.
QUICK = dict(seeds=[0], steps=3000, n_checkpoints_linear=6, n_checkpoints_log=16, eval_size=1024, llc=False,
             ed_batch=128, ensemble=1)

# The rules of `expectations`, fixed before the runs they judge. Changes, each made before a run
# at these settings and for the reason given:
# - ED coincidence: boundaries are compared with ED *forms* (every PC pair agrees, Carroll et al. §4.2), no longer
#   with the union of the pairs' cusps and vertices, which the paper does not use.
# - boundary stability (new): each boundary is re-found in ≥ 80% of the chain resamples, and with ≥ 3 seeds each
#   boundary of the seed-mean curve in ≥ 80% of the seed resamples (icl_lab.stages.BOUNDARY_MATCH_TOL).
# - sampler check: the LLC is now estimated at a sparse set of checkpoints; the rule (≥ 90% unflagged from the
#   E[ŷ²] minimum on) is unchanged and now counts the estimated checkpoints only.
# The other thresholds are those of the study's first version (4aaec9a), unchanged.
RULES = dict(min_stages=3, icl_vs_ridge=0.8, final_vs_ridge=1.1, sampler_ok_share=0.9, pc1_share=0.5,
             ed_share=0.5, ed_tol_log=0.3, found_share=0.8, paper_factor=2.0)


class StagesConfig(LLCStudyConfig):
    """Settings of the study. The defaults are the 'small' scale; `for_scale` gives 'paper' and `quick`.

    Small scale, and why: D = 4, K = 8, σ² = 0.125 and the 'hoogland' preset (51.7k parameters) are the authors' own
    regression setting [EXT: timaeus-research/icl L2H4Minf]; lr 3e-3 with the triangle (linear one-cycle) schedule
    as theirs. Scaled down: batch 64 instead of 256 and 80,000 steps instead of 500,000 (5.1M sequences against
    128M, 1/25); three seeds, the fewest that the seed bootstrap of the boundaries and the comparison of stage orders
    need, trained together as one ensemble; 50 checkpoints (16 linear + 34 log-spaced) for the
    indicators and essential dynamics. The LLC at the library's validated defaults `LLCConfig()` (ε = 1e-4, γ = 0.01·nβ,
    nβ = n/log n, burn-in min_burnin(ε, γ), 4 chains × 500 draws, minibatch 256; docs/llc.md, "Defaults and their
    validation") on n = 4,096 sequences, checked once (llc_run.settings_check: λ̂ at γ/2 and 2γ, the γ-plateau; at
    the papers' settings; on a network with a known λ). One such estimate costs tens of minutes on 2 CPU cores
    (docs/llc.md, "What this costs"), so λ̂ is estimated at a sparse set fixed by a rule before the run
    (llc_at 'loss', `icl_lab.stages.loss_moving_steps`): 6 checkpoints at equal shares of the test loss's total
    change, 2
    log-spaced ones for the flat stretches, and the last. The paper's late stages (LR3-LR5, 126k-500k steps at
    batch 256) need not be reached; the report says what was. The rules of the checks are `RULES`.
    """

    SMALL: ClassVar[dict[str, Any]] = dict(seeds=[0, 1, 2], ensemble=3, batch_size=64, steps=80_000,
                                           n_checkpoints_linear=16, n_checkpoints_log=34, llc_n=4096,
                                           sampler=LLCConfig(), step_sizes=[1e-4], llc_at="loss")
    PAPER: ClassVar[dict[str, Any]] = PAPER
    QUICK: ClassVar[dict[str, Any]] = QUICK
    study: Literal["stages"] = "stages"
    K: int = Field(8, ge=2, description="pairs per sequence (≥ 2: the ICL score compares two positions)")
    noise_var: float = Field(0.125, gt=0, description="σ²: Hoogland et al. use 0.125")
    calibration_frac: float = Field(0.5, gt=0, le=1, description="calibrate at the first checkpoint at or after "
                                    "this fraction of the steps (a mid/late checkpoint)")
    ed_batch: int = Field(256, ge=1, description="fixed sequences whose predictions form the ED trajectory")
    ed_components: int = Field(3, ge=2, description="PCs kept (Hoogland et al. plot 3)")
    ed_sigma: float = Field(1.0, ge=0, description="smoothing of the PC curves, in checkpoint-index units")
    icl_early: int = Field(1, ge=1, description="early position k₁ of the ICL score ℓ_late − ℓ_early (1-based)")
    icl_late: int | None = Field(None, ge=1, description="late position (1-based); None: K")
    input_scales: list[float] = Field(default_factory=lambda: [1.0, 2.0], min_length=1,
                                      description="g: ICL scores on x ~ N(0, g I_D) (Hoogland et al. Fig. 5)")
    ln_threshold: float = Field(0.1, gt=0, description="an LN weight entry with |w_i| below this counts as collapsed")
    llc_at: Literal["all", "loss", "grid"] = Field(
        "all", description="where λ̂ is estimated: every checkpoint; 'loss': llc_loss_points where the test loss "
        "moves + llc_log_points log-spaced + the last (icl_lab.stages.loss_moving_steps); 'grid': the log-spaced "
        "checkpoints and llc_linear linear-spaced ones (the authors' LLC grid)")
    llc_loss_points: int = Field(6, ge=1, description="'loss': checkpoints at equal shares of the loss's change")
    llc_log_points: int = Field(2, ge=0, description="'loss': log-spaced checkpoints for where the loss is flat")
    llc_linear: int = Field(200, ge=0, description="'grid': linear-spaced LLC checkpoints")
    form_rule: Literal["all", "union"] = Field("all", description="ED forms: 'all' PC pairs agree (the paper's) or "
                                               "the looser 'union' (the report names it)")

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @field_validator("input_scales")
    @classmethod
    def _check_scales(cls, v: list[float]) -> list[float]:
        bad = [g for g in v if not (math.isfinite(g) and g > 0)]
        if bad:
            raise ValueError(f"input scales g must be finite and > 0 (x ~ N(0, g I_D)), got {bad[0]}")
        if 1.0 not in v:
            raise ValueError(f"input_scales must include 1.0 (the training distribution), got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _check(self) -> StagesConfig:
        late = self.K if self.icl_late is None else self.icl_late
        if not self.icl_early < late <= self.K:
            raise ValueError(f"icl_early and icl_late must satisfy 1 <= icl_early < icl_late <= K = {self.K}, got "
                             f"icl_early={self.icl_early}, icl_late={late} (allowed icl_late: "
                             f"{self.icl_early + 1}..{self.K}, or None for K)")
        return self

    @property
    def late(self) -> int:
        """The late position of the ICL score (1-based)."""
        return self.K if self.icl_late is None else self.icl_late

    def run_config(self, seed: int) -> RunConfig:
        return self.build_run(run_name(seed), None, seed)

    def run_configs(self) -> dict[str, RunConfig]:
        """One run per seed."""
        return {run_name(s): self.run_config(s) for s in self.seeds}

    def llc_grid(self) -> list[int]:
        """'grid': the steps λ̂ is estimated at, from the settings alone (icl_lab.train.checkpoint_steps)."""
        every = checkpoint_steps(self.steps, min(self.n_checkpoints_linear, self.steps + 1),
                                 min(self.n_checkpoints_log, self.steps))
        wanted = checkpoint_steps(self.steps, min(self.llc_linear, self.steps + 1), min(self.n_checkpoints_log,
                                                                                         self.steps))
        return snap_steps(wanted, every).tolist()

    def llc_steps(self, run: Run) -> list[int] | None:
        """The checkpoints of `run` to estimate (None: all), by the rule `llc_at`, fixed before the run."""
        if self.llc_at == "all":
            return None
        if self.llc_at == "grid":
            return snap_steps(self.llc_grid(), run.checkpoint_steps).tolist()
        steps = np.asarray(run.checkpoint_steps, dtype=np.float64)
        metrics = run.metrics.drop_duplicates("step", keep="last").set_index("step")["id_loss"].sort_index()
        loss = metrics.reindex(steps, method="nearest").to_numpy(dtype=np.float64)
        return loss_moving_steps(steps, loss, self.llc_loss_points, self.llc_log_points).tolist()

    def dry_run_lines(self) -> list[str]:
        """What a run of these settings would do, for `icl-lab study stages --dry-run` (nothing is computed)."""
        rc = self.run_config(self.seeds[0])
        n_ckpt = len(checkpoint_steps(self.steps, min(self.n_checkpoints_linear, self.steps + 1),
                                      min(self.n_checkpoints_log, self.steps)))
        s = self.sampler
        if not self.llc:
            llc = "LLC: skipped (quick)"
        else:
            per_run = {"all": f"{n_ckpt}", "grid": f"{len(self.llc_grid())}",
                       "loss": f"at most {self.llc_loss_points + self.llc_log_points + 1}"}[self.llc_at]
            llc = (f"LLC: ε {s.step_size:g}, nβ {'n/log n' if s.nbeta is None else f'{s.nbeta:.4g}'}, γ "
                   f"{'0.01·nβ' if s.localization is None else f'{s.localization:.4g}'}, {s.num_chains} chains × "
                   f"{s.num_draws} draws, burn-in {'min_burnin(ε, γ)' if s.num_burnin is None else s.num_burnin}, "
                   f"minibatch {s.batch_size}, n {self.llc_n:,}; calibration grid ε {self.step_sizes} (+ γ/2, 2γ) "
                   f"once; estimates at {per_run} checkpoints per run ({self.llc_at}), "
                   f"{self.llc_jobs()} estimates in all")
        return [f"settings: preset {self.preset}, D {self.D}, K {self.K}, σ² {self.noise_var:g}, M = ∞, batch "
                f"{self.batch_size}, {self.steps:,} steps, lr {self.lr:g} {self.schedule} (warm-up "
                f"{rc.train.warmup_frac:g}), seeds {self.seeds}, {n_ckpt} checkpoints per run, device {self.device}",
                f"executor: {self.executor} (training; {len(self.seeds)} jobs, ensemble {self.ensemble}); LLC "
                f"estimates in {self.workers} local worker(s) on {self.device}",
                llc, f"ED forms: {self.form_rule} PC pairs"]

    def llc_jobs(self) -> int | str:
        """The number of LLC estimates (an upper bound for 'loss'); 0 without the LLC."""
        if not self.llc:
            return 0
        n_ckpt = len(checkpoint_steps(self.steps, min(self.n_checkpoints_linear, self.steps + 1),
                                      min(self.n_checkpoints_log, self.steps)))
        per = {"all": n_ckpt, "grid": len(self.llc_grid()),
               "loss": self.llc_loss_points + self.llc_log_points + 1}[self.llc_at]
        return per * len(self.seeds)


def run_name(seed: int) -> str:
    return f"Minf-seed{seed}"


# ================================================================================================ pure helpers
def icl_score(per_token_loss: ArrayLike, early: int = 1, late: int | None = None) -> np.ndarray:
    """The ICL score ICL_{late:early} = ℓ_late − ℓ_early (Hoogland et al. Eq. 2, after Olsson et al. 2022, whose
    language-model score is the loss at token 500 minus the loss at token 50).

    Negative when later positions, with more examples in context, are predicted better; it falls as in-context
    learning improves. Positions are 1-based (position k has k − 1 examples in context).

    Args:
        per_token_loss: (..., K) per-token losses ℓ_1 ... ℓ_K.
        early, late: 1 <= early < late <= K; late None means K.
    Returns:
        (...) the score.
    """
    loss = np.asarray(per_token_loss, dtype=np.float64)
    K = loss.shape[-1]
    late = K if late is None else late
    if not 1 <= early < late <= K:
        raise ValueError(f"ICL score positions must satisfy 1 <= early < late <= K = {K}, got early={early}, "
                         f"late={late}")
    return loss[..., late - 1] - loss[..., early - 1]


_LN_WEIGHT = re.compile(r"(?:^|\.)(ln[^.]*)\.w$")


def ln_weight_vectors(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The LayerNorm weight (gain) vectors of a model state: {LN name: (d_model,)}, in state order.

    LNs are the entries named `<...>ln<...>.w` (model.py: `blocks.{l}.ln1.w` before attention, `blocks.{l}.ln2.w`
    before the MLP, `ln_final.w` before the unembedding); the name drops the trailing `.w`.
    """
    out = {}
    for name, value in state.items():
        if _LN_WEIGHT.search(name):
            v = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
            out[name[: -len(".w")]] = v.astype(np.float64).reshape(-1)
    return out


def ln_weight_stats(w: ArrayLike, threshold: float = 0.1) -> dict[str, float]:
    """Summaries of one LN weight vector w: (d,) (Hoogland et al. §D.3.4, "layer norm collapse": many entries go
    to 0): `norm` ‖w‖₂, `rms` ‖w‖₂/√d (1 at the usual initialisation w = 1), `frac_small` the fraction of entries
    with |w_i| < threshold."""
    v = np.asarray(w, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("ln_weight_stats: empty weight vector")
    norm = float(np.linalg.norm(v))
    return {"norm": norm, "rms": norm / math.sqrt(v.size), "frac_small": float(np.mean(np.abs(v) < threshold))}


def stage_changes(curves: pd.DataFrame, table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Change of each curve over each stage: value at the stage's end minus value at its start.

    Args:
        curves: one row per checkpoint, with a 'step' column and `columns`; every stage start and end step of
            `table` must be one of its steps.
        table: a stage table (`icl_lab.stages.stage_table`: columns stage, start, end, type).
        columns: the curves to difference.
    Returns:
        DataFrame with stage, start, end, type and one 'Δ<column>' per column.
    """
    by_step = curves.set_index("step")
    missing = sorted({float(s) for s in pd.concat([table["start"], table["end"]])} - set(map(float, by_step.index)))
    if missing:
        raise ValueError(f"stage_changes: stage steps {missing} are not rows of the curves")
    rows = []
    for r in table.itertuples():
        row = {"stage": int(r.stage), "start": int(r.start), "end": int(r.end), "type": r.type}
        for c in columns:
            row[f"Δ{c}"] = float(by_step.loc[r.end, c] - by_step.loc[r.start, c])
        rows.append(row)
    return pd.DataFrame(rows)


def _g_label(g: float) -> str:
    return f"{g:g}"


# ================================================================================================ measurements
def _scaled_batches(cfg: StagesConfig, seed: int) -> dict[float, tuple[Tensor, Tensor]]:
    """{g: (x (B, K, D), y (B, K))}: one fixed fresh-task batch with its inputs scaled to x ~ N(0, g I_D), same
    tasks, directions and label noise for every g (common random numbers)."""

    task = cfg.run_config(seed).task
    b = sample_batch(task, None, cfg.eval_size, make_generator(seed, "stages/icl"))
    noise = b.y - torch.einsum("bkd,bd->bk", b.x, b.w)
    out = {}
    for g in cfg.input_scales:
        x = b.x * math.sqrt(g)
        out[g] = (x, torch.einsum("bkd,bd->bk", x, b.w) + noise)
    return out


def developmental_curves(cfg: StagesConfig, run: Run) -> tuple[pd.DataFrame, np.ndarray, dict[str, float]]:
    """Every checkpoint's indicators, loading each checkpoint once (Hoogland et al. §D4, Fig. 5).

    Returns (curves, ed_preds, ridge):
        curves: one row per checkpoint: step; yhat_sq = E[ŷ²] over sequences and positions at g = 1;
            loss_g{g} (mean loss), icl_g{g} (ICL score) per input scale g; ln_rms:{LN}, ln_small:{LN} per LN.
        ed_preds: (T, ed_batch, K) predictions on the fixed ED batch (generator 'ed').
        ridge: the ridge predictor's (Bayes-optimal at M = ∞) loss_g{g} and icl_g{g} on the same batches.
    """

    batches = _scaled_batches(cfg, run.config.seed)
    ed = sample_batch(run.config.task, None, cfg.ed_batch, make_generator(run.config.seed, "ed"))
    rows, preds = [], []
    for step in run.checkpoint_steps:
        model = run.load_checkpoint(step)
        model.eval()
        row: dict[str, float] = {"step": step}
        for g, (x, y) in batches.items():
            pred = predict(model, x, y)
            ell = per_token_loss(pred, y).numpy()
            row[f"loss_g{_g_label(g)}"] = float(ell.mean())
            row[f"icl_g{_g_label(g)}"] = float(icl_score(ell, cfg.icl_early, cfg.late))
            if g == 1.0:
                row["yhat_sq"] = float(pred.square().mean())
        for name, w in ln_weight_vectors(model.state_dict()).items():
            stats = ln_weight_stats(w, cfg.ln_threshold)
            row[f"ln_rms:{name}"] = stats["rms"]
            row[f"ln_small:{name}"] = stats["frac_small"]
        rows.append(row)
        preds.append(predict(model, ed.x, ed.y).numpy())
    ridge: dict[str, float] = {}
    for g, (x, y) in batches.items():
        ell = per_token_loss(ridge_predict(x, y, cfg.noise_var), y).numpy()
        ridge[f"loss_g{_g_label(g)}"] = float(ell.mean())
        ridge[f"icl_g{_g_label(g)}"] = float(icl_score(ell, cfg.icl_early, cfg.late))
    return pd.DataFrame(rows), np.stack(preds), ridge


def analyse_run(cfg: StagesConfig, run: Run, out: Path) -> dict[str, Any]:
    """Curves, essential dynamics, milestones and the stage table of one run (its boundaries with 95% chain-bootstrap
    intervals); writes curves and tables to OUT. Without the LLC (cfg.llc False) the table is one stage of unknown
    type and every λ̂ column is nan."""

    curves, ed_preds, ridge = developmental_curves(cfg, run)
    ed = essential_dynamics(ed_preds, np.array(run.checkpoint_steps), n_components=cfg.ed_components,
                            sigma=cfg.ed_sigma)
    metrics = run.metrics.drop_duplicates("step", keep="last").set_index("step")
    curves = curves.merge(metrics[["id_loss", "ood_loss"]].rename(columns={"id_loss": "loss"}), left_on="step",
                          right_index=True, how="left")
    if cfg.llc:
        llc = finite_llc(run)
        llc_cols = ["step", "llc_mean", "llc_std", "llc_per_chain", "ok", "flags", "num_chains", *SE_COLUMNS]
        curves = curves.merge(llc[[c for c in llc_cols if c in llc.columns]], on="step", how="left")
        used = curves[np.isfinite(curves["llc_mean"])].reset_index(drop=True)
        stages = llc_stages(used, used["loss"].to_numpy(), ed_events=ed, form_rule=cfg.form_rule)
    else:
        curves = curves.assign(llc_mean=np.nan, llc_std=np.nan)
        used = curves.copy()
        none = np.zeros(len(used), dtype=bool)
        table = stage_table(used["step"].to_numpy(), np.zeros(len(used)), used["loss"].to_numpy(), [],
                            loss_plateaus="auto", ed_events=ed.event_steps(cfg.form_rule), trusted=none)
        stages = StageResult(table.assign(**{c: np.nan for c in INTERVAL_COLUMNS[:3]}, end_interval=""), [], none,
                             None, cfg.form_rule)
    used["trusted"], table = stages.trusted, stages.table
    name = run.path.name
    save_stage_table(table, out / f"stage_table_{name}")
    write_parquet(out / f"curves_{name}.parquet", curves.drop(columns=["llc_per_chain"], errors="ignore"))
    columns = ["loss", "llc_mean", "yhat_sq"] + [c for c in curves.columns if c.startswith(("icl_g", "ln_rms:",
                                                                                           "ln_small:"))]
    changes = stage_changes(used, table, columns)
    return {"run": run, "curves": curves, "used": used, "ed": ed, "ridge": ridge, "milestones": stages.milestones,
            "table": table, "changes": changes, "intervals": stages.intervals}


def analyse_seeds(cfg: StagesConfig, results: Mapping[str, Mapping[str, Any]], out: Path) -> StageResult | None:
    """Stages of the seed-mean λ̂ curve with 95% seed-bootstrap intervals (`icl_lab.studies.common.seed_stages`),
    with ≥ MIN_SEEDS_FOR_INTERVALS seeds and the LLC; writes OUT/stage_table_seed_mean. None otherwise."""
    if not cfg.llc:
        return None
    llcs = {n: r["used"] for n, r in results.items()}
    losses = {n: r["curves"].set_index("step")["loss"] for n, r in results.items()}
    first = next(iter(results.values()))
    res = seed_stages(llcs, losses, ed_events=first["ed"], form_rule=cfg.form_rule)
    if res is not None:
        save_stage_table(res.table, out / "stage_table_seed_mean")
    return res


# ================================================================================================ expectations
def _type_sequence(table: pd.DataFrame) -> str:
    """Stage types with consecutive repeats merged, e.g. 'A B A'."""
    types = list(table["type"])
    return " ".join(t for i, t in enumerate(types) if i == 0 or types[i - 1] != t)


def _found_enough(missing: np.ndarray) -> bool:
    """Every boundary re-found in at least RULES['found_share'] of the resamples (missing: (B,) fractions)."""
    return bool((1.0 - missing >= RULES["found_share"] - 1e-9).all())


def expectations(cfg: StagesConfig, results: Mapping[str, Mapping[str, Any]],
                 seed_result: StageResult | None = None) -> list[Check]:
    """docs/papers.md §D3-D4 and §G9 against the measurements, one row per (expectation, run) plus cross-seed rows.
    The rules are fixed here and in `RULES`, before looking at any result; an expectation that cannot be judged
    (e.g. no type-B stage to look for LN collapse in, fewer than 3 seeds) is 'unclear' and says why. Without the
    LLC (quick) the checks that need it are one 'unclear' row per run. seed_result: the seed-mean curve's stages
    (`analyse_seeds`), for the stability of its boundaries over seeds."""
    rows: list[Check] = []
    g1 = "icl_g1"
    g_hi = f"icl_g{_g_label(max(cfg.input_scales))}"

    def add(what: str, run: str, source: str, expected: str, measured: str, ok: bool | None,
            needs_llc: bool = True) -> None:
        if cfg.llc or not needs_llc:
            rows.append(Check(what, expected, measured, ok, run=run, source=source))

    for name, r in results.items():
        table, changes, curves, used = r["table"], r["changes"], r["curves"], r["used"]
        n_stages = len(table)
        if not cfg.llc:
            rows.append(Check("the checks that need the LLC (stages, their types, boundaries, sampler)", "the LLC "
                              "at the study's checkpoints", "LLC skipped (quick): no λ̂, no stages", None, run=name,
                              source="§D2-D4"))
        add("several developmental stages", name, "§D4 Table 2 (5 stages), §G9",
            f"at least {RULES['min_stages']} stages ({RULES['min_stages'] - 1} or more LLC milestones)",
            f"{n_stages} stage(s), types {' '.join(table['type'])}, ending at steps {fmt_steps(table['end'])}",
            n_stages >= RULES["min_stages"])
        add("the first stage is type A (the LLC rises while the prior and ICL are learned)", name,
            "§D4 (LR1, LR2 type A)", "stage 1 type A", f"stage 1: Δλ̂ = {table['delta_llc'].iloc[0]:+.3g}",
            bool(table["type"].iloc[0] == "A"))
        rise = float(table.loc[table["type"] == "A", "delta_llc"].sum())
        fall = float(-table.loc[table["type"] == "B", "delta_llc"].sum()) + 0.0  # + 0.0: no "-0" when none
        add("the LLC mostly rises over training", name, "§D4 Table 2 (Δλ̂ +174 in A stages, −56 in B)",
            "total rise over type-A stages > total fall over type-B stages",
            f"rise {rise:.3g}, fall {fall:.3g}; λ̂ from {used['llc_mean'].iloc[0]:.3g} (step "
            f"{int(used['step'].iloc[0])}) to {used['llc_mean'].iloc[-1]:.3g}", rise > fall)
        b_stages = table[table["type"] == "B"]
        add("some stages lower the LLC (type B, LR3-LR4)", name, "§D4, §G9", "at least one type-B stage",
            f"{len(b_stages)} type-B stage(s)"
            + (f": Δλ̂ {', '.join(f'{v:+.3g}' for v in b_stages['delta_llc'])}" if len(b_stages) else ""),
            len(b_stages) > 0)
        bad = table[~(table["delta_loss"] < 0)]
        add("the test loss falls in every stage", name, "§D4 Table 2 (every Δℓ̂ < 0)", "Δℓ̂ < 0 in every stage",
            "Δℓ̂ per stage: " + ", ".join(f"{v:+.3g}" for v in table["delta_loss"]), bad.empty)
        # LR1: the prior predictor ŷ = 0, before ICL
        icl = curves[g1].to_numpy()
        total = icl[-1] - icl[0]
        half = curves["step"][(icl - icl[0]) <= 0.5 * total] if total < 0 else pd.Series(dtype=float)
        t_half = float(half.iloc[0]) if len(half) else math.nan
        i_min = int(np.argmin(curves["yhat_sq"].to_numpy()))
        y_min, t_min = float(curves["yhat_sq"].iloc[i_min]), float(curves["step"].iloc[i_min])
        add("LR1: E[ŷ²] dips below σ² (the task-prior predictor ŷ = 0) before ICL emerges", name,
            "§D4 (minimum ≈ 0.1 < σ² = 0.125 just after LR1), §G9",
            f"min over checkpoints of E[ŷ²] < σ² = {cfg.noise_var:g}, at a step before the ICL score has made half "
            "its total change",
            f"min E[ŷ²] = {y_min:.3g} at step {int(t_min):,}; initial {curves['yhat_sq'].iloc[0]:.3g}, final "
            f"{curves['yhat_sq'].iloc[-1]:.3g}; ICL score half-way at step "
            + (f"{int(t_half):,}" if math.isfinite(t_half) else "never"),
            bool(y_min < cfg.noise_var and math.isfinite(t_half) and t_min < t_half), needs_llc=False)
        ridge = r["ridge"][g1]
        add("the ICL score improves over training (ℓ_late − ℓ_early falls towards ridge's)", name,
            "§D4 (LR2 acquires ICL), Eq. 2",
            f"final ICL score below the initial one and at least {RULES['icl_vs_ridge']:.0%} of ridge's "
            "(Bayes-optimal) score",
            f"ICL_{{{cfg.late}:{cfg.icl_early}}} from {icl[0]:.3g} to {icl[-1]:.3g}; ridge {ridge:.3g}",
            bool(icl[-1] < icl[0] and icl[-1] <= RULES["icl_vs_ridge"] * ridge), needs_llc=False)
        d_icl = changes[f"Δ{g1}"].to_numpy()
        k = int(np.argmin(d_icl))
        add("ICL is acquired in a type-A stage (LR2)", name, "§D4, §G9",
            "the stage with the largest fall of the ICL score is type A",
            f"stage {int(changes['stage'].iloc[k])} (steps {int(changes['start'].iloc[k]):,}-"
            f"{int(changes['end'].iloc[k]):,}, type {changes['type'].iloc[k]}): ΔICL = {d_icl[k]:+.3g} of "
            f"{d_icl.sum():+.3g} over all stages", bool(changes["type"].iloc[k] == "A"))
        last = r["run"].metrics.iloc[-1]
        ridge_ood = r["run"].baselines["ood_ridge_loss"]
        add("the final model matches ridge on fresh tasks (M = ∞)", name, "§C2, §D1",
            f"final loss within {RULES['final_vs_ridge'] - 1:.0%} of ridge's",
            f"{last['ood_loss']:.4g} vs ridge {ridge_ood:.4g} ({100 * (last['ood_loss'] / ridge_ood - 1):+.1f}%)",
            bool(last["ood_loss"] <= RULES["final_vs_ridge"] * ridge_ood), needs_llc=False)
        # LN collapse in type-B stages
        lns = [c.split(":", 1)[1] for c in curves.columns if c.startswith("ln_rms:")]
        final_ln = next((n for n in lns if n.startswith("ln_final")), lns[-1])
        small_end = {n: float(curves[f"ln_small:{n}"].iloc[-1]) for n in lns}
        if len(b_stages):
            d_rms = float(changes.loc[changes["type"] == "B", f"Δln_rms:{final_ln}"].sum())
            biggest = max(small_end, key=small_end.get)
            add("LR3-LR4: the unembedding LN collapses during the type-B stages", name, "§D4 (LN collapse), §G9",
                f"RMS of {final_ln}.w falls over the type-B stages, and at the end {final_ln} has the largest "
                f"fraction of weights with |w| < {cfg.ln_threshold:g}",
                f"Δ RMS over B stages {d_rms:+.3g}; final fractions " + ", ".join(
                    f"{n} {v:.0%}" for n, v in small_end.items()),
                bool(d_rms < 0 and small_end[final_ln] >= small_end[biggest]))
            if max(cfg.input_scales) > 1:
                d_hi = float(changes.loc[changes["type"] == "B", f"Δ{g_hi}"].sum())
                d_lo = float(changes.loc[changes["type"] == "B", f"Δ{g1}"].sum())
                add(f"LR3: over the type-B stages ICL gets worse on larger inputs (g = {max(cfg.input_scales):g})",
                    name, "§D4 (Fig. 5)", f"the ICL score at g = {max(cfg.input_scales):g} rises over the type-B "
                    "stages while the one at g = 1 does not", f"ΔICL over B stages: g = "
                    f"{max(cfg.input_scales):g} {d_hi:+.3g}, g = 1 {d_lo:+.3g}", bool(d_hi > 0 and d_lo <= 0))
        else:
            add("LR3-LR4: the unembedding LN collapses during the type-B stages", name, "§D4 (LN collapse), §G9",
                "a type-B stage in which to look", "no type-B stage; final fractions of |w| < "
                f"{cfg.ln_threshold:g}: " + ", ".join(f"{n} {v:.0%}" for n, v in small_end.items()), None)
        # cross-checks of the boundaries
        inner = table.iloc[:-1]
        if len(inner):
            n_ed, chance = int(inner["ed_agrees"].sum()), float(inner["ed_chance"].iloc[0])
            add("stage boundaries coincide with essential-dynamics forms", name, "§D3-D4, Carroll et al. §4.2",
                f"at least {RULES['ed_share']:.0%} of the boundaries within {RULES['ed_tol_log']:g} in log step of "
                f"an ED form ({FORM_RULES[cfg.form_rule].format(pairs='the', window=FORM_WINDOW)}), and a larger "
                "fraction than chance (the share of the log-step range that lies that close to some form)",
                f"{n_ed} of {len(inner)} boundaries (at steps {fmt_steps(inner['end'])}; nearest forms at "
                f"{fmt_steps(inner['ed_step'].dropna())}); chance {chance:.0%}",
                bool(n_ed >= RULES["ed_share"] * len(inner) and n_ed / len(inner) > chance))
            miss = inner["end_missing"].to_numpy(dtype=float) if "end_missing" in inner else np.array([np.nan])
            method = next((m for m in inner.get("end_interval", []) if m), "none")
            add("stage boundaries are stable under resampling of the SGLD chains", name,
                "95% bootstrap (icl_lab.intervals)",
                f"every boundary re-found (a milestone within {BOUNDARY_MATCH_TOL:g} in log step) in at least "
                f"{RULES['found_share']:.0%} of the chain resamples; 95% intervals ({method})",
                "; ".join(f"{int(e):,}: [{lo:,.0f}, {hi:,.0f}], missed in {m:.0%}" for e, lo, hi, m in zip(
                    inner["end"], inner["end_lo"], inner["end_hi"], miss, strict=True)) if np.isfinite(miss).all()
                else f"no interval: {method}",
                _found_enough(miss) if np.isfinite(miss).all() else None)
            n_loss = int(inner["loss_agrees"].sum())
            add("some stages do not show in the loss", name, "§D4 ('many stages do not show in the loss')",
                "at least one boundary with no loss milestone within 0.3 in log step",
                f"{len(inner) - n_loss} of {len(inner)} boundaries without a loss milestone nearby (loss-milestone "
                f"chance {float(inner['loss_chance'].iloc[0]):.0%})", n_loss < len(inner))
        else:
            add("stage boundaries coincide with essential-dynamics forms", name, "§D3-D4, Carroll et al. §4.2",
                "at least one boundary to check", "no boundary was found", None)
        evr = r["ed"].explained_variance_ratio
        add("essential dynamics: the first PC dominates", name, "§D3 (LR: 0.65, 0.08, 0.05)",
            f"PC1 explains > {RULES['pc1_share']:.0%} of the variance of the predictions over checkpoints",
            "explained variance " + ", ".join(f"{v:.2f}" for v in evr), bool(evr[0] > RULES["pc1_share"]),
            needs_llc=False)
        # λ̂ is defined at a local minimum: before the prior predictor is learned (LR1) the checkpoints are far from
        # one and chains find lower loss, so the sampler is judged from the E[ŷ²] minimum (the end of LR1) on
        if cfg.llc:
            llc_rows = r["run"].llc
            after = llc_rows[llc_rows["step"] >= t_min]
            mixed = after["flags"].map(sampler_worked)
            add("LLC chains stationary and mixed once the prior is learned", name, "§D2 (App. A diagnostics)",
                f"no not_stationary / chains_disagree / diverged flag at ≥ {RULES['sampler_ok_share']:.0%} of the "
                f"estimated checkpoints from step {int(t_min):,} (the E[ŷ²] minimum, end of LR1)",
                f"{int(mixed.sum())} of {len(after)} checkpoints"
                + (f"; flagged at steps {fmt_steps(after.loc[~mixed, 'step'])}" if (~mixed).any() else ""),
                bool(mixed.mean() >= RULES["sampler_ok_share"]) if len(after) else None)
    if len(results) >= MIN_SEEDS_FOR_INTERVALS:
        seqs = {name: _type_sequence(r["table"]) for name, r in results.items()}
        add("the order of stage types is the same in every seed", "all seeds", "§D4 ('their order is preserved')",
            "identical sequences of stage types (consecutive repeats merged)",
            "; ".join(f"{n}: {s}" for n, s in seqs.items()), len(set(seqs.values())) == 1)
    else:
        add("the order of stage types is the same in every seed", "all seeds", "§D4 ('their order is preserved')",
            f"at least {MIN_SEEDS_FOR_INTERVALS} seeds", f"{len(results)} seed(s); add seeds to check", None)
    if seed_result is not None:
        inner = seed_result.table.iloc[:-1]
        miss = inner["end_missing"].to_numpy(dtype=float)
        add("boundaries of the seed-mean λ̂ curve are stable under resampling of the seeds", "all seeds",
            "95% bootstrap (icl_lab.intervals)",
            f"every boundary re-found in at least {RULES['found_share']:.0%} of the seed resamples",
            ("; ".join(f"{int(e):,}: [{lo:,.0f}, {hi:,.0f}], missed in {m:.0%}" for e, lo, hi, m in zip(
                inner["end"], inner["end_lo"], inner["end_hi"], miss, strict=True)) or "no boundary")
            + f" ({next((m for m in inner['end_interval'] if m), 'no interval')})",
            bool(len(inner)) and bool(np.isfinite(miss).all()) and _found_enough(miss))
    if cfg.scale == "paper":
        r0 = results[run_name(cfg.seeds[0])]
        ends = r0["table"]["end"].iloc[:-1].to_numpy(float)
        paper_ends = [e for _, e, *_ in PAPER_STAGES[:-1]]
        near = [any(abs(math.log(e / p)) <= math.log(RULES["paper_factor"]) for e in ends if e > 0)
                for p in paper_ends]
        add("boundaries near the paper's (1k, 40k, 126k, 320k)", run_name(cfg.seeds[0]), "§D4 Table 2",
            f"a boundary within a factor {RULES['paper_factor']:g} of each of the paper's",
            f"boundaries at {fmt_steps(ends)}", all(near))
    return rows


# ================================================================================================ the report
def _paper_table() -> pd.DataFrame:
    return pd.DataFrame([{"stage": s, "end": e, "type": t, "Δℓ̂": dl, "Δλ̂": dlam} for s, e, t, dl, dlam in PAPER_STAGES])


def _stage_view(r: Mapping[str, Any]) -> pd.DataFrame:
    """The stage table with its per-stage indicator changes, for the report."""
    t = r["table"]
    ch = r["changes"]
    cols = ["stage", "start", "end", "type", "end_kind", "delta_loss", "delta_llc", "llc_end"]
    view = t[cols].copy()
    for c in ("end_lo", "end_hi", "end_missing", "loss_step", "loss_agrees", "ed_step", "ed_agrees"):
        if c in t.columns:
            view[c] = t[c]
    view["ΔE[ŷ²]"] = ch["Δyhat_sq"].to_numpy()
    for c in ch.columns:
        if c.startswith("Δicl_g"):
            view[f"ΔICL g={c[len('Δicl_g'):]}"] = ch[c].to_numpy()
        if c.startswith("Δln_rms:"):
            view[f"ΔRMS {c.split(':', 1)[1]}"] = ch[c].to_numpy()
    view["start"] = view["start"].astype(int)
    view["end"] = view["end"].astype(int)
    return view


class Stages(Study):
    name = "stages"
    title = "The developmental landscape of in-context learning"
    config = StagesConfig
    scale_note = ("The sizes of this study next to the paper's. At small scale training is far shorter (fewer "
                  "sequences, a faster schedule), so stage boundaries sit at other steps and late stages may not be "
                  "reached (docs/papers.md §G9: the order of the stages is what should hold).")
    reused = "finished runs and LLC estimates are reused and cost nothing"

    def checks_note(self) -> str:
        return ("The rules were fixed before any run (see `expectations` in icl_lab.studies.stages); 'unclear' means "
                "the check could not be made and says why.")

    def llc_plan(self, runs: dict[str, Run]) -> LLCPlan | None:
        """Calibrate once at the first checkpoint at or after calibration_frac of the first seed's run; estimate at
        each run's `llc_steps` (the rule `llc_at`). None without the LLC (quick)."""
        cfg = self.cfg
        if not cfg.llc:
            return None
        first = run_name(cfg.seeds[0])
        step = next(s for s in runs[first].checkpoint_steps if s >= cfg.calibration_frac * cfg.steps)
        at = None if cfg.llc_at == "all" else {name: cfg.llc_steps(run) for name, run in runs.items()}
        return LLCPlan(LLCSettings(sampler=cfg.sampler, n=cfg.llc_n, data="id", seed=0), cfg.step_sizes, first,
                       step, steps_by_run=at)

    def analyse(self, runs: dict[str, Run], shared: SharedSettings | None, out: Path) -> dict[str, Any]:
        if self.cfg.llc and (shared is None or shared.settings is None):
            why = "no calibration" if shared is None else f"{shared.run} at step {shared.step}: {shared.reason}"
            raise ValueError(f"LLC calibration failed ({why})")
        results = {name: analyse_run(self.cfg, run, out) for name, run in runs.items()}
        return {"results": results, "shared": shared, "seeds": analyse_seeds(self.cfg, results, out)}

    def checks(self, r: dict[str, Any]) -> list[Check]:
        return expectations(self.cfg, r["results"], r.get("seeds"))

    def figures(self, r: dict[str, Any], figs: Path) -> dict[str, Any]:
        cfg, results, pngs = self.cfg, r["results"], {}
        for name, res in results.items():
            u, table, rn = res["used"], res["table"], res["run"].path.name
            pngs[name] = {
                "indicators": indicator_figure(
                    res["curves"], table, res["ridge"], {g: f"icl_g{_g_label(g)}" for g in cfg.input_scales},
                    noise_var=cfg.noise_var, early=cfg.icl_early, late=cfg.late, ln_threshold=cfg.ln_threshold,
                    title=rn, path=figs / f"indicators_{rn}")[0],
                "ed": plot_pc_pairs(res["ed"], figs / f"ed_{rn}", osculating=True, form_rule=cfg.form_rule,
                                    title=f"{rn}: essential dynamics (Hoogland et al. Fig. 2)")[0],
                "pc_scores": pc_scores_figure(res["ed"], table, rn, figs / f"pc_scores_{rn}")[0]}
            if cfg.llc:
                pngs[name]["stages"] = plot_stages(
                    u["step"], u["loss"], u["llc_mean"], llc_half_width(u), table, figs / f"stages_{rn}",
                    milestones=res["milestones"], loss_label="test loss (fresh tasks)", trusted=u["trusted"],
                    title=f"{rn}: loss and LLC with stages (Hoogland et al. Fig. 1)")[0]
            cal = res["run"].path / "figures" / "llc_calibration.png"
            if cal.exists() and cfg.llc:
                pngs[name]["calibration"] = cal
        if len(results) > 1 and cfg.llc:
            pngs["seeds"] = seeds_figure({n: x["used"] for n, x in results.items()},
                                         {n: x["table"] for n, x in results.items()}, figs / "llc_all_seeds")[0]
        return pngs

    def sections(self, r: dict[str, Any], pngs: dict[str, Any]) -> list[Section]:
        cfg, results, shared, seed_res = self.cfg, r["results"], r["shared"], r.get("seeds")
        sections = []
        for name, r in results.items():
            t, u, cur = r["table"], r["used"], r["curves"]
            bounds = t["end"].iloc[:-1]
            if not cfg.llc:
                sections.append(Section(f"Stages, {name}", (
                    "LLC skipped (quick): one estimate at the validated defaults costs tens of minutes on 2 CPU cores "
                    "(docs/llc.md, 'What this costs'), so this quick run has no λ̂ and no stages; every check that "
                    "needs them is 'unclear'. Run without --quick for the LLC."), tables=[_paper_table()]))
                continue
            s = shared.settings.sampler
            flags = r["run"].llc["flags"].fillna("")
            n_flagged = int((flags != "").sum())
            iv = ("; ".join(f"{int(e):,} [{lo:,.0f}, {hi:,.0f}]" for e, lo, hi in zip(
                bounds, t["end_lo"].iloc[:-1], t["end_hi"].iloc[:-1], strict=True)) or "no boundary")
            method = next((m for m in t["end_interval"] if m), "none")
            text = (
                f"Test loss (top, fresh tasks) and LLC (bottom, mean and 95% interval over {s.num_chains} chains) "
                "against step, "
                "with the stages found at critical points of λ̂ against log step (orange: λ̂ rises, type A; blue: "
                "falls, type B; dotted: milestones; hatched: 95% interval of each boundary). λ̂ was estimated at "
                f"{len(u)} of {len(cur)} checkpoints (rule '{cfg.llc_at}'). Measured: {len(t)} stage(s) of types "
                f"{' '.join(t['type'])}, boundaries at steps (95% interval) {iv}, the intervals from {method}; λ̂ "
                f"from {u['llc_mean'].iloc[0]:.3g} at step {int(u['step'].iloc[0])} to a maximum of "
                f"{u['llc_mean'].max():.3g} at step {int(u.loc[u['llc_mean'].idxmax(), 'step']):,} and "
                f"{u['llc_mean'].iloc[-1]:.3g} at the end; the loss from {u['loss'].iloc[0]:.3g} to "
                f"{u['loss'].iloc[-1]:.3g}. {n_flagged} of {len(flags)} LLC estimates carry a diagnostic flag "
                f"({', '.join(sorted({f for fl in flags for f in fl.split(';') if f})) or 'none'}). The table gives "
                "per stage the change in loss and LLC, the end boundary's 95% interval and the share of resamples "
                "that missed it, the nearest loss milestone and ED form to each boundary (agreement: within 0.3 in "
                f"log step; forms: {FORM_RULES[cfg.form_rule].format(pairs='the', window=FORM_WINDOW)}), and the "
                "change of each indicator. The paper's Table 2 (seed 1) follows.")
            sections.append(Section(f"Stages, {name} (Hoogland et al. Fig. 1, Table 2)", text,
                                    figures=[pngs[name]["stages"]], tables=[_stage_view(r), _paper_table()]))
            i_min = int(np.argmin(cur["yhat_sq"].to_numpy()))
            icl_txt = "; ".join(
                f"g = {g:g}: {cur[f'icl_g{_g_label(g)}'].iloc[0]:.3g} → min {cur[f'icl_g{_g_label(g)}'].min():.3g} → "
                f"{cur[f'icl_g{_g_label(g)}'].iloc[-1]:.3g} (ridge {r['ridge'][f'icl_g{_g_label(g)}']:.3g})"
                for g in cfg.input_scales)
            lns = [c.split(":", 1)[1] for c in cur.columns if c.startswith("ln_rms:")]
            ln_txt = "; ".join(f"{n}: RMS {cur[f'ln_rms:{n}'].iloc[0]:.3g} → min {cur[f'ln_rms:{n}'].min():.3g} → "
                               f"{cur[f'ln_rms:{n}'].iloc[-1]:.3g}, {cur[f'ln_small:{n}'].iloc[-1]:.0%} of weights "
                               "below "
                               f"{cfg.ln_threshold:g} at the end" for n in lns)
            text = (f"Indicators on {cfg.eval_size:,} fixed fresh-task sequences at every checkpoint, on the stage "
                    "bands. "
                    f"E[ŷ²]: {cur['yhat_sq'].iloc[0]:.3g} at step 0, minimum {cur['yhat_sq'].iloc[i_min]:.3g} at step "
                    f"{int(cur['step'].iloc[i_min]):,} (σ² = {cfg.noise_var:g}), {cur['yhat_sq'].iloc[-1]:.3g} at the "
                    "end. "
                    f"ICL score ℓ_{cfg.late} − ℓ_{cfg.icl_early} (start → min → end): {icl_txt}. LayerNorm weights: "
                    f"{ln_txt}.")
            sections.append(Section(f"Indicators per stage, {name} (Hoogland et al. Fig. 5, §D.3.4)", text,
                                    figures=[pngs[name]["indicators"]]))
            ed = r["ed"]
            ev = ", ".join(f"{v:.1%}" for v in ed.explained_variance_ratio)
            cusps = sorted({int(x) for f in ed.features.values() for x in ed.steps[f.cusps]})
            verts = sorted({int(x) for f in ed.features.values() for x in ed.steps[f.vertices]})
            forms = ed.event_steps(cfg.form_rule).astype(int).tolist()
            text = (f"PCA of the predictions on {cfg.ed_batch} fixed fresh-task sequences at each of "
                    f"{len(ed.steps)} checkpoints, smoothed with σ = {cfg.ed_sigma:g} checkpoints; explained variance "
                    f"{ev} (the paper's LR model: 65%, 8%, 5%). Cusps of any pair (steps): {fmt_steps(cusps)}; "
                    f"vertices (circles, with osculating circles; steps): {fmt_steps(verts)}. Forms (gold stars; "
                    f"rule '{cfg.form_rule}': {ed.describe_rule(cfg.form_rule)}), the events the LLC boundaries are "
                    f"checked against: {fmt_steps(forms)}. Below: PC scores against step with the LLC boundaries "
                    f"(dashed) at {fmt_steps(bounds)}.")
            sections.append(Section(f"Essential dynamics, {name} (Hoogland et al. Figs. 2 and 6)", text,
                                    figures=[pngs[name]["ed"], pngs[name]["pc_scores"]]))
        if "seeds" in pngs:
            sections.append(Section("All seeds", (
                "LLC and loss of every seed with each seed's boundaries (ticks). Boundaries per seed: "
                + "; ".join(f"{n}: {fmt_steps(r['table']['end'].iloc[:-1])} (types {_type_sequence(r['table'])})"
                            for n, r in results.items()) + "."), figures=[pngs["seeds"]]))
        if seed_res is not None:
            t = seed_res.table
            sections.append(Section("Stages of the seed-mean LLC curve, with seed-bootstrap intervals", (
                f"λ̂ averaged over the {len(results)} seeds at the checkpoints trusted in every seed, its milestones, "
                "and the 95% percentile-bootstrap interval of each boundary from resampling the seeds "
                f"(icl_lab.stages.seed_boundary_intervals; re-found: a milestone within {BOUNDARY_MATCH_TOL:g} in log "
                f"step). Boundaries at {fmt_steps(t['end'].iloc[:-1])}; types {_type_sequence(t)}. ED forms for the "
                f"cross-check are those of {run_name(cfg.seeds[0])}."),
                tables=[t[[c for c in ["stage", "start", "end", "type", "delta_llc", "delta_loss", *INTERVAL_COLUMNS,
                                       "ed_agrees"] if c in t.columns]]]))
        elif cfg.llc:
            sections.append(Section("Stages of the seed-mean LLC curve", (
                f"Not made: {len(results)} seed(s); the seed bootstrap needs at least {MIN_SEEDS_FOR_INTERVALS} seeds "
                "with at least 3 checkpoints trusted in all of them.")))
        sections.append(self._settings_section(shared, pngs))
        return sections

    def _settings_section(self, shared: SharedSettings | None, pngs: dict[str, Any]) -> Section:
        """The LLC settings, where they come from, and where λ̂ was estimated."""
        cfg = self.cfg
        if not cfg.llc or shared is None or shared.settings is None:
            return Section("LLC settings", "LLC skipped (quick): no calibration and no estimates.")
        s, b = shared.settings.sampler, cfg.sampler
        first = run_name(cfg.seeds[0])
        cal_figs = [pngs[first]["calibration"]] if "calibration" in pngs[first] else []
        origin = ("the paper's SGLD settings (ε = 3e-4, nβ = 200/3, γ = 20/3: comparable with the published curve, "
                  "benchmarks/llc_published.py; not the library's validated defaults, at which deep linear networks "
                  "read 23-79% low at this γ/nβ = 0.1, docs/llc.md)" if cfg.scale == "paper" else
                  "the library's validated defaults LLCConfig() (docs/llc.md, 'Defaults and their validation'); the "
                  "paper's settings (ε = 3e-4, γ/nβ = 0.1) are not estimated at this scale, so these values are not "
                  "comparable with the published curve")
        where = {"all": "every checkpoint",
                 "loss": f"{cfg.llc_loss_points} checkpoints at equal shares of the test loss's total change, "
                         f"{cfg.llc_log_points} log-spaced ones and the last (icl_lab.stages.loss_moving_steps; "
                         "fixed before the run)",
                 "grid": f"the {cfg.n_checkpoints_log} log-spaced and {cfg.llc_linear} linear-spaced checkpoints "
                         "(the authors' LLC grid)"}[cfg.llc_at]
        gamma = "0.01·nβ" if b.localization is None else f"{b.localization:.4g}"
        return Section("LLC settings", (
            f"Settings: {origin}. Checked once at step {shared.step:,} of {first} (the first checkpoint at or after "
            f"{cfg.calibration_frac:.0%} of training) over ε in {', '.join(f'{e:g}' for e in cfg.step_sizes)} at γ = "
            f"{gamma} and at γ/2, 2γ (the γ-plateau), each burning in for max({b.num_burnin or 0}, min_burnin(ε, γ) "
            f"≈ 3/(εγ)) steps; used: ε = {s.step_size:g}, γ = {s.localization:.4g}, nβ = "
            f"{'n/log n' if s.nbeta is None else f'{s.nbeta:.4g}'}, {s.num_chains} chains × {s.num_draws} draws after "
            f"{s.num_burnin} burn-in, minibatch {s.batch_size}, on n = {shared.settings.n:,} fixed fresh-task "
            f"sequences, at {where}. The same settings, data and SGLD seed are used at every checkpoint of every "
            "seed. Intervals are 95%: boundaries by the percentile bootstrap over chains (each run) and seeds."),
            figures=cal_figs)

    def differs(self, r: dict[str, Any]) -> str:
        cfg, table = self.cfg, r["results"][run_name(self.cfg.seeds[0])]["table"]
        return ("Stage boundaries: the paper's end at 1k, 40k, 126k, 320k and 500k steps (batch 256, 500k steps); "
                f"here ({cfg.batch_size} × {cfg.steps:,}) at {fmt_steps(table['end'])}, types "
                f"{' '.join(table['type'])} against the paper's A A B B A. Only the order is comparable "
                "(docs/papers.md §G9).")

    def intro(self, r: dict[str, Any]) -> str:
        cfg = self.cfg
        return (f"Hoogland et al. (2024) at scale '{cfg.scale}'{' (quick)' if cfg.quick else ''}: M = ∞, "
                f"D = {cfg.D}, K = {cfg.K}, σ² = {cfg.noise_var:g}, preset '{cfg.preset}', {cfg.steps:,} steps at "
                f"batch {cfg.batch_size}, seeds {cfg.seeds}. LLC at every checkpoint with one calibrated setting; "
                "essential dynamics; stages at critical points of the LLC; ICL score, E[ŷ²] and LayerNorm weights per "
                "stage.")

    def scale_table(self) -> pd.DataFrame:
        """This study's sizes next to the paper's (docs/papers.md §D1-D2)."""
        cfg = self.cfg
        rc = cfg.run_config(cfg.seeds[0])
        m, s = rc.model, cfg.sampler
        rows = [
            ("model", f"preset '{cfg.preset}': {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads × "
                      f"{m.d_head}, MLP {m.d_mlp} ({m.activation}), {n_parameters(rc):,} parameters",
             "about 50k parameters [EXT: 2 layers, 4 heads, d 64, MLP 64]"),
            ("tasks", f"M = ∞ (w ~ N(0, I_D) per sequence), D = {cfg.D}, K = {cfg.K}, σ² = {cfg.noise_var:g}",
             "M = ∞, σ² = 0.125 [EXT: D = 4, K = 8]"),
            ("optimiser", f"AdamW (weight decay {cfg.weight_decay:g}), lr {cfg.lr:g}, {cfg.schedule} schedule",
             "[EXT] Adam, lr 0.003, linear one-cycle (50% warm-up)"),
            ("batch × steps", f"{cfg.batch_size} × {cfg.steps:,} = {cfg.batch_size * cfg.steps:,} sequences",
             "[EXT] 256 × 500,000 = 128,000,000"),
            ("seeds", ", ".join(map(str, cfg.seeds)), "5 (stage table for seed 1)"),
            ("checkpoints", f"{cfg.n_checkpoints_linear} linear + {cfg.n_checkpoints_log} log-spaced",
             "[EXT] 10,000 linear + 100 log-spaced"),
            ("LLC checkpoints", "none (quick)" if not cfg.llc else {
                "all": "every checkpoint", "grid": f"{cfg.n_checkpoints_log} log + {cfg.llc_linear} linear-spaced",
                "loss": f"{cfg.llc_loss_points} where the loss moves + {cfg.llc_log_points} log-spaced + the last"}[
                    cfg.llc_at], "[EXT] 200 linear + 100 log-spaced"),
            ("LLC sampler (before calibration)",
             f"ε {s.step_size:g} (grid {', '.join(f'{e:g}' for e in cfg.step_sizes)}), γ "
             f"{'0.01·nβ' if s.localization is None else f'{s.localization:.4g}'}, nβ "
             f"{'n/log n' if s.nbeta is None else f'{s.nbeta:.4g}'}, {s.num_chains} chains × {s.num_draws} draws, "
             f"burn-in {'min_burnin(ε, γ)' if s.num_burnin is None else s.num_burnin}, minibatch {s.batch_size}, "
             f"n = {cfg.llc_n:,}", "[EXT] ε 3e-4, γ 20/3, nβ 200/3; 10 chains × 5,000 draws, minibatch 1024, "
             "n = 2^20"),
        ]
        return scale_frame(cfg, rows, "Hoogland et al.")


STUDY = Stages
