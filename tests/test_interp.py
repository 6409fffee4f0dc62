import pytest
import torch

from icl_lab.config import build_run_config
from icl_lab.model import build_model

tl = pytest.importorskip("transformer_lens")


@pytest.mark.parametrize("preset", ["seed", "hoogland", "raventos-small"])
def test_export_to_transformer_lens_gives_equal_outputs(preset):
    from icl_lab.interp import to_hooked_transformer

    cfg = build_run_config(overrides={"preset": preset, "D": 5, "K": 6})
    model = build_model(cfg.task, cfg.model, seed=2)
    hooked = to_hooked_transformer(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 6, 5, generator=g), torch.randn(8, 6, generator=g)
    with torch.no_grad():
        assert torch.allclose(hooked(x, y), model(x, y), atol=1e-5)


def test_users_seed_model_and_icl_lab_seed_preset_are_the_same_function():
    """The independent check of model.py: the user's own TL code, with our weights, gives our outputs."""
    from icl_lab.interp import from_seed_model, to_seed_state_dict

    from seed_model import ICLTransformer as SeedModel

    cfg = build_run_config(overrides={"D": 8, "K": 16})
    ours = build_model(cfg.task, cfg.model, seed=0)
    torch.manual_seed(0)
    theirs = SeedModel(input_dim=8, seq_length=16)
    missing, unexpected = theirs.load_state_dict(to_seed_state_dict(ours), strict=False)
    missing = {k for k in missing if not k.endswith((".mask", ".IGNORE"))}  # TL's attention buffers
    assert not unexpected and missing == {"transformer.embed.W_E", "transformer.pos_embed.W_pos"}
    x, y = torch.randn(16, 16, 8), torch.randn(16, 16)
    with torch.no_grad():
        assert torch.allclose(theirs(x, y), ours(x, y), atol=1e-5)
        back = from_seed_model(theirs, D=8, K=16)
        assert torch.allclose(back(x, y), ours(x, y), atol=1e-6)


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
