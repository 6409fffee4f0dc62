"""Attention patterns, head ablations and probes; the TransformerLens interop is tested in test_tl.py."""

import torch

from icl_lab.config import build_run_config
from icl_lab.model import build_model


def test_run_with_cache_matches_forward_and_patterns_are_causal():
    from icl_lab.interp import attention_patterns, run_with_cache

    cfg = build_run_config(overrides={"D": 3, "K": 5})
    model = build_model(cfg.task, cfg.model, seed=0)
    x, y = torch.randn(4, 5, 3), torch.randn(4, 5)
    pred, cache = run_with_cache(model, x, y)
    with torch.no_grad():
        assert torch.allclose(pred, model(x, y), atol=1e-6)
    pat = attention_patterns(model, x, y)
    assert pat.shape == (2, 4, 4, 10, 10)
    assert torch.allclose(pat.sum(-1), torch.ones(2, 4, 4, 10), atol=1e-6)
    assert torch.all(pat.triu(1) == 0)
    # the pattern is the one the model uses: recompute head 0 of layer 0 by hand
    h = model.blocks[0].ln1(cache["resid.0"])
    a = model.blocks[0].attn
    q = h @ a.W_Q[0] + a.b_Q[0]
    k = h @ a.W_K[0] + a.b_K[0]
    scores = (q @ k.transpose(-1, -2)) / 32**0.5
    scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(pat[0, :, 0], scores.softmax(-1), atol=1e-5)


def test_head_ablation_zeroing_all_heads_equals_removing_attention():
    from icl_lab.interp import head_ablation_effects, run_with_cache

    cfg = build_run_config(overrides={"D": 3, "K": 5, "n_layers": 1, "n_heads": 2})
    model = build_model(cfg.task, cfg.model, seed=0)
    x, y = torch.randn(16, 5, 3), torch.randn(16, 5)
    effects = head_ablation_effects(model, x, y)
    assert set(effects) == {"none", "L0H0", "L0H1"}
    assert not torch.allclose(effects["L0H0"], effects["none"])
    pred, _ = run_with_cache(model, x, y, ablate={(0, 0): "zero", (0, 1): "zero"})
    with torch.no_grad():  # by hand: attention contributes only b_O
        b = model.blocks[0]
        h = model.residual_in(x, y) + b.attn.b_O
        h = h + b.mlp(b.ln2(h))
        assert torch.allclose(pred, model.readout(h), atol=1e-6)


def test_probes_recover_a_linearly_encoded_target():
    from icl_lab.interp import probe_residual

    cfg = build_run_config(overrides={"D": 3, "K": 4})
    model = build_model(cfg.task, cfg.model, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, 3, generator=g)
    y = torch.randn(400, 4, generator=g)
    # x_k itself is linearly present in the residual entering block 0: R² ≈ 1 per position for target x_1
    r2 = probe_residual(model, x, y, x[:, 0, :], layer=0)
    assert r2[0] > 0.99
    labels = (x[:, 0, 0] > 0).long()
    acc = probe_residual(model, x, y, labels, layer=0, classify=True)
    assert acc[0] > 0.9
    random_labels = torch.randint(0, 2, (400,), generator=g)
    assert probe_residual(model, x, y, random_labels, layer=0, classify=True).mean() < 0.7
