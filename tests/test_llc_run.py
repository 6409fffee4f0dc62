"""LLC over a run's checkpoints: calibration saved with the run, estimates recorded per step with their device,
and the caller's torch thread count left alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from icl_lab.config import LLCConfig, build_run_config
from icl_lab.llc import min_burnin
from icl_lab.llc_run import LLCSettings, calibrate_run, estimate_run, load_settings, refined_table, save_settings
from icl_lab.store import Run
from icl_lab.train import train

from conftest import tiny_overrides


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = build_run_config(overrides=tiny_overrides(steps=60))
    return train(cfg, tmp_path_factory.mktemp("llc_run") / "run", progress=False)


def test_calibrate_then_estimate_every_checkpoint_on_cpu(tiny_run):
    threads = torch.get_num_threads()
    base = LLCSettings(sampler=LLCConfig(num_chains=2, num_draws=20, num_burnin=5, batch_size=16,
                                         localization=100.0), n=128)
    cal, chosen = calibrate_run(tiny_run, settings=base, step_sizes=[3e-4, 1e-3], localizations=[100.0])
    assert torch.get_num_threads() == threads  # sampled with one thread, the caller's count restored
    assert chosen.calibrated and load_settings(tiny_run) == chosen
    eps = chosen.sampler.step_size
    assert chosen.sampler.num_burnin == max(5, min_burnin(eps, 100.0))  # the burn-in calibration chose
    llc = estimate_run(tiny_run, steps=tiny_run.checkpoint_steps[-2:], progress=False, device="cpu")
    assert torch.get_num_threads() == threads
    assert list(llc["step"]) == tiny_run.checkpoint_steps[-2:]
    assert (llc["device"] == "cpu").all() and (llc["settings_hash"] == chosen.digest()).all()
    assert np.isfinite(llc["llc_mean"]).all() and (llc["num_burnin"] == chosen.sampler.num_burnin).all()
    again = estimate_run(tiny_run, steps=tiny_run.checkpoint_steps[-2:], progress=False)  # done: reused as is
    assert again["llc_mean"].tolist() == llc["llc_mean"].tolist()


def test_estimates_at_several_settings_are_kept_side_by_side(tiny_run):
    steps = tiny_run.checkpoint_steps[-2:]
    sampler = LLCConfig(step_size=1e-3, num_chains=2, num_draws=10, num_burnin=5, batch_size=16, localization=50.0)
    first = LLCSettings(sampler=sampler, n=128)
    second = first.model_copy(update={"sampler": sampler.model_copy(update={"localization": 25.0})})
    a = estimate_run(tiny_run, steps=steps, settings=first, progress=False)
    b = estimate_run(tiny_run, steps=steps, settings=second, progress=False)
    assert list(b["localization"]) == [25.0, 25.0]  # run.llc: the curve at the settings used last
    every = tiny_run.llc_all
    for settings, curve in ((first, a), (second, b)):
        kept = every[every["settings_hash"] == settings.digest()]
        assert list(kept["step"]) == steps and kept["llc_mean"].tolist() == curve["llc_mean"].tolist()
    again = estimate_run(tiny_run, steps=steps, settings=first, progress=False)  # back to the first: reused
    assert again["llc_mean"].tolist() == a["llc_mean"].tolist() and len(tiny_run.llc_all) == len(every)


def test_cli_calibrate_estimate_resume_and_plot(tmp_path):
    from typer.testing import CliRunner

    from icl_lab.cli import app
    from icl_lab.store import Run

    runner = CliRunner()
    path = train(build_run_config(overrides=tiny_overrides(steps=60)), tmp_path / "run", progress=False).path
    small = ["--n", "128", "--chains", "2", "--draws", "20", "--burnin", "5", "--batch-size", "16", "--quiet"]
    result = runner.invoke(app, ["llc", str(path), "--quiet"])
    assert result.exit_code == 2 and "llc calibrate" in result.output  # no settings yet: says what to run
    result = runner.invoke(app, ["llc", "calibrate", str(path), "--step-sizes", "3e-4,1e-3", "--localizations", "100",
                                 *small])
    assert result.exit_code == 0, result.output
    assert "chosen (" in result.output and "γ-plateau" in result.output and (path / "llc_settings.json").exists()
    assert (path / "figures" / "llc_calibration.png").exists()
    steps = Run.load(path).checkpoint_steps
    result = runner.invoke(app, ["llc", str(path), "--chains", "8", "--quiet"])  # not silently ignored
    assert result.exit_code == 2 and "--chains: only for `icl-lab llc calibrate`" in result.output
    result = runner.invoke(app, ["llc", str(path), "--steps", ",".join(map(str, steps[-3:])), "--quiet"])
    assert result.exit_code == 0, result.output
    first = Run.load(path).llc
    assert list(first["step"]) == steps[-3:] and np.isfinite(first["llc_mean"]).all()
    result = runner.invoke(app, ["llc", str(path), "--quiet"])  # the rest; the three done are kept as they were
    assert result.exit_code == 0, result.output
    llc = Run.load(path).llc
    assert list(llc["step"]) == steps
    assert llc.set_index("step").loc[steps[-3:], "llc_mean"].tolist() == first["llc_mean"].tolist()
    result = runner.invoke(app, ["plot", str(path)])
    assert result.exit_code == 0, result.output
    last = str(steps[-1])
    result = runner.invoke(app, ["llc", str(path), "--steps", last, "--refine", "position,token", "--quiet"])
    assert result.exit_code == 2 and "--refine position,token" in result.output and "allowed: position" in result.output
    result = runner.invoke(app, ["llc", str(path), "--steps", last, "--refine", "position,task", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "data-refined" in result.output and "task1" in result.output and "k5" in result.output
    refined = Run.load(path).llc
    assert refined["llc_mean"].tolist() == llc.set_index("step").loc[[steps[-1]], "llc_mean"].tolist()


@pytest.mark.parametrize("device, message", [("gpu", "allowed: cpu, cuda, cuda:N"),
                                             ("cuda:x", "allowed: cpu, cuda, cuda:N")])
def test_cli_bad_device_fails_before_any_work(tmp_path, device, message):
    from typer.testing import CliRunner

    from icl_lab.cli import app

    path = train(build_run_config(overrides=tiny_overrides(steps=10)), tmp_path / "run", progress=False).path
    result = CliRunner().invoke(app, ["llc", "calibrate", str(path), "--device", device], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and message in result.output
    assert not (path / "llc_settings.json").exists()


CONCURRENT = """
import sys, time
from pathlib import Path
from icl_lab.llc_run import estimate_run
from icl_lab.store import Run
run, steps, start = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")], float(sys.argv[3])
while time.time() < start:  # both processes start estimating at the same moment
    time.sleep(0.005)
estimate_run(Run.load(run), steps=steps, progress=False)
"""


@pytest.mark.parametrize("split", ["disjoint", "same"])
def test_concurrent_processes_neither_lose_nor_duplicate_rows(tmp_path, split):
    """Two real processes estimate one run at once, as a SLURM array over checkpoints would: on disjoint steps
    each keeps its rows; on the same steps they share the work. Either way llc.parquet ends with each step once."""
    run = train(build_run_config(overrides=tiny_overrides(steps=60, n_checkpoints_linear=6, n_checkpoints_log=6)),
                tmp_path / "run", progress=False)
    settings = LLCSettings(sampler=LLCConfig(num_chains=2, num_draws=30, num_burnin=10, batch_size=16,
                                             localization=100.0, step_size=1e-4), n=64)
    save_settings(run, settings)
    steps = run.checkpoint_steps
    assert len(steps) >= 8
    parts = [steps[::2], steps[1::2]] if split == "disjoint" else [steps, steps]
    start = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(run.path), ",".join(map(str, p)), str(start)],
                              stderr=subprocess.PIPE, text=True) for p in parts]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    llc = Run.load(run.path).llc_all
    assert sorted(llc["step"]) == sorted(steps)  # every step once: none lost, none twice
    assert (llc["settings_hash"] == settings.digest()).all() and np.isfinite(llc["llc_mean"]).all()
    alone = tmp_path / "alone"  # the same estimates by one process: concurrency changes no number
    shutil.copytree(run.path, alone, ignore=shutil.ignore_patterns("llc.parquet", ".llc*"))
    ref = estimate_run(Run.load(alone), steps=steps, progress=False)
    assert ref.set_index("step")["llc_mean"].to_dict() == llc.set_index("step")["llc_mean"].to_dict()


def test_a_claim_is_released_when_its_row_is_written(tmp_path):
    """Two processes that each hold a step the other needs must not wait for each other: here this test holds the
    last step's claim while a real process estimates every step; the process must let go of the first step's claim
    once its row is written (not when it is all done), or the two would deadlock."""
    from icl_lab.llc_run import _claim_path
    from icl_lab.store import file_lock

    run = train(build_run_config(overrides=tiny_overrides(steps=20)), tmp_path / "run", progress=False)
    settings = LLCSettings(sampler=LLCConfig(num_chains=2, num_draws=10, num_burnin=5, batch_size=16,
                                             localization=100.0, step_size=1e-4), n=64)
    save_settings(run, settings)
    steps, digest = run.checkpoint_steps, settings.digest()
    with file_lock(_claim_path(run, digest, steps[-1])) as mine:
        assert mine
        proc = subprocess.Popen([sys.executable, "-c", CONCURRENT, str(run.path), ",".join(map(str, steps)), "0"],
                                stderr=subprocess.PIPE, text=True)
        deadline, released = time.time() + 120, False
        while time.time() < deadline and not released:
            with file_lock(_claim_path(run, digest, steps[0])) as got:
                done = Run.load(run.path).llc_all
                released = bool(got) and done is not None and steps[0] in set(done["step"])
            time.sleep(0.2)
    _, err = proc.communicate(timeout=120)  # our claim is gone: it estimates the last step itself and ends
    assert released, "the first step's claim was still held while its process waited for ours"
    assert proc.returncode == 0, err[-2000:]
    assert sorted(Run.load(run.path).llc_all["step"]) == steps


def test_refined_estimate_per_position_task_and_fresh(tiny_run):
    """The refined curve comes from the same chains: λ̂ equals the unrefined one, the per-position values average
    to it, and each pool task and the fresh batch get a value with a 95% interval."""
    step = tiny_run.checkpoint_steps[-1]
    sampler = LLCConfig(step_size=1e-3, num_chains=2, num_draws=15, num_burnin=5, batch_size=32, localization=50.0)
    plain = LLCSettings(sampler=sampler, n=128)
    refined = plain.model_copy(update={"refine": ["position", "task", "fresh"]})
    assert "refine" not in plain.to_json() and plain.digest() != refined.digest()
    a = estimate_run(tiny_run, steps=[step], settings=plain, progress=False).iloc[0]
    b = estimate_run(tiny_run, steps=[step], settings=refined, progress=False).iloc[0]
    assert b["llc_mean"] == a["llc_mean"]  # observables consume no randomness
    K, M = tiny_run.config.task.K, tiny_run.config.task.M
    positions = [b[f"llc_refined_k{k}"] for k in range(K)]
    assert np.mean(positions) == pytest.approx(b["llc_mean"], rel=1e-6)
    for name in [f"task{j}" for j in range(M)] + ["fresh"]:
        assert np.isfinite(b[f"llc_refined_{name}"]) and b[f"llc_refined_{name}_lo"] <= b[f"llc_refined_{name}_hi"]
    long = refined_table(tiny_run.llc)
    assert set(long["name"]) == {f"k{k}" for k in range(K)} | {f"task{j}" for j in range(M)} | {"fresh"}


def test_refine_settings_are_validated():
    with pytest.raises(ValueError, match="needs data 'id'"):
        LLCSettings(refine=["task"], data="ood")
    with pytest.raises(ValueError, match="twice"):
        LLCSettings(refine=["position", "position"])
    with pytest.raises(ValueError, match="position"):
        LLCSettings(refine=["token"])


def test_validated_plan_checks_plateau_paper_and_ground_truth(tiny_run, tmp_path):
    """Validated settings are not calibrated but checked: λ̂ at γ/nβ halved and doubled, at the papers' settings,
    and a deep linear network at the same settings; the curve reuses the check's own estimate."""
    from icl_lab.llc_run import LLCPlan, calibrate_shared, load_shared, settings_report

    sampler = LLCConfig(num_chains=2, num_draws=20, num_burnin=20, batch_size=16)  # localization None: validated
    paper = LLCConfig(step_size=3e-4, nbeta=200 / 3, localization=20 / 3, num_chains=2, num_draws=20,
                      num_burnin=10, batch_size=16)
    base = LLCSettings(sampler=sampler, n=128)
    plan = LLCPlan(base, [], "r", check_settings=True, paper_sampler=paper)
    runs = {"r": tiny_run}
    shared = calibrate_shared(tmp_path, plan, runs)
    assert plan.validated and shared.settings == base and shared.check is not None
    check = shared.check
    nb = check["nbeta"]
    assert [r["gamma_over_nbeta"] for r in check["plateau"]] == [0.005, 0.01, 0.02]
    assert [r["localization"] for r in check["plateau"]] == pytest.approx([0.005 * nb, 0.01 * nb, 0.02 * nb])
    mids = [r["llc_mean"] for r in check["plateau"]]
    assert check["on_plateau"] == all(abs(v - mids[1]) <= 0.1 * abs(mids[1]) for v in mids)
    assert check["paper"]["nbeta"] == pytest.approx(200 / 3) and check["paper"]["step_size"] == 3e-4
    gt = check["ground_truth"]
    assert gt["case"] == "dln2_r0" and gt["llc_theory"] > 0 and np.isfinite(gt["llc_mean"])
    step = tiny_run.checkpoint_steps[-1]
    curve = tiny_run.llc_all
    own = curve[(curve["settings_hash"] == base.digest()) & (curve["step"] == step)]
    assert len(own) == 1 and own["llc_mean"].iloc[0] == mids[1]  # reused by the curve, not estimated twice
    assert load_shared(tmp_path, plan, runs).check == check  # cached with its inputs
    text, tables = settings_report(shared)
    assert "γ-plateau" in text and "dln2_r0" in text and "papers' settings" in text
    assert len(tables) == 2 and len(tables[0]) == 4
