"""Pieces every study shares: training a grid of runs in worker processes, timing phases, predictions of a
run's checkpoints on a fixed batch."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from icl_lab.config import RunConfig
from icl_lab.evaluate import predict
from icl_lab.progress import Bar
from icl_lab.store import Run


class PhaseTimer:
    """Wall time per phase: `with timer("train"): ...`; `timer.seconds` keeps them in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


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
