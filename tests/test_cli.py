import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from icl_lab.cli import app
from icl_lab.config import leaf_fields
from icl_lab.store import Run

from conftest import tiny_overrides

runner = CliRunner()


def flags(**kw) -> list[str]:
    out = []
    for k, v in tiny_overrides(**kw).items():
        out += [f"--{k if k in {'M', 'D', 'K'} else k.replace('_', '-')}", str(v)]
    return out


def test_every_config_field_is_a_flag():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for key in leaf_fields():
        flag = key if key in {"M", "D", "K"} else key.replace("_", "-")
        assert f"--{flag}" in result.output, flag


def test_train_plot_info(tmp_path):
    result = runner.invoke(app, ["train", "--out", str(tmp_path), "--quiet", *flags()])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "seed-M2-D4-K6-seed0"
    run = Run.load(run_dir)
    assert run.finished and run.config.model.d_model == 16
    result = runner.invoke(app, ["plot", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "figures" / "curves.png").stat().st_size > 10_000
    assert (run_dir / "figures" / "curves.pdf").exists()
    result = runner.invoke(app, ["info", str(run_dir)])
    assert result.exit_code == 0 and "checkpoints" in result.output and "metrics.parquet" in result.output
    # an existing run without --resume / --overwrite is refused and left untouched
    before = (run_dir / "metrics.parquet").read_bytes()
    result = runner.invoke(app, ["train", "--out", str(tmp_path), "--quiet", *flags()])
    assert result.exit_code == 2 and "already exists" in result.output and "--resume" in result.output
    assert (run_dir / "metrics.parquet").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--M", "0"], "M must be an integer >= 1 or 'inf'"),
        (["--M", "-2"], "M must be an integer >= 1 or 'inf'"),
        (["--noise-var", "-1"], "noise_var: Input should be greater than or equal to 0"),
        (["--D", "0"], "D: Input should be greater than or equal to 1"),
        (["--K", "0"], "K: Input should be greater than or equal to 1"),
        (["--preset", "gpt9"], "unknown model preset 'gpt9'; allowed presets: seed, hoogland"),
        (["--family", "cube"], "family: Input should be 'gaussian' or 'unit_norm'"),
        (["--lr", "0"], "lr: Input should be greater than 0"),
        (["--batch-size", "0"], "batch_size: Input should be greater than or equal to 1"),
        (["--steps", "5", "--n-checkpoints-log", "9"], "n_checkpoints_log=9 is more than steps=5"),
        (["--name", "../../escaped"], "name '../../escaped' starts with '.'"),
        (["--name", "a/b"], "name 'a/b' holds a path separator"),
        (["--name", "a\\b"], "holds a path separator"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, args, message):
    (tmp_path / "cwd").mkdir()
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "cwd" / "runs"), "--quiet", *args],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert [p.name for p in tmp_path.rglob("*")] == ["cwd"]  # nothing written, inside --out or outside it


def test_unknown_key_in_config_file(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"M": 2, "learning_rate": 0.1}))
    result = runner.invoke(app, ["train", "--config", str(cfg), "--out", str(tmp_path / "runs")],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "unknown config key 'learning_rate'" in result.output
    assert not (tmp_path / "runs").exists()


def test_corrupt_checkpoint_on_resume(tmp_path):
    run_dir = tmp_path / "r"
    assert runner.invoke(app, ["train", "--run-dir", str(run_dir), "--quiet", *flags()]).exit_code == 0
    state = run_dir / "checkpoints" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    result = runner.invoke(app, ["train", "--resume", str(run_dir), "--quiet"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "corrupt or truncated" in result.output


def test_kill_and_resume_continues_bit_identically(tmp_path):
    """SIGKILL a training process midway, resume it, and compare with an uninterrupted run."""
    args = flags(steps=1500, n_checkpoints_linear=31, n_checkpoints_log=0)
    straight = tmp_path / "straight"
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "icl_lab.cli", "train", "--quiet", *args]
    subprocess.run([*cmd, "--run-dir", str(straight)], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cmd, "--run-dir", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt_dir = killed / "checkpoints"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(ckpt_dir.glob("step_*.safetensors"))) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1500 not in Run.load(killed).checkpoint_steps, "the kill came too late to test anything"
    subprocess.run([*cmd[:4], "--resume", str(killed), "--quiet"], check=True, env=env, capture_output=True)
    a, b = Run.load(straight).load_checkpoint(1500), Run.load(killed).load_checkpoint(1500)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------------------------------------ sweep
def sweep_sets(**kw) -> list[str]:
    base = tiny_overrides(**{"steps": 20, "n_checkpoints_linear": 3, "n_checkpoints_log": 2, "eval_size": 32, **kw})
    return [a for k, v in base.items() for a in ("--set", f"{k}={v}")]


def test_sweep_runs_a_grid_records_failures_and_resumes(tmp_path):
    from icl_lab.sweep import load_index

    out = tmp_path / "sw"
    args = ["sweep", "--out", str(out), "--workers", "1", "--quiet"]
    r = runner.invoke(app, [*args, "--grid", "seed=0,1", *sweep_sets(), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "2 runs (dry run" in r.output and "seed=0-" in r.output and not out.exists()
    # one failing run (lr = 1e30 diverges) is recorded and does not stop the other: exit status 1
    r = runner.invoke(app, [*args, "--grid", "seed=0", "--grid", "lr=1e30,0.01", *sweep_sets()],
                      env={"COLUMNS": "300"})
    assert r.exit_code == 1, r.output
    assert "1 done, 1 failed" in r.output and "TrainingDiverged" in r.output
    index = load_index(out)
    assert index["status"].tolist() == ["failed", "done"] and index["attempts"].tolist() == [1, 1]
    # no grid: the recorded sweep again; the finished run is skipped, the failed one not retried
    done_metrics = out / index.iloc[1]["path"] / "metrics.parquet"
    mtime = done_metrics.stat().st_mtime_ns
    r = runner.invoke(app, [*args, "--no-retry-failed"])
    assert r.exit_code == 1 and load_index(out)["attempts"].tolist() == [1, 1]
    assert done_metrics.stat().st_mtime_ns == mtime
    r = runner.invoke(app, ["sweep", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "--executor" in r.output and "--address" in r.output and "--slurm" in r.output


def test_sweep_file_with_flags(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[base]\nsteps = 20\nD = 3\n[base.model]\nd_model = 16\n[grid]\nM = [1, "inf"]\n'
                    '[sweep]\nexecutor = "local"\n')
    r = runner.invoke(app, ["sweep", "--config", str(spec), "--grid", "seed=0,1", "--set", "n_layers=1",
                            "--dry-run", "--out", str(tmp_path / "sw")])
    assert r.exit_code == 0, r.output
    assert "4 runs" in r.output and "M=inf_seed=1-" in r.output and not (tmp_path / "sw").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--grid", "activation=relu,tanh"], "activation='tanh'"),
    (["--grid", "activation=relu,tanh"], "Allowed for activation: one of: relu, gelu, gelu_tanh"),
    (["--grid", "M=2,0"], "Allowed for M: an integer >= 1, or 'inf'"),
    (["--grid", "learning_rate=0.1"], "unknown config field 'learning_rate' in the grid; allowed fields:"),
    (["--grid", "lr=0.1", "--set", "lr"], "--set expects KEY=VALUE, got 'lr'"),
    (["--grid", "lr=0.1", "--set", "d_model=0"], "invalid base config: model.d_model:"),
    (["--grid", "seed=0", "--executor", "dask"], "unknown executor 'dask'; allowed: local, ray, slurm"),
    (["--grid", "seed=0", "--workers", "0"], "workers must be an integer >= 1, got 0"),
    (["--grid", "seed=0", "--ensemble", "0"], "ensemble must be an integer >= 1, got 0"),
    (["--grid", "name=../x,b"], "name '../x' starts with '.'"),
    ([], "has no sweep.json; give a grid"),
    (["--config", "missing.toml"], "config file missing.toml does not exist"),
])
def test_sweep_bad_input_fails_before_anything_is_written(tmp_path, args, message):
    out = tmp_path / "sw"
    r = runner.invoke(app, ["sweep", "--out", str(out), *args], env={"COLUMNS": "300"})
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and message in " ".join(r.output.split())
    assert not out.exists()


def test_sweep_file_errors_name_the_table(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[grid]\nseed = [0]\n[sweep]\nprocesses = 2\n')
    r = runner.invoke(app, ["sweep", "--config", str(spec), "--out", str(tmp_path / "sw")], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "unknown [sweep] options ['processes']; allowed: executor, workers" in r.output
    spec.write_text('[grid]\nseed = [0]\n')
    r = runner.invoke(app, ["sweep", "--config", str(spec), "--grid", "seed=1", "--out", str(tmp_path / "sw")],
                      env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "given both in" in r.output
    assert not (tmp_path / "sw").exists()


# ------------------------------------------------------------------------------------------------ llc, bad input
@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory):
    from icl_lab.config import build_run_config
    from icl_lab.train import train

    path = tmp_path_factory.mktemp("cli") / "run"
    return train(build_run_config(overrides=tiny_overrides(steps=10)), path, progress=False).path


def _llc_command(name: str):
    import typer

    return typer.main.get_command(app).commands["llc"].commands[name]


def test_llc_calibrate_defaults_are_the_config_defaults():
    from icl_lab.config import LLCConfig
    from icl_lab.llc import DEFAULT_STEP_SIZES
    from icl_lab.llc_run import LLCSettings

    defaults = {p.name: p.default for p in _llc_command("calibrate").params}
    cfg, settings = LLCConfig(), LLCSettings()
    assert (defaults["chains"], defaults["draws"], defaults["burnin"]) == (cfg.num_chains, cfg.num_draws,
                                                                           cfg.num_burnin)
    assert defaults["batch_size"] == str(cfg.batch_size) and defaults["sampler"] == cfg.sampler
    assert defaults["tilted"] is cfg.tilted
    assert (defaults["n"], defaults["data"]) == (settings.n, settings.data)
    assert tuple(float(v) for v in defaults["step_sizes"].split(",")) == DEFAULT_STEP_SIZES
    assert defaults["localizations"] is None and defaults["nbetas"] is None  # resolved from nβ by llc.calibrate


def test_llc_calibrate_without_flags_passes_the_config_defaults(tiny_run_dir, monkeypatch):
    """What reaches calibrate_run when no flag is given: exactly LLCSettings() and DEFAULT_STEP_SIZES."""
    import icl_lab.cli as cli
    from icl_lab.config import LLCConfig
    from icl_lab.llc import DEFAULT_STEP_SIZES
    from icl_lab.llc_run import LLCSettings

    seen = {}

    def fake(run, step, settings, device, **grid):
        seen.update(step=step, settings=settings, device=device, **grid)
        raise ValueError("stop here")

    monkeypatch.setattr(cli, "calibrate_run", fake)
    r = runner.invoke(app, ["llc", "calibrate", str(tiny_run_dir), "--quiet"], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "error: stop here" in r.output
    seed = Run.load(tiny_run_dir).config.seed
    assert seen["settings"] == LLCSettings(seed=seed) and seen["settings"].sampler == LLCConfig()
    assert seen["step"] is None and seen["device"] == "cpu"
    assert tuple(seen["step_sizes"]) == DEFAULT_STEP_SIZES and seen["localizations"] is None
    assert seen["nbetas"] is None


@pytest.mark.parametrize("flag", [["--chains", "8"], ["--step-sizes", "1e-4"], ["--sampler", "mala"],
                                  ["--tilted"], ["--batch-size", "64"], ["--step", "3"]])
def test_llc_estimate_refuses_calibration_flags(tiny_run_dir, flag):
    r = runner.invoke(app, ["llc", str(tiny_run_dir), *flag], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and f"{flag[0]}: only for `icl-lab llc calibrate`" in r.output


@pytest.mark.parametrize("flag", [["--workers", "2"], ["--steps", "0,1"]])
def test_llc_calibrate_refuses_estimate_flags(tiny_run_dir, flag):
    r = runner.invoke(app, ["llc", "calibrate", str(tiny_run_dir), *flag], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and f"No such option: {flag[0]}" in r.output
    assert not (tiny_run_dir / "llc_settings.json").exists()


def test_llc_estimate_honours_n_and_data_against_the_saved_settings(tiny_run_dir, monkeypatch, tmp_path):
    """--n / --data in estimate mode must match the calibrated settings (they fix nβ and the data): a different
    value is an error naming both, the same value estimates with the saved settings."""
    import shutil

    import icl_lab.cli as cli
    from icl_lab.llc_run import LLCSettings, save_settings

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run_dir)
    saved = LLCSettings(n=256, data="ood", calibrated=True)
    save_settings(Run.load(run_dir), saved)
    for flags_, message in ((["--n", "512"], "--n 512: the settings in"),
                            (["--data", "id"], "calibrated with --data ood")):
        r = runner.invoke(app, ["llc", str(run_dir), *flags_, "--quiet"], env={"COLUMNS": "300"})
        assert r.exit_code == 2 and message in r.output, r.output
    seen = {}

    def fake(run, steps, settings, **kw):
        seen.update(steps=steps, settings=settings)
        raise ValueError("stop here")

    monkeypatch.setattr(cli, "estimate_run", fake)
    r = runner.invoke(app, ["llc", "estimate", str(run_dir), "--n", "256", "--data", "ood", "--steps", "0,10"],
                      env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "stop here" in r.output
    assert seen == {"steps": [0, 10], "settings": saved}


@pytest.mark.parametrize(("args", "message"), [
    (["study", "low-diversity", "--Ms", "inf"], "Ms: Value error, M must be a finite integer >= 1 in this study"),
    (["study", "low-diversity", "--Ms", "0,1"], "Ms: Value error, M must be an integer >= 1 or 'inf', got 0"),
    (["study", "low-diversity", "--seeds", "a"], "seeds: 'a' is not allowed; allowed: comma-separated integers"),
    (["study", "low-diversity", "--config", "missing.toml"], "config file missing.toml does not exist"),
    (["study", "nope"], "unknown study 'nope'"),
    (["llc", "calibrate", "RUN", "--step-sizes", "1e-4,x"], "--step-sizes: '1e-4,x' is not a comma-separated list"),
    (["llc", "calibrate", "RUN", "--batch-size", "x"], "--batch-size: 'x' is not allowed"),
    (["llc", "calibrate", "RUN", "--sampler", "hmc"], "sampler: Input should be 'sgld', 'rmsprop_sgld' or 'mala'"),
    (["llc", "calibrate", "RUN", "--sampler", "mala"], "sampler 'mala' needs batch_size None"),
    (["llc", "calibrate", "RUN", "--step", "7"], "no checkpoint at step 7"),
    (["llc", "calibrate", "RUN", "--device", "tpu"], "--device: unknown device 'tpu'"),
    (["llc", "calibrate"], "Missing argument 'RUN'"),
    (["llc", "RUN", "--steps", "1,x"], "--steps: '1,x' is not allowed"),
    (["llc", "RUN", "--workers", "0"], "Invalid value for '--workers'"),
    (["llc", "RUN"], "has no LLC settings; run `icl-lab llc calibrate"),
    (["llc", "missing-run"], "cannot read run missing-run"),
    (["stages", "RUN"], "has no LLC estimates"),
    (["train", "--lr", "abc"], "Invalid value for '--lr'"),
    (["nope"], "No such command 'nope'"),
])
def test_bad_input_exits_with_one_error_line(tiny_run_dir, args, message):
    args = [str(tiny_run_dir) if a == "RUN" else a for a in args]
    r = runner.invoke(app, args, env={"COLUMNS": "300"})
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not (tiny_run_dir / "llc_settings.json").exists()


def test_stages_command_uses_the_studies_stage_pipeline(tmp_path):
    """`icl-lab stages RUN` writes the same table as studies.common.llc_stages on the run's curve, and a large
    negative, flagged early section places no boundary."""
    import shutil

    import numpy as np
    import pandas as pd

    from icl_lab.config import build_run_config
    from icl_lab.store import write_parquet
    from icl_lab.studies.common import llc_stages
    from icl_lab.train import train

    run = train(build_run_config(overrides=tiny_overrides(steps=40, n_checkpoints_linear=8, n_checkpoints_log=8)),
                tmp_path / "run", progress=False)
    steps = np.array(run.checkpoint_steps)
    lam = np.where(steps < 5, -2000.0, np.where(steps < 20, 10.0, 30.0)) + 0.01 * steps
    flags = np.where(steps < 5, "not_stationary", "")
    llc = pd.DataFrame({"step": steps, "llc_mean": lam, "llc_std": 0.5, "flags": flags, "llc_mcse": 0.3})
    write_parquet(run.path / "llc.parquet", llc)
    r = runner.invoke(app, ["stages", str(run.path)], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    written = pd.read_parquet(run.path / "stages.parquet")
    loss = run.metrics.set_index("step").loc[steps]["id_loss"].to_numpy()
    expected = llc_stages(llc, loss).table
    pd.testing.assert_frame_equal(written.reset_index(drop=True), expected.reset_index(drop=True), check_dtype=False)
    assert len(written) >= 2 and written["start"].iloc[1:].gt(3).all()  # no boundary in the untrusted steps 0-3
    shutil.rmtree(run.path)


def test_two_sweep_commands_on_one_sweep_wait_for_each_other(tmp_path):
    """Two `icl-lab sweep` processes started together on the same sweep: the second waits for the first, finds
    its runs done, and trains nothing again; the index lists each run once, trained once."""
    from icl_lab.sweep import load_index

    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "icl_lab.cli", "sweep", "--out", str(out), "--workers", "1", "--quiet",
           "--grid", "seed=0,1,2", *sweep_sets(steps=60)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("waiting for it" in err for _, err in outputs) == 1  # one of them waited, and said so
    index = load_index(out)
    assert len(index) == 3 and index["run_id"].is_unique
    assert (index["status"] == "done").all() and (index["attempts"] == 1).all()
