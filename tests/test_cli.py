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
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, args, message):
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "runs"), "--quiet", *args],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists()


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
