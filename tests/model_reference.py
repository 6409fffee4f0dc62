"""Writes model_reference.safetensors: outputs, gradients, vmapped gradients and a short training run of the
model on fixed seeds, the values test_model.py holds later implementations to (float tolerance).

    PYTHONPATH=src python tests/model_reference.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from icl_lab.attention import vmappable_sdpa
from icl_lab.config import build_run_config
from icl_lab.model import PRESETS, build_model
from icl_lab.tasks import make_generator, sample_batch
from icl_lab.train import train

PATH = Path(__file__).resolve().parent / "data" / "model_reference.safetensors"
TRAIN = dict(D=4, K=6, M=2, n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=16, steps=30, batch_size=16,
             eval_size=64, n_checkpoints_linear=2, n_checkpoints_log=0)


def batch_for(cfg, B: int):
    return sample_batch(cfg.task, None, B, make_generator(123, "reference"))


def model_values(preset: str, D: int, K: int, B: int) -> dict[str, torch.Tensor]:
    """Outputs (B, K), the loss's gradient for every parameter, and per-chain gradients under vmap(grad)."""
    cfg = build_run_config(overrides={"preset": preset, "D": D, "K": K, "M": None})
    model = build_model(cfg.task, cfg.model, seed=7)
    b = batch_for(cfg, B)
    out = model(b.x, b.y)
    (out - b.y).square().mean().backward()
    vals = {f"{preset}/out": out.detach()}
    vals |= {f"{preset}/grad/{n}": p.grad for n, p in model.named_parameters()}
    # vmap over 2 perturbed copies of the parameters (the LLC chains' path)
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(5)
    stacked = {n: p + 1e-2 * torch.randn(2, *p.shape, generator=g) for n, p in params.items()}

    def loss(ps, x, y):
        return (torch.func.functional_call(model, ps, (x, y)) - y).square().mean()

    with vmappable_sdpa():
        vg = torch.func.vmap(torch.func.grad(loss), in_dims=(0, None, None))(stacked, b.x, b.y)
    vals |= {f"{preset}/vmap_grad/{n}": v for n, v in vg.items()}
    return vals


def sample(t: torch.Tensor, n: int = 64) -> torch.Tensor:
    """n entries of t at fixed positions (a compact fingerprint of a large gradient)."""
    flat = t.reshape(-1)
    idx = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(flat.numel()))[:n]
    return flat[idx]


def reference_values() -> dict[str, torch.Tensor]:
    """Every value the reference file holds, computed by the current code (call at one torch thread)."""
    vals: dict[str, torch.Tensor] = {}
    for preset in PRESETS:
        vals |= model_values(preset, D=3, K=5, B=4)
    seed = model_values("seed", D=8, K=16, B=32)
    vals |= {k.replace("seed/", "seed_full/"): v for k, v in seed.items() if "/grad/" not in k and "vmap" not in k}
    cfg = build_run_config(overrides=TRAIN)
    with tempfile.TemporaryDirectory() as tmp:
        run = train(cfg, Path(tmp) / "r", progress=False)
        vals["train/loss"] = torch.tensor(run.train_loss["loss"].to_numpy())
        vals |= {f"train/final/{k}": v for k, v in run.load_checkpoint(30).state_dict().items()}
    return {k: (sample(v) if "grad/" in k or "final/" in k else v).contiguous() for k, v in vals.items()}


def main() -> None:
    torch.set_num_threads(1)
    save_file(reference_values(), str(PATH))


if __name__ == "__main__":
    main()
