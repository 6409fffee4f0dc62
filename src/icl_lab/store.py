"""A run on disk. Nothing here is ever loaded with pickle; every write is atomic (temp file, then rename).

    RUN/config.json                       resolved config + package and torch versions
    RUN/checkpoints/step_00001000.safetensors   model weights at a scheduled step (never overwritten)
    RUN/checkpoints/state.safetensors     latest resumable state: weights, AdamW state, generator states
    RUN/metrics.parquet                   one row per evaluation, per-token columns
    RUN/train_loss.parquet                training minibatch loss at every step
    RUN/baselines.json                    dMMSE / ridge / zero-predictor levels on the fixed eval sets
    RUN/llc.parquet, RUN/llc_settings.json, RUN/stages.parquet ...   analyses, written by their modules
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from icl_lab import __version__
from icl_lab.atomic import atomic_write
from icl_lab.config import RunConfig
from icl_lab.model import ICLTransformer

__all__ = [
    "file_lock",
    "STEP_FILE",
    "Run",
    "load_strict",
    "load_tensors",
    "save_tensors",
    "settings_digest",
    "write_json",
    "write_parquet",
]

STEP_FILE = re.compile(r"^step_(\d{8})\.safetensors$")


# ------------------------------------------------------------------------------------------------ atomic I/O
@contextlib.contextmanager
def file_lock(path: str | Path, *, blocking: bool = False) -> Iterator[bool]:
    """An exclusive flock on `path` (created; it records host and pid) for the body; yields whether it was
    acquired (always True when `blocking`: it waits). Closing the descriptor releases it, also when a process dies.

    flock is advisory and per host: processes on one machine exclude each other, and so do NFS clients where the
    server supports flock over NFSv4 locks; on other shared filesystems it may not hold across nodes.
    """
    import fcntl  # deferred: POSIX-only, so that importing store works on every platform

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=str)))


def settings_digest(settings: dict[str, Any]) -> str:
    """A short hash of a JSON-able settings dict (key order does not matter): the key of an LLC curve."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def write_parquet(path: str | Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda p: df.to_parquet(p, index=False))


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                 ) -> None:
    """Atomic safetensors write with a sha256 of the contents in the metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), "sha256": _digest(tensors)}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_tensors(path: str | Path, device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load and verify a safetensors file; a truncated or corrupt file raises ValueError naming it."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated and cannot be read: {e}") from e
    if "sha256" in meta and _digest(tensors) != meta["sha256"]:
        raise ValueError(f"checkpoint {path} is corrupt: its contents do not match the stored sha256")
    return {k: v.to(device) for k, v in tensors.items()}, meta


# ------------------------------------------------------------------------------------------------ the run
class Run:
    """A training run directory. `Run.load(path)` for reading; `Run.create` when training starts."""

    def __init__(self, path: Path, config: RunConfig):
        self.path = Path(path)
        self.config = config

    # -- creating and loading
    @classmethod
    def create(cls, path: str | Path, config: RunConfig, *, overwrite: bool = False) -> Run:
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise FileExistsError(f"run directory {path} already exists; pass --resume to continue it or "
                                      f"--overwrite to replace it")
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / "config.json", {"config": config.model_dump(mode="json"),
                                          "icl_lab_version": __version__, "torch_version": torch.__version__})
        return cls(path, config)

    @classmethod
    def load(cls, path: str | Path) -> Run:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{path} is not an icl-lab run: {cfg_file} is missing")
        try:
            return cls(path, RunConfig.model_validate(json.loads(cfg_file.read_text())["config"]))
        except (OSError, ValueError, KeyError, TypeError) as e:  # half-written, hand-edited or not ours
            why = " ".join(str(e).split())[:200]
            raise ValueError(f"{cfg_file} is unreadable or not an icl-lab run config ({type(e).__name__}: "
                             f"{why}); start the run again with --overwrite") from e

    @property
    def versions(self) -> dict[str, str]:
        raw = json.loads((self.path / "config.json").read_text())
        return {k: raw[k] for k in ("icl_lab_version", "torch_version") if k in raw}

    # -- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoint_dir / f"step_{step:08d}.safetensors"

    @property
    def checkpoint_steps(self) -> list[int]:
        if not self.checkpoint_dir.exists():
            return []
        return sorted(int(m.group(1)) for f in self.checkpoint_dir.iterdir() if (m := STEP_FILE.match(f.name)))

    def save_checkpoint(self, step: int, model: torch.nn.Module) -> None:
        save_tensors(self.checkpoint_path(step), dict(model.state_dict()), {"step": str(step)})

    def load_checkpoint(self, step: int, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model at `step`, rebuilt from the config and strictly loaded from safetensors."""
        path = self.checkpoint_path(step)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at step {step} in {self.path}; steps: {self.checkpoint_steps}")
        tensors, _ = load_tensors(path, device)
        model = ICLTransformer(self.config.model, self.config.task.D, self.config.task.K).to(device)
        load_strict(model, tensors, str(path))
        return model.eval()

    @property
    def state_path(self) -> Path:
        return self.checkpoint_dir / "state.safetensors"

    # -- tables
    def _table(self, name: str) -> pd.DataFrame | None:
        f = self.path / name
        return pd.read_parquet(f) if f.exists() else None

    @property
    def metrics(self) -> pd.DataFrame:
        df = self._table("metrics.parquet")
        return df if df is not None else pd.DataFrame()

    @property
    def train_loss(self) -> pd.DataFrame:
        df = self._table("train_loss.parquet")
        return df if df is not None else pd.DataFrame(columns=["step", "loss"])

    @property
    def llc_all(self) -> pd.DataFrame | None:
        """Every LLC estimate of the run, at every setting (column settings_hash), or None."""
        return self._table("llc.parquet")

    @property
    def llc(self) -> pd.DataFrame | None:
        """The LLC curve at the run's current settings (RUN/llc_settings.json, the last ones used): one row per
        step. Estimates at other settings stay in llc.parquet (`llc_all`)."""
        df = self.llc_all
        settings = self.path / "llc_settings.json"
        if df is None or "settings_hash" not in df.columns or not settings.exists():
            return df
        current = settings_digest(json.loads(settings.read_text()))
        return df[df["settings_hash"] == current].reset_index(drop=True)

    @property
    def baselines(self) -> dict[str, float]:
        f = self.path / "baselines.json"
        return json.loads(f.read_text()) if f.exists() else {}

    @property
    def finished(self) -> bool:
        return self.config.train.steps in self.checkpoint_steps and (self.path / "metrics.parquet").exists()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, steps={self.config.train.steps}, checkpoints={len(self.checkpoint_steps)})"


def load_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict) with an error that lists missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{where} does not match the model: missing {missing}, unexpected {unexpected}, "
                         f"shape mismatches {shapes}")
    model.load_state_dict(tensors, strict=True)
