"""Grids of training runs: expansion, validation, bookkeeping, and three executors (local processes, Ray, SLURM).

A sweep is a directory:

    SWEEP/sweep.json                 the specs ({grid, base}) it was run with, latest last
    SWEEP/index.parquet              one row per run: run_id, status, the varied values, error, timings, path, config
    SWEEP/runs/<run_id>/             an ordinary run directory, exactly as `icl_lab.train.train` writes it
    SWEEP/.status/<run_id>.json      the run's status, written atomically by whichever worker trains it
    SWEEP/.status/<run_id>.lock      held (flock) while a process trains the run: two processes never train one run
    SWEEP/.lock                      held by the coordinating process: one coordinator per sweep at a time

A grid maps flat config keys (the names `icl_lab.config.leaf_fields()` lists: M, seed, lr, weight_decay, ...) to
lists of values; the sweep is their Cartesian product on top of the base values. Run ids are deterministic: the
varied values in grid order plus a short hash of the full resolved config (`M=2_seed=0-1a2b3c4d`), so re-running a
sweep, or extending its grid, maps every config to the same directory. Every grid key and value is validated
against the config models before anything is written.

The truth about a run is its directory (a finished run has its final checkpoint and evaluation), never the index:
re-running a sweep skips finished runs, resumes interrupted ones from their saved state (`train(resume=True)`) and
retries failed ones. One failing run records its error (in its status file and the index) and does not stop the
others. Every run trains with one torch thread (`cpus_per_task` under SLURM) whichever executor runs it, so on CPU
its results are bit-identical to `train()` in a one-thread process, across executors, kills and resumes
(ensemble members: equal up to float rounding).

Executors (`executor=`):
  local  a process pool (spawn), `workers` processes (default: os.cpu_count()); workers=1 trains in this process.
         A worker that dies (killed, out of memory) breaks the pool: the runs it held or had queued are recorded
         as failed with that error, and the next re-run resumes them.
  ray    Ray tasks of one CPU each; `address` joins an existing cluster ("auto", "ray://host:10001", ...),
         otherwise a local Ray instance with `workers` CPUs is started (or the one this process already has is
         used). Workers need `icl_lab` importable and the sweep directory on a filesystem they share.
  slurm  submitit's AutoExecutor: one job array, a job per run (or ensemble); preempted or timed-out jobs are
         requeued and resume from their saved state. `slurm` options go to `update_parameters` (e.g.
         {"slurm_partition": "gpu", "timeout_min": 240, "gpus_per_node": 1}); {"cluster": "local"} uses submitit's
         local executor (testing), {"cluster": "debug"} runs the jobs in this process.

With `ensemble=N`, fresh runs that can be stacked (one architecture and schedule; seed, M, lr, weight decay may
differ) are trained N at a time in one job by `icl_lab.ensemble.train_ensemble` (each member still written as an
ordinary run directory). If an ensemble fails, its members are run one by one, so one diverging member does not
take the others down.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import re
import signal
import socket
import sys
import time
import traceback
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import ValidationError
from safetensors import safe_open

from icl_lab import train as training  # module, not function: training.train is looked up at call time
from icl_lab.config import (
    PRESETS,
    SECTIONS,
    RunConfig,
    build_run_config,
    check_path_name,
    leaf_fields,
    read_config_file,
)
from icl_lab.ensemble import group_stackable, train_ensemble
from icl_lab.progress import Bar
from icl_lab.store import Run, file_lock, write_json, write_parquet
from icl_lab.threads import torch_threads

__all__ = [
    "EXECUTORS",
    "INDEX_FILE",
    "SPEC_FILE",
    "STATUSES",
    "SWEEP_OPTIONS",
    "Executor",
    "SweepError",
    "SweepFailed",
    "SweepRun",
    "allowed_values",
    "check_options",
    "config_hash",
    "execute_runs",
    "expand_grid",
    "first_line",
    "flat_value",
    "load_index",
    "load_spec",
    "make_run_id",
    "parse_assignments",
    "parse_grid",
    "read_sweep_file",
    "run_is_complete",
    "run_job",
    "run_sweep",
    "sweep_runs",
    "train_named_runs",
]

STATUSES = ("pending", "running", "done", "failed")
EXECUTORS = ("local", "ray", "slurm")
Executor = Literal["local", "ray", "slurm"]
SWEEP_OPTIONS = ("executor", "workers", "address", "slurm", "ensemble")  # the [sweep] table of a sweep file

INDEX_FILE = "index.parquet"
SPEC_FILE = "sweep.json"
STATUS_DIR = ".status"
RUNS_DIR = "runs"
INTERRUPTED = "interrupted; re-run the sweep to resume it"

Job = tuple[list[str], list[str], list[str], str | None]  # (config JSONs, run directories, status files, wandb
# project or None): the args of run_job


class SweepError(ValueError):
    """A grid, base config, option or sweep directory that cannot be run (raised before anything is written)."""


class SweepFailed(RuntimeError):
    """Raised by `train_named_runs` when runs failed; `.index` holds the sweep index."""

    def __init__(self, message: str, index: pd.DataFrame):
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class SweepRun:
    """One point of a sweep: its id, the varied values (as resolved in the config) and the full config."""

    run_id: str
    values: dict[str, Any]
    config: RunConfig


# ================================================================================================ grid → runs
def _value(text: str, flag: str) -> Any:
    """A flag value: "none"/"null" -> None, "[...]" -> a JSON list, anything else stays a string (the config
    parses it, so its error names the field)."""
    if text.lower() in ("none", "null"):
        return None
    if text.startswith("["):
        try:
            return list(json.loads(text))
        except json.JSONDecodeError as e:
            raise SweepError(f"{flag}: {text!r} is not a valid JSON list ({e})") from e
    return text


def parse_assignments(items: Iterable[str], flag: str = "--set") -> dict[str, Any]:
    """KEY=VALUE flags (`--set`, `--slurm`) as a dict of flag values (see `_value`). Raises SweepError."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _value(text.strip(), f"{flag} {key.strip()}")
    return out


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """Parse `--grid` flags: "M=1,2,4", "seed=0,1", "M=inf,8", "grad_clip=none,1.0", or a JSON list after the "="
    ("betas=[[0.9,0.99],[0.9,0.95]]"). Values stay strings where the config parses them (pydantic coerces "2" to
    an int field); "none"/"null" become None. Repeating a key is an error."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip().lstrip("-"), text.strip()
        if not sep or not key:
            raise SweepError(f"--grid expects KEY=V1,V2,...; got {item!r}")
        if key in grid:
            raise SweepError(f"--grid {key} is given twice; put all its values in one flag: {key}=V1,V2,...")
        if text.startswith("["):
            grid[key] = _value(text, f"--grid {key}")
        else:
            grid[key] = [_value(v.strip(), f"--grid {key}") for v in text.split(",")] if text else []
    return grid


def read_sweep_file(path: str | Path) -> dict[str, Any]:
    """Read a sweep spec (TOML or JSON): a [grid] table (key -> list of values), an optional [base] table (flat
    keys, or nested task/model/train sections, as a config file) and an optional [sweep] table of executor options
    (SWEEP_OPTIONS). Returns {"grid": ..., "base": ..., "sweep": ...}."""
    try:
        raw = read_config_file(path)
    except ValueError as e:  # missing file, wrong suffix, bad TOML / JSON
        raise SweepError(str(e)) from e
    unknown = set(raw) - {"grid", "base", "sweep"}
    if unknown:
        raise SweepError(f"sweep file {path}: unknown tables {sorted(unknown)}; allowed: grid, base, sweep "
                         f"(put config values under [base])")
    grid, options = raw.get("grid", {}), raw.get("sweep", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) for v in grid.values()):
        raise SweepError(f"sweep file {path}: [grid] must map config keys to lists of values, e.g. M = [1, 2, 4]")
    if set(options) - set(SWEEP_OPTIONS):
        raise SweepError(f"sweep file {path}: unknown [sweep] options {sorted(set(options) - set(SWEEP_OPTIONS))}; "
                         f"allowed: {', '.join(SWEEP_OPTIONS)}")
    return {"grid": dict(grid), "base": dict(raw.get("base", {})), "sweep": dict(options)}


def flat_value(config: RunConfig, key: str) -> Any:
    """The value of a flat config key (as `leaf_fields` names it) in a resolved config."""
    section = leaf_fields()[key]
    return getattr(getattr(config, section), key) if section else getattr(config, key)


def allowed_values(key: str) -> str:
    """A human-readable description of the values a flat config key accepts (for error messages)."""
    if key == "M":
        return "an integer >= 1, or 'inf' (a fresh task per sequence)"
    if key == "preset":
        return "one of: " + ", ".join(PRESETS)
    section = leaf_fields()[key]
    field = (SECTIONS[section] if section else RunConfig).model_fields[key]
    args = typing.get_args(field.annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), field.annotation) if optional else field.annotation
    if typing.get_origin(base) is Literal:
        text = "one of: " + ", ".join(map(str, typing.get_args(base)))
    elif base is bool:
        text = "true or false"
    elif typing.get_origin(base) is tuple:
        text = "a JSON list such as [0.9, 0.999]"
    elif base in (int, float):
        bounds = [f"{sym} {getattr(m, attr)}" for m in field.metadata
                  for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                  if getattr(m, attr, None) is not None]
        text = " ".join(["an integer" if base is int else "a number", " and ".join(bounds)]).strip()
    else:
        text = "a string"
    return text + (", or none" if optional else "")


def _why(e: Exception) -> str:
    """A one-line reason from a pydantic ValidationError (field: message; ...) or any other error."""
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in err['loc'] if not isinstance(p, int)) or 'config'}: "
                         f"{err['msg']}" for err in e.errors())
    return str(e)


def _fmt(key: str, value: Any) -> str:
    if value is None:
        text = "inf" if key == "M" else "none"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}" if math.isfinite(value) else str(value)
    elif isinstance(value, (tuple, list)):
        text = "-".join(_fmt(key, v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "-", text)


def config_hash(config: RunConfig, n: int = 8) -> str:
    """A short sha256 of the resolved config (canonical JSON), stable across processes and platforms."""
    canon = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:n]


def make_run_id(values: Mapping[str, Any], config: RunConfig) -> str:
    """Deterministic run id: the varied values in grid order plus a hash of the full config,
    e.g. 'M=2_seed=0-1a2b3c4d' ('run-1a2b3c4d' for an empty grid)."""
    readable = "_".join(f"{k}={_fmt(k, v)}" for k, v in values.items())[:150]
    return f"{readable or 'run'}-{config_hash(config)}"


def expand_grid(grid: Mapping[str, Sequence[Any]] | None, base: Mapping[str, Any] | None = None) -> list[SweepRun]:
    """Validate and expand base × grid into SweepRuns (grid order: the last key varies fastest).

    Raises SweepError naming the field and the allowed values for an unknown key, an empty or bad value, a
    combination the config rejects, or two grid points that resolve to the same config. Writes nothing.
    """
    grid, base = dict(grid or {}), dict(base or {})
    leaves = leaf_fields()
    try:
        build_run_config(base)
    except (ValidationError, ValueError) as e:
        raise SweepError(f"invalid base config: {_why(e)}") from e
    for key, values in grid.items():
        if key not in leaves:
            raise SweepError(f"unknown config field {key!r} in the grid; allowed fields: {', '.join(sorted(leaves))}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise SweepError(f"grid field {key!r} needs a non-empty list of values ({allowed_values(key)})")
        for v in values:  # each value alone on top of the base: the error names this field and this value
            try:
                build_run_config(base, {key: v})
            except (ValidationError, ValueError) as e:
                raise SweepError(f"invalid grid value {key}={v!r}: {_why(e)}. Allowed for {key}: "
                                 f"{allowed_values(key)}") from e
    runs: list[SweepRun] = []
    seen: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*grid.values()):
        point = dict(zip(grid, combo, strict=True))
        try:
            cfg = build_run_config(base, point)
        except (ValidationError, ValueError) as e:
            raise SweepError(f"the grid point {point} is invalid: {_why(e)}") from e
        values = {k: flat_value(cfg, k) for k in grid}
        run_id = make_run_id(values, cfg)
        if run_id in seen:
            raise SweepError(f"grid points {seen[run_id]} and {point} give the same config; remove one")
        seen[run_id] = point
        runs.append(SweepRun(run_id, values, cfg))
    return runs


# ================================================================================================ one job (worker)
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_is_complete(run: Run) -> bool:
    """Finished and fully recorded: final checkpoint, and the final evaluation row in metrics.parquet
    (stricter than `Run.finished`, which a kill between the final checkpoint and the metrics write can fool)."""
    metrics = run.metrics if run.finished else pd.DataFrame()
    return not metrics.empty and int(metrics["step"].max()) == run.config.train.steps


def _state_step(run: Run) -> int | None:
    """The step a run's resumable state was saved at (safetensors metadata), None if unreadable."""
    try:
        with safe_open(str(run.state_path), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except Exception:  # noqa: BLE001 -- informational only; train() reports a corrupt state properly
        return None


def _start(status_file: Path, **extra: Any) -> dict[str, Any]:
    """Write and return a 'running' status record (attempts counted on from the previous record)."""
    previous = _read_json(status_file) or {}
    record = {"status": "running", "error": None, "started_at": time.time(), "finished_at": None, "seconds": None,
              "attempts": int(previous.get("attempts") or 0) + 1, "host": socket.gethostname(), "pid": os.getpid(),
              "resumed_from": None, **extra}
    write_json(status_file, record)
    return record


def _finish(status_file: Path, record: dict[str, Any], status: str, error: str | None = None) -> dict[str, Any]:
    record.update(status=status, error=error, finished_at=time.time())
    record["seconds"] = record["finished_at"] - record["started_at"]
    write_json(status_file, record)
    return record


def _finish_run(status_file: Path, record: dict[str, Any], run: Run) -> dict[str, Any]:
    """'done', or 'pending' for a run stopped early (Ctrl-C): re-running the sweep resumes it."""
    if run_is_complete(run):
        return _finish(status_file, record, "done")
    return _finish(status_file, record, "pending", INTERRUPTED)


def _run_one(config: RunConfig, path: Path, status_file: Path, wandb: str | None = None) -> dict[str, Any]:
    """Train (or finish) one run, recording its status; a training error is recorded, never raised."""
    with file_lock(status_file.with_suffix(".lock")) as locked:
        if not locked:  # another live process trains this run: leave it alone
            return {**(_read_json(status_file) or {}), "status": "running", "note": "another process trains it"}
        record = _start(status_file)
        try:
            run = Run.load(path) if (path / "config.json").exists() else None
            if run is not None and run.config != config:
                raise ValueError(f"{path} holds a run with a different config; remove it to rerun this point")
            if run is None or not run_is_complete(run):
                resume = run is not None and run.state_path.exists()
                record["resumed_from"] = _state_step(run) if resume else None
                # a directory without resumable state starts over (deterministic, so nothing is lost)
                run = training.train(config, path, resume=resume, overwrite=not resume, progress=False, wandb=wandb)
        except Exception as e:  # noqa: BLE001 -- recorded, and the other runs go on
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
            return _finish(status_file, record, "failed", f"{type(e).__name__}: {e}\n{tb}")
        except KeyboardInterrupt:
            _finish(status_file, record, "pending", INTERRUPTED)
            raise
        return _finish_run(status_file, record, run)


def _run_ensemble(configs: list[RunConfig], paths: list[Path], status_files: list[Path], wandb: str | None = None
                  ) -> list | None:
    """Train fresh, stackable runs together (icl_lab.ensemble); None if that failed (statuses left as they were)."""
    with contextlib.ExitStack() as stack:
        if not all(stack.enter_context(file_lock(f.with_suffix(".lock"))) for f in status_files):
            return None
        previous = [_read_json(f) for f in status_files]
        records = [_start(f, ensemble=len(configs)) for f in status_files]
        try:
            runs = train_ensemble(configs, paths, overwrite=True, progress=False, wandb=wandb)
        except Exception:  # noqa: BLE001 -- the members are then run one by one, and record their own errors
            for f, prev in zip(status_files, previous, strict=True):
                write_json(f, prev or {"status": "pending"})
            return None
        return [_finish_run(f, rec, run) for f, rec, run in zip(status_files, records, runs, strict=True)]


def run_job(config_jsons: Sequence[str], run_dirs: Sequence[str], status_files: Sequence[str],
            wandb: str | None = None, threads: int = 1) -> list[dict[str, Any]]:
    """The job every executor runs, with `threads` torch threads: one run, or several fresh stackable runs trained
    as one ensemble (each member run on its own if the ensemble fails). Returns one status record per run (also
    written to its status file: status, error, started_at / finished_at (Unix s), seconds, attempts, host, pid,
    resumed_from). Picklable by reference; raises only if interrupted."""
    configs = [RunConfig.model_validate_json(c) for c in config_jsons]
    paths, files = [Path(d) for d in run_dirs], [Path(f) for f in status_files]
    with torch_threads(threads):
        records = _run_ensemble(configs, paths, files, wandb) if len(configs) > 1 else None
        return records or [_run_one(c, p, f, wandb) for c, p, f in zip(configs, paths, files, strict=True)]


class _SlurmTask:
    """submitit callable running `run_job`; on preemption / timeout submitit calls `checkpoint` and requeues the
    same job, whose runs then resume from their saved state."""

    def __call__(self, *args: Any) -> list[dict[str, Any]]:
        return run_job(*args)

    def checkpoint(self, *args: Any) -> Any:
        import submitit  # deferred: optional extra (icl-lab[sweep])

        return submitit.helpers.DelayedSubmission(self, *args)


# ================================================================================================ executors
# Each executor runs a dict of jobs {key: Job} and yields (key, the job's records, or the exception that killed
# its worker) as jobs finish; closing the generator cancels what has not started.
def _outcome(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or the exception it raised: a worker that died (killed, out of memory, node lost)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- recorded as the job's runs' error; the other jobs go on
        return e


def _worker_init() -> None:
    """Pool worker: on Linux, get SIGINT when the coordinating process dies, so an orphaned worker saves its state
    and stops instead of training on beside a resumed sweep."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


def _run_local(jobs: dict[str, Job], workers: int) -> Iterator[tuple[str, Any]]:
    if workers <= 1 or len(jobs) <= 1:  # in this process, one job after another
        for key, job in jobs.items():
            yield key, _outcome(run_job, *job)
        return
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn"), initializer=_worker_init)
    try:
        futures = {pool.submit(run_job, *job): key for key, job in jobs.items()}
        for future in as_completed(futures):
            yield futures[future], _outcome(future.result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_ray(jobs: dict[str, Job], workers: int, address: str | None) -> Iterator[tuple[str, Any]]:
    import ray  # deferred: optional extra (icl-lab[sweep])

    started = not ray.is_initialized()
    if started:
        ray.init(**({"address": address} if address else {"num_cpus": workers}), include_dashboard=False,
                 log_to_driver=False)
    elif address:
        print(f"ray is already initialised in this process; ignoring address {address}", file=sys.stderr)
    task = ray.remote(num_cpus=1, max_retries=0)(run_job)
    refs = {task.remote(*job): key for key, job in jobs.items()}
    waiting = list(refs)
    try:
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            yield refs[done[0]], _outcome(ray.get, done[0])
    finally:
        for ref in waiting:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        if started:
            ray.shutdown()


def _run_slurm(jobs: dict[str, Job], folder: Path, options: Mapping[str, Any] | None,
               poll_seconds: float) -> Iterator[tuple[str, Any]]:
    import submitit  # deferred: optional extra (icl-lab[sweep])

    params = {"timeout_min": 240, "cpus_per_task": 1, "name": "icl-lab-sweep", **(options or {})}
    executor = submitit.AutoExecutor(folder=str(folder), cluster=params.pop("cluster", None))
    executor.update_parameters(**params)
    threads = int(params["cpus_per_task"])
    with executor.batch():  # one job array
        submitted = [(key, executor.submit(_SlurmTask(), *job, threads)) for key, job in jobs.items()]
    waiting = dict(submitted)
    try:
        while waiting:
            done = [key for key, job in waiting.items() if job.done()]
            for key in done:
                yield key, _outcome(waiting.pop(key).result)
            if not done:
                time.sleep(poll_seconds)
    finally:
        for job in waiting.values():
            with contextlib.suppress(Exception):
                job.cancel(check=False)


def _require(executor: str) -> None:
    """Fail before anything is written when an executor's optional dependency is missing."""
    module = {"ray": "ray", "slurm": "submitit"}.get(executor)
    if module is not None:
        try:
            __import__(module)
        except ImportError as e:
            raise SweepError(f"the {executor} executor needs {module}: pip install 'icl-lab[sweep]'") from e


# ================================================================================================ the index
def _column(values: list[Any]) -> Any:
    """A parquet-friendly column for varied values: nullable ints, floats, bools or strings (lists as JSON)."""
    if any(isinstance(v, (list, tuple)) for v in values):
        values = [None if v is None else json.dumps(list(v)) for v in values]
    column = pd.array(values)
    return column if column.dtype != object else pd.array([None if v is None else str(v) for v in values],
                                                          dtype="string")


def _build_index(root: Path, runs_dir: Path, runs: Sequence[SweepRun], keys: Sequence[str]) -> pd.DataFrame:
    """One row per run in `runs`' order, statuses from the status files (written by the workers); rows of an
    existing index for runs not in `runs` (an earlier, different grid) are kept after them."""
    status = [_read_json(root / STATUS_DIR / f"{r.run_id}.json") or {} for r in runs]
    when = lambda field: pd.to_datetime(pd.Series([st.get(field) for st in status], dtype="Float64"), unit="s",
                                        utc=True)
    df = pd.DataFrame({
        "run_id": [r.run_id for r in runs],
        "status": [st.get("status", "pending") for st in status],
        **{k: _column([r.values.get(k) for r in runs]) for k in keys},
        "error": pd.array([st.get("error") for st in status], dtype="string"),
        "started_at": when("started_at"),
        "finished_at": when("finished_at"),
        "seconds": pd.array([st.get("seconds") for st in status], dtype="Float64"),
        "attempts": [int(st.get("attempts") or 0) for st in status],
        "host": pd.array([st.get("host") for st in status], dtype="string"),
        "path": [os.path.relpath(runs_dir / r.run_id, root) for r in runs],
        "config": [r.config.model_dump_json() for r in runs],
    })
    if (root / INDEX_FILE).exists():
        old = pd.read_parquet(root / INDEX_FILE)
        old = old[~old["run_id"].isin(set(df["run_id"]))]
        if not old.empty:
            dtypes = {**old.dtypes.to_dict(), **df.dtypes.to_dict()}
            df = pd.concat([df, old], ignore_index=True)
            for c, dt in dtypes.items():  # concat widens a column missing on one side (Int64 -> Float64)
                with contextlib.suppress(TypeError, ValueError):
                    df[c] = df[c].astype(dt)
    return df


def load_index(sweep_dir: str | Path) -> pd.DataFrame:
    """The sweep's index.parquet as a DataFrame (see the module docstring for the columns)."""
    path = Path(sweep_dir) / INDEX_FILE
    if not path.exists():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory: {path} is missing")
    return pd.read_parquet(path)


# ================================================================================================ running
def _plan_jobs(todo: Sequence[SweepRun], runs_dir: Path, ensemble: int) -> dict[str, list[SweepRun]]:
    """Jobs keyed by their first run id: single runs, or (ensemble > 1) stackable fresh runs in groups of at most
    `ensemble`. Runs with a resumable state always resume on their own."""
    fresh = [r for r in todo if not Run(runs_dir / r.run_id, r.config).state_path.exists()] if ensemble > 1 else []
    fresh_ids = {r.run_id for r in fresh}
    jobs = {r.run_id: [r] for r in todo if r.run_id not in fresh_ids}
    if fresh:
        for group in group_stackable([r.config for r in fresh]):
            for i in range(0, len(group), ensemble):
                members = [fresh[j] for j in group[i:i + ensemble]]
                jobs[members[0].run_id] = members
    return jobs


def check_options(executor: str, workers: Any, ensemble: Any) -> None:
    """Raise SweepError for an unknown executor, a missing optional dependency or a bad workers / ensemble."""
    if executor not in EXECUTORS:
        raise SweepError(f"unknown executor {executor!r}; allowed: {', '.join(EXECUTORS)}")
    for name, value in (("workers", workers), ("ensemble", ensemble)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SweepError(f"{name} must be an integer >= 1, got {value!r}")
    _require(executor)


def _complete_runs(runs: Sequence[SweepRun], runs_dir: Path) -> set[str]:
    """Ids of the finished runs; raises SweepError if a run directory holds another config or cannot be read."""
    complete = set()
    for r in runs:
        path = runs_dir / r.run_id
        if (path / "config.json").exists():
            try:
                existing = Run.load(path)
            except (ValidationError, ValueError, json.JSONDecodeError) as e:
                raise SweepError(f"{path} holds an unreadable run ({e}); remove it to rerun this point") from e
            if existing.config != r.config:
                raise SweepError(f"{path} holds a run with a different config; remove it or choose another sweep "
                                 f"directory")
            if run_is_complete(existing):
                complete.add(r.run_id)
    return complete


def _reconcile(status_dir: Path, runs: Sequence[SweepRun], complete: set[str], retry_failed: bool
               ) -> list[SweepRun]:
    """Bring the status files in line with the run directories (a killed sweep leaves 'running' behind);
    returns the runs to train."""
    todo = []
    for r in runs:
        path = status_dir / f"{r.run_id}.json"
        status = (_read_json(path) or {}).get("status")
        if r.run_id in complete:
            if status != "done":
                write_json(path, {**(_read_json(path) or {}), "status": "done", "error": None})
        elif status != "failed" or retry_failed:
            if status not in (None, "pending"):
                write_json(path, {**(_read_json(path) or {}), "status": "pending"})
            todo.append(r)
    return todo


@contextlib.contextmanager
def _coordinator(root: Path) -> Iterator[None]:
    """Hold root/.lock, the sweep's one coordinator; when another process holds it, say so and wait for it (that
    process's finished runs are then skipped, so two commands on one sweep never train a run twice)."""
    with file_lock(root / ".lock") as locked:
        if locked:
            yield
            return
    holder = (root / ".lock").read_text().strip()
    print(f"sweep {root} is being run by another process ({holder}); waiting for it", file=sys.stderr, flush=True)
    with file_lock(root / ".lock", blocking=True):
        yield


def execute_runs(root: str | Path, runs: Sequence[SweepRun], *, runs_dir: str | Path | None = None,
                 executor: Executor = "local", workers: int | None = None, address: str | None = None,
                 slurm: Mapping[str, Any] | None = None, retry_failed: bool = True, progress: bool = True,
                 poll_seconds: float = 1.0, ensemble: int = 1, spec: Mapping[str, Any] | None = None,
                 wandb: str | None = None) -> pd.DataFrame:
    """Train `runs` into `runs_dir/<run_id>` (default root/runs) with `executor`, keeping root/index.parquet
    current; returns the index. Finished runs are skipped, interrupted ones resumed, failed ones retried unless
    `retry_failed=False`. Bad options, duplicate ids or a run directory holding a different config are errors
    before anything is written. `spec` ({grid, base}) is recorded in root/sweep.json.
    """
    root = Path(root)
    runs_dir = Path(runs_dir) if runs_dir is not None else root / RUNS_DIR
    check_options(executor, workers, ensemble)
    if len({r.run_id for r in runs}) != len(runs):
        raise SweepError("run ids must be unique")
    _complete_runs(runs, runs_dir)  # a directory holding another config is an error before anything is written

    root.mkdir(parents=True, exist_ok=True)
    with _coordinator(root):
        if spec is not None:
            _record_spec(root, spec)
        complete = _complete_runs(runs, runs_dir)  # again under the lock: a process waited for may have trained
        todo = _reconcile(root / STATUS_DIR, runs, complete, retry_failed)
        keys = list(dict.fromkeys(k for r in runs for k in r.values))
        write_index = lambda: write_parquet(root / INDEX_FILE, _build_index(root, runs_dir, runs, keys))
        write_index()
        jobs: dict[str, Job] = {
            key: ([r.config.model_dump_json() for r in members], [str(runs_dir / r.run_id) for r in members],
                  [str(root / STATUS_DIR / f"{r.run_id}.json") for r in members], wandb)
            for key, members in _plan_jobs(todo, runs_dir, ensemble).items()}
        n_workers = workers or os.cpu_count() or 1
        if executor == "local":
            results = _run_local(jobs, n_workers)
        elif executor == "ray":
            results = _run_ray(jobs, n_workers, address)
        else:
            results = _run_slurm(jobs, root / ".submitit", slurm, poll_seconds)
        counts = {"done": 0, "failed": 0}
        try:
            with contextlib.closing(results), Bar(progress, len(todo), f"sweep ({executor})", columns=(
                    "done {task.fields[done]}", "failed {task.fields[failed]}"), **counts) as bar:
                for key, outcome in results:
                    if isinstance(outcome, BaseException):  # the job died: its runs fail, the others go on
                        error = f"the job running this run failed: {type(outcome).__name__}: {outcome}"
                        outcome = [_finish(Path(f), {"started_at": time.time(), **(_read_json(Path(f)) or {})},
                                           "failed", error) for f in jobs[key][2]]
                    for record in outcome:
                        counts[record["status"]] = counts.get(record["status"], 0) + 1
                    bar.update(advance=len(outcome), **counts)
                    write_index()
        finally:
            write_index()
    return load_index(root)


def _record_spec(root: Path, spec: Mapping[str, Any]) -> None:
    """Keep every distinct {grid, base} the sweep was run with (so a re-run without a grid repeats the latest)."""
    specs = (_read_json(root / SPEC_FILE) or {}).get("specs", [])
    spec = json.loads(json.dumps({"grid": dict(spec["grid"]), "base": dict(spec["base"])}, default=str))
    if not specs or specs[-1] != spec:
        specs.append(spec)
    write_json(root / SPEC_FILE, {"specs": specs})


def load_spec(sweep_dir: str | Path) -> dict[str, Any]:
    """The latest {grid, base} a sweep directory was run with."""
    data = _read_json(Path(sweep_dir) / SPEC_FILE)
    if not data or not data.get("specs"):
        raise SweepError(f"{sweep_dir} has no {SPEC_FILE}; give a grid (--grid or a sweep file)")
    return data["specs"][-1]


def run_sweep(sweep_dir: str | Path, grid: Mapping[str, Sequence[Any]] | None = None,
              base: Mapping[str, Any] | None = None, *, executor: Executor = "local", workers: int | None = None,
              address: str | None = None, slurm: Mapping[str, Any] | None = None, retry_failed: bool = True,
              progress: bool = True, poll_seconds: float = 1.0, ensemble: int = 1, wandb: str | None = None
              ) -> pd.DataFrame:
    """Expand base × grid (validated first; nothing is written on an error) and train every point into
    `sweep_dir/runs/<run_id>`; returns the index (also at `sweep_dir/index.parquet`). Failed runs never raise
    here: check `index.status`.

    With neither grid nor base, the sweep directory's latest recorded spec is run again (finishing it).
    `executor`: 'local' (`workers` processes, default os.cpu_count()), 'ray' (`address` of an existing cluster,
    or a local one with `workers` CPUs), 'slurm' (submitit; `slurm` = update_parameters options, plus
    'cluster': 'local' / 'debug' for testing). `ensemble` > 1 trains up to that many stackable runs together in
    each job (icl_lab.ensemble; results equal to separate runs up to float rounding).
    """
    if grid is None and base is None:
        spec = load_spec(sweep_dir)
        grid, base = spec["grid"], spec["base"]
    grid, base = dict(grid or {}), dict(base or {})
    return execute_runs(sweep_dir, expand_grid(grid, base), executor=executor, workers=workers, address=address,
                        slurm=slurm, retry_failed=retry_failed, progress=progress, poll_seconds=poll_seconds,
                        ensemble=ensemble, spec={"grid": grid, "base": base}, wandb=wandb)


def train_named_runs(configs: Mapping[str, RunConfig], root: str | Path, *, workers: int = 1,
                     executor: Executor = "local", progress: bool = True, address: str | None = None,
                     slurm: Mapping[str, Any] | None = None, ensemble: int = 1, wandb: str | None = None
                     ) -> dict[str, Run]:
    """Train every config into root/NAME through the sweep machinery (what a study needs, on any executor):
    finished runs are reused, interrupted ones resumed, a directory with a different config is an error;
    root/index.parquet records statuses and timings. Raises SweepFailed listing the failed runs (after all runs
    were attempted)."""
    root = Path(root)
    for name in configs:
        try:
            check_path_name(name, "run name")
        except ValueError as e:
            raise SweepError(str(e)) from e
    runs = [SweepRun(name, {}, cfg) for name, cfg in configs.items()]
    index = execute_runs(root, runs, runs_dir=root, executor=executor, workers=workers, address=address,
                         slurm=slurm, progress=progress, ensemble=ensemble, wandb=wandb)
    bad = index[index["run_id"].isin(set(configs)) & (index["status"] != "done")]
    if not bad.empty:
        lines = [f"{r.run_id}: {r.status}: {first_line(r.error)}" for r in bad.itertuples()]
        raise SweepFailed(f"{len(bad)} of {len(configs)} runs did not finish:\n  " + "\n  ".join(lines), index)
    return {name: Run.load(root / name) for name in configs}


def first_line(error: Any) -> str:
    """The first line of an index `error` cell ('' for none)."""
    return "" if error is None or pd.isna(error) else str(error).splitlines()[0]


def sweep_runs(sweep_dir: str | Path, status: str | None = "done") -> dict[str, Run]:
    """The sweep's runs (those with `status`, or all with status=None) as {run_id: Run}."""
    root = Path(sweep_dir)
    index = load_index(root)
    if status is not None:
        index = index[index["status"] == status]
    return {r.run_id: Run.load(root / r.path) for r in index.itertuples() if (root / r.path / "config.json").exists()}
