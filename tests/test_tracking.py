"""icl_lab.tracking: the null tracker, the key mapping, and a real wandb run in offline mode (no network)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from icl_lab.tracking import Tracker, evaluation_values, llc_values, open_tracker


def test_null_tracker_without_project_does_not_import_wandb():
    code = ("import sys\nfrom icl_lab.tracking import open_tracker\n"
            "t = open_tracker(None, '.', name='r', job_type='train')\n"
            "t.log(0, {'train/loss': 1.0}); t.finish()\n"
            "assert type(t).__name__ == 'Tracker', type(t)\n"
            "assert 'wandb' not in sys.modules, 'wandb was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_evaluation_values_prefix_and_skip():
    row = {"step": 10, "lr": 1e-3, "id_loss": 0.5, "id_loss_k0": 1.0, "ood_delta_dmmse": np.float32(0.25),
           "bad": float("nan")}
    assert evaluation_values(row) == {"eval/id_loss": 0.5, "eval/id_loss_k0": 1.0, "eval/ood_delta_dmmse": 0.25,
                                      "train/lr": 1e-3}


def test_llc_values_numbers_and_flags():
    row = {"step": 3, "llc_mean": np.float64(12.5), "num_chains": np.int64(4), "ok": False, "sampler": "sgld",
           "flags": "not_stationary;chains_disagree", "llc_per_chain": [1.0, 2.0]}
    assert llc_values(row) == {"llc/llc_mean": 12.5, "llc/num_chains": 4.0,
                               "llc/flags": "not_stationary;chains_disagree"}
    assert llc_values({"llc_mean": 1.0, "flags": ""})["llc/flags"] == "ok"


def read_wandb_file(path) -> tuple[set[str], dict[str, str]]:
    """History keys and config of a .wandb file: 32 KiB blocks of records (7-byte header: crc, length, type),
    each a wandb_internal_pb2.Record, after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, records = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(buf)
            buf = b""
    keys, config = set(), {}
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
        elif kind == "run":
            config |= {item.key: item.value_json for item in rec.run.config.update}
    return keys, config


@pytest.fixture
def offline(monkeypatch):
    """wandb in offline mode (nothing leaves the machine); skips without wandb."""
    pytest.importorskip("wandb", reason="wandb is not installed (the `wandb` extra)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def save_png(path: Path) -> Path:
    """A small PNG figure at `path` (its folder made)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    plt.plot([0, 1], [1, 0])
    plt.savefig(path)
    plt.close("all")
    return path


def test_wandb_offline_run_holds_the_logged_keys(tmp_path, offline):
    fig_path = save_png(tmp_path / "fig.png")
    run_dir = tmp_path / "run"
    with open_tracker("icl-lab-test", run_dir, name="r", job_type="train", config={"D": 8, "M": 2}) as t:
        assert isinstance(t, Tracker) and type(t).__name__ == "WandbTracker"
        t.log(0, {"train/loss": 1.0})
        t.log(1, evaluation_values({"id_loss": 0.5, "id_loss_k0": 0.7}))
        t.log(1, llc_values({"llc_mean": 3.0, "flags": ""}))
        t.log_figure("loss", fig_path)
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, list(run_dir.rglob("*"))
    keys, config = read_wandb_file(files[0])
    assert {"step", "train/loss", "eval/id_loss", "eval/id_loss_k0", "llc/llc_mean", "llc/flags",
            "figures/loss/path"} <= keys  # an image is logged as a record of its file
    assert config["D"] == "8" and config["M"] == "2"


def test_train_and_llc_mirror_to_wandb_offline(tmp_path, offline):
    """`icl-lab train --wandb P` and `icl-lab llc estimate --wandb P`: the offline runs under the run directory hold
    the config, the training loss, the evaluations (mean and per-token, ID and OOD, Δ to the baselines) and each
    LLC estimate with its diagnostics."""
    from typer.testing import CliRunner

    from icl_lab.cli import app
    from icl_lab.config import LLCConfig
    from icl_lab.llc_run import LLCSettings, save_settings
    from icl_lab.store import Run

    from conftest import tiny_overrides

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in tiny_overrides(steps=20).items()]
    run_dir = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--run-dir", str(run_dir), "--quiet", "--wandb", "p", *flags])
    assert r.exit_code == 0, r.output
    run = Run.load(run_dir)
    save_settings(run, LLCSettings(sampler=LLCConfig(num_chains=2, num_draws=10, num_burnin=5, batch_size=16,
                                                     localization=100.0), n=64))
    r = CliRunner().invoke(app, ["llc", "estimate", str(run_dir), "--steps", "20", "--quiet", "--wandb", "p"])
    assert r.exit_code == 0, r.output
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2
    records = [read_wandb_file(f) for f in files]  # one wandb run per command; their order on disk is random
    (train_keys, train_config), = [r for r in records if "train/loss" in r[0]]
    (llc_keys, llc_config), = [r for r in records if "llc/llc_mean" in r[0]]
    assert {"train/loss", "train/lr", "eval/id_loss", "eval/id_loss_k1", "eval/ood_loss",
            "eval/id_delta_dmmse", "eval/ood_delta_ridge"} <= train_keys
    assert json.loads(train_config["task"])["M"] == 2 and json.loads(train_config["seed"]) == 0
    assert {"llc/llc_mean", "llc/llc_mcse", "llc/rhat", "llc/ess", "llc/flags"} <= llc_keys
    assert "sampler" in llc_config


def test_train_without_wandb_never_imports_it(tmp_path):
    code = ("import sys\nfrom icl_lab.config import build_run_config\nfrom icl_lab.train import train\n"
            "sys.path.insert(0, 'tests')\nfrom conftest import tiny_overrides\n"
            f"train(build_run_config(overrides=tiny_overrides(steps=5)), {str(tmp_path / 'r')!r}, progress=False)\n"
            "assert 'wandb' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).resolve().parents[1]))


@pytest.mark.parametrize("ensemble", [1, 2])
def test_sweep_mirrors_every_run_to_wandb(tmp_path, offline, ensemble):
    """run_sweep(wandb=...) passes the project to every job, run by run or as an ensemble: each run directory
    gets its own offline wandb run with the training loss."""
    from icl_lab.sweep import run_sweep

    from conftest import tiny_overrides

    index = run_sweep(tmp_path / "sw", {"seed": [0, 1]}, tiny_overrides(steps=10), workers=1, progress=False,
                      ensemble=ensemble, wandb="p")
    assert (index["status"] == "done").all(), index
    for run_id in index["run_id"]:
        files = list((tmp_path / "sw" / "runs" / run_id).glob("wandb/offline-run-*/run-*.wandb"))
        assert len(files) == 1, run_id
        assert "train/loss" in read_wandb_file(files[0])[0]


def test_a_study_mirrors_its_figures_and_checks(tmp_path, offline):
    import pandas as pd

    from icl_lab.studies.low_diversity import LowDiversityConfig
    from icl_lab.studies.runner import mirror_study

    out = tmp_path / "study"
    save_png(out / "figures" / "M2" / "loss.png")
    pd.DataFrame({"verdict": ["pass", "fail", "pass"]}).to_parquet(out / "expectations.parquet")
    mirror_study(LowDiversityConfig(wandb="p"), out)
    files = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    keys, config = read_wandb_file(files[0])
    assert {"study/checks", "study/checks_pass", "figures/M2/loss/path"} <= keys and json.loads(config["wandb"]) == "p"
    mirror_study(LowDiversityConfig(), tmp_path / "nothing")  # no project: nothing written, nothing imported
    assert not (tmp_path / "nothing").exists()
