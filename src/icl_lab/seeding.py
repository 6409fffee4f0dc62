"""Seeds and generators: every source of randomness has its own `torch.Generator`, seeded from the run seed and
a fixed label (`make_generator(seed, "pool/0")`), so changing one stream (an analysis setting, say) never changes
another (training)."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "make_generator"]


def derive_seed(seed: int, label: str) -> int:
    """A 63-bit seed from (run seed, label), stable across Python versions and platforms."""
    digest = hashlib.sha256(f"icl-lab:{seed}:{label}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, label: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A `torch.Generator` on `device` seeded with derive_seed(seed, label)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, label))
    return g
