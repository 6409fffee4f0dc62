"""Experiment tracking: mirror what a command records to Weights & Biases, when asked.

icl-lab's own files (config.json, metrics.parquet, llc.parquet, the figures) are the record. A `Tracker` only
mirrors them, so that a user who tracks every run in wandb (as the user's own pipeline did) sees icl-lab's runs
there too. `open_tracker(None, ...)` returns the null tracker, and wandb is then never imported.

What goes where, in one wandb run per command and icl-lab run (group = the run's name, job_type = the command):
- "config": the run's config (and the sampler's settings for `llc`);
- "train/loss" at every update, "eval/<set>_<metric>" (mean and per-token `_k<k>`, ID and OOD, Δ to dMMSE and
  ridge) at every evaluation, "llc/<field>" for every LLC estimate (λ̂, its errors and R̂/ESS, the flags);
- figures as images under "figures/<name>".
Every record carries its own x-axis, "step" (the training step, or the checkpoint step of an LLC estimate), so the
records of commands that run in any order line up. wandb writes its files under the run directory it is given;
the mode (online or offline) is wandb's own: set WANDB_MODE=offline to keep everything local.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Tracker", "WandbTracker", "open_tracker", "llc_values", "evaluation_values"]


class Tracker:
    """The null tracker: records nothing. Subclasses mirror records somewhere."""

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Record `values` (name -> number or text) at `step`."""

    def log_figure(self, name: str, path: str | Path) -> None:
        """Record the image file at `path` as figure `name`."""

    def finish(self) -> None:
        """Close the record (idempotent)."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


class WandbTracker(Tracker):
    """A wandb run under `run_dir` (its files go to run_dir/wandb)."""

    _live = 0  # open wandb runs in this process

    def __init__(self, project: str, run_dir: str | Path, *, name: str, job_type: str, config: Mapping[str, Any]):
        import wandb  # deferred: the optional `wandb` extra, imported only when a project is given

        self._wandb = wandb
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, dir=str(run_dir), name=f"{name}:{job_type}", group=name,
                              job_type=job_type, config=dict(config), reinit="create_new")
        WandbTracker._live += 1
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self._open = True

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        self.run.log({"step": int(step), **values})

    def log_figure(self, name: str, path: str | Path) -> None:
        if Path(path).suffix.lower() in (".png", ".jpg", ".jpeg"):
            self.run.log({f"figures/{name}": self._wandb.Image(str(path))})

    def finish(self) -> None:
        if self._open:
            self._open = False
            self.run.finish()
            WandbTracker._live -= 1
            if WandbTracker._live == 0:  # finish() returns before wandb's writer has flushed the run's file;
                self._wandb.teardown()  # teardown waits for it (and is only safe once no run is open)


def open_tracker(project: str | None, run_dir: str | Path, *, name: str, job_type: str,
                 config: Mapping[str, Any] | None = None) -> Tracker:
    """A wandb tracker for `project`, or the null tracker when project is None."""
    if not project:
        return Tracker()
    return WandbTracker(project, run_dir, name=name, job_type=job_type, config=config or {})


def evaluation_values(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.parquet row (icl_lab.evaluate) as wandb keys: "eval/<column>", the step and lr left out."""
    return {f"eval/{k}": float(v) for k, v in row.items() if k not in ("step", "lr") and _is_number(v)} | (
        {"train/lr": float(row["lr"])} if "lr" in row else {})


def llc_values(row: Mapping[str, Any]) -> dict[str, Any]:
    """An llc.parquet row (LLCResult.to_row) as wandb keys "llc/<column>": numbers, and the flags as text."""
    out: dict[str, Any] = {f"llc/{k}": float(v) for k, v in row.items() if k != "step" and _is_number(v)}
    if "flags" in row:
        out["llc/flags"] = str(row["flags"] or "ok")
    return out


def _is_number(v: Any) -> bool:
    """A finite int or float, numpy scalars included; not a bool."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(float(v))
