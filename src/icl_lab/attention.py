"""Causal self-attention that stays one fused kernel under torch.func.vmap (ensembles, vectorised LLC chains).

`F.scaled_dot_product_attention` has no vmap batching rule for its fused CPU kernel: under vmap it either loops
over the vmapped axis (one kernel call per member, with a warning) or, with the math backend, decomposes into
tiny 32×32 matrix products (1,024 per layer for 8 members × 32 sequences × 4 heads), masks and copies.
Attention has no parameters, so a vmapped axis is just more sequences: `causal_attention` folds it into the batch
axis and calls the fused flash kernel once. Measured on 2 CPU cores (2026-12-02): forward + backward of one layer
on 8 × 32 sequences 25 ms folded against 34 ms for the math decomposition; inside the whole 8-member ensemble
step, though, the folded kernel was 4-9% slower than the math path (4 paired rounds, same process).

On CPU this is a pair of `torch.autograd.Function`s (forward, backward) around ATen's flash-attention-for-CPU
kernels, each with a vmap rule that folds (N, B, ...) -> (N·B, ...), so it composes with plain autograd,
`torch.func.grad` and `vmap` in either order (first derivatives only). For one model it runs exactly the kernels that
`F.scaled_dot_product_attention(q, k, v, is_causal=True)` runs on CPU (same values, bit for bit). It takes the
packed projection qkv: (B, T, H, 3e) and returns its gradient packed, which saves the two copies of that tensor
(split's concatenation, then the transpose back) that autograd makes around separate q, k, v. On other devices
it is `F.scaled_dot_product_attention` (the batched math path is efficient on a GPU).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BATCHING_WARNING", "causal_attention", "vmappable_sdpa"]

# The start of the warning vmap gives for an op without a batching rule (it then loops over the mapped axis).
BATCHING_WARNING = "There is a performance drop because we have not yet implemented the batching rule"


def _fold(info, in_dims, args):  # noqa: ANN001, ANN202 - the vmap-rule signature of torch.autograd.Function
    """Each arg with the vmapped axis first and folded into its leading (batch) axis: (N, B, ...) -> (N·B, ...)."""
    n = info.batch_size
    flat = []
    for x, d in zip(args, in_dims, strict=True):
        x = x.expand(n, *x.shape) if d is None else x.movedim(d, 0)
        flat.append(x.reshape(n * x.shape[1], *x.shape[2:]))
    return n, flat


def _unfold(n: int, outs: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
    return tuple(o.view(n, -1, *o.shape[1:]) for o in outs), (0,) * len(outs)


def _split(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v: each (B, H, T, e), as strided views of the packed qkv: (B, T, H, 3e) (no copy)."""
    return qkv.transpose(1, 2).split(qkv.shape[-1] // 3, dim=-1)


class _FlashBackward(torch.autograd.Function):
    """The gradient with respect to qkv of out = _Flash(qkv); lse is the forward's row log-sum-exp.

    The kernel returns dq, dk, dv in (B, T, H, e) memory order, so one concatenation writes the packed gradient
    (B, T, H, 3e) that the qkv projection's backward reads without a further copy.
    """

    @staticmethod
    def forward(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor) -> Tensor:
        if grad_out.stride(-1) != 1:  # the kernel reads rows of e; other strides are fine
            grad_out = grad_out.contiguous()
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, *_split(qkv), out, lse, 0.0, True)
        return torch.cat([g.transpose(1, 2) for g in grads], dim=-1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        pass

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001, ANN205
        raise NotImplementedError("causal_attention: second derivatives are not implemented")

    @staticmethod
    def vmap(info, in_dims, *args):  # noqa: ANN001, ANN205
        n, flat = _fold(info, in_dims, args)
        outs, dims = _unfold(n, (_FlashBackward.apply(*flat),))
        return outs[0], dims[0]


class _Flash(torch.autograd.Function):
    """qkv: (B, T, H, 3e) -> causal attention output (B, H, T, e) and row log-sum-exp (B, H, T)."""

    @staticmethod
    def forward(qkv: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*_split(qkv), 0.0, True)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        ctx.save_for_backward(*inputs, *output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_lse: Tensor) -> Tensor:  # noqa: ANN001
        qkv, out, lse = ctx.saved_tensors
        return _FlashBackward.apply(grad_out, qkv, out, lse)

    @staticmethod
    def vmap(info, in_dims, qkv):  # noqa: ANN001, ANN205
        n, flat = _fold(info, in_dims, (qkv,))
        return _unfold(n, _Flash.apply(*flat))


def causal_attention(qkv: Tensor) -> Tensor:
    """softmax(q kᵀ / √e + causal mask) v (Vaswani et al. 2017, Eq. 1) for packed qkv: (B, T, H, 3e), each head's
    [q | k | v] side by side as the fused projection writes them -> z: (B, H, T, e)."""
    if qkv.device.type == "cpu" and qkv.dtype in (torch.float32, torch.float64):
        return _Flash.apply(qkv)[0]
    return F.scaled_dot_product_attention(*_split(qkv), is_causal=True)


@contextmanager
def vmappable_sdpa() -> Iterator[None]:
    """Run F.scaled_dot_product_attention through its math decomposition, whose ops vmap batches (its fused kernels
    have no batching rule), and silence BATCHING_WARNING for ops that still loop over the mapped axis. For models
    other than icl-lab's, and devices other than the CPU, under vmap (ensembles, vectorised LLC chains)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=BATCHING_WARNING)
        yield
