import subprocess
import sys

import pytest
import torch

from icl_lab.atomic import atomic_write
from icl_lab.config import build_run_config
from icl_lab.store import Run, load_tensors, save_tensors, write_json


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"a": 1})

    def boom(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text().strip().startswith("{")
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_safetensors_round_trip_and_corruption_detected(tmp_path):
    f = tmp_path / "t.safetensors"
    save_tensors(f, {"a": torch.arange(6.0), "s": torch.tensor(3)}, {"step": "4"})
    tensors, meta = load_tensors(f)
    assert torch.equal(tensors["a"], torch.arange(6.0)) and meta["step"] == "4"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) - 5])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_tensors(f)
    flipped = bytearray(raw)
    flipped[-3] ^= 0xFF
    f.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="do not match the stored sha256"):
        load_tensors(f)


def test_run_create_refuses_existing_directory(tmp_path, tiny_config):
    Run.create(tmp_path / "r", tiny_config)
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        Run.create(tmp_path / "r", tiny_config)
    run = Run.create(tmp_path / "r", tiny_config, overwrite=True)
    assert Run.load(run.path).config == tiny_config
    assert set(run.versions) == {"icl_lab_version", "torch_version"}


def test_load_checkpoint_is_strict(tmp_path, tiny_config):
    from icl_lab.model import build_model

    run = Run.create(tmp_path / "r", tiny_config)
    model = build_model(tiny_config.task, tiny_config.model, seed=0)
    run.save_checkpoint(7, model)
    assert run.checkpoint_steps == [7]
    loaded = run.load_checkpoint(7)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(),
                                                 strict=True))
    other = build_run_config(overrides={**tiny_config.model.model_dump(exclude={"preset"}), "d_model": 8,
                                        "D": 4, "K": 6})
    save_tensors(run.checkpoint_path(9), dict(build_model(other.task, other.model, 0).state_dict()))
    with pytest.raises(ValueError, match="shape mismatches"):
        run.load_checkpoint(9)
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 3"):
        run.load_checkpoint(3)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    """Files written through atomic_write get the mode a plain open(..., "w") would give them."""
    code = (f"import os, pathlib\nos.umask({umask})\n"
            "from icl_lab.atomic import current_umask\nfrom icl_lab.store import write_json\n"
            f"assert current_umask() == {umask}, oct(current_umask())\n"
            f"d = pathlib.Path({str(tmp_path)!r})\n"
            "write_json(d / 'sub' / 'a.json', {'x': 1})\n"
            "import pandas\nfrom icl_lab.stages import save_stage_table\n"
            "save_stage_table(pandas.DataFrame({'a': [1]}), d / 'stages')\n"
            "open(d / 'plain.txt', 'w').close()\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert plain == 0o666 & ~umask
    for written in ("sub/a.json", "stages.parquet", "stages.csv"):
        assert (tmp_path / written).stat().st_mode & 0o777 == plain, written
    assert (tmp_path / "sub").stat().st_mode & 0o777 == 0o777 & ~umask
