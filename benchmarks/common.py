"""Shared helpers for the benchmarks: machine info, a measured matmul peak, timing, statistics, atomic writes.

Benchmarks import this as a sibling module (`sys.path` holds the script's folder when run as
`python benchmarks/NAME.py`). Timing rules used by every benchmark (DESIGN.md, Performance): measure after
warm-up, in one process, with both sides of a comparison interleaved round by round so that drift and other jobs
on the shared cores hit both sides alike; report medians and the spread over rounds.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch


def set_threads(n: int) -> int:
    """Pin torch's intra-op threads to n (and inter-op to 1 where still allowed); returns the count in use."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started
        pass
    return torch.get_num_threads()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def loadavg() -> list[float] | None:
    """1, 5 and 15-minute load averages (other jobs on the shared cores), or None where unavailable."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(packages: tuple[str, ...] = ("icl-lab", "transformer-lens", "devinterp", "numpy")) -> dict[str, Any]:
    """CPU model, cores, threads, library versions, date and load: the header of every results file."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "cores_available": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in packages},
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "loadavg_at_start": loadavg(),
    }


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> list[float]:
    """GFLOP/s of `repeats` timed n×n @ n×n matmuls (2n³ FLOPs each), after one untimed warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=dtype)
    b = torch.randn(n, n, generator=g, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return rates


def rate(fn: Callable[[int], object], n: int) -> float:
    """Calls fn(n), which must run n units of work (steps), and returns units per second of wall time."""
    t0 = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - t0)


def interleaved_rounds(tasks: dict[str, Callable[[], float | None]], rounds: int,
                       on_round: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, list[float]]:
    """Run every task once per round, rotating the order each round; returns {name: [value per round]}.

    Each task is a zero-argument callable returning its measurement (e.g. steps/s of one timed chunk), or None
    to sit this round out (nothing is recorded). Rotation keeps any one task from always following the same
    neighbour (caches, thermal, other jobs).
    """
    names = list(tasks)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        shift = r % len(names)
        values = {}
        for name in names[shift:] + names[:shift]:
            value = tasks[name]()
            if value is not None:
                values[name] = value
                out[name].append(value)
        if on_round is not None:
            on_round(r, values)
    return out


def summarize(values: list[float]) -> dict[str, Any]:
    """median, mean, std (sample; 0 for one value), min, max, n and the values themselves."""
    vals = [float(v) for v in values]
    return {
        "median": statistics.median(vals),
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "values": vals,
    }


def welch_test(a: list[float], b: list[float]) -> dict[str, Any]:
    """Welch's two-sided t-test for equal means (unequal variances): t, dof, p.

    p needs scipy (the `dev` extra); without it p is None. With fewer than two values a side, or zero variance
    on both, nothing can be tested and t, dof, p are None.
    """
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return {"test": "welch_t", "t": None, "dof": None, "p": None, "note": "needs >= 2 values per side"}
    va, vb = statistics.variance(a) / na, statistics.variance(b) / nb
    if va + vb == 0:
        return {"test": "welch_t", "t": None, "dof": None, "p": None, "note": "zero variance on both sides"}
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    try:
        from scipy import stats

        p = float(2 * stats.t.sf(abs(t), dof))
    except ImportError:
        p = None
    return {"test": "welch_t", "t": t, "dof": dof, "p": p}


def write_atomic(path: str | Path, text: str) -> Path:
    """Write text to path via a temporary file in the same folder and a rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def seed_m2_run(workdir: Path, quick: bool = False):
    """The user's kind of run that the LLC benchmarks share (benchmarks/llc_curve.py's): the seed preset on M = 2
    unit-norm noiseless tasks, batch 32, lr 3e-3 constant, 5,000 steps with 13 linear + 30 log-spaced checkpoints
    (quick: 300 steps, 4 + 8). Reused from workdir/full (or /quick) when it is there and finished; else trained."""
    from icl_lab.config import build_run_config
    from icl_lab.store import Run
    from icl_lab.train import train

    steps, lin, log_ = (300, 4, 8) if quick else (5000, 13, 30)
    cfg = build_run_config(overrides=dict(preset="seed", family="unit_norm", noise_var=0.0, M=2, steps=steps,
                                          batch_size=32, lr=3e-3, n_checkpoints_linear=lin, n_checkpoints_log=log_,
                                          seed=0, name="seed-M2"))
    path = Path(workdir) / ("quick" if quick else "full")
    run = Run.load(path) if (path / "config.json").exists() else None
    if run is None or not run.finished or run.config != cfg:
        run = train(cfg, path, overwrite=True, progress=False)
    return run


class _NoCfg(torch.nn.Module):
    """Hides a model's `cfg` attribute: devinterp takes any module with `.cfg.n_heads` for a TransformerLens
    HookedTransformer and calls `.to(device, print_details=False)` on it, which plain modules reject."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, y):
        return self.inner(x, y)


class Devinterp:
    """devinterp 2.x `sample` on the fixed data (x, y) with icl-lab's minibatch MSE.

    devinterp wants a `datasets.Dataset` with an integer `input_ids` column, so each row holds its own index and
    the loss function looks the sequence up: the mean over the minibatch is exactly icl-lab's minibatch loss.
    num_init_loss_batches = n / minibatch, so devinterp's ℓ_n(w*) covers the whole data, like icl-lab's.
    λ̂ is computed from the post-burn-in trace (devinterp's own `llc` also averages the burn-in steps; it is
    recorded as `llc_mean_devinterp_all_steps_incl_burnin`).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        from datasets import Dataset  # deferred: a benchmark-only dependency (the `bench` extra)

        self.x, self.y, self.n = x, y, x.shape[0]
        self.dataset = Dataset.from_dict({"input_ids": [[i, i] for i in range(self.n)]}).with_format("torch")

        def loss_fn(model, input_ids):
            idx = input_ids[:, 0]
            xb, yb = self.x[idx], self.y[idx]
            return (model(xb, yb) - yb).square().mean(dim=1, keepdim=True)  # (batch, 1) per-"token" loss

        self.loss_fn = loss_fn

    def run(self, model, *, lr: float, localization: float, chains: int, draws: int, burnin: int, batch: int,
            nbeta: float, seed: int = 100) -> dict[str, Any]:
        """One devinterp SGLD estimate; returns seconds, λ̂ (mean, std, per chain) and the (C, T) loss trace."""
        from devinterp.slt.llc import compute_llc  # deferred: the `bench` extra
        from devinterp.slt.sampling import sample

        if hasattr(model, "cfg"):
            model = _NoCfg(model)
        with tempfile.TemporaryDirectory(prefix="devinterp_") as tmp, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            tree = sample(model, self.dataset, {}, lr=lr, n_beta=nbeta, localization=localization,
                          num_chains=chains, num_draws=draws, batch_size=batch, num_burnin_steps=burnin,
                          num_init_loss_batches=max(1, self.n // batch), init_seed=seed, device="cpu",
                          output_path=Path(tmp) / "samples.zarr", loss_fn=self.loss_fn)
            wall = time.perf_counter() - t0
            ds = tree.dataset
            init = float(ds.init_loss.values.mean())
            trace = np.asarray(ds.sampling_loss.values, dtype=np.float64).mean(axis=(2, 3))  # (C, T) post burn-in
            all_steps = float(compute_llc(tree).llc_mean)
        per_chain = nbeta * (trace.mean(axis=1) - init)
        failed = [str(w.message) for w in caught if "failed" in str(w.message).lower()]
        std = float(per_chain.std(ddof=1)) if chains > 1 else math.nan
        return {"seconds": wall, "llc_mean": float(per_chain.mean()), "llc_std": std,
                "llc_se": std / math.sqrt(chains), "llc_per_chain": [float(v) for v in per_chain],
                "init_loss": init, "llc_mean_devinterp_all_steps_incl_burnin": all_steps, "chain_failures": failed,
                "steps": chains * (draws + burnin), "trace": trace}
