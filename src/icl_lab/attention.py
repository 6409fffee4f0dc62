"""Causal self-attention on the packed q, k, v projection, with public PyTorch only.

`causal_attention` is `F.scaled_dot_product_attention(q, k, v, is_causal=True)` on strided views of the packed
projection (no copy); on CPU that is the fused flash-attention kernel. That kernel has no vmap batching rule:
under `torch.func.vmap` it loops over the mapped axis, one kernel call per member, with a warning. Callers that
vmap a model (ensembles, vectorised LLC chains) enter `vmappable_sdpa()`, which selects the math decomposition,
whose ops vmap batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["BATCHING_WARNING", "causal_attention", "vmappable_sdpa"]

# The start of the warning vmap gives for an op without a batching rule (it then loops over the mapped axis).
BATCHING_WARNING = "There is a performance drop because we have not yet implemented the batching rule"


def _split(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v: each (B, H, T, e), as strided views of the packed qkv: (B, T, H, 3e) (no copy)."""
    return qkv.transpose(1, 2).split(qkv.shape[-1] // 3, dim=-1)


def causal_attention(qkv: Tensor, rows: slice = slice(None)) -> Tensor:
    """softmax(q kᵀ / √e + causal mask) v (Vaswani et al. 2017, Eq. 1) for packed qkv: (B, T, H, 3e), each head's
    [q | k | v] side by side as the fused projection writes them -> z: (B, H, T', e) for the T' query positions
    `rows` (every position is a key and value; the model's last block queries only the positions it reads)."""
    q, k, v = _split(qkv)
    if rows == slice(None):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = qkv.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril()[rows]  # (T', T): query i sees keys <= i
    return F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask)


@contextmanager
def vmappable_sdpa() -> Iterator[None]:
    """Run F.scaled_dot_product_attention through its math decomposition, whose ops vmap batches (its fused kernels
    have no batching rule), and silence BATCHING_WARNING for ops that still loop over the mapped axis: for any
    model under vmap (ensembles, vectorised LLC chains). Its switches are process-wide: enter it from one thread."""
    with sdpa_kernel([SDPBackend.MATH]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=BATCHING_WARNING)
        yield
