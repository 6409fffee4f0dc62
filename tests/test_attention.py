"""causal_attention against the math decomposition of scaled-dot-product attention, under every composition of
autograd, torch.func.grad and vmap that the ensembles and the vectorised LLC chains use."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from icl_lab.attention import causal_attention


def reference(q, k, v):
    """softmax(q kᵀ/√e + causal mask) v, written out (an independent implementation)."""
    T = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 5, 2, 7, 4, generator=g, dtype=torch.float64) for _ in range(3)]  # (N, B, H, T, e)


def loss(q, k, v, attn=causal_attention):
    return (attn(q, k, v) ** 2).sum()


def test_plain_matches_reference_and_is_the_fused_kernel(qkv):
    q, k, v = (t[0] for t in qkv)
    torch.testing.assert_close(causal_attention(q, k, v), reference(q, k, v), rtol=0, atol=1e-12)
    q32, k32, v32 = (t.float() for t in (q, k, v))  # on CPU: exactly what F.scaled_dot_product_attention computes
    assert torch.equal(causal_attention(q32, k32, v32), F.scaled_dot_product_attention(q32, k32, v32, is_causal=True))


def test_vmap_folds_the_mapped_axis(qkv):
    q, k, v = qkv
    torch.testing.assert_close(torch.func.vmap(causal_attention)(q, k, v), reference(q, k, v), rtol=0, atol=1e-12)
    out = torch.func.vmap(causal_attention, in_dims=(0, None, 0))(q, k[0], v)  # an unmapped argument
    torch.testing.assert_close(out, reference(q, k[0].expand_as(q), v), rtol=0, atol=1e-12)
    out = torch.func.vmap(causal_attention, in_dims=2)(q, k, v)  # the mapped axis not first
    ref = reference(*(t.movedim(2, 0) for t in (q, k, v)))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_gradients_in_every_composition(qkv):
    q, k, v = qkv
    ref = torch.func.vmap(torch.func.grad(lambda a, b, c: loss(a, b, c, reference), argnums=(0, 1, 2)))(q, k, v)
    inner = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)))(q, k, v)  # LLC chains: vmap(grad(.))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    torch.func.vmap(loss)(*leaves).sum().backward()  # ensembles: autograd through vmap
    outer = torch.func.grad(lambda a: torch.func.vmap(loss)(a, k, v).sum())(q)
    for a, b, c in zip(ref, inner, [t.grad for t in leaves], strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-11)
        torch.testing.assert_close(c, a, rtol=0, atol=1e-11)
    torch.testing.assert_close(outer, ref[0], rtol=0, atol=1e-11)
    args = tuple(t[0].clone().requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(causal_attention, args)


def test_math_backend_agrees(qkv):
    q, k, v = (t[1] for t in qkv)
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v), ref, rtol=0, atol=1e-12)
