"""causal_attention against a written-out softmax attention, plain and under every composition of autograd,
torch.func.grad and vmap that the ensembles and the vectorised LLC chains use."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from icl_lab.attention import BATCHING_WARNING, causal_attention, vmappable_sdpa


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


def test_plain_matches_reference(qkv):
    torch.testing.assert_close(causal_attention(qkv[0]), reference(qkv[0]), rtol=0, atol=1e-12)
    q32 = qkv[0].float()  # the fused float32 kernel
    torch.testing.assert_close(causal_attention(q32), reference(q32), rtol=1e-5, atol=1e-6)
    leaf = q32.clone().requires_grad_(True)
    (causal_attention(leaf) ** 2).sum().backward()
    expect = torch.func.grad(lambda a: (reference(a) ** 2).sum())(q32)
    torch.testing.assert_close(leaf.grad, expect, rtol=1e-5, atol=1e-5)


def test_vmap_under_vmappable_sdpa_batches_every_op(qkv):
    """The math backend that vmappable_sdpa selects has a batching rule for every op: with warnings as errors
    (pytest's setting here) nothing falls back to a loop over the mapped axis."""
    with sdpa_kernel([SDPBackend.MATH]):
        torch.testing.assert_close(torch.func.vmap(causal_attention)(qkv), reference(qkv), rtol=0, atol=1e-12)
        out = torch.func.vmap(causal_attention, in_dims=2)(qkv)  # the mapped axis not first
        torch.testing.assert_close(out, reference(qkv.movedim(2, 0)), rtol=0, atol=1e-12)
        grads = torch.func.vmap(torch.func.grad(loss))(qkv)
    torch.testing.assert_close(grads, torch.func.vmap(torch.func.grad(lambda a: loss(a, reference)))(qkv),
                               rtol=0, atol=1e-11)


def test_vmap_without_the_context_loops_with_a_warning_and_the_same_values(qkv):
    with pytest.warns(UserWarning, match=BATCHING_WARNING):
        out = torch.func.vmap(causal_attention)(qkv)
    torch.testing.assert_close(out, reference(qkv), rtol=0, atol=1e-12)


def test_gradients_in_every_composition(qkv):
    ref = torch.func.vmap(torch.func.grad(lambda a: loss(a, reference)))(qkv)
    with vmappable_sdpa():
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


def test_jacobian(qkv):
    small = qkv[0, :2, :3, :1]  # (B=2, T=3, H=1, 3e=12)
    with vmappable_sdpa():
        jac = torch.func.jacrev(causal_attention)(small)
    torch.testing.assert_close(jac, torch.func.jacrev(reference)(small), rtol=0, atol=1e-12)


def test_vmappable_sdpa_restores_the_backends():
    before = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()
    with vmappable_sdpa():
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == before


def test_queries_at_some_rows_only(qkv):
    """rows: the outputs at those query positions, every position still a key and value."""
    rows = slice(0, None, 2)
    torch.testing.assert_close(causal_attention(qkv[0], rows), reference(qkv[0])[:, :, rows], rtol=0, atol=1e-12)
    q32 = qkv[0].float().requires_grad_(True)
    (causal_attention(q32, rows) ** 2).sum().backward()
    expect = torch.func.grad(lambda a: (reference(a)[:, :, rows] ** 2).sum())(qkv[0].float())
    torch.testing.assert_close(q32.grad, expect, rtol=1e-5, atol=1e-5)
    with vmappable_sdpa():
        got = torch.func.vmap(torch.func.grad(lambda a: (causal_attention(a, rows) ** 2).sum()))(qkv)
    torch.testing.assert_close(got, torch.func.vmap(torch.func.grad(lambda a: (reference(a)[:, :, rows] ** 2).sum()))(
        qkv), rtol=0, atol=1e-11)
