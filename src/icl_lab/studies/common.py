"""Pieces every study shares: the settings every study has (declared once), a check's record and its table, what
"the sampler worked" means, the stage pipeline, the joint trajectory PCA over nested pools, and timing phases."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from icl_lab.baselines import dmmse_predict, ridge_predict
from icl_lab.config import Family, LLCConfig, RunConfig, Schedule, build_run_config, parse_m
from icl_lab.evaluate import predict
from icl_lab.model import build_model, count_parameters
from icl_lab.plots import m_label
from icl_lab.stages import (
    MIN_SEEDS_FOR_INTERVALS,
    add_boundary_intervals,
    chain_boundary_intervals,
    llc_milestones,
    seed_boundary_intervals,
    seed_mean_curve,
    stage_table,
    trusted_mask,
)
from icl_lab.store import Run, write_json
from icl_lab.tasks import root_task_batch, task_pool
from icl_lab.trajectory import FormRule, joint_trajectory_pca

__all__ = [
    "SAMPLER_FAILED",
    "Check",
    "LLCStudyConfig",
    "MsStudyConfig",
    "PhaseTimer",
    "StageResult",
    "StudyConfig",
    "check_ms",
    "CHECK_COLUMNS",
    "check_out",
    "check_table",
    "checkpoint_predictions",
    "fmt_ms",
    "fmt_steps",
    "flag_names",
    "joint_pca",
    "llc_stages",
    "n_parameters",
    "scale_frame",
    "seed_stages",
    "spearman",
    "parse_ms",
    "sampler_worked",
]


# ================================================================================================ settings
def parse_ms(v: Any) -> Any:
    """A list of task diversities from "1,2,inf" or a list (for a pydantic `mode="before"` validator)."""
    if isinstance(v, str):
        v = v.split(",")
    return [parse_m(m) for m in v] if isinstance(v, (list, tuple)) else v


def check_ms(v: list[int | None], min_finite: int, too_few: str) -> list[int | None]:
    """Task diversities: each ≥ 1 or None (∞), distinct, at least `min_finite` finite (else ValueError(too_few));
    sorted with ∞ last."""
    bad = [m for m in v if m is not None and m < 1]
    if bad:
        raise ValueError(f"M must be an integer >= 1 or 'inf', got {bad[0]}")
    if len(set(v)) != len(v):
        raise ValueError(f"task diversities must be distinct, got {v}")
    if sum(m is not None for m in v) < min_finite:
        raise ValueError(too_few)
    return sorted(m for m in v if m is not None) + ([None] if None in v else [])


class StudyConfig(BaseModel):
    """Settings every study has: its scale, where its runs train, and the task, model and training of its runs.

    A study sets SMALL (its defaults, over the ones below), PAPER (the paper's sizes, over SMALL) and QUICK (a
    minutes-long version of SMALL), and adds its own fields.
    """

    model_config = ConfigDict(extra="forbid")
    SMALL: ClassVar[dict[str, Any]] = {}
    PAPER: ClassVar[dict[str, Any]] = {}
    QUICK: ClassVar[dict[str, Any]] = {}
    study: str
    scale: Literal["small", "paper"] = "small"
    quick: bool = False
    device: str = "cpu"
    executor: Literal["local", "ray", "slurm"] = "local"
    workers: int | None = Field(2, ge=1)
    address: str | None = Field(None, description="ray: address of an existing cluster")
    slurm: dict[str, Any] = Field(default_factory=dict, description="slurm: submitit update_parameters options")
    ensemble: int = Field(1, ge=1, description="train up to N stackable runs together (icl_lab.ensemble)")
    wandb: str | None = Field(None, description="Weights & Biases project to mirror training and LLC to")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    family: Family = "gaussian"
    D: int = Field(4, ge=1)
    K: int = Field(8, ge=1)
    noise_var: float = Field(0.125, ge=0)
    preset: str = "hoogland"
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="ModelConfig fields over the preset")
    batch_size: int = Field(32, ge=1)
    steps: int = Field(16_000, ge=1)
    lr: float = Field(3e-3, gt=0)
    schedule: Schedule = "triangle"
    weight_decay: float = Field(0.0, ge=0)
    n_checkpoints_linear: int = Field(11, ge=0)
    n_checkpoints_log: int = Field(10, ge=0)
    eval_size: int = Field(2048, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _small_defaults(cls, data: Any) -> Any:
        return {**cls.SMALL, **data} if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check_scale(self) -> StudyConfig:
        if self.quick and self.scale == "paper":
            raise ValueError("quick is a minutes-long version of the small scale; it cannot be combined with "
                             "scale='paper' (allowed: quick with scale='small')")
        if self.scale == "paper" and not self.PAPER:
            raise ValueError(f"the study {self.study} has no paper scale (allowed: scale 'small')")
        return self

    @classmethod
    def for_scale(cls, scale: str = "small", quick: bool = False, **overrides: Any) -> Any:
        """The settings of `scale` ('small' or 'paper'; `quick` shrinks 'small'), then `overrides`."""
        if quick and scale == "paper":
            raise ValueError("quick: the quick version shrinks the small scale and cannot be combined with scale "
                             "'paper' (allowed: --quick with --scale small)")
        if scale == "paper" and not cls.PAPER:
            raise ValueError(f"the study {cls.model_fields['study'].default} has no paper scale (allowed: scale "
                             "'small')")
        base = {"paper": cls.PAPER}.get(scale, {}) | (cls.QUICK if quick else {})
        return cls(**{**base, **overrides, "scale": scale, "quick": quick})

    def build_run(self, name: str, M: int | None, seed: int, **train: Any) -> RunConfig:
        """The run config `name` of task diversity M and `seed`; `train` overrides training fields (batch_size,
        eval_every). Raises ValueError or pydantic's ValidationError (naming the field) for settings it rejects."""
        return build_run_config(overrides=dict(
            preset=self.preset, **self.model_overrides, family=self.family, D=self.D, K=self.K, M=M,
            noise_var=self.noise_var, seed=seed, steps=self.steps, lr=self.lr, schedule=self.schedule,
            weight_decay=self.weight_decay, n_checkpoints_linear=min(self.n_checkpoints_linear, self.steps + 1),
            n_checkpoints_log=min(self.n_checkpoints_log, self.steps), eval_size=self.eval_size, device=self.device,
            name=name, **{"batch_size": self.batch_size, **train}))

    def run_configs(self) -> dict[str, RunConfig]:
        """Every run of the study by name (validated before anything is written)."""
        raise NotImplementedError


class MsStudyConfig(StudyConfig):
    """A study over task diversities M: at least MIN_FINITE finite ones, and ∞ (None, 'inf') if INFINITE."""

    MIN_FINITE: ClassVar[int] = 1
    TOO_FEW: ClassVar[str] = "at least one finite task diversity is needed"
    INFINITE: ClassVar[bool] = True
    Ms: list[int | None] = Field(default_factory=lambda: [1, 2],
                                 description="task diversities; None (or 'inf') is a fresh task per sequence")

    @field_validator("Ms", mode="before")
    @classmethod
    def _parse_ms(cls, v: Any) -> Any:
        return parse_ms(v)

    @field_validator("Ms")
    @classmethod
    def _check_ms(cls, v: list[int | None]) -> list[int | None]:
        if not cls.INFINITE and None in v:
            raise ValueError("M must be a finite integer >= 1 in this study ('inf' is not allowed)")
        return check_ms(v, cls.MIN_FINITE, cls.TOO_FEW)

    @property
    def finite_Ms(self) -> list[int]:
        return [m for m in self.Ms if m is not None]


class LLCStudyConfig(StudyConfig):
    """A study that estimates the LLC, with one setting shared by every checkpoint and run on n = llc_n fixed
    sequences (`icl_lab.llc_run`): by default the library's validated defaults, checked once
    (`llc_run.settings_check`); a sampler with a fixed γ (localization) is instead calibrated over `step_sizes`."""

    llc: bool = Field(True, description="estimate the LLC (False, e.g. at the quick scale: the report says it was "
                      "skipped)")
    llc_n: int = Field(2048, ge=2, description="n, the fixed LLC dataset")
    sampler: LLCConfig = Field(default_factory=LLCConfig, description="the SGLD settings (LLCConfig's validated "
                               "defaults unless given)")
    step_sizes: list[float] = Field(default_factory=lambda: [1e-4], min_length=1,
                                    description="ε grid of a calibration (only with a fixed localization)")


def check_out(out: str | Path, study: str, configs: Mapping[str, RunConfig]) -> None:
    """Raise ValueError, before anything is written, if OUT is another study's directory or OUT/runs holds a run
    of one of these names with another config (another scale or other settings written to the same --out)."""
    f = Path(out) / "study_config.json"
    if f.exists():
        other = json.loads(f.read_text()).get("study", "low-diversity")
        if other != study:
            raise ValueError(f"{out} holds the study {other!r}, not {study!r}; choose another --out")
    for name, config in configs.items():
        path = Path(out) / "runs" / name
        if (path / "config.json").exists() and Run.load(path).config != config:
            raise ValueError(f"{path} holds a run with a different config (another scale or other settings in the "
                             f"same --out); choose another --out or remove that run")


# ================================================================================================ checks
@dataclass(frozen=True)
class Check:
    """One expectation against a measurement: the rule (`expected`) is fixed before the measurement is made;
    `ok` None means the check could not be made (`measured` says why)."""

    expectation: str
    expected: str
    measured: str
    ok: bool | None
    run: str = ""
    source: str = ""

    @property
    def verdict(self) -> Literal["pass", "fail", "unclear"]:
        return "unclear" if self.ok is None else ("pass" if self.ok else "fail")


CHECK_COLUMNS = ["expectation", "run", "source", "expected", "measured", "verdict"]


def check_table(checks: Sequence[Check]) -> pd.DataFrame:
    """The expectations table of a report, one row per check; every study's table has the same columns."""
    rows = [{"expectation": c.expectation, "run": c.run, "source": c.source, "expected": c.expected,
             "measured": c.measured, "verdict": c.verdict} for c in checks]
    return pd.DataFrame(rows, columns=CHECK_COLUMNS)


# The flags of `icl_lab.llc.diagnose` that say the chains did not sample the tempered posterior: they blew up,
# were still drifting after burn-in, or disagree with each other. The others describe w* ("negative",
# "not_at_minimum", "exceeds_half_d") or the precision of the mean ("few_effective_draws").
SAMPLER_FAILED = frozenset({"diverged", "not_stationary", "chains_disagree"})


def flag_names(flags: Any) -> set[str]:
    """The flag names of an llc.parquet `flags` cell ("a;b"; NaN or None: none)."""
    return set(filter(None, flags.split(";"))) if isinstance(flags, str) else set()


def sampler_worked(flags: Any) -> bool:
    """Whether the SGLD chains of one estimate sampled (no flag of SAMPLER_FAILED)."""
    return not (SAMPLER_FAILED & flag_names(flags))


def scale_frame(cfg: StudyConfig, rows: list[tuple[str, str, str]], paper: str) -> pd.DataFrame:
    """A scale table: (setting, this study, the paper) rows."""
    return pd.DataFrame(rows, columns=["setting", f"this study (scale '{cfg.scale}'{', quick' if cfg.quick else ''})",
                                       paper])


def n_parameters(rc: RunConfig) -> int:
    """The number of parameters of a run's model."""

    return count_parameters(build_model(rc.task, rc.model, 0))


def fmt_ms(Ms: Sequence[Any]) -> str:
    return ", ".join(m_label(m) for m in Ms) if len(Ms) else "none"


def fmt_steps(steps: Sequence[float]) -> str:
    return ", ".join(f"{int(s):,}" for s in steps) if len(steps) else "none"


# ================================================================================================ analysis
@dataclass
class StageResult:
    """The stages of one LLC curve: the table (`icl_lab.stages.stage_table`, with the 95% interval of each stage's
    end boundary: `icl_lab.stages.INTERVAL_COLUMNS`), its milestones, which λ̂ were trusted to place boundaries,
    the boundary intervals (one row per milestone) and the ED form rule of the cross-check."""

    table: pd.DataFrame
    milestones: list
    trusted: np.ndarray
    intervals: pd.DataFrame | None = None
    form_rule: str = "all"


def _ed_steps(ed_events: Any, form_rule: FormRule) -> Any:
    """ED events as steps under `form_rule` (an EssentialDynamics), or as given (steps, None)."""
    return ed_events.event_steps(form_rule) if hasattr(ed_events, "event_steps") else ed_events


def llc_stages(llc: pd.DataFrame, loss: Any, ed_events: Any = None, *, form_rule: FormRule = "all",
               n_boot: int = 2000) -> StageResult:
    """Stage boundaries at critical points of λ̂ against log step, from the trusted estimates only (unflagged,
    λ̂ > 0; the rest is drawn, not used), each with a 95% bootstrap interval over the SGLD chains
    (`icl_lab.stages.chain_boundary_intervals`; nan, saying why, without per-chain values), cross-checked with
    loss plateaus and, if given, ED forms (`form_rule` "all": every PC pair agrees, the paper's; "union": any
    pair, which the report must name; `icl_lab.trajectory.find_forms`).

    llc: rows of llc.parquet with a finite λ̂, sorted by step; loss: (T,) the test loss at the same steps.
    """

    trusted = trusted_mask(llc)
    milestones = llc_milestones(llc)
    table = stage_table(llc["step"].to_numpy(), llc["llc_mean"].to_numpy(), loss, milestones, loss_plateaus="auto",
                        ed_events=_ed_steps(ed_events, form_rule), trusted=trusted)
    intervals = chain_boundary_intervals(llc, milestones, n_boot=n_boot)
    return StageResult(add_boundary_intervals(table, intervals), milestones, trusted, intervals, form_rule)


def seed_stages(llcs: Mapping[str, pd.DataFrame], losses: Mapping[str, pd.Series], ed_events: Any = None, *,
                form_rule: FormRule = "all", n_boot: int = 2000) -> StageResult | None:
    """Stages of the seed-mean λ̂ curve with 95% intervals from resampling the seeds
    (`icl_lab.stages.seed_boundary_intervals`); None with fewer than MIN_SEEDS_FOR_INTERVALS seeds or fewer than 3
    steps trusted in every seed.

    llcs: {run: llc.parquet rows}; losses: {run: test loss indexed by step} (the table's loss is their mean at the
    common steps); ed_events: ED forms (steps, or one run's EssentialDynamics) for the cross-check.
    """
    if len(llcs) < MIN_SEEDS_FOR_INTERVALS:
        return None
    frames = list(llcs.values())
    steps, mean, _ = seed_mean_curve(frames)
    if steps.size < 3:
        return None
    milestones, intervals = seed_boundary_intervals(frames, n_boot=n_boot)
    loss = np.mean([np.asarray(s.reindex(steps), dtype=np.float64) for s in losses.values()], axis=0)
    table = stage_table(steps, mean, loss if np.isfinite(loss).all() else None, milestones,
                        loss_plateaus="auto" if np.isfinite(loss).all() else None,
                        ed_events=_ed_steps(ed_events, form_rule))
    return StageResult(add_boundary_intervals(table, intervals), milestones, np.ones(steps.size, dtype=bool),
                       intervals, form_rule)


def checkpoint_predictions(run: Run, x: Tensor, y: Tensor, steps: list[int] | None = None) -> np.ndarray:
    """Predictions (T, B, K) of the run's checkpoints (all, or `steps`) on one fixed batch."""
    steps = run.checkpoint_steps if steps is None else steps
    return np.stack([predict(run.load_checkpoint(s), x, y).numpy() for s in steps])


def joint_pca(runs: Mapping[int | None, Run], n: int, ridge_label: str, n_components: int = 2,
              sigma: float = 1.0, label: Callable[[Any], str] = m_label) -> Any:
    """Carroll et al. §4.2: one PCA over the checkpoints of runs with nested pools (one seed; {M: run}), all
    predicting on n sequences of the shared root task; dMMSE_M of every finite M and ridge (λ = σ²; least squares
    at σ² = 0) are projected as points, not fitted. Runs are named 'M=<label(M)>'."""

    first = next(iter(runs.values()))
    task, seed = first.config.task, first.config.seed
    finite = [M for M in runs if M is not None]
    pool = task_pool(task.family, max(finite), task.D, seed)
    batch = root_task_batch(task, pool, n, seed)
    preds = {f"M={label(M)}": checkpoint_predictions(run, batch.x, batch.y) for M, run in runs.items()}
    refs = {f"dMMSE_{label(M)}": dmmse_predict(batch.x, batch.y, pool[:M], task.noise_var).numpy() for M in finite}
    refs[ridge_label] = ridge_predict(batch.x, batch.y, task.noise_var).numpy()
    steps = {f"M={label(M)}": np.array(run.checkpoint_steps) for M, run in runs.items()}
    return joint_trajectory_pca(preds, refs, n_components=n_components, steps_by_run=steps, sigma=sigma)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks (nan with fewer than 2 points or a constant input)."""
    if len(a) < 2:
        return math.nan
    ra, rb = pd.Series(list(a)).rank(), pd.Series(list(b)).rank()
    return float(ra.corr(rb)) if ra.nunique() > 1 and rb.nunique() > 1 else math.nan


# ================================================================================================ timing
class PhaseTimer:
    """Wall time per phase: `with timer("train"): ...`; `timer.seconds` keeps them in order.

    `save(out)` writes OUT/timings.json (this invocation) and appends it to OUT/timings_history.json, so the times of
    the invocation that did the work survive a later one that reuses everything (`icl-lab report`, a re-run).
    """

    HISTORY = "timings_history.json"

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def save(self, out: Path) -> None:
        history = self.history(out)
        history.append({"finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                        "seconds": self.seconds})
        write_json(out / "timings.json", self.seconds)
        write_json(out / self.HISTORY, history)

    @classmethod
    def history(cls, out: Path) -> list[dict[str, Any]]:
        f = out / cls.HISTORY
        return json.loads(f.read_text()) if f.exists() else []

    def table(self, out: Path, earlier: int = 3) -> pd.DataFrame:
        """Seconds per phase (rows): this invocation, then up to `earlier` previous ones (columns named by the time
        they finished), newest first; a phase an invocation did not run is blank."""
        columns = {"this invocation": self.seconds}
        for past in reversed(self.history(out)[-earlier:]):
            columns[past["finished_utc"].replace("T", " ")[:16] + " UTC"] = past["seconds"]
        table = pd.DataFrame(columns).round(1)
        return table.rename_axis("phase").reset_index()
