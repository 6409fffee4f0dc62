"""Per-token losses on fixed evaluation sets and distances Δ to the baselines (docs/papers.md §A4-A5, §B5).

Loss is plain squared error (no ½, no /σ², no /D). Δ(A, B) = mean over sequences and positions of
(A(S_k) − B(S_k))², Raventós Eq. 4 without the 1/D (figures may add it, labelled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from icl_lab.baselines import dmmse_predict, ridge_predict, zero_predict
from icl_lab.config import TaskConfig
from icl_lab.tasks import Batch, eval_sets

__all__ = [
    "EVAL_CHUNK",
    "EVAL_CHUNK_DEFAULT",
    "EvalSet",
    "baseline_levels",
    "eval_chunk",
    "evaluate",
    "per_token_loss",
    "predict",
    "prepare_eval_sets",
]

# Rows per forward pass in `predict` and in `icl_lab.llc` (ℓ_n(w*)). On CPU, small chunks stay in cache and are
# faster than one pass over all rows, with bit-identical outputs; a GPU wants big chunks.
EVAL_CHUNK = {"cpu": 128}
EVAL_CHUNK_DEFAULT = 2048


def eval_chunk(device: torch.device) -> int:
    """Rows per forward pass without autograd on `device` (EVAL_CHUNK, else EVAL_CHUNK_DEFAULT)."""
    return EVAL_CHUNK.get(device.type, EVAL_CHUNK_DEFAULT)


@dataclass
class EvalSet:
    """A fixed batch and its baseline predictions, computed once. dmmse is ridge's when M = inf."""

    name: str
    batch: Batch
    dmmse: Tensor
    ridge: Tensor


def per_token_loss(pred: Tensor, y: Tensor) -> Tensor:
    """ℓ_k = mean over sequences of (ŷ_k − y_k)²; pred, y: (B, K) -> (K,)."""
    return (pred - y).square().mean(0)


def prepare_eval_sets(task: TaskConfig, pool: Tensor | None, size: int, seed: int,
                      device: str | torch.device = "cpu") -> dict[str, EvalSet]:
    """The in-distribution ('id') and out-of-distribution ('ood') sets with dMMSE and ridge predictions."""
    out = {}
    for name, batch in eval_sets(task, pool, size, seed, device).items():
        ridge = ridge_predict(batch.x, batch.y, task.noise_var)
        dmmse = ridge if pool is None else dmmse_predict(batch.x, batch.y, pool, task.noise_var)
        out[name] = EvalSet(name, batch, dmmse, ridge)
    return out


@torch.inference_mode()
def predict(model: nn.Module, x: Tensor, y: Tensor, chunk: int | None = None) -> Tensor:
    """Model predictions (B, K) for x: (B, K, D), y: (B, K), in chunks of rows, without autograd."""
    chunk = chunk or eval_chunk(x.device)
    return torch.cat([model(x[i:i + chunk], y[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


def evaluate(model: nn.Module, sets: dict[str, EvalSet]) -> dict[str, float]:
    """One metrics row: for each set, mean and per-token loss and Δ to dMMSE and to ridge.

    Keys: '{set}_loss', '{set}_loss_k{k}', '{set}_delta_dmmse', '{set}_delta_dmmse_k{k}', '{set}_delta_ridge',
    '{set}_delta_ridge_k{k}' with k = 1..K.
    """
    was_training = model.training
    model.eval()
    row: dict[str, float] = {}
    for name, s in sets.items():
        pred = predict(model, s.batch.x, s.batch.y)
        for key, ref in (("loss", s.batch.y), ("delta_dmmse", s.dmmse), ("delta_ridge", s.ridge)):
            _put_curve(row, f"{name}_{key}", per_token_loss(pred, ref))
    model.train(was_training)
    return row


def baseline_levels(sets: dict[str, EvalSet]) -> dict[str, float]:
    """Per-token and mean losses of the dMMSE, ridge and zero predictors on each set (for plots and reports)."""
    row: dict[str, float] = {}
    for name, s in sets.items():
        y = s.batch.y
        for key, pred in (("dmmse", s.dmmse), ("ridge", s.ridge), ("zero", zero_predict(s.batch.x, y))):
            _put_curve(row, f"{name}_{key}_loss", per_token_loss(pred, y))
    return row


def _put_curve(row: dict[str, float], key: str, curve: Tensor) -> None:
    row[key] = curve.mean().item()
    for k, v in enumerate(curve.tolist(), start=1):
        row[f"{key}_k{k}"] = v
