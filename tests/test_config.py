import json

import pytest
from pydantic import ValidationError

from icl_lab.config import RunConfig, build_run_config, check_path_name, nest, read_config_file


@pytest.mark.parametrize(
    ("override", "field", "allowed"),
    [
        ({"M": 0}, "M", "integer >= 1 or 'inf'"),
        ({"M": -3}, "M", "integer >= 1 or 'inf'"),
        ({"noise_var": -0.1}, "noise_var", "greater than or equal to 0"),
        ({"D": 0}, "D", "greater than or equal to 1"),
        ({"K": 0}, "K", "greater than or equal to 1"),
        ({"family": "laplace"}, "family", "'gaussian' or 'unit_norm'"),
        ({"lr": 0.0}, "lr", "greater than 0"),
        ({"lr": -1e-3}, "lr", "greater than 0"),
        ({"batch_size": 0}, "batch_size", "greater than or equal to 1"),
        ({"activation": "tanh"}, "activation", "'relu', 'gelu' or 'gelu_tanh'"),
        ({"schedule": "step"}, "schedule", "'triangle', 'cosine' or 'constant_cooldown'"),
        ({"cooldown_frac": 0.0}, "cooldown_frac", "greater than 0"),
        ({"cooldown_frac": 1.2}, "cooldown_frac", "less than or equal to 1"),
    ],
)
def test_bad_values_name_field_and_allowed(override, field, allowed):
    with pytest.raises(ValidationError) as err:
        build_run_config(overrides=override)
    text = str(err.value)
    assert field in text and allowed in text


def test_cooldown_schedule_from_flat_overrides():
    train = build_run_config(overrides={"schedule": "constant_cooldown", "cooldown_frac": 0.3}).train
    assert (train.schedule, train.cooldown_frac) == ("constant_cooldown", 0.3)
    assert build_run_config().train.cooldown_frac == 0.2


def test_unknown_preset_names_allowed():
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'.*seed, hoogland, raventos-base"):
        build_run_config(overrides={"preset": "gpt5"})


def test_more_checkpoints_than_steps():
    with pytest.raises(ValidationError, match="n_checkpoints_log=50 is more than steps=10"):
        build_run_config(overrides={"steps": 10, "n_checkpoints_log": 50})
    with pytest.raises(ValidationError, match="n_checkpoints_linear=12"):
        build_run_config(overrides={"steps": 10, "n_checkpoints_linear": 12, "n_checkpoints_log": 2})


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="unknown config key 'lerning_rate'.*allowed keys:.*lr"):
        build_run_config(overrides={"lerning_rate": 1e-3})
    with pytest.raises(ValidationError, match="n_layer"):
        build_run_config({"model": {"n_layer": 3}})


def test_m_inf_spellings():
    for v in ("inf", "INF", "none", float("inf"), None):
        assert build_run_config(overrides={"M": v}).task.M is None
    assert build_run_config(overrides={"M": "4"}).task.M == 4


def test_preset_then_overrides_then_flags(tmp_path):
    cfg = build_run_config(overrides={"preset": "raventos-small"})
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.activation) == (4, 64, "gelu_tanh")
    f = tmp_path / "c.toml"
    f.write_text('seed = 3\n[model]\npreset = "hoogland"\nn_layers = 3\n[train]\nlr = 0.01\n')
    cfg = build_run_config(read_config_file(f), {"lr": 0.02})
    assert cfg.model.preset == "hoogland" and cfg.model.n_layers == 3 and cfg.model.d_mlp == 64
    assert cfg.train.lr == 0.02 and cfg.seed == 3
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"M": 7, "steps": 100}))
    assert build_run_config(read_config_file(j)).task.M == 7


def test_config_round_trips_through_json():
    cfg = build_run_config(overrides={"M": None, "preset": "hoogland"})
    assert RunConfig.model_validate_json(cfg.to_json()) == cfg


def test_nest_and_bad_file(tmp_path):
    assert nest({"M": 2, "lr": 1.0, "seed": 1}) == {"task": {"M": 2}, "train": {"lr": 1.0}, "seed": 1}
    bad = tmp_path / "c.yaml"
    bad.write_text("M: 2")
    with pytest.raises(ValueError, match=r"\.toml or \.json"):
        read_config_file(bad)


@pytest.mark.parametrize("bad", ["", " ", ".", "..", "../x", ".hidden", "a/b", "a\\b", "a:b", "a\x00b", "x" * 256])
def test_check_path_name_refuses_what_is_not_one_plain_name(bad):
    with pytest.raises(ValueError, match="^run name "):
        check_path_name(bad, "run name")


@pytest.mark.parametrize("good", ["seed-M2", "M=2_seed=0-1a2b3c4d", "lr 0.1", "x" * 255])
def test_check_path_name_accepts_plain_names(good):
    assert check_path_name(good, "run name") == good
