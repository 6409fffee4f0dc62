import math

import pytest
import torch
from pydantic import ValidationError

from icl_lab.config import TrainConfig, build_run_config
from icl_lab.store import Run
from icl_lab.train import TrainingDiverged, checkpoint_steps, lr_factor, make_optimizer, train

from conftest import tiny_overrides


def test_checkpoint_schedule_is_union_of_linear_and_log_with_ends():
    steps = checkpoint_steps(1000, 5, 4)
    assert steps == [0, 1, 10, 100, 250, 500, 750, 1000]
    assert checkpoint_steps(7, 0, 0) == [0, 7]
    assert checkpoint_steps(5, 6, 5) == [0, 1, 2, 3, 4, 5]


def test_lr_schedules():
    tri = TrainConfig(steps=100, schedule="triangle", warmup_frac=0.5)
    f = [lr_factor(s, tri) for s in range(100)]
    assert math.isclose(max(f), 1.0) and f.index(max(f)) == 49
    assert f[0] == pytest.approx(1 / 50) and f[-1] == pytest.approx(0.0)
    assert all(a < b for a, b in zip(f[:49], f[1:50], strict=True))
    assert all(a > b for a, b in zip(f[49:-1], f[50:], strict=True))
    cos = TrainConfig(steps=100, schedule="cosine", warmup_frac=0.1)
    c = [lr_factor(s, cos) for s in range(100)]
    assert c[9] == pytest.approx(1.0) and c[-1] == pytest.approx(0.0, abs=1e-12)
    assert c[54] == pytest.approx(0.5 * (1 + math.cos(math.pi * (55 - 10) / 90)))  # update 55 of 100
    assert lr_factor(37, TrainConfig()) == 1.0


def test_constant_cooldown_holds_then_decays_linearly_to_zero():
    cfg = TrainConfig(steps=100, schedule="constant_cooldown", cooldown_frac=0.2)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[:80] == [1.0] * 80  # updates 1..80 at the full rate
    assert f[80] == pytest.approx(1 - 1 / 20) and f[89] == pytest.approx(0.5)  # update 90 of 100: halfway down
    assert f[-1] == pytest.approx(0.0)
    assert all(b - a == pytest.approx(-1 / 20) for a, b in zip(f[79:-1], f[80:], strict=True))
    assert TrainConfig().cooldown_frac == 0.2
    whole = [lr_factor(s, TrainConfig(steps=4, schedule="constant_cooldown", cooldown_frac=1.0)) for s in range(4)]
    assert whole == pytest.approx([0.75, 0.5, 0.25, 0.0])
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValidationError, match="cooldown_frac"):
            TrainConfig(schedule="constant_cooldown", cooldown_frac=bad)


def test_weight_decay_is_applied_to_matrices_only():
    lin = torch.nn.Linear(3, 3)
    opt = make_optimizer(lin, TrainConfig(lr=0.1, weight_decay=0.5))
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin.weight.grad = torch.zeros_like(lin.weight)
    lin.bias.grad = torch.zeros_like(lin.bias)
    opt.step()  # zero gradient: only decoupled decay moves the weights, w <- w (1 - lr wd)
    assert torch.allclose(lin.weight, w0 * (1 - 0.1 * 0.5))
    assert torch.equal(lin.bias, b0)


def test_training_learns_and_records_everything(tmp_path):
    cfg = build_run_config(overrides=tiny_overrides(steps=150, D=3, K=4, M=1, lr=1e-2))
    run = train(cfg, tmp_path / "r", progress=False)
    m = run.metrics
    assert m["step"].tolist() == run.checkpoint_steps == checkpoint_steps(150, 5, 5)
    assert m["id_loss"].iloc[-1] < 0.5 * m["id_loss"].iloc[0]
    assert {"id_loss_k1", "ood_loss_k4", "id_delta_dmmse", "ood_delta_ridge_k2"} <= set(m.columns)
    assert len(run.train_loss) == 150
    assert set(run.baselines) >= {"id_dmmse_loss", "ood_ridge_loss", "id_zero_loss_k1"}
    # M = 1, noiseless: dMMSE is exact on the pool
    assert run.baselines["id_dmmse_loss"] < 1e-10


def test_resume_after_interruption_is_bit_identical(tmp_path):
    cfg = build_run_config(overrides=tiny_overrides(steps=60))
    straight = train(cfg, tmp_path / "a", progress=False)
    part = train(cfg, tmp_path / "b", progress=False, stop_after=23)
    assert part.config.train.steps not in part.checkpoint_steps
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False)
    a, b = straight.load_checkpoint(60), resumed.load_checkpoint(60)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert straight.metrics.equals(resumed.metrics)
    assert straight.train_loss.equals(resumed.train_loss)


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from icl_lab import model as model_mod

    cfg = build_run_config(overrides=tiny_overrides(steps=50))
    calls = {"n": 0}
    original = model_mod.ICLTransformer.forward

    def poisoned(self, x, y):
        out = original(self, x, y)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 30:
                return out * float("nan")
        return out

    monkeypatch.setattr(model_mod.ICLTransformer, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 30 .* last good checkpoint is step 25"):
        train(cfg, tmp_path / "r", progress=False)
    run = Run.load(tmp_path / "r")
    assert max(run.checkpoint_steps) == 25
    assert torch.isfinite(run.load_checkpoint(25).blocks[0].attn.W_Q).all()
    assert run.metrics["step"].max() == 25


def _assert_same_run(a: Run, b: Run) -> None:
    for (name, p), q in zip(a.load_checkpoint(a.config.train.steps).state_dict().items(),
                            b.load_checkpoint(b.config.train.steps).state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert a.checkpoint_steps == b.checkpoint_steps
    assert a.metrics.equals(b.metrics) and a.train_loss.equals(b.train_loss)


@pytest.mark.parametrize("kill_point", ["after_config", "after_first_checkpoint", "during_checkpoint_write"])
def test_resume_from_every_state_a_kill_leaves(tmp_path, kill_point):
    """Every write is atomic, so a kill leaves one of a few states on disk; each resumes to the uninterrupted
    run's final weights, bit for bit: config.json but no state yet (starts from step 0, and says so); a state
    save behind it; a checkpoint's temporary file left half-written beside a saved state."""
    cfg = build_run_config(overrides=tiny_overrides(steps=60))
    straight = train(cfg, tmp_path / "straight", progress=False)
    path = tmp_path / "killed"
    if kill_point == "after_config":
        Run.create(path, cfg)  # what exists between writing config.json and the first state save
        with pytest.warns(UserWarning, match="no saved state yet .* from step 0"):
            resumed = train(cfg, path, resume=True, progress=False)
    else:
        part = train(cfg, path, progress=False, stop_after=1 if kill_point == "after_first_checkpoint" else 23)
        if kill_point == "during_checkpoint_write":
            (part.checkpoint_dir / f".step_{30:08d}.safetensors.abc123.tmp").write_bytes(b"\x00" * 17)
        resumed = train(cfg, path, resume=True, progress=False)
    _assert_same_run(straight, resumed)


@pytest.mark.parametrize("damage", ["missing", "truncated", "not_json"])
def test_resume_of_a_run_without_a_readable_config_is_one_line_naming_the_file(tmp_path, damage):
    from typer.testing import CliRunner

    from icl_lab.cli import app

    cfg = build_run_config(overrides=tiny_overrides(steps=20))
    run = train(cfg, tmp_path / "r", progress=False, stop_after=5)
    cfg_file = run.path / "config.json"
    text = cfg_file.read_text()
    if damage == "missing":
        cfg_file.unlink()
    else:
        cfg_file.write_text(text[: len(text) // 2] if damage == "truncated" else "[1, 2]")
    result = CliRunner().invoke(app, ["train", "--resume", str(run.path), "--quiet"], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and str(cfg_file) in " ".join(result.output.split())
