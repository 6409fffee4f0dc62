"""Sweeps (icl_lab.sweep): grid expansion and validation, the index, failure isolation, kill + resume,
and the local / Ray / submitit executors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import icl_lab.train
from icl_lab.config import build_run_config
from icl_lab.store import Run
from icl_lab.sweep import (
    SweepError,
    SweepFailed,
    expand_grid,
    load_index,
    make_run_id,
    parse_grid,
    read_sweep_file,
    run_sweep,
    train_named_runs,
)
from icl_lab.train import train as train_here

from conftest import tiny_overrides


def base(**kw) -> dict:
    return tiny_overrides(**{"steps": 20, "n_checkpoints_linear": 3, "n_checkpoints_log": 2, "eval_size": 32, **kw})


def train(config, path, **kw):
    """A straight run as a sweep trains it: one torch thread (the thread count changes CPU float rounding)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_here(config, path, **kw)
    finally:
        torch.set_num_threads(before)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    run = Run.load(run_dir)
    return run.load_checkpoint(run.config.train.steps).state_dict()


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical final weights, checkpoints and logged losses."""
    ra, rb = Run.load(a), Run.load(b)
    assert ra.checkpoint_steps == rb.checkpoint_steps
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    pd.testing.assert_frame_equal(ra.metrics, rb.metrics)
    pd.testing.assert_frame_equal(ra.train_loss, rb.train_loss)


# ------------------------------------------------------------------------------------------------ grids
def test_parse_grid_flags_and_sweep_file(tmp_path):
    grid = parse_grid(["M=1,2,inf", "--seed=0,1", "grad_clip=none,1.0", "betas=[[0.9,0.99],[0.8,0.9]]"])
    assert grid == {"M": ["1", "2", "inf"], "seed": ["0", "1"], "grad_clip": [None, "1.0"],
                    "betas": [[0.9, 0.99], [0.8, 0.9]]}
    with pytest.raises(SweepError, match="KEY=V1"):
        parse_grid(["M"])
    with pytest.raises(SweepError, match="twice"):
        parse_grid(["M=1", "M=2"])
    f = tmp_path / "s.toml"
    f.write_text('[base]\nsteps = 20\nD = 3\n[base.model]\nd_model = 16\n[grid]\nM = [1, "inf"]\nseed = [0, 1]\n'
                 '[sweep]\nworkers = 2\n')
    spec = read_sweep_file(f)
    assert spec["grid"] == {"M": [1, "inf"], "seed": [0, 1]} and spec["sweep"] == {"workers": 2}
    runs = expand_grid(spec["grid"], spec["base"])
    assert [r.values for r in runs] == [{"M": 1, "seed": 0}, {"M": 1, "seed": 1}, {"M": None, "seed": 0},
                                        {"M": None, "seed": 1}]
    assert all(r.config.train.steps == 20 and r.config.model.d_model == 16 for r in runs)
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid]\nM = 2\n")
    with pytest.raises(SweepError, match="lists of values"):
        read_sweep_file(bad)


def test_run_ids_are_deterministic_readable_and_unique():
    runs = expand_grid(parse_grid(["M=1,2,inf", "lr=0.003,1e-4"]), base())
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == 6
    assert ids[0].startswith("M=1_lr=0.003-") and ids[-1].startswith("M=inf_lr=0.0001-")
    again = expand_grid({"M": [1, 2, None], "lr": [3e-3, 1e-4]}, base())  # other spellings, same configs
    assert [r.run_id for r in again] == ids
    assert make_run_id(runs[0].values, runs[0].config) == ids[0]
    other = expand_grid({"M": [1]}, base(seed=5))  # a base change changes the hash
    assert other[0].run_id.split("-")[0] == "M=1" and other[0].run_id != ids[0]


@pytest.mark.parametrize("grid, message", [
    ({"foo": [1]}, r"unknown config field 'foo'.*allowed fields: .*weight_decay"),
    ({"activation": ["relu", "tanh"]}, r"activation='tanh'.*one of: relu, gelu, gelu_tanh"),
    ({"M": [2, 0]}, r"M=0.*integer >= 1, or 'inf'"),
    ({"lr": [-1]}, r"lr=-1.*a number > 0"),
    ({"seed": []}, r"'seed' needs a non-empty list"),
    ({"n_checkpoints_log": [5, 50]}, r"n_checkpoints_log=50"),
    ({"M": ["inf", "none"]}, r"same config"),
])
def test_bad_grids_are_rejected_before_anything_is_written(tmp_path, grid, message):
    out = tmp_path / "sweep"
    with pytest.raises(SweepError, match=message):
        run_sweep(out, grid, base(), progress=False)
    assert not out.exists()


def test_bad_base_and_executor_are_rejected(tmp_path):
    with pytest.raises(SweepError, match="invalid base config"):
        run_sweep(tmp_path / "a", {"seed": [0]}, {"d_model": 0}, progress=False)
    with pytest.raises(SweepError, match="unknown executor 'dask'"):
        run_sweep(tmp_path / "b", {"seed": [0]}, base(), executor="dask", progress=False)  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------ local runs
def test_in_process_sweep_index_failure_isolation_skip_and_retry(tmp_path, monkeypatch):
    """One failing run records its error and does not stop the others; re-running skips the finished runs and
    retries the failed one."""
    out = tmp_path / "sweep"
    real_train = icl_lab.train.train
    calls: list[int] = []
    failing = {1}

    def flaky_train(config, path, **kw):
        calls.append(config.seed)
        if config.seed in failing:
            raise RuntimeError("boom: simulated failure")
        return real_train(config, path, **kw)

    monkeypatch.setattr(icl_lab.train, "train", flaky_train)
    index = run_sweep(out, {"seed": [0, 1, 2]}, base(), workers=1, progress=False)
    assert calls == [0, 1, 2]  # the failure did not stop seed 2
    assert index["status"].tolist() == ["done", "failed", "done"]
    assert index["seed"].tolist() == [0, 1, 2]
    failed = index.iloc[1]
    assert "RuntimeError: boom: simulated failure" in failed["error"]
    assert pd.isna(index.iloc[0]["error"])
    assert (index["finished_at"] >= index["started_at"]).all() and (index["seconds"] > 0).all()
    assert json.loads(index.iloc[0]["config"])["seed"] == 0
    assert load_index(out)["run_id"].tolist() == index["run_id"].tolist()  # what is on disk
    for r in index.itertuples():
        assert (out / r.path).parent == out / "runs"
    assert Run.load(out / index.iloc[0]["path"]).finished

    # re-run: finished runs are skipped; the failed one is retried (and now succeeds)
    failing.clear()
    calls.clear()
    index2 = run_sweep(out, workers=1, progress=False)  # the recorded spec
    assert calls == [1]
    assert index2["status"].tolist() == ["done"] * 3 and pd.isna(index2["error"]).all()
    assert index2.iloc[1]["attempts"] == 2 and index2.iloc[0]["attempts"] == 1
    with pytest.raises(SweepError, match="different config"):  # a tampered run directory is refused up front
        cfg = json.loads((out / index.iloc[0]["path"] / "config.json").read_text())
        cfg["config"]["train"]["lr"] = 0.5
        (out / index.iloc[0]["path"] / "config.json").write_text(json.dumps(cfg))
        run_sweep(out, progress=False)


def test_process_pool_sweep_isolates_a_diverging_run(tmp_path):
    """Two spawn workers; lr = 1e30 makes that run's training diverge inside its worker."""
    out = tmp_path / "sweep"
    index = run_sweep(out, {"lr": [1e-2, 1e30]}, base(), workers=2, progress=False, poll_seconds=0.2)
    assert index["status"].tolist() == ["done", "failed"]
    assert "TrainingDiverged" in index.iloc[1]["error"] and pd.isna(index.iloc[0]["error"])
    assert index["host"].notna().all() and (index["attempts"] == 1).all()
    # the worker's run equals a straight run in this process
    ref = train(build_run_config(base(lr=1e-2)), tmp_path / "ref", progress=False)
    assert_same_run(out / index.iloc[0]["path"], ref.path)
    again = run_sweep(out, workers=2, retry_failed=False, progress=False)
    assert again["status"].tolist() == ["done", "failed"] and (again["attempts"] == 1).all()


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from icl_lab.sweep import run_sweep
    run_sweep(sys.argv[1], {"seed": [0, 1]}, BASE, workers=1, progress=False)
""")


def test_killed_sweep_resumes_to_bit_identical_results(tmp_path):
    """SIGKILL a sweep (its whole process group) midway; re-running it resumes the interrupted run from its saved
    state and skips the finished one; every run equals a straight, uninterrupted run bit for bit."""
    out = tmp_path / "sweep"
    b = base(steps=200, n_checkpoints_linear=9, n_checkpoints_log=0)
    script = tmp_path / "sweep_script.py"
    script.write_text(KILL_SCRIPT.replace("BASE", repr(b)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], start_new_session=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = expand_grid({"seed": [0, 1]}, b)
    midway = out / "runs" / runs[1].run_id / "checkpoints" / "step_00000050.safetensors"
    deadline = time.monotonic() + 120
    try:
        while not midway.exists():  # the first run is done, the second is a quarter through
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the sweep did not get going"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    second = Run.load(out / "runs" / runs[1].run_id)
    assert not second.finished, "the sweep finished before it was killed; nothing was resumed"
    assert load_index(out)["status"].tolist() == ["done", "pending"]  # the index as the kill left it
    status = json.loads((out / ".status" / f"{runs[1].run_id}.json").read_text())
    assert status["status"] == "running"  # left behind by the kill

    first_metrics = out / "runs" / runs[0].run_id / "metrics.parquet"
    mtime = first_metrics.stat().st_mtime_ns
    index = run_sweep(out, workers=1, progress=False)
    assert index["status"].tolist() == ["done", "done"]
    assert index["attempts"].tolist() == [1, 2]
    assert first_metrics.stat().st_mtime_ns == mtime  # the finished run was skipped
    resumed_from = json.loads((out / ".status" / f"{runs[1].run_id}.json").read_text())["resumed_from"]
    assert 25 <= resumed_from < 200  # the kill may fall between the step-50 checkpoint and its state write
    ref = train(runs[1].config, tmp_path / "straight", progress=False)
    assert_same_run(out / "runs" / runs[1].run_id, ref.path)


def test_ensemble_jobs_in_a_sweep(tmp_path):
    """--ensemble 3: the 6 lr × seed points go in two stackable groups of 3; the group with diverging members
    falls back to single runs, which record their own errors; every finished run matches a separate run up to
    float rounding."""
    out = tmp_path / "sweep"
    grid = {"lr": [1e-2, 1e30], "seed": [0, 1, 2]}
    index = run_sweep(out, grid, base(), workers=1, ensemble=3, progress=False)
    assert index["status"].tolist() == ["done"] * 3 + ["failed"] * 3
    assert index.loc[index["status"] == "failed", "error"].str.contains("TrainingDiverged").all()
    statuses = [json.loads((out / ".status" / f"{r}.json").read_text()) for r in index["run_id"]]
    assert [st.get("ensemble") for st in statuses] == [3, 3, 3, None, None, None]
    assert [st["attempts"] for st in statuses] == [1] * 6
    for r in index[index["status"] == "done"].itertuples():
        ref = train(Run.load(out / r.path).config, tmp_path / f"ref-{r.seed}", progress=False)
        a, b = final_weights(out / r.path), final_weights(ref.path)
        for k in b:
            if not k.endswith("attn.b_K"):  # softmax-invariant, see test_ensemble.py
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_train_named_runs_is_a_drop_in_for_study_training(tmp_path):
    cfgs = {"a": build_run_config(base(seed=0)), "b": build_run_config(base(seed=1, M=None))}
    runs = train_named_runs(cfgs, tmp_path, progress=False)
    assert set(runs) == {"a", "b"} and all(r.finished for r in runs.values())
    assert runs["a"].path == tmp_path / "a"
    idx = load_index(tmp_path)
    assert idx["run_id"].tolist() == ["a", "b"] and (idx["status"] == "done").all()
    mtime = (tmp_path / "a" / "metrics.parquet").stat().st_mtime_ns
    train_named_runs(cfgs, tmp_path, progress=False)  # reused, not retrained
    assert (tmp_path / "a" / "metrics.parquet").stat().st_mtime_ns == mtime
    with pytest.raises(SweepError, match="different config"):
        train_named_runs({"a": build_run_config(base(seed=9))}, tmp_path, progress=False)
    bad = {"c": build_run_config(base(lr=1e30))}
    with pytest.raises(SweepFailed, match="c: failed: TrainingDiverged"):
        train_named_runs(bad, tmp_path, progress=False)


# ------------------------------------------------------------------------------------------------ executors
@pytest.mark.slow  # starting a Ray cluster takes 15-20 s on 2 shared cores
def test_ray_executor_on_a_local_two_cpu_cluster(tmp_path):
    ray = pytest.importorskip("ray", reason="the ray executor needs the optional extra: pip install 'icl-lab[sweep]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "sweep"
        index = run_sweep(out, {"seed": [0, 1], "lr": [1e-2, 1e30]}, base(), executor="ray", progress=False,
                          poll_seconds=0.2)
    finally:
        ray.shutdown()
    assert sorted(index["status"]) == ["done", "done", "failed", "failed"]
    done = index[index["status"] == "done"].iloc[0]
    ref = train(build_run_config(base(), {"seed": int(done["seed"]), "lr": 1e-2}), tmp_path / "ref", progress=False)
    assert_same_run(out / done["path"], ref.path)


@pytest.mark.slow  # every submitit local job is a fresh Python process importing torch (~30 s in all)
def test_slurm_executor_with_submitits_local_executor(tmp_path):
    pytest.importorskip("submitit", reason="the slurm executor needs the optional extra: pip install 'icl-lab[sweep]'")
    out = tmp_path / "sweep"
    index = run_sweep(out, {"lr": [1e-2, 1e30]}, base(), executor="slurm", progress=False,
                      poll_seconds=0.2, slurm={"cluster": "local", "timeout_min": 5})
    assert index["status"].tolist() == ["done", "failed"], index["error"].tolist()
    assert "TrainingDiverged" in index.iloc[1]["error"]
    assert (out / ".submitit").is_dir()
    ref = train(build_run_config(base(lr=1e-2)), tmp_path / "ref", progress=False)
    assert_same_run(out / index.iloc[0]["path"], ref.path)


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # submitit's debug jobs leave their log files open
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_slurm_executor_plumbing_with_submitits_debug_executor(tmp_path):
    """The same submitit code path (job array, polling, results, the checkpointable task), jobs run in-process."""
    pytest.importorskip("submitit", reason="the slurm executor needs the optional extra: pip install 'icl-lab[sweep]'")
    out = tmp_path / "sweep"
    index = run_sweep(out, {"lr": [1e-2, 1e30]}, base(), executor="slurm", progress=False, poll_seconds=0.05,
                      slurm={"cluster": "debug"})
    assert index["status"].tolist() == ["done", "failed"], index["error"].tolist()
    assert "TrainingDiverged" in index.iloc[1]["error"]
