"""causal_attention against the math decomposition of scaled-dot-product attention, under every composition of
autograd, torch.func.grad and vmap that the ensembles and the vectorised LLC chains use."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from icl_lab.attention import causal_attention


def split(qkv):
    """q, k, v: each (..., H, T, e) from the packed qkv: (..., T, H, 3e)."""
    return qkv.transpose(-3, -2).chunk(3, dim=-1)


def reference(qkv):
    """softmax(q kᵀ/√e + causal mask) v, written out (an independent implementation) -> (..., H, T, e)."""
    q, k, v = split(qkv)
    T = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 7, 2, 12, generator=g, dtype=torch.float64)  # (N, B, T, H, 3e)


def loss(qkv, attn=causal_attention):
    return (attn(qkv) ** 2).sum()


def test_plain_matches_reference_and_is_the_fused_kernel(qkv):
    torch.testing.assert_close(causal_attention(qkv[0]), reference(qkv[0]), rtol=0, atol=1e-12)
    q32 = qkv[0].float()  # on CPU: exactly what F.scaled_dot_product_attention computes on q, k, v
    assert torch.equal(causal_attention(q32), F.scaled_dot_product_attention(*split(q32), is_causal=True))


def test_gradient_is_bit_identical_to_sdpa_on_q_k_v(qkv):
    leaf = qkv[0].float().requires_grad_(True)
    (causal_attention(leaf) ** 2).sum().backward()
    mine = leaf.grad
    leaf.grad = None
    (F.scaled_dot_product_attention(*split(leaf), is_causal=True) ** 2).sum().backward()
    assert mine.shape == leaf.shape and mine.is_contiguous()
    assert torch.equal(mine, leaf.grad)


def test_vmap_folds_the_mapped_axis(qkv):
    torch.testing.assert_close(torch.func.vmap(causal_attention)(qkv), reference(qkv), rtol=0, atol=1e-12)
    out = torch.func.vmap(causal_attention, in_dims=2)(qkv)  # the mapped axis not first
    torch.testing.assert_close(out, reference(qkv.movedim(2, 0)), rtol=0, atol=1e-12)


def test_gradients_in_every_composition(qkv):
    ref = torch.func.vmap(torch.func.grad(lambda a: loss(a, reference)))(qkv)
    inner = torch.func.vmap(torch.func.grad(loss))(qkv)  # LLC chains: vmap(grad(.))
    leaf = qkv.clone().requires_grad_(True)
    torch.func.vmap(loss)(leaf).sum().backward()  # ensembles: autograd through vmap
    outer = torch.func.grad(lambda a: torch.func.vmap(loss)(a).sum())(qkv)
    for got in (inner, leaf.grad, outer):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-11)
    # an unmapped grad_out layout: the cotangent of a transposed use of the output
    twisted = torch.func.grad(lambda a: (causal_attention(a).transpose(-1, -2) ** 3).sum())(qkv[1])
    expect = torch.func.grad(lambda a: (reference(a).transpose(-1, -2) ** 3).sum())(qkv[1])
    torch.testing.assert_close(twisted, expect, rtol=0, atol=1e-11)
    assert torch.autograd.gradcheck(causal_attention, (qkv[0].clone().requires_grad_(True),))


def test_jacobian_maps_the_cotangent_alone(qkv):
    """jacrev vmaps the backward over cotangents with qkv, out and lse unmapped (the fold's expand branch)."""
    small = qkv[0, :2, :3, :1]  # (B=2, T=3, H=1, 3e=12)
    torch.testing.assert_close(torch.func.jacrev(causal_attention)(small), torch.func.jacrev(reference)(small),
                               rtol=0, atol=1e-12)


def test_math_backend_agrees(qkv):
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(*split(qkv[1]), is_causal=True)
    torch.testing.assert_close(causal_attention(qkv[1]), ref, rtol=0, atol=1e-12)
