"""The low-diversity study: how the user's 2-layer model solves M = 1 and M = 2, and which findings survive
controls on M = 2 (docs/papers.md §F1, §G3-G4).

Run groups, all in one report:
- main: the `seed` preset as the user has it (no positional embedding, σ² = 0, constant lr), M in Ms × `seeds`;
- controls on M = 2 only, `control_seeds` each: `pos_emb` (a learned positional embedding), `noise` (σ² =
  control_noise_var, where the optimum is reachable: the noiseless M = 2 optimum is an infimum), `cooldown` (the
  lr decays linearly to 0 over the last cooldown_frac of training, so the final checkpoints sit near minima).

Per group: per-token loss against dMMSE and least squares, probes for the task identity, attention at stage
boundaries, and the LLC (λ̂ and its tilted, off-minimum version) at a sparse set of checkpoints (`llc_steps`), with
stages from trusted (unflagged) estimates only. Essential dynamics per run and a joint trajectory PCA per seed of the
main group (its M = 1 and M = 2 pools are nested and share the root task). Runs and LLC estimates on disk are reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from icl_lab.config import LLCConfig, RunConfig, preset_fields
from icl_lab.interp import attention_patterns, probe_residual
from icl_lab.llc_run import LLCPlan, LLCSettings, SharedSettings, finite_llc
from icl_lab.plots import llc_half_width, per_token_columns, plot_joint_pca, plot_pc_pairs, plot_stages
from icl_lab.plots.studies import attention_figure, ms_delta_figure, ms_llc_figure, ms_loss_figure, probe_figure
from icl_lab.report import Section
from icl_lab.seeding import make_generator
from icl_lab.stages import save_stage_table, trusted_mask
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

__all__ = ["CONTROLS", "LowDiversity", "LowDiversityConfig", "expectations", "group_of",
           "llc_steps", "run_name", "run_study", "survival"]

Control = Literal["pos_emb", "noise", "cooldown"]
# what each control changes, against the main group (the user's model as it is)
CONTROLS: dict[str, str] = {
    "pos_emb": "a learned positional embedding (the user's model has none: it tells positions apart only through "
               "the causal mask)",
    "noise": "label noise σ² = control_noise_var > 0, where the optimum is reachable (at σ² = 0 the M = 2 optimum "
             "is an infimum that no finite weights reach)",
    "cooldown": "the learning rate decayed linearly to 0 over the last cooldown_frac of training (constant-lr Adam "
                "at batch 32 never reaches a minimum, where λ̂ is defined)",
}
CONTROL_M = 2  # the controls train M = 2 only
MAIN = "main"


class LowDiversityConfig(MsStudyConfig, LLCStudyConfig):
    """Settings of the study: the `seed` preset on unit-norm, noiseless tasks at a constant learning rate (the main
    group) and the controls on M = 2; `for_scale(quick=True)` gives the minutes-long version, without the LLC.

    LLC (SMALL): the library's validated sampler defaults, `LLCConfig(tilted=True)` (ε = 1e-4, γ = 0.01·nβ, burn-in
    min_burnin(ε, γ), 4 chains × 500 draws, minibatch 256; docs/llc.md "Defaults and their validation"), checked by
    one settings check (llc_run.settings_check: λ̂ at γ/2 and 2γ, the γ-plateau; at the papers' settings; on a
    network with a known λ) at the final checkpoint of the first main M = 2 run. An estimate at these settings is
    expensive, so each run is estimated at a sparse set of checkpoints, chosen by `llc_steps` before any estimate is
    made: `llc_points` per main-group run and `control_llc_points` per control run (0: no LLC for that group).
    QUICK estimates no LLC at all: at the validated settings one estimate alone costs more than the quick version's
    budget, and at cheaper settings λ̂ is not comparable with the literature.

    Rules of the checks (fixed here before any run, never adjusted after a result):
    - every per-run check's rule is written in its `expected` column (`expectations`);
    - a finding survives a control when its outcome (pass or fail) is the same in the control as in the main group:
      the main group's outcome is the verdict of a strict majority of its seeds with a verdict, a control's is the
      verdict shared by all its seeds with a verdict; otherwise (a tie, mixed control seeds, no verdict) unclear
      (`survival`).
    """

    SMALL: ClassVar[dict[str, Any]] = dict(
        Ms=[1, 2], seeds=[0, 1, 2], family="unit_norm", D=8, K=16, noise_var=0.0, preset="seed", steps=5000,
        schedule="constant", n_checkpoints_linear=5, n_checkpoints_log=16, eval_size=1024, llc_n=4096,
        sampler=LLCConfig(tilted=True), step_sizes=[1e-4], llc_points=4, control_llc_points=3)
    QUICK: ClassVar[dict[str, Any]] = dict(
        seeds=[0], steps=1500, n_checkpoints_linear=6, n_checkpoints_log=12, eval_size=512, llc_n=1024,
        llc=False, llc_points=0, control_llc_points=0, ed_batch=64)
    INFINITE: ClassVar[bool] = False
    study: Literal["low-diversity"] = "low-diversity"
    ed_batch: int = Field(256, ge=1, description="fixed sequences whose predictions form the ED trajectory")
    controls: list[Control] = Field(default_factory=lambda: ["pos_emb", "noise", "cooldown"],
                                    description="control groups on M = 2 (CONTROLS)")
    control_seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="seeds of each control")
    control_noise_var: float = Field(0.01, gt=0, description="σ² of the noise control")
    cooldown_frac: float = Field(0.2, gt=0, le=1, description="cooldown control: the final fraction of the steps "
                                 "over which the lr falls linearly to 0")
    llc_points: int = Field(4, ge=0, description="checkpoints per main-group run with an LLC estimate (llc_steps; 0: "
                            "none)")
    control_llc_points: int = Field(3, ge=0, description="checkpoints per control run with an LLC estimate")

    @model_validator(mode="after")
    def _check_controls(self) -> LowDiversityConfig:
        if len(set(self.controls)) != len(self.controls):
            raise ValueError(f"controls must be distinct, got {self.controls}")
        if self.controls and CONTROL_M not in self.Ms:
            raise ValueError(f"the controls {self.controls} are controls of the M = {CONTROL_M} runs: Ms must contain "
                             f"{CONTROL_M} (or set controls to [])")
        if "cooldown" in self.controls and self.schedule != "constant":
            raise ValueError(f"the cooldown control needs the main group at schedule 'constant', got "
                             f"{self.schedule!r}")
        if "noise" in self.controls and self.control_noise_var == self.noise_var:
            raise ValueError(f"the noise control's control_noise_var={self.control_noise_var} equals noise_var")
        if "pos_emb" in self.controls and self.model_overrides.get("pos_emb", preset_fields(self.preset)["pos_emb"]):
            raise ValueError("the pos_emb control needs a main-group model without a positional embedding")
        return self

    @property
    def groups(self) -> dict[str, list[tuple[int, int]]]:
        """{group: [(M, seed), ...]}: the main group, then each control."""
        return {MAIN: [(M, s) for M in self.Ms for s in self.seeds],
                **{c: [(CONTROL_M, s) for s in self.control_seeds] for c in self.controls}}

    def group_config(self, group: str) -> LowDiversityConfig:
        """The settings the runs of `group` train with: these, changed by the control."""
        change = {MAIN: {}, "pos_emb": {"model_overrides": {**self.model_overrides, "pos_emb": True}},
                  "noise": {"noise_var": self.control_noise_var}, "cooldown": {"schedule": "constant_cooldown"}}
        return self.model_copy(update=change[group])

    def run_config(self, M: int, seed: int, group: str = MAIN) -> RunConfig:
        return self.group_config(group).build_run(run_name(M, seed, group), M, seed, cooldown_frac=self.cooldown_frac)

    def run_configs(self) -> dict[str, RunConfig]:
        return {run_name(M, s, g): self.run_config(M, s, g) for g, cells in self.groups.items() for M, s in cells}

    def llc_points_of(self, group: str) -> int:
        return self.llc_points if group == MAIN else self.control_llc_points


def run_name(M: int, seed: int, group: str = MAIN) -> str:
    return f"M{M}-seed{seed}" if group == MAIN else f"{group}-M{M}-seed{seed}"


def group_of(name: str) -> str:
    """The group of a run name (`run_name`)."""
    head = name.split("-M")[0]
    return head if head in CONTROLS else MAIN


def llc_steps(steps: Sequence[int], loss: Sequence[float], n: int, start_frac: float = 0.9) -> list[int]:
    """The checkpoints at which a run's LLC is estimated, fixed before any estimate: the final checkpoint and, for
    n > 1, the checkpoints nearest (in log step) to n log-spaced steps from the first checkpoint whose loss is below
    start_frac of the initial loss (where the loss starts to move; else the first step > 0) to the final one, each
    checkpoint chosen once.

    steps: (T,) increasing checkpoint steps starting at 0; loss: (T,) the in-distribution loss there.
    Returns min(n, T − 1) sorted steps (none for n = 0).
    """
    steps, loss = np.asarray(steps), np.asarray(loss, dtype=float)
    if n <= 0:
        return []
    pos = steps > 0
    moved = np.flatnonzero(pos & (loss < start_frac * loss[0]))
    t0 = steps[moved[0]] if len(moved) else steps[pos][0]
    free = [int(s) for s in steps[pos]]
    chosen = [free.pop()]  # the final checkpoint
    for target in np.geomspace(t0, steps[-1], n)[:-1][::-1]:
        if not free:
            break
        i = int(np.argmin(np.abs(np.log(np.array(free, dtype=float)) - np.log(target))))
        chosen.append(free.pop(i))
    return sorted(chosen)


def _checkpoint_loss(run: Run) -> np.ndarray:
    """(T,) the in-distribution loss at the run's checkpoints."""
    m = run.metrics.drop_duplicates("step", keep="last").set_index("step")
    return m.loc[run.checkpoint_steps, "id_loss"].to_numpy(dtype=float)


def has_llc(run: Run) -> bool:
    return run.llc is not None and not run.llc.empty


def _slug(label: str) -> str:
    """A file-name key of a grid row label ("M=2, pos_emb" -> "M2_pos_emb")."""
    return label.replace("=", "").replace(", ", "_")


def _fixed_batch(run: Run, n: int):
    task = run.config.task
    pool = task_pool(task.family, task.M or 1, task.D, run.config.seed)
    return sample_batch(task, pool, n, make_generator(run.config.seed, "ed"))


def _essential_dynamics(run: Run, n: int):
    batch = _fixed_batch(run, n)
    preds = checkpoint_predictions(run, batch.x, batch.y)
    return essential_dynamics(preds, np.array(run.checkpoint_steps), n_components=3, sigma=1.0)


def _stages(run: Run, ed) -> Any:
    """The stage table of a run's LLC curve (saved as RUN/stages.{parquet,csv}), with its milestones; None without
    fewer than 2 finite LLC estimates."""
    llc = finite_llc(run) if has_llc(run) else None
    if llc is None or len(llc) < 2:
        return None
    loss = run.metrics.drop_duplicates("step", keep="last").set_index("step").loc[llc["step"]]["id_loss"].to_numpy()
    stages = llc_stages(llc, loss, ed_events=ed)
    save_stage_table(stages.table, run.path / "stages")
    return stages


def _k2_drop(run: Run) -> int | None:
    """The first checkpoint of an M = 2 run at which ℓ_2 is below half of ‖w₁−w₂‖²/4 (None: none)."""
    m = run.metrics
    drop = m["step"][m["id_loss_k2"] < 0.5 * _pool_gap(run)]
    return int(drop.iloc[0]) if len(drop) else None


def _boundary_steps(run: Run, stages: Any, limit: int = 4) -> list[int]:
    """The first checkpoint after initialisation, the LLC stage boundaries (or, without an LLC, the drop of ℓ_2 of
    an M = 2 run), and the final step; at most `limit`, keeping the latest boundaries."""
    steps = run.checkpoint_steps
    if stages is not None:
        inner = [int(e) for e in stages.table["end"].iloc[:-1]]
    else:
        drop = _k2_drop(run) if run.config.task.M == 2 else None
        inner = [] if drop is None else [drop]
    chosen = sorted({steps[1], *inner, steps[-1]})
    if len(chosen) > limit:
        chosen = [chosen[0], *chosen[1:-1][-(limit - 2):], chosen[-1]]
    return chosen


def _attention_patterns(run: Run, stages: Any) -> dict[int, np.ndarray]:
    """{step: mean attention (L, H, T, T) over 64 in-distribution sequences} at the stage boundaries."""
    batch = _fixed_batch(run, 64)
    return {step: attention_patterns(run.load_checkpoint(step), batch.x, batch.y).mean(1).numpy()
            for step in _boundary_steps(run, stages)}


def _probes(runs: dict[str, Run]) -> pd.DataFrame:
    """Task-identity probe accuracy per position from the final residual at x positions (M >= 2 runs of every
    group), at the middle and the final checkpoint."""
    rows = []
    for name, run in runs.items():
        M = run.config.task.M
        if M < 2:
            continue
        batch = _fixed_batch(run, 2048)
        for step in (run.checkpoint_steps[len(run.checkpoint_steps) // 2], run.checkpoint_steps[-1]):
            acc = probe_residual(run.load_checkpoint(step), batch.x, batch.y, batch.task_index, classify=True)
            rows.append({"group": group_of(name), "M": M, "seed": run.config.seed, "step": step,
                         **{f"k{k + 1}": float(a) for k, a in enumerate(acc)}})
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


def _llc_checks(add: Any, name: str, run: Run, m: pd.DataFrame, llc: pd.DataFrame) -> None:
    """The checks of a run's LLC estimates (sampler, smoothness, sign, and for M = 1 the shape of the curve)."""
    first = m.iloc[0]
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
    lam = llc["llc_mean"].to_numpy()
    if run.config.task.M == 1:
        add("LLC rises while the map is learned, then settles", name,
            "max λ̂ > λ̂ at the first estimated checkpoint; last 3 within 25% of each other",
            f"λ̂: {lam[0]:.3g} → max {lam.max():.3g} → last {lam[-3:].round(2).tolist()}",
            bool(lam.max() > lam[0] and np.ptp(lam[-3:]) <= 0.25 * abs(lam[-3:]).mean()))
    elif run.config.task.M == 2:
        add("LLC rises (type A) around the drop", name, *_type_a(llc, _k2_drop(run)))


def _type_a(llc: pd.DataFrame, t_drop: int | None) -> tuple[str, str, bool | None]:
    """(expected, measured, ok) of "λ̂ rises around the drop of ℓ_2", from trusted estimates only (unflagged, λ̂ > 0;
    `icl_lab.stages.trusted_mask`): the last one against the last at or before the drop."""
    expected = "trusted λ̂ at the end > trusted λ̂ at or before the drop of ℓ_2 below half the gap"
    if t_drop is None:
        return expected, "no drop within training", None
    trusted = llc[trusted_mask(llc)]
    before = trusted[trusted["step"] <= t_drop]["llc_mean"].to_numpy()
    after = trusted[trusted["step"] > t_drop]["llc_mean"].to_numpy()
    if not len(before) or not len(after):
        return expected, (f"drop at step {t_drop}; {len(before)} trusted estimates at or before it, {len(after)} "
                          "after"), None
    return expected, f"drop at step {t_drop}; λ̂ {before[-1]:.3g} → {after[-1]:.3g}", bool(after[-1] > before[-1])


def expectations(cfg: LowDiversityConfig, runs: dict[str, Run], probes: pd.DataFrame) -> list[Check]:
    """docs/papers.md §G3-G4 checked against the measurements, one row per (expectation, run) of every group; the
    LLC rows only for runs with LLC estimates."""
    rows: list[Check] = []

    def add(what: str, run: str, expected: str, measured: str, ok: bool | None) -> None:
        rows.append(Check(what, expected, measured, None if ok is None else bool(ok), run=run))

    for name, run in runs.items():
        M = run.config.task.M
        m = run.metrics
        first, last = m.iloc[0], m.iloc[-1]
        k_cols = per_token_columns(m, "id_loss")
        if has_llc(run):
            _llc_checks(add, name, run, m, finite_llc(run))
        if M == 1:
            add("loss falls from about 1 to about 0", name, "initial ≈ 1, final < 1% of initial",
                f"{first['id_loss']:.3g} → {last['id_loss']:.2e}", last["id_loss"] < 0.01 * first["id_loss"])
            spread = float(np.ptp([last[c] for c in k_cols]))
            add("per-token loss flat in k (no ICL needed)", name, "max − min of final ℓ_k ≪ initial loss",
                f"spread {spread:.2e}", spread < 0.01 * first["id_loss"])
        if M == 2:
            gap, noise = _pool_gap(run), run.config.task.noise_var
            floor = [run.baselines.get(f"id_dmmse_loss_k{k}", 0.0) for k in range(2, len(k_cols) + 1)]
            l1 = last[k_cols[0]]
            rest = max(last[c] - f for c, f in zip(k_cols[1:], floor, strict=True))
            add("final ℓ_1 ≈ ‖w₁−w₂‖²/4 + σ² (pool-mean prediction)", name,
                f"{gap + noise:.3g} (±20% of {gap:.3g})", f"{l1:.3g}", abs(l1 - gap - noise) <= 0.2 * gap)
            add("final ℓ_k ≈ dMMSE's for k ≥ 2 (task identified from one example)", name,
                f"max ℓ_k − dMMSE ℓ_k (k≥2) < 5% of {gap:.3g}", f"{rest:.2e}", rest < 0.05 * gap)
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
    for _, row in probes.iterrows():
        kcols = [c for c in probes.columns if c.startswith("k") and c[1:].isdigit()]
        name = run_name(int(row.M), int(row.seed), row.get("group", MAIN))
        if row.step == runs[name].checkpoint_steps[-1]:
            acc1, acc2 = row[kcols[0]], row[kcols[1:]].min()
            add("the model knows which task from k = 2 on (probe)", name,
                "probe accuracy ≈ chance at k = 1, > 95% for k ≥ 2", f"k=1: {acc1:.2f}; min k≥2: {acc2:.2f}",
                bool(acc2 > 0.95))
    return rows


def _outcome(verdicts: Sequence[bool | None], majority: bool) -> bool | None:
    """A group's outcome from its seeds' verdicts: with `majority`, the verdict of a strict majority of the seeds
    with one; else the verdict all of them share. None: a tie, mixed verdicts, or none."""
    known = [v for v in verdicts if v is not None]
    if not known:
        return None
    n_pass = sum(known)
    if majority:
        return True if 2 * n_pass > len(known) else (False if 2 * n_pass < len(known) else None)
    return True if n_pass == len(known) else (False if n_pass == 0 else None)


def survival(checks: Sequence[Check], groups: Sequence[str]) -> list[Check]:
    """Which findings on M = 2 survive each control: one row per (expectation measured on a main-group M = 2 run,
    control). Rule (LowDiversityConfig): the outcome is the same in the control as in the main group, the main
    group's outcome being its seeds' strict majority and a control's the verdict all its seeds share."""
    def by_group(expectation: str, group: str) -> list[bool | None]:
        return [c.ok for c in checks if c.expectation == expectation and group_of(c.run) == group
                and f"-M{CONTROL_M}-" in f"-{c.run}-"]

    def tally(v: list[bool | None]) -> str:
        n_pass, n_fail = sum(x is True for x in v), sum(x is False for x in v)
        return f"{n_pass} pass, {n_fail} fail, {len(v) - n_pass - n_fail} unclear"

    rows = []
    findings = list(dict.fromkeys(c.expectation for c in checks if group_of(c.run) == MAIN
                                  and c.run.startswith(f"M{CONTROL_M}-")))
    for what in findings:
        main = by_group(what, MAIN)
        for control in [g for g in groups if g != MAIN]:
            other = by_group(what, control)
            a, b = _outcome(main, majority=True), _outcome(other, majority=False)
            ok = None if a is None or b is None else a == b
            rows.append(Check(what, "same outcome as the main group (main: majority of seeds; control: all seeds)",
                              f"main: {tally(main)}; {control}: {tally(other)}", ok, run=f"{control} vs main",
                              source="controls"))
    return rows


class LowDiversity(Study):
    name = "low-diversity"
    title = "Low task diversity: how the seed model solves M = 1 and M = 2"
    config = LowDiversityConfig
    reused = "finished runs and LLC estimates are reused and cost nothing"

    def checks_note(self) -> str:
        return ("Each row is measured on the run named; the rows with source 'controls' say whether a finding on M = 2 "
                "survives each control (rule in the 'expected' column, fixed in LowDiversityConfig before the run). "
                "Where a check fails, the figures below show what happened instead.")

    def llc_plan(self, runs: dict[str, Run]) -> LLCPlan | None:
        """Calibrate once, at the final checkpoint of the first main-group M = max(Ms) run; estimate each run at its
        `llc_steps` (none when no group asks for the LLC)."""
        cfg = self.cfg
        points = {run_name(M, s, g): cfg.llc_points_of(g) for g, cells in cfg.groups.items() for M, s in cells}
        if not cfg.llc or not any(points.values()):
            return None
        base = LLCSettings(sampler=cfg.sampler, n=cfg.llc_n, data="id", seed=0, refine=["position", "task", "fresh"])
        at = {name: llc_steps(run.checkpoint_steps, _checkpoint_loss(run), points.get(name, 0))
              for name, run in runs.items()}
        return LLCPlan(base, cfg.step_sizes, run_name(max(cfg.Ms), cfg.seeds[0]), steps_by_run=at)

    def analyse(self, runs: dict[str, Run], shared: SharedSettings | None, out: Path) -> dict[str, Any]:
        cfg = self.cfg
        if shared is not None and shared.settings is None:
            raise ValueError(f"LLC calibration of {shared.run} at step {shared.step} failed: {shared.reason}")
        eds = {name: _essential_dynamics(run, cfg.ed_batch) for name, run in runs.items()}
        joint = {s: joint_pca({M: runs[run_name(M, s)] for M in cfg.Ms}, cfg.ed_batch, "least squares", label=str)
                 for s in cfg.seeds}
        stages = {name: _stages(run, eds[name]) for name, run in runs.items()}
        plan = self.llc_plan(runs)
        llc_at = {} if plan is None else {p.name: steps for p, steps in plan.steps(runs).items()}
        return {"runs": runs, "eds": eds, "joint": joint, "stages": stages, "probes": _probes(runs),
                "settings": None if shared is None else shared.settings, "llc_at": llc_at}

    def checks(self, r: dict[str, Any]) -> list[Check]:
        rows = expectations(self.cfg, r["runs"], r["probes"])
        return rows + survival(rows, list(self.cfg.groups))

    def _grid(self, runs: dict[str, Run]) -> dict[str, dict[int, Run]]:
        """{row label: {seed: run}}: M = 1, M = 2 of the main group, then each control."""
        cfg = self.cfg
        grid = {f"M={M}": {s: runs[run_name(M, s)] for s in cfg.seeds} for M in cfg.Ms}
        for c in cfg.controls:
            grid[f"M={CONTROL_M}, {c}"] = {s: runs[run_name(CONTROL_M, s, c)] for s in cfg.control_seeds}
        return grid

    def figures(self, r: dict[str, Any], figs: Path) -> dict[str, Any]:
        cfg, runs = self.cfg, r["runs"]
        grid = self._grid(runs)
        pngs: dict[str, Any] = {}
        for name, run in runs.items():
            stages, t = r["stages"][name], run.config.task
            if stages is None:
                continue
            llc = finite_llc(run)
            loss = run.metrics.drop_duplicates("step", keep="last").set_index("step").loc[llc["step"]]["id_loss"]
            pngs[f"stages_{name}"] = plot_stages(
                llc["step"].to_numpy(), loss.to_numpy(), llc["llc_mean"].to_numpy(), llc_half_width(llc),
                stages.table, figs / f"stages_{name}", milestones=stages.milestones,
                loss_label="in-distribution loss", title=f"{run.path.name}: M={t.M}, seed {run.config.seed}",
                trusted=stages.trusted)[0]
        for label, by_seed in grid.items():
            run = next(iter(by_seed.values()))
            key = _slug(label)
            patterns = _attention_patterns(run, r["stages"][run.path.name])
            pngs[f"attention_{key}"] = (attention_figure(patterns, run.path.name, figs / f"attention_{key}"),
                                        list(patterns))
            pngs[f"ed_{key}"] = plot_pc_pairs(r["eds"][run.path.name], figs / f"ed_{key}",
                                              title=f"{label}, seed {run.config.seed}")[0]
        gaps = {label: {s: _pool_gap(run) for s, run in g.items()} for label, g in grid.items()
                if next(iter(g.values())).config.task.M == 2}
        pngs["loss"] = ms_loss_figure(grid, gaps, cfg.K, figs / "loss_curves")[0]
        pngs["delta"] = ms_delta_figure({label: {s: run.metrics for s, run in g.items()} for label, g in grid.items()},
                                        figs / "delta")[0]
        with_llc = {label: {f"seed {s}": finite_llc(run) for s, run in g.items() if has_llc(run)}
                    for label, g in grid.items()}
        with_llc = {label: curves for label, curves in with_llc.items() if curves}
        if with_llc:
            pngs["llc"] = ms_llc_figure(with_llc, figs / "llc_curves")[0]
        for s, jp in r["joint"].items():
            pngs[f"joint_pca_seed{s}"] = plot_joint_pca(
                jp, figs / f"joint_pca_seed{s}", ref_runs={f"dMMSE_{M}": f"M={M}" for M in cfg.Ms},
                title=f"joint trajectory PCA on root-task sequences, seed {s}")[0]
        if len(r["probes"]):
            pngs["probes"] = probe_figure(r["probes"], figs / "probes")[0]
        return pngs

    def sections(self, r: dict[str, Any], pngs: dict[str, Any]) -> list[Section]:
        cfg, runs, eds, joint, probes = self.cfg, r["runs"], r["eds"], r["joint"], r["probes"]
        grid = self._grid(runs)
        sections = [Section("Run groups", (
            "The main group is the user's model as it is; each control changes one thing and trains M = "
            f"{CONTROL_M} only. Seed counts were fixed in the study's config before the run."),
            tables=[self._groups_table()])]
        finals = pd.DataFrame([{"run": n, "group": group_of(n), "final id loss": run.metrics.iloc[-1]["id_loss"],
                                "final ood loss": run.metrics.iloc[-1]["ood_loss"],
                                "dMMSE id": run.baselines["id_dmmse_loss"],
                                "least sq. ood": run.baselines["ood_ridge_loss"],
                                "zero ood": run.baselines["ood_zero_loss"]} for n, run in runs.items()])
        sections.append(Section("Loss against step, and the final per-token loss", (
            "One row per group. Left and middle: mean loss (solid) and the loss at the first position ℓ_1 (dotted) on "
            "a fixed in-distribution set (the pool's tasks, fresh inputs) and on fresh unit-norm tasks, with the dMMSE "
            "(green) and least-squares (blue) levels of each seed's data. Right: the final per-token loss against the "
            "position k, against the dMMSE (dashed) and least-squares (dash-dot) per-token losses and, for M = 2, "
            "‖w₁−w₂‖²/4 (dotted)."), figures=[pngs["loss"]], tables=[finals]))
        sections.append(Section("Distance to the Bayes-optimal predictors", (
            "Δ(model, dMMSE) and Δ(model, least squares): mean squared difference of predictions on the same inputs, "
            "in distribution (solid) and on fresh tasks (dashed)."), figures=[pngs["delta"]]))
        sections.append(self._llc_section(r, pngs))
        sections.append(self._refined_section(runs))
        for by_seed in grid.values():
            name = next(iter(by_seed.values())).path.name
            stages = r["stages"][name]
            if stages is None:
                continue
            sections.append(Section(f"Stages, {name}", (
                "Loss (top) and LLC (bottom) with the stage boundaries found at critical points of λ̂ against log step "
                "from the trusted estimates only (unflagged, λ̂ > 0; hollow points are drawn, not used; orange: LLC "
                "rises, type A; blue: falls, type B). The table cross-checks each boundary with loss plateaus and "
                "essential-dynamics cusps/vertices (agreement within 0.3 in log step; the chance columns give how "
                "often a random step would agree)."), figures=[pngs[f"stages_{name}"]], tables=[stages.table]))
        for label, by_seed in grid.items():
            run = next(iter(by_seed.values()))
            ed, key = eds[run.path.name], _slug(label)
            ev = ", ".join(f"{v:.1%}" for v in ed.explained_variance_ratio)
            sections.append(Section(f"Essential dynamics, {label} (seed {run.config.seed})", (
                f"PCA of the concatenated predictions on {cfg.ed_batch} fixed sequences at every checkpoint; explained "
                f"variance of the PCs: {ev}. Cusps (red crosses) and vertices (circles) are candidate forms; their "
                f"steps: {ed.event_steps().astype(int).tolist()}."), figures=[pngs[f"ed_{key}"]]))
        for s, jp in joint.items():
            ev = ", ".join(f"{v:.1%}" for v in jp.explained_variance_ratio)
            sections.append(Section(f"Joint trajectory PCA (main group, seed {s})", (
                f"One PCA fitted on the checkpoints of the M = {cfg.Ms} runs, evaluated on {cfg.ed_batch} sequences "
                "of the shared root task; dMMSE_M (diamonds) and least squares (triangle) are projected, not fitted. "
                f"Explained variance: {ev}."), figures=[pngs[f"joint_pca_seed{s}"]]))
        for label, by_seed in grid.items():
            run = next(iter(by_seed.values()))
            paths, steps = pngs[f"attention_{_slug(label)}"]
            sections.append(Section(f"Attention patterns, {label} (seed {run.config.seed})", (
                f"Mean attention per layer and head over 64 in-distribution sequences at steps {steps} (the first "
                "checkpoint after initialisation, the LLC stage boundaries, or without an LLC the drop of ℓ_2, and "
                "the final step). Tokens alternate x_1, y_1, x_2, y_2, …; predictions are read at the x tokens."),
                figures=[paths[0]]))
        if len(probes):
            sections.append(Section("Probes for the task identity", (
                "Held-out accuracy of a linear classifier reading the final residual stream at x_k, trained on half of "
                "2,048 sequences, at the middle and final checkpoints of every M = 2 run. Chance is 50%."),
                figures=[pngs["probes"]], tables=[probes.round(3)]))
        cal = runs[run_name(max(cfg.Ms), cfg.seeds[0])].path / "figures" / "llc_calibration.png"
        if r["settings"] is not None and cal.exists():
            sections.append(Section("LLC calibration (γ-plateau)", (
                f"λ̂ at the validated step size(s) {cfg.step_sizes} and at γ/2 and 2γ around the default γ = 0.01·nβ, "
                "at the final checkpoint of the calibration run, with the loss traces; the settings are kept when λ̂ "
                "does not move with γ (within 10% or two standard errors) and no diagnostic flag is raised."),
                figures=[cal]))
        return sections

    def _groups_table(self) -> pd.DataFrame:
        cfg = self.cfg
        rows = [{"group": MAIN, "changes": "nothing: the seed preset, σ² = 0, constant lr", "Ms": str(cfg.Ms),
                 "seeds": str(cfg.seeds), "LLC checkpoints per run": cfg.llc_points}]
        rows += [{"group": c, "changes": CONTROLS[c].replace("control_noise_var", str(cfg.control_noise_var))
                  .replace("cooldown_frac", str(cfg.cooldown_frac)), "Ms": str([CONTROL_M]),
                  "seeds": str(cfg.control_seeds), "LLC checkpoints per run": cfg.control_llc_points}
                 for c in cfg.controls]
        return pd.DataFrame(rows)

    def _llc_section(self, r: dict[str, Any], pngs: dict[str, Any]) -> Section:
        cfg, runs, settings = self.cfg, r["runs"], r["settings"]
        if settings is None:
            return Section("LLC over training", (
                "Not estimated in this version"
                + (" (--quick)" if cfg.quick else "") + f": llc_points = {cfg.llc_points}, control_llc_points = "
                f"{cfg.control_llc_points}. At the validated sampler settings (LLCConfig(tilted=True): ε = 1e-4, "
                "γ = 0.01·nβ, 4 chains × 500 draws, minibatch 256) one estimate of this model costs more than the "
                "whole quick version's budget, and at cheaper settings λ̂ is not comparable with the published values "
                "Run the default (small) scale for the LLC curves."))
        rows = []
        for n, run in runs.items():
            if not has_llc(run):
                continue
            llc = run.llc.sort_values("step")
            tilted = llc["llc_tilted"] if "llc_tilted" in llc else pd.Series(np.nan, index=llc.index)
            rows.append({"run": n, "group": group_of(n), "steps": str(r["llc_at"].get(n, [])),
                         "λ̂": " / ".join(f"{v:.3g}" for v in llc["llc_mean"]),
                         "tilted λ̂": " / ".join(f"{v:.3g}" for v in tilted),
                         "trusted": f"{int(trusted_mask(llc).sum())} of {len(llc)}",
                         "flags seen": ", ".join(sorted({f for fl in llc["flags"] for f in str(fl).split(";") if f}))})
        return Section("LLC over training", (
            f"λ̂ = nβ(E[L] − L(w*)) with one set of SGLD settings for every estimate, on n = {settings.n} fixed "
            f"in-distribution sequences: {settings.sampler.model_dump()}. The tilted λ̂ samples ℓ_n(w) − ∇ℓ_n(w*)ᵀ(w − "
            "w*), exact off a minimum for a quadratic, so where w* is not at a minimum (flag not_at_minimum) it is the "
            "one to read. Estimates are made at a sparse set of checkpoints fixed before any estimate (llc_steps: the "
            "final checkpoint and the ones nearest to log-spaced steps from where the loss starts to fall): "
            f"{cfg.llc_points} per main-group run, {cfg.control_llc_points} per control run. Mean with its 95% "
            "interval over chains, raw; stages use the trusted estimates only."),
            figures=[pngs["llc"]] if "llc" in pngs else [], tables=[pd.DataFrame(rows)])

    def _refined_section(self, runs: dict[str, Run]) -> Section:
        """λ̂ per context position (the data-refined LLC, docs/llc.md) at k = 1 against k ≥ 2 for the M = 2 runs."""
        rows = []
        for n, run in runs.items():
            if run.config.task.M != CONTROL_M or not has_llc(run):
                continue
            llc = run.llc.sort_values("step")
            cols = sorted((c for c in llc.columns if c.startswith("llc_refined_k") and c[13:].isdigit()),
                          key=lambda c: int(c[13:]))
            for _, row in llc.iterrows() if cols else []:
                rest = row[cols[1:]].to_numpy(dtype=float)
                rows.append({"run": n, "step": int(row["step"]), "λ̂ at k = 1": row[cols[0]],
                             "mean λ̂ over k ≥ 2": float(np.mean(rest)), "max λ̂ over k ≥ 2": float(np.max(rest))})
        if not rows:
            return Section("Where the M = 2 model's complexity sits: λ̂ at k = 1 against k ≥ 2", (
                "No data-refined LLC in these runs' llc.parquet (the LLC was not estimated at this scale)."))
        return Section("Where the M = 2 model's complexity sits: λ̂ at k = 1 against k ≥ 2", (
            "Data-refined LLC from the same chains as λ̂: ℓ_k evaluated along them as an observable (k = 1 is column "
            "llc_refined_k0)."), tables=[pd.DataFrame(rows)])

    def intro(self, r: dict[str, Any]) -> str:
        cfg, settings = self.cfg, r["settings"]
        llc = ("no LLC (see 'LLC over training')" if settings is None else
               f"LLC settings (shared by every estimate): {settings.sampler.model_dump()} on n = {settings.n} fixed "
               "in-distribution sequences")
        return (f"Seed preset (the user's 2-layer model, D={cfg.D}, K={cfg.K}) trained on unit-norm tasks with M in "
                f"{cfg.Ms}, seeds {cfg.seeds}, {cfg.steps} steps at batch {cfg.batch_size}, constant lr {cfg.lr}, "
                f"σ² = {cfg.noise_var}; controls on M = {CONTROL_M} ({', '.join(cfg.controls) or 'none'}), seeds "
                f"{cfg.control_seeds}. {llc}.")


STUDY = LowDiversity
