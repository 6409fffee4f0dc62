"""Pieces every study shares: the settings of the papers' sweep-based studies (scale, executor), training a grid
of runs in worker processes, timing phases, predictions of a run's checkpoints on a fixed batch."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from icl_lab.config import RunConfig, parse_m
from icl_lab.evaluate import predict
from icl_lab.progress import Bar
from icl_lab.store import Run, write_json


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


class SweepStudyConfig(BaseModel):
    """Settings every sweep-based study of the papers shares: its scale and where its runs train.

    Subclasses add the study's own fields and set PAPER and QUICK, the overrides of the 'paper' scale and of the
    minutes-long version of 'small' (the subclass's defaults are the 'small' scale).
    """

    model_config = ConfigDict(extra="forbid")
    PAPER: ClassVar[dict[str, Any]] = {}
    QUICK: ClassVar[dict[str, Any]] = {}
    scale: Literal["small", "paper"] = "small"
    quick: bool = False
    device: str = "cpu"
    executor: Literal["local", "ray", "slurm"] = "local"
    workers: int | None = Field(2, ge=1)
    address: str | None = Field(None, description="ray: address of an existing cluster")
    slurm: dict[str, Any] = Field(default_factory=dict, description="slurm: submitit update_parameters options")
    ensemble: int = Field(1, ge=1, description="train up to N stackable runs together (icl_lab.ensemble)")

    @model_validator(mode="after")
    def _check_scale(self) -> SweepStudyConfig:
        if self.quick and self.scale == "paper":
            raise ValueError("quick is a minutes-long version of the small scale; it cannot be combined with "
                             "scale='paper' (allowed: quick with scale='small')")
        return self

    @classmethod
    def for_scale(cls, scale: str = "small", quick: bool = False, **overrides: Any) -> Any:
        """The settings of `scale` ('small' or 'paper'; `quick` shrinks 'small'), then `overrides`."""
        if quick and scale == "paper":
            raise ValueError("quick: the quick version shrinks the small scale and cannot be combined with scale "
                             "'paper' (allowed: --quick with --scale small)")
        base = {"paper": cls.PAPER}.get(scale, {}) | (cls.QUICK if quick else {})
        return cls(**{**base, **overrides, "scale": scale, "quick": quick})


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


def _train_one(config_json: str, path: str, resume: bool) -> str:
    from icl_lab.train import train

    torch.set_num_threads(1)
    train(RunConfig.model_validate_json(config_json), path, resume=resume, progress=False)
    return path


def train_runs(configs: dict[str, RunConfig], root: Path, workers: int = 1, progress: bool = True) -> dict[str, Run]:
    """Train every config into root/NAME, reusing finished runs and resuming interrupted ones.

    A run directory whose config differs from the requested one is an error (never silently reused).
    With workers > 1, runs train in parallel processes of one thread each (small models use a core better
    one per process than two threads on one model).
    """
    jobs = []
    for name, cfg in configs.items():
        path = root / name
        if (path / "config.json").exists():
            existing = Run.load(path)
            if existing.config != cfg:
                raise ValueError(f"{path} holds a run with a different config; remove it or choose another --out")
            if existing.finished:
                continue
            jobs.append((cfg, path, existing.state_path.exists()))
        else:
            jobs.append((cfg, path, False))
    with Bar(progress, len(jobs), "train runs") as bar:
        if workers <= 1 or len(jobs) <= 1:
            for cfg, path, resume in jobs:
                _train_one(cfg.model_dump_json(), str(path), resume)
                bar.advance()
        else:
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = [pool.submit(_train_one, cfg.model_dump_json(), str(path), resume)
                           for cfg, path, resume in jobs]
                for fut in as_completed(futures):
                    fut.result()
                    bar.advance()
    return {name: Run.load(root / name) for name in configs}


def checkpoint_predictions(run: Run, x: Tensor, y: Tensor, steps: list[int] | None = None) -> np.ndarray:
    """Predictions (T, B, K) of the run's checkpoints (all, or `steps`) on one fixed batch."""
    steps = run.checkpoint_steps if steps is None else steps
    return np.stack([predict(run.load_checkpoint(s), x, y).numpy() for s in steps])
