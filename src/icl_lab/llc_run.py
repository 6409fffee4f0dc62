"""LLC over a run's checkpoints: the I/O layer around `llc.estimate_llc` and `llc.calibrate`.

Every checkpoint of a run is estimated with identical settings and data (docs/papers.md §F3): one fixed dataset of
n sequences drawn from its own generator (`llc/<source>`), the run's calibrated SGLD settings from
`RUN/llc_settings.json`, and the same SGLD seed at every checkpoint (common random numbers, as the Timaeus
sweeps do), so differences between checkpoints are not sampler noise. Results go to `RUN/llc.parquet`, one
row per step and settings (column settings_hash): a curve at a second setting is kept next to the first, never
over it, and `Run.llc` reads the curve at the settings used last. Finished steps are skipped when re-run.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from icl_lab.config import LLCConfig
from icl_lab.ground_truth import SUITE, validate
from icl_lab.llc import (
    Calibration,
    Observable,
    calibrate,
    combine_observables,
    default_nbeta,
    estimate_llc,
    vectorizes,
)
from icl_lab.progress import Bar
from icl_lab.seeding import derive_seed, make_generator
from icl_lab.store import Run, file_lock, settings_digest, write_json, write_parquet
from icl_lab.tasks import root_task_batch, sample_batch, task_pool
from icl_lab.threads import torch_threads
from icl_lab.tracking import llc_values, open_tracker

__all__ = [
    "add_llc_rows",
    "DataSource",
    "LLCPlan",
    "LLCSettings",
    "SharedSettings",
    "calibrate_run",
    "calibrate_shared",
    "estimate_run",
    "estimate_runs",
    "estimate_step",
    "finite_llc",
    "fresh_observable",
    "llc_data",
    "load_settings",
    "load_shared",
    "missing_steps",
    "mse_loss",
    "position_observable",
    "position_task_observable",
    "refine_observable",
    "refined_table",
    "save_settings",
    "settings_check",
    "settings_path",
    "settings_report",
    "task_observable",
    "PAPER_SAMPLER",
]

DataSource = Literal["id", "ood", "root"]
Refinement = Literal["position", "task", "fresh"]
FigureFn = Callable[[Calibration, Path], object]  # draws a calibration's figure at a path (icl_lab.plots)


class LLCSettings(BaseModel):
    """What an LLC curve depends on besides the checkpoint: sampler config, data, seed."""

    model_config = ConfigDict(extra="forbid")
    sampler: LLCConfig = Field(default_factory=LLCConfig)
    n: int = Field(4096, ge=2, description="fixed dataset size (the n of nβ = n / log n)")
    data: DataSource = "id"
    seed: int = 0
    calibrated: bool = False
    refine: list[Refinement] = Field(
        default_factory=list, description="data-refined λ̂ from the same chains: 'position' (each context position "
        "k), 'task' (each pool task; data 'id' with finite M), 'fresh' (a fixed batch of fresh tasks)")

    @model_validator(mode="after")
    def _refine_is_possible(self) -> LLCSettings:
        if len(set(self.refine)) != len(self.refine):
            raise ValueError(f"refine lists a refinement twice: {self.refine}; allowed: position, task, fresh")
        if "task" in self.refine and self.data != "id":
            raise ValueError(f"refine 'task' needs data 'id' (sequences from the pool), got data '{self.data}'")
        return self

    def to_json(self) -> dict:
        """The settings as JSON; `refine` only when requested, so unrefined curves keep their key."""
        out = json.loads(self.model_dump_json())
        if not out["refine"]:
            del out["refine"]
        return out

    def digest(self) -> str:
        return settings_digest(self.to_json())


def mse_loss(forward, batch: tuple[Tensor, ...]) -> Tensor:
    """The training loss as an LLC loss_fn: mean squared error of forward(x, y) against y (batch = (x, y, ...))."""
    x, y = batch[0], batch[1]
    return (forward(x, y) - y).square().mean()


def position_observable(K: int) -> Observable:
    """ℓ_k for each context position k (names k0 … k{K−1}): the mean over sequences of (ŷ_k − y_k)², whose mean
    over k is the training loss (Hoogland et al.'s per-token LLC, docs/papers.md §D2)."""
    def fn(forward, batch: tuple[Tensor, ...]) -> Tensor:
        x, y = batch[0], batch[1]
        return (forward(x, y) - y).square().mean(dim=0)  # (K,)
    return Observable(tuple(f"k{k}" for k in range(K)), fn)


def task_observable(M: int) -> Observable:
    """ℓ on the sequences of each pool task (names task0 … task{M−1}); batch = (x, y, task_index) with
    task_index: (B,) the pool index of each sequence. nan for a task with no sequence in the batch."""
    def fn(forward, batch: tuple[Tensor, ...]) -> Tensor:
        x, y, idx = batch
        return _task_means((forward(x, y) - y).square().mean(dim=-1), idx, M)
    return Observable(tuple(f"task{j}" for j in range(M)), fn)


def _task_means(per_seq: Tensor, idx: Tensor, M: int) -> Tensor:
    """per_seq: (B,) a loss per sequence, idx: (B,) its pool task -> (M,) the mean per task (0/0 = nan for a task
    with no sequence in the batch). vmap-able: no data-dependent shapes."""
    onehot = (idx[:, None] == torch.arange(M, device=idx.device)).to(per_seq.dtype)  # (B, M)
    return (onehot * per_seq[:, None]).sum(0) / onehot.sum(0)


def position_task_observable(K: int, M: int) -> Observable:
    """`position_observable(K)` and `task_observable(M)` from one forward pass (names k0 … task0 …)."""
    def fn(forward, batch: tuple[Tensor, ...]) -> Tensor:
        x, y, idx = batch
        err = (forward(x, y) - y).square()  # (B, K)
        return torch.cat([err.mean(dim=0), _task_means(err.mean(dim=-1), idx, M)])
    return Observable(tuple(f"k{k}" for k in range(K)) + tuple(f"task{j}" for j in range(M)), fn)


def fresh_observable(x: Tensor, y: Tensor) -> Observable:
    """ℓ on a fixed batch of fresh-task sequences x: (B, K, D), y: (B, K), whatever the chain's minibatch (name
    'fresh'): how the complexity the chains see bears on tasks outside the pool."""
    def fn(forward, batch: tuple[Tensor, ...]) -> Tensor:
        return (forward(x, y) - y).square().mean().reshape(1)
    return Observable(("fresh",), fn)


def refine_observable(run: Run, settings: LLCSettings, device: str | torch.device = "cpu") -> Observable | None:
    """The observables of `settings.refine` for `run` (None when none is requested). The fresh-task batch has as
    many sequences as the SGLD minibatch (all n without one), from its own generator (llc/fresh)."""
    task, parts = run.config.task, []
    if "task" in settings.refine and task.M is None:
        raise ValueError(f"refine 'task' needs a finite task pool; {run.path} has M = ∞")
    if {"position", "task"} <= set(settings.refine):
        parts.append(position_task_observable(task.K, task.M))  # one forward pass for both
    for kind in settings.refine:
        if kind == "position" and "task" not in settings.refine:
            parts.append(position_observable(task.K))
        elif kind == "task" and "position" not in settings.refine:
            parts.append(task_observable(task.M))
        elif kind == "fresh":
            m = settings.sampler.batch_size or settings.n
            fresh = sample_batch(task, None, m, make_generator(run.config.seed, "llc/fresh"))
            parts.append(fresh_observable(fresh.x.to(device), fresh.y.to(device)))
    return combine_observables(*parts) if parts else None


def refined_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Long table of the data-refined λ̂ in llc.parquet rows: step, name, llc, lo, hi, mcse (one row per step and
    component; empty when the rows carry none)."""
    names = [c.removeprefix("llc_refined_") for c in rows.columns
             if c.startswith("llc_refined_") and not c.endswith(("_lo", "_hi", "_mcse"))]
    out = [{"step": int(r["step"]), "name": k, "llc": r[f"llc_refined_{k}"], "lo": r[f"llc_refined_{k}_lo"],
            "hi": r[f"llc_refined_{k}_hi"], "mcse": r[f"llc_refined_{k}_mcse"]}
           for r in rows.to_dict("records") for k in names if f"llc_refined_{k}" in r]
    return pd.DataFrame(out, columns=["step", "name", "llc", "lo", "hi", "mcse"])


def llc_data(run: Run, n: int, source: DataSource = "id", with_tasks: bool = False) -> tuple[Tensor, ...]:
    """The fixed LLC dataset of a run: n sequences from the pool ('id'), fresh tasks ('ood') or the root task;
    (x, y), or (x, y, task_index) with `with_tasks` (pool sequences only: the same x and y)."""
    task, seed = run.config.task, run.config.seed
    pool = task_pool(task.family, task.M or 1, task.D, seed)
    if source == "root":
        batch = root_task_batch(task, pool, n, seed)
    else:
        batch = sample_batch(task, pool if (source == "id" and task.M is not None) else None, n,
                             make_generator(seed, f"llc/{source}"))
    if not with_tasks:
        return batch.x, batch.y
    if batch.task_index is None:
        raise ValueError(f"per-task data needs sequences from a finite pool; {run.path} ({source}) has none")
    return batch.x, batch.y, batch.task_index


def settings_path(run: Run) -> Path:
    return run.path / "llc_settings.json"


def load_settings(run: Run) -> LLCSettings | None:
    f = settings_path(run)
    return LLCSettings.model_validate_json(f.read_text()) if f.exists() else None


def save_settings(run: Run, settings: LLCSettings) -> None:
    write_json(settings_path(run), settings.to_json())


@contextmanager
def _sampling_threads(model: nn.Module, sampler: LLCConfig, device: str, shared_cores: bool) -> Iterator[None]:
    """torch threads while sampling on CPU: one where estimates run in parallel processes (shared_cores) or the
    chains are vmapped (these models are so small that a second intra-op thread only synchronises, and next to a
    busy core it spins); otherwise the caller's, over which
    estimate_llc runs the chains concurrently with one intra-op thread each (icl_lab.threads)."""
    n_sampled = sum(p.numel() for p in model.parameters() if p.requires_grad)
    one = torch.device(device).type == "cpu" and (shared_cores or vectorizes(sampler, n_sampled, device))
    with torch_threads(1 if one else torch.get_num_threads()):
        yield


def finite_llc(run: Run) -> pd.DataFrame:
    """The run's llc.parquet rows with a finite estimate, by step (diverged checkpoints are reported, not used
    as values)."""
    llc = run.llc
    if llc is None or llc.empty:
        raise ValueError(f"{run.path} has no LLC estimates; run `icl-lab llc {run.path}` first")
    llc = llc.sort_values("step")
    return llc[llc["llc_mean"].map(math.isfinite)]


def calibrate_run(run: Run, step: int | None = None, settings: LLCSettings | None = None, device: str = "cpu",
                  figure: FigureFn | None = None, **grid) -> tuple:
    """Sweep ε (and γ, nβ) at one checkpoint (default: the last) on `device`, pick the settings, save them with
    the run.

    Returns (calibration, chosen LLCSettings); also writes RUN/llc_calibration.parquet, and calls
    figure(calibration, RUN/figures/llc_calibration) when given (the face passes `plots.plot_calibration`).
    """
    settings = settings or load_settings(run) or LLCSettings(seed=run.config.seed)
    step = run.checkpoint_steps[-1] if step is None else step
    model = run.load_checkpoint(step, device)
    data = llc_data(run, settings.n, settings.data)
    with _sampling_threads(model, settings.sampler, device, shared_cores=False):
        cal = calibrate(model, data, mse_loss, base=settings.sampler, seed=_sgld_seed(settings), **grid)
    write_parquet(run.path / "llc_calibration.parquet", cal.table.assign(step=step))
    if figure is not None:
        figure(cal, run.path / "figures" / "llc_calibration")
    if cal.chosen is None:
        raise ValueError(f"LLC calibration of {run.path} at step {step} found no stable step size ({cal.reason}); "
                         f"see {run.path / 'figures' / 'llc_calibration.png'} and widen the grid")
    chosen = settings.model_copy(update={"sampler": cal.chosen, "calibrated": True})
    save_settings(run, chosen)
    return cal, chosen


def _sgld_seed(settings: LLCSettings) -> int:
    return derive_seed(settings.seed, "sgld") % (2**31)


def estimate_step(run_path: str | Path, step: int, settings_json: str, device: str = "cpu",
                  shared_cores: bool = False) -> dict:
    """One checkpoint's LLC as a parquet row (a top-level function so worker processes can run it; they pass
    shared_cores=True). The device is where it runs, not part of the settings (recorded in the row: CPU and GPU
    agree only to float tolerance)."""
    run = Run.load(run_path)
    settings = LLCSettings.model_validate_json(settings_json)
    model = run.load_checkpoint(step, device)
    data = llc_data(run, settings.n, settings.data, with_tasks="task" in settings.refine)
    observables = refine_observable(run, settings, device)
    with _sampling_threads(model, settings.sampler, device, shared_cores):
        result = estimate_llc(model, data, mse_loss, config=settings.sampler, seed=_sgld_seed(settings),
                              observables=observables)
    return {"step": step, **result.to_row(), "settings_hash": settings.digest(), "device": str(device)}


def estimate_run(run: Run, steps: Iterable[int] | None = None, settings: LLCSettings | None = None,
                 workers: int = 1, progress: bool = True, device: str = "cpu", wandb: str | None = None
                 ) -> pd.DataFrame:
    """Estimate the LLC at every checkpoint of `run` (or `steps`), skipping steps already done with the same
    settings; writes RUN/llc.parquet after every finished step, so an interrupted job resumes where it stopped.
    settings default to the run's saved (calibrated) ones."""
    settings = settings or load_settings(run)
    if settings is None:
        raise ValueError(f"{run.path} has no LLC settings; run `icl-lab llc calibrate {run.path}` first")
    estimate_runs([run], settings, steps={run.path: steps} if steps is not None else None, workers=workers,
                  progress=progress, device=device, wandb=wandb)
    return run.llc


def _key(row: dict) -> tuple[str, int]:
    return str(row.get("settings_hash")), int(row["step"])


def _done(run: Run, digest: str) -> set[int]:
    """Steps of `run` with an estimate at the settings `digest`, as llc.parquet holds them now."""
    old = run.llc_all
    return set() if old is None else {s for h, s in map(_key, old.to_dict("records")) if h == digest}


def add_llc_rows(run: Run, new: list[dict]) -> None:
    """Merge rows into RUN/llc.parquet under the run's lock, re-reading the file first: rows that other processes
    wrote since are kept, and a (settings, step) already there is not written twice."""
    with file_lock(run.path / ".llc.lock", blocking=True):
        old = run.llc_all
        rows = [] if old is None else old.to_dict("records")  # every setting's rows are kept
        have = {_key(r) for r in rows}
        rows += [r for r in new if _key(r) not in have]
        write_parquet(run.path / "llc.parquet", pd.DataFrame(sorted(rows, key=_key)))


def _claim_path(run: Run, digest: str, step: int) -> Path:
    return run.path / ".llc-claims" / f"{digest}-{step:08d}.lock"


def estimate_runs(runs: list[Run], settings: LLCSettings, steps: dict[Path, Iterable[int]] | None = None,
                  workers: int = 1, progress: bool = True, device: str = "cpu", wandb: str | None = None) -> None:
    """`estimate_run` for several runs with one settings object; all (run, step) jobs share one process pool.

    Safe to run as several processes at once on the same runs (a SLURM array over checkpoints, say): each
    (run, step) is claimed with a lock before it is estimated, so a step is estimated once; a process that finds
    a step claimed by another waits for it at the end, and estimates it itself if the other died without
    writing it. Rows are merged into llc.parquet under a lock (`add_llc_rows`), so none is lost or duplicated.
    wandb: a Weights & Biases project to mirror each new estimate (λ̂, its errors, R̂, ESS, flags) to, one wandb
        run per icl-lab run (icl_lab.tracking). None: wandb is not imported.
    """
    payload, digest = settings.model_dump_json(), settings.digest()
    wanted: list[tuple[Run, int]] = []
    for run in runs:
        save_settings(run, settings)
        chosen = sorted(set(run.checkpoint_steps if steps is None or run.path not in steps else steps[run.path]))
        missing = set(chosen) - set(run.checkpoint_steps)
        if missing:
            raise ValueError(f"no checkpoints at steps {sorted(missing)} in {run.path}")
        wanted += [(run, s) for s in missing_steps(run, settings, chosen)]

    with contextlib.ExitStack() as claims, Bar(progress, len(wanted), "LLC checkpoints") as bar:
        with_jobs = {run.path: run for run, _ in wanted}.values()
        trackers = {run.path: claims.enter_context(open_tracker(
            wandb, run.path, name=run.path.name, job_type="llc", config=json.loads(payload))) for run in with_jobs}

        held: dict[tuple[Path, int], contextlib.ExitStack] = {}  # my claims, each released once its row is written

        def add(run: Run, row: dict) -> None:
            add_llc_rows(run, [row])
            trackers[run.path].log(int(row["step"]), llc_values(row))
            bar.advance()
            claim = held.pop((run.path, int(row["step"])), None)
            if claim is not None:
                claim.close()

        mine: list[tuple[Run, int]] = []
        theirs: list[tuple[Run, int]] = []
        for run, step in wanted:
            claim = claims.enter_context(contextlib.ExitStack())
            if claim.enter_context(file_lock(_claim_path(run, digest, step))):
                held[(run.path, step)] = claim
                mine.append((run, step))
            else:
                claim.close()
                theirs.append((run, step))
        # A claim is held only while its step is estimated: two processes that each wait for the other's steps at
        # the end would otherwise each hold what the other waits for.
        _estimate_jobs(mine, payload, workers, device, add)
        for run, step in theirs:  # another process holds the claim: wait for it, then check its row is there
            with file_lock(_claim_path(run, digest, step), blocking=True):
                if step not in _done(run, digest):
                    _estimate_jobs([(run, step)], payload, 1, device, add)
                else:
                    bar.advance()


def _estimate_jobs(jobs: list[tuple[Run, int]], payload: str, workers: int, device: str,
                   add: Callable[[Run, dict], None]) -> None:
    """Estimate each (run, step) and hand its row to add(run, row) as soon as it is done."""
    if workers <= 1 or len(jobs) <= 1:
        for run, step in jobs:
            add(run, estimate_step(run.path, step, payload, device))
        return
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(estimate_step, run.path, step, payload, device, True): run for run, step in jobs}
        for fut in as_completed(futures):
            add(futures[fut], fut.result())


# ================================================================================================ a study's LLC plan
# Hoogland et al.'s SGLD (docs/papers.md §D2; their L2H4 sweep): ε = 3e-4, nβ = 200/3, γ = 20/3 (γ/nβ = 0.1), with
# icl-lab's chains, draws and burn-in of benchmarks/llc_published.py. The values the papers print are at these.
PAPER_SAMPLER = LLCConfig(step_size=3e-4, nbeta=200 / 3, localization=20 / 3, num_chains=4, num_draws=1000,
                          num_burnin=500, batch_size=256)
PLATEAU_RATIOS = (0.005, 0.01, 0.02)  # γ/nβ halved and doubled around the validated 0.01 (docs/llc.md)
PLATEAU_TOLERANCE = 0.1  # λ̂ at the halved and doubled γ within 10% of λ̂ at 0.01: on a plateau (llc.pick's rel_tol)
GROUND_TRUTH_CASE = "dln2_r0"  # a singular deep linear network with a known λ (ground_truth.SUITE)


@dataclass(frozen=True)
class LLCPlan:
    """The LLCs a study needs: each run's checkpoints in `steps_by_run` ({run name: steps}; a run not named gets no
    estimate), or each run's last one (`final_only`), or every checkpoint of every run (neither).

    With validated settings (base.sampler.localization None: the library's defaults, γ = 0.01·nβ), nothing is
    calibrated; with `check_settings`, the settings are checked once at `calibrate_step` (None: the last
    checkpoint) of the run `calibrate`: λ̂ at γ/nβ halved and doubled (the γ-plateau), λ̂ at the papers' settings
    (PAPER_SAMPLER), and a deep linear network with a known λ at the same settings (the ground-truth line).
    Otherwise (a fixed γ) one calibration over `step_sizes` at that checkpoint chooses ε for every estimate."""

    base: LLCSettings
    step_sizes: list[float]
    calibrate: str
    calibrate_step: int | None = None
    final_only: bool = False
    check_settings: bool = True
    steps_by_run: dict[str, list[int]] | None = None
    paper_sampler: LLCConfig = field(default_factory=lambda: PAPER_SAMPLER)

    @property
    def validated(self) -> bool:
        return self.base.sampler.localization is None

    def steps(self, runs: dict[str, Run]) -> dict[Path, list[int]] | None:
        if self.final_only:
            return {r.path: [r.checkpoint_steps[-1]] for r in runs.values()}
        if self.steps_by_run is not None:
            return {r.path: list(self.steps_by_run.get(name, [])) for name, r in runs.items()}
        return None


@dataclass(frozen=True)
class SharedSettings:
    """The outcome of a study's calibration or settings check: the settings (None: no stable step size, `reason`
    says why), where they were calibrated or checked, and the check's results (`settings_check`; None when
    calibrated)."""

    settings: LLCSettings | None
    reason: str
    run: str
    step: int
    check: dict | None = None


CALIBRATION_FILE = "llc_settings.json"  # in the study directory: {"inputs", "settings", "reason"}


def _calibration_inputs(plan: LLCPlan, runs: dict[str, Run]) -> dict:
    run = runs[plan.calibrate]
    step = run.checkpoint_steps[-1] if plan.calibrate_step is None else plan.calibrate_step
    if plan.validated:
        return {"run": plan.calibrate, "step": step, "base": plan.base.to_json(), "validated": True,
                "check": plan.check_settings, "plateau": list(PLATEAU_RATIOS),
                "paper": json.loads(plan.paper_sampler.model_dump_json()), "ground_truth": GROUND_TRUTH_CASE}
    return {"run": plan.calibrate, "step": step, "base": plan.base.to_json(),
            "step_sizes": list(plan.step_sizes), "burnin": "max(num_burnin, min_burnin(step_size, localization))"}


def load_shared(out: Path, plan: LLCPlan, runs: dict[str, Run]) -> SharedSettings | None:
    """The study's saved calibration, if it was made from the same inputs (run, step, base settings, ε grid and
    burn-in rule); else None."""
    f, inputs = Path(out) / CALIBRATION_FILE, _calibration_inputs(plan, runs)
    saved = json.loads(f.read_text()) if f.exists() else {}
    if saved.get("inputs") != inputs:
        return None
    settings = None if saved["settings"] is None else LLCSettings.model_validate(saved["settings"])
    return SharedSettings(settings, saved["reason"], inputs["run"], inputs["step"], saved.get("check"))


def calibrate_shared(out: Path, plan: LLCPlan, runs: dict[str, Run], device: str = "cpu",
                     figure: FigureFn | None = None) -> SharedSettings:
    """Calibrate once for the whole study, under OUT/.llc_settings.lock: a second process on the same study waits
    for the first and then reuses its calibration."""
    with file_lock(Path(out) / ".llc_settings.lock", blocking=True):
        return _calibrate_shared(out, plan, runs, device, figure)


def _calibrate_shared(out: Path, plan: LLCPlan, runs: dict[str, Run], device: str,
                      figure: FigureFn | None) -> SharedSettings:
    """Calibrate once for the whole study (`calibrate_run`), or reuse OUT/llc_settings.json when its inputs are the
    same. A calibration that finds no stable step size is recorded, not raised: settings is then None."""
    shared = load_shared(out, plan, runs)
    if shared is not None:
        return shared
    inputs = _calibration_inputs(plan, runs)
    if plan.validated:
        check = settings_check(runs[plan.calibrate], inputs["step"], plan.base, device, plan.paper_sampler) \
            if plan.check_settings else None
        reason = "the library's validated defaults (docs/llc.md), not calibrated"
        write_json(Path(out) / CALIBRATION_FILE, {"inputs": inputs, "settings": plan.base.to_json(),
                                                  "reason": reason, "check": check})
        return SharedSettings(plan.base, reason, inputs["run"], inputs["step"], check)
    try:
        cal, chosen = calibrate_run(runs[plan.calibrate], step=inputs["step"], settings=plan.base,
                                    step_sizes=plan.step_sizes, localizations=[plan.base.sampler.localization],
                                    device=device, figure=figure)
        reason = cal.reason
    except ValueError as e:
        chosen, reason = None, str(e)
    write_json(Path(out) / CALIBRATION_FILE, {"inputs": inputs, "settings": None if chosen is None else
                                              chosen.to_json(), "reason": reason})
    return SharedSettings(chosen, reason, inputs["run"], inputs["step"])


def missing_steps(run: Run, settings: LLCSettings, steps: Iterable[int] | None = None) -> list[int]:
    """The checkpoints (all, or `steps`) of `run` with no LLC estimate at `settings`."""
    done = _done(run, settings.digest())
    return [s for s in (run.checkpoint_steps if steps is None else steps) if s not in done]


# ================================================================================================ the settings check
def settings_check(run: Run, step: int, settings: LLCSettings, device: str = "cpu",
                   paper_sampler: LLCConfig = PAPER_SAMPLER) -> dict:
    """Check validated settings at one checkpoint (docs/llc.md, "Defaults, and what they are validated on"):

    - plateau: λ̂ at γ/nβ in PLATEAU_RATIOS (the estimate at the settings' own γ is also the curve's row, added to
      llc.parquet so it is not estimated twice); on the plateau when the halved and doubled γ read within
      PLATEAU_TOLERANCE of it;
    - paper: λ̂ at paper_sampler (PAPER_SAMPLER: the settings the published values were made at, so comparable
      with them);
    - ground_truth: `ground_truth.validate` of GROUND_TRUTH_CASE at the same sampler settings and n.
    Returns a JSON-able dict with those three entries."""
    nbeta = default_nbeta(settings.n) if settings.sampler.nbeta is None else settings.sampler.nbeta
    rows = []
    for ratio in PLATEAU_RATIOS:
        if ratio == PLATEAU_RATIOS[1]:  # the settings themselves: the curve's own estimate at this step
            row = estimate_step(run.path, step, settings.model_dump_json(), device)
            add_llc_rows(run, [row])
        else:
            trial = settings.model_copy(update={"refine": [], "sampler": settings.sampler.model_copy(
                update={"localization": ratio * nbeta})})
            row = estimate_step(run.path, step, trial.model_dump_json(), device)
        rows.append({"gamma_over_nbeta": ratio, "localization": ratio * nbeta, **_summary(row)})
    mid = rows[1]["llc_mean"]
    on_plateau = all(abs(r["llc_mean"] - mid) <= PLATEAU_TOLERANCE * abs(mid) for r in rows)
    paper = settings.model_copy(update={"sampler": paper_sampler, "refine": []})
    paper_row = _summary(estimate_step(run.path, step, paper.model_dump_json(), device))
    case = SUITE[GROUND_TRUTH_CASE]
    gt = validate(case, n=settings.n, config=settings.sampler.model_copy(update={"tilted": False}))
    return {"run": run.path.name, "step": step, "nbeta": nbeta, "plateau": rows, "on_plateau": on_plateau,
            "plateau_tolerance": PLATEAU_TOLERANCE, "paper": paper_row,
            "paper_settings": json.loads(paper_sampler.model_dump_json()),
            "ground_truth": {"case": case.name, "widths": list(case.widths), "rank": case.rank, "d": case.d,
                             "llc_theory": gt.llc_theory, "llc_mean": gt.llc_mean, "llc_se": gt.llc_se,
                             "rel_error": gt.rel_error, "flags": gt.flags, "seconds": gt.estimate_seconds}}


def _summary(row: dict) -> dict:
    keys = ("llc_mean", "llc_lo", "llc_hi", "llc_mcse", "rhat", "ess", "flags", "step_size", "nbeta", "num_burnin",
            "num_draws", "num_chains", "batch_size", "seconds")
    return {k: row.get(k) for k in keys}


def settings_report(shared: SharedSettings) -> tuple[str, list[pd.DataFrame]]:
    """The report's account of the LLC settings: a paragraph and tables (the γ-plateau, the papers' settings, the
    ground-truth line). Data only; the study runner turns it into a report section."""
    sampler = shared.settings.sampler if shared.settings is not None else None
    if sampler is None:
        return f"No LLC settings: {shared.reason}.", []
    gamma = "0.01·nβ" if sampler.localization is None else f"{sampler.localization:g}"
    burnin = "min_burnin(ε, γ) ≈ 3/(εγ)" if sampler.num_burnin is None else f"{sampler.num_burnin}"
    what = (f"ε = {sampler.step_size:g}, γ = {gamma}, burn-in {burnin}, "
            f"{sampler.num_chains} chains × {sampler.num_draws} draws, minibatch {sampler.batch_size} of n = "
            f"{shared.settings.n:,} fixed sequences, sampler {sampler.sampler}")
    text = f"Every λ̂ in this report: {what} ({shared.reason}). Intervals are 95% t intervals over the chains."
    check = shared.check
    if not check:
        return text + " The settings were not checked at this scale (no γ-plateau or ground-truth line).", []
    plateau = pd.DataFrame(check["plateau"])
    gt = check["ground_truth"]
    paper, ps = check["paper"], check["paper_settings"]
    text += (f" Checked at step {check['step']:,} of {check['run']} (nβ = {check['nbeta']:.4g}). γ-plateau: λ̂ at "
             f"γ/nβ = " + ", ".join(f"{r['gamma_over_nbeta']:g}: {r['llc_mean']:.4g}" for r in check["plateau"])
             + f" — {'on' if check['on_plateau'] else 'NOT on'} a plateau (halved and doubled γ within "
             f"{check['plateau_tolerance']:.0%}). At the papers' settings (Hoogland et al.'s SGLD: ε = "
             f"{ps['step_size']:g}, nβ = {ps['nbeta']:.3g}, γ = {ps['localization']:.3g}), the same checkpoint reads "
             f"λ̂ = {paper['llc_mean']:.4g} [95%: {paper['llc_lo']:.4g}, {paper['llc_hi']:.4g}] against "
             f"{check['plateau'][1]['llc_mean']:.4g} at these settings: published values compare with the first "
             f"number, this report's with the second. Ground truth at these settings: the deep linear network "
             f"{gt['case']} "
             f"(widths {tuple(gt['widths'])}, rank {gt['rank']}, d = {gt['d']}) has λ = {gt['llc_theory']:.4g} and "
             f"reads λ̂ = {gt['llc_mean']:.4g} ± {gt['llc_se']:.2g} ({gt['rel_error']:+.1%}).")
    table = pd.concat([plateau.assign(settings=[f"validated, γ/nβ = {r:g}" for r in plateau["gamma_over_nbeta"]]),
                       pd.DataFrame([paper | {"settings": "papers' (Hoogland et al.)"}])], ignore_index=True)
    cols = ["settings", "llc_mean", "llc_lo", "llc_hi", "llc_mcse", "rhat", "ess", "flags", "step_size", "nbeta",
            "num_burnin", "seconds"]
    truth = pd.DataFrame([{k: gt[k] for k in ("case", "d", "rank", "llc_theory", "llc_mean", "llc_se", "rel_error",
                                              "flags", "seconds")}])
    return text, [table[[c for c in cols if c in table]], truth]
