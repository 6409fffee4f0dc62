"""The developmental-stages study: Hoogland et al. (2024), "The developmental landscape of in-context learning"
(docs/papers.md §D, small-scale targets §G9).

At M = ∞ (a fresh gaussian task w ~ N(0, I_D) for every sequence, label noise σ² > 0), train one long run per seed
(Hoogland et al. train 5 seeds and tabulate seed 1) and measure, at every checkpoint:

- the LLC λ̂(w_t) (Eqs. 5-6) with one set of SGLD settings, calibrated once at a mid/late checkpoint of the first
  seed and shared by every checkpoint and seed (`icl_lab.llc_run`; docs/papers.md §D2, §F3);
- essential dynamics (Eq. 7, §D3): a PCA of the predictions on a fixed batch over checkpoints, smoothed, with cusps
  and vertices of the PC-pair curves (`icl_lab.trajectory.essential_dynamics`);
- the stage table (Table 2, §D4): milestones are critical points of λ̂ against log step (`icl_lab.stages`), each
  boundary cross-checked against milestones of the loss and against ED cusps/vertices; type A where the LLC
  rises, type B where it falls;
- per-stage indicators (§D4, Fig. 5): E[ŷ²] (LR1 learns the prior ŷ = 0, so E[ŷ²] dips below σ²), the ICL score
  ℓ_late − ℓ_early (Eq. 2, after Olsson et al. 2022; it falls as in-context learning improves) on inputs
  x ~ N(0, g I_D) for several g (LR3 gets worse at ICL for g > 1), and the LayerNorm weights (LR3/LR4: "layer
  norm collapse", most of all in the unembedding LN): RMS of each LN's weight vector and the fraction of its
  entries near 0.

One HTML report: the figures with a paragraph of measured numbers under each, and an expectations table whose
rules are fixed in `expectations` (never tuned to agree); where small-scale results differ from the paper's, the
report says so with numbers.

Scales (`StagesConfig.for_scale`): 'small' (default) is designed to finish within 60 minutes on 2 CPU cores;
'paper' gives the paper's sizes (the 'hoogland' preset at D = 8, K = 16, σ² = 0.125, batch 256, 500k steps, 5 seeds)
for a GPU or a cluster; `quick=True` is a minutes-long small version. Finished runs, the calibration and finished
LLC estimates are reused.

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
from icl_lab.plots import plot_pc_pairs, plot_stages
from icl_lab.plots.studies import indicator_figure, pc_scores_figure, seeds_figure
from icl_lab.report import Section
from icl_lab.seeding import make_generator
from icl_lab.stages import SE_COLUMNS, save_stage_table
from icl_lab.store import Run, write_parquet
from icl_lab.studies.common import (
    Check,
    LLCStudyConfig,
    fmt_steps,
    llc_stages,
    n_parameters,
    sampler_worked,
    scale_frame,
)
from icl_lab.studies.runner import Study, run_study
from icl_lab.tasks import sample_batch
from icl_lab.trajectory import essential_dynamics

__all__ = [
    "PAPER_STAGES",
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

# The paper's sizes (docs/papers.md §D1): the 'hoogland' preset (2 layers, 4 heads, d 64, MLP 64) at D = 8, K = 16,
# σ² = 0.125 (the paper-scale D and K of every study here; the authors' repo uses D = 4, K = 8 [EXT]), Adam lr 3e-3 with
# the linear one-cycle schedule (50% warm-up), batch 256, 500k steps, 5 seeds. [EXT] LLC at a union of 100 log- and
# 200 linear-spaced checkpoints; 8 chains x 500 draws after 500 burn-in, SGLD minibatch 1024, n = 32,768 (calibrate
# rather than copy: the grid below is searched at γ = 1000 as in the other studies).
PAPER = dict(D=8, K=16, seeds=[0, 1, 2, 3, 4], batch_size=256, steps=500_000, lr=3e-3, n_checkpoints_linear=200,
             n_checkpoints_log=100, eval_size=8192, llc_n=32_768,
             sampler=LLCConfig(num_chains=8, num_draws=500, num_burnin=500, batch_size=1024, localization=1000.0),
             step_sizes=[1e-6, 3e-6, 1e-5, 3e-5, 1e-4], ed_batch=512, device="cuda", workers=4)
# A few minutes on 2 cores: one seed, 3,000 steps, about 20 checkpoints, light LLC.
QUICK = dict(seeds=[0], steps=3000, n_checkpoints_linear=6, n_checkpoints_log=16, eval_size=1024, llc_n=1024,
             sampler=LLCConfig(num_chains=2, num_draws=60, num_burnin=20, batch_size=64, localization=1000.0),
             step_sizes=[3e-5, 1e-4, 3e-4], ed_batch=128)


class StagesConfig(LLCStudyConfig):
    """Settings of the study. The defaults are the 'small' scale, designed to finish within 60 minutes on 2 CPU
    cores; `for_scale` gives 'paper' and `quick`.

    Small scale, and why: D = 4, K = 8, σ² = 0.125 and the 'hoogland' preset (51.7k parameters) are the authors' own
    regression setting [EXT: timaeus-research/icl L2H4Minf]; lr 3e-3 with the triangle (linear one-cycle) schedule
    as theirs. Scaled down: batch 64 instead of 256 and 80,000 steps instead of 500,000 (5.1M sequences against
    128M, 1/25), two seeds instead of five (trained side by side, one per core), the LLC at 50 checkpoints (16
    linear + 34 log-spaced) instead of 300, with 4 chains x 100 draws on n = 2,048 sequences instead of 8 x 500 on
    32,768. The paper's late stages (LR3-LR5, 126k-500k steps at batch 256) need not be reached; the report says
    what was.
    """

    SMALL: ClassVar[dict[str, Any]] = dict(seeds=[0, 1], batch_size=64, steps=80_000, n_checkpoints_linear=16,
                                           n_checkpoints_log=34)
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
    """Curves, essential dynamics, milestones and the stage table of one run; writes curves and tables to OUT."""

    curves, ed_preds, ridge = developmental_curves(cfg, run)
    ed = essential_dynamics(ed_preds, np.array(run.checkpoint_steps), n_components=cfg.ed_components,
                            sigma=cfg.ed_sigma)
    llc = finite_llc(run)
    metrics = run.metrics.drop_duplicates("step", keep="last").set_index("step")
    curves = curves.merge(metrics[["id_loss", "ood_loss"]].rename(columns={"id_loss": "loss"}), left_on="step",
                          right_index=True, how="left")
    llc_cols = ["step", "llc_mean", "llc_std", "ok", "flags", "num_chains", *SE_COLUMNS]
    curves = curves.merge(llc[[c for c in llc_cols if c in llc.columns]], on="step", how="left")
    used = curves[np.isfinite(curves["llc_mean"])].reset_index(drop=True)
    stages = llc_stages(used, used["loss"].to_numpy(), ed_events=ed)
    used["trusted"], table = stages.trusted, stages.table
    name = run.path.name
    save_stage_table(table, out / f"stage_table_{name}")
    write_parquet(out / f"curves_{name}.parquet", curves)
    columns = ["loss", "llc_mean", "yhat_sq"] + [c for c in curves.columns if c.startswith(("icl_g", "ln_rms:",
                                                                                           "ln_small:"))]
    changes = stage_changes(used, table, columns)
    return {"run": run, "curves": curves, "used": used, "ed": ed, "ridge": ridge, "milestones": stages.milestones,
            "table": table, "changes": changes}


# ================================================================================================ expectations
def _type_sequence(table: pd.DataFrame) -> str:
    """Stage types with consecutive repeats merged, e.g. 'A B A'."""
    types = list(table["type"])
    return " ".join(t for i, t in enumerate(types) if i == 0 or types[i - 1] != t)


def expectations(cfg: StagesConfig, results: Mapping[str, Mapping[str, Any]]) -> list[Check]:
    """docs/papers.md §D3-D4 and §G9 against the measurements, one row per (expectation, run) plus cross-seed rows.
    The rules are fixed here, before looking at any result; an expectation that cannot be judged (e.g. no type-B
    stage to look for LN collapse in) is 'unclear' and says why."""
    rows: list[Check] = []
    g1 = "icl_g1"
    g_hi = f"icl_g{_g_label(max(cfg.input_scales))}"

    def add(what: str, run: str, source: str, expected: str, measured: str, ok: bool | None) -> None:
        rows.append(Check(what, expected, measured, ok, run=run, source=source))

    for name, r in results.items():
        table, changes, curves, used = r["table"], r["changes"], r["curves"], r["used"]
        n_stages = len(table)
        add("several developmental stages", name, "§D4 Table 2 (5 stages), §G9",
            "at least 3 stages (2 or more LLC milestones)",
            f"{n_stages} stage(s), types {' '.join(table['type'])}, ending at steps {fmt_steps(table['end'])}",
            n_stages >= 3)
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
            bool(y_min < cfg.noise_var and math.isfinite(t_half) and t_min < t_half))
        ridge = r["ridge"][g1]
        add("the ICL score improves over training (ℓ_late − ℓ_early falls towards ridge's)", name,
            "§D4 (LR2 acquires ICL), Eq. 2",
            "final ICL score below the initial one and at least 80% of ridge's (Bayes-optimal) score",
            f"ICL_{{{cfg.late}:{cfg.icl_early}}} from {icl[0]:.3g} to {icl[-1]:.3g}; ridge {ridge:.3g}",
            bool(icl[-1] < icl[0] and icl[-1] <= 0.8 * ridge))
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
            "final loss within 10% of ridge's", f"{last['ood_loss']:.4g} vs ridge {ridge_ood:.4g} "
            f"({100 * (last['ood_loss'] / ridge_ood - 1):+.1f}%)", bool(last["ood_loss"] <= 1.1 * ridge_ood))
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
            add("stage boundaries coincide with essential-dynamics forms (cusps / vertices)", name, "§D3-D4",
                "at least half of the boundaries within 0.3 in log step of an ED cusp or vertex, and a larger "
                "fraction than chance (the share of the log-step range that lies that close to some event)",
                f"{n_ed} of {len(inner)} boundaries (at steps {fmt_steps(inner['end'])}; nearest events at "
                f"{fmt_steps(inner['ed_step'].dropna())}); chance {chance:.0%}",
                bool(n_ed >= len(inner) / 2 and n_ed / len(inner) > chance))
            n_loss = int(inner["loss_agrees"].sum())
            add("some stages do not show in the loss", name, "§D4 ('many stages do not show in the loss')",
                "at least one boundary with no loss milestone within 0.3 in log step",
                f"{len(inner) - n_loss} of {len(inner)} boundaries without a loss milestone nearby (loss-milestone "
                f"chance {float(inner['loss_chance'].iloc[0]):.0%})", n_loss < len(inner))
        else:
            add("stage boundaries coincide with essential-dynamics forms (cusps / vertices)", name, "§D3-D4",
                "at least one boundary to check", "no boundary was found", None)
        evr = r["ed"].explained_variance_ratio
        add("essential dynamics: the first PC dominates", name, "§D3 (LR: 0.65, 0.08, 0.05)",
            "PC1 explains > 50% of the variance of the predictions over checkpoints",
            "explained variance " + ", ".join(f"{v:.2f}" for v in evr), bool(evr[0] > 0.5))
        # λ̂ is defined at a local minimum: before the prior predictor is learned (LR1) the checkpoints are far from
        # one and chains find lower loss, so the sampler is judged from the E[ŷ²] minimum (the end of LR1) on
        llc_rows = r["run"].llc
        after = llc_rows[llc_rows["step"] >= t_min]
        mixed = after["flags"].map(sampler_worked)
        add("LLC chains stationary and mixed once the prior is learned", name, "§D2 (App. A diagnostics)",
            f"no not_stationary / chains_disagree / diverged flag at ≥ 90% of the checkpoints from "
            f"step {int(t_min):,} (the E[ŷ²] minimum, end of LR1)", f"{int(mixed.sum())} of {len(after)} checkpoints"
            + (f"; flagged at steps {fmt_steps(after.loc[~mixed, 'step'])}" if (~mixed).any() else ""),
            bool(mixed.mean() >= 0.9) if len(after) else None)
    if len(results) > 1:
        seqs = {name: _type_sequence(r["table"]) for name, r in results.items()}
        add("the order of stage types is the same in every seed", "all seeds", "§D4 ('their order is preserved')",
            "identical sequences of stage types (consecutive repeats merged)",
            "; ".join(f"{n}: {s}" for n, s in seqs.items()), len(set(seqs.values())) == 1)
    else:
        add("the order of stage types is the same in every seed", "all seeds", "§D4 ('their order is preserved')",
            "at least two seeds", f"one seed ({cfg.seeds[0]}); add seeds to check", None)
    if cfg.scale == "paper":
        r0 = results[run_name(cfg.seeds[0])]
        ends = r0["table"]["end"].iloc[:-1].to_numpy(float)
        paper_ends = [e for _, e, *_ in PAPER_STAGES[:-1]]
        near = [any(abs(math.log(e / p)) <= math.log(2) for e in ends if e > 0) for p in paper_ends]
        add("boundaries near the paper's (1k, 40k, 126k, 320k)", run_name(cfg.seeds[0]), "§D4 Table 2",
            "a boundary within a factor 2 of each of the paper's", f"boundaries at {fmt_steps(ends)}",
            all(near))
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
    for c in ("loss_step", "loss_agrees", "ed_step", "ed_agrees"):
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

    def llc_plan(self, runs: dict[str, Run]) -> LLCPlan:
        """Calibrate once at the first checkpoint at or after calibration_frac of the first seed's run."""
        cfg = self.cfg
        first = run_name(cfg.seeds[0])
        step = next(s for s in runs[first].checkpoint_steps if s >= cfg.calibration_frac * cfg.steps)
        return LLCPlan(LLCSettings(sampler=cfg.sampler, n=cfg.llc_n, data="id", seed=0), cfg.step_sizes, first, step)

    def analyse(self, runs: dict[str, Run], shared: SharedSettings, out: Path) -> dict[str, Any]:
        if shared.settings is None:
            raise ValueError(f"LLC calibration of {shared.run} at step {shared.step} failed: {shared.reason}")
        return {"results": {name: analyse_run(self.cfg, run, out) for name, run in runs.items()}, "shared": shared}

    def checks(self, r: dict[str, Any]) -> list[Check]:
        return expectations(self.cfg, r["results"])

    def figures(self, r: dict[str, Any], figs: Path) -> dict[str, Any]:
        cfg, results, pngs = self.cfg, r["results"], {}
        for name, res in results.items():
            u, table, rn = res["used"], res["table"], res["run"].path.name
            pngs[name] = {
                "stages": plot_stages(u["step"], u["loss"], u["llc_mean"], u["llc_std"], table, figs / f"stages_{rn}",
                                      milestones=res["milestones"], loss_label="test loss (fresh tasks)",
                                      trusted=u["trusted"],
                                      title=f"{rn}: loss and LLC with stages (Hoogland et al. Fig. 1)")[0],
                "indicators": indicator_figure(
                    res["curves"], table, res["ridge"], {g: f"icl_g{_g_label(g)}" for g in cfg.input_scales},
                    noise_var=cfg.noise_var, early=cfg.icl_early, late=cfg.late, ln_threshold=cfg.ln_threshold,
                    title=rn, path=figs / f"indicators_{rn}")[0],
                "ed": plot_pc_pairs(res["ed"], figs / f"ed_{rn}", osculating=True,
                                    title=f"{rn}: essential dynamics (Hoogland et al. Fig. 2)")[0],
                "pc_scores": pc_scores_figure(res["ed"], table, rn, figs / f"pc_scores_{rn}")[0]}
            cal = res["run"].path / "figures" / "llc_calibration.png"
            if cal.exists():
                pngs[name]["calibration"] = cal
        if len(results) > 1:
            pngs["seeds"] = seeds_figure({n: x["used"] for n, x in results.items()},
                                         {n: x["table"] for n, x in results.items()}, figs / "llc_all_seeds")[0]
        return pngs

    def sections(self, r: dict[str, Any], pngs: dict[str, Any]) -> list[Section]:
        cfg, results, settings, cal_step = self.cfg, r["results"], r["shared"].settings, r["shared"].step
        sections = []
        s = settings.sampler
        for name, r in results.items():
            t, u, cur = r["table"], r["used"], r["curves"]
            bounds = t["end"].iloc[:-1]
            flags = r["run"].llc["flags"].fillna("")
            n_flagged = int((flags != "").sum())
            text = (
                f"Test loss (top, fresh tasks) and LLC (bottom, mean ± std over {s.num_chains} chains) against step, "
                "with the stages found at critical points of λ̂ against log step (orange: λ̂ rises, type A; blue: "
                "falls, type "
                f"B; dotted: milestones). Measured: {len(t)} stage(s) of types {' '.join(t['type'])}, boundaries at "
                f"steps {fmt_steps(bounds)}; λ̂ from {u['llc_mean'].iloc[0]:.3g} at step {int(u['step'].iloc[0])} to a "
                f"maximum of {u['llc_mean'].max():.3g} at step {int(u.loc[u['llc_mean'].idxmax(), 'step']):,} and "
                f"{u['llc_mean'].iloc[-1]:.3g} at the end; the loss from {u['loss'].iloc[0]:.3g} to "
                f"{u['loss'].iloc[-1]:.3g}. {n_flagged} of {len(flags)} LLC estimates carry a diagnostic flag "
                f"({', '.join(sorted({f for fl in flags for f in fl.split(';') if f})) or 'none'}). The table gives "
                "per "
                "stage the change in loss and LLC, the nearest loss milestone and ED form to each boundary (agreement: "
                "within 0.3 in log step), and the change of each indicator. The paper's Table 2 (seed 1) follows.")
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
            text = (f"PCA of the predictions on {cfg.ed_batch} fixed fresh-task sequences at each of "
                    f"{len(ed.steps)} checkpoints, smoothed with σ = {cfg.ed_sigma:g} checkpoints; explained variance "
                    f"{ev} (the paper's LR model: 65%, 8%, 5%). Cusps (steps): {fmt_steps(cusps)}; vertices (circles, "
                    f"with osculating circles; steps): {fmt_steps(verts)}. Below: PC scores against step with the LLC "
                    f"boundaries (dashed) at {fmt_steps(bounds)}.")
            sections.append(Section(f"Essential dynamics, {name} (Hoogland et al. Figs. 2 and 6)", text,
                                    figures=[pngs[name]["ed"], pngs[name]["pc_scores"]]))
        if "seeds" in pngs:
            sections.append(Section("All seeds", (
                "LLC and loss of every seed with each seed's boundaries (ticks). Boundaries per seed: "
                + "; ".join(f"{n}: {fmt_steps(r['table']['end'].iloc[:-1])} (types {_type_sequence(r['table'])})"
                            for n, r in results.items()) + "."), figures=[pngs["seeds"]]))
        first = run_name(cfg.seeds[0])
        cal_figs = [pngs[first]["calibration"]] if "calibration" in pngs[first] else []
        sections.append(Section("LLC settings", (
            f"Calibrated once at step {cal_step:,} of {first} (the first checkpoint at or after "
            f"{cfg.calibration_frac:.0%} of training) over ε in {', '.join(f'{e:g}' for e in cfg.step_sizes)} at γ = "
            f"{cfg.sampler.localization:g}, each grid point burning in for max({cfg.sampler.num_burnin}, "
            "min_burnin(ε, γ) "
            f"≈ 3/(εγ)) steps; chosen: ε = {s.step_size:g}, γ = {s.localization:g}, nβ = "
            f"{'n/log n' if s.nbeta is None else f'{s.nbeta:g}'}, {s.num_chains} chains × {s.num_draws} draws after "
            f"{s.num_burnin} burn-in, minibatch {s.batch_size}, on n = {settings.n:,} fixed fresh-task sequences. The "
            "same settings, data and SGLD seed are used at every checkpoint of every seed."), figures=cal_figs))
        return sections

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
            ("checkpoints (LLC at each)", f"{cfg.n_checkpoints_linear} linear + {cfg.n_checkpoints_log} log-spaced",
             "[EXT] 200 linear + 100 log-spaced"),
            ("LLC sampler (before calibration)", f"{s.num_chains} chains × {s.num_draws} draws, burn-in ≥ "
             f"{s.num_burnin}, minibatch {s.batch_size}, γ = {s.localization:g}, n = {cfg.llc_n:,}; ε from "
             f"{', '.join(f'{e:g}' for e in cfg.step_sizes)}", "[EXT] 8 chains × 500 draws, 500 burn-in, minibatch "
             "1024, n = 32,768"),
        ]
        return scale_frame(cfg, rows, "Hoogland et al.")


STUDY = Stages
