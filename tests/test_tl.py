"""TransformerLens interop on both lines: 3.x (`HookedTransformer`, the user's code; `make test` installs 3.9) and
4.x (`TransformerBridge`; `make test-tl4` builds a virtualenv with it). Each line's tests skip, saying why, where
that line is not installed."""

import math
import subprocess
import sys

import pytest
import torch

from icl_lab.config import LLCConfig, build_run_config
from icl_lab.interp import attention_patterns
from icl_lab.llc import estimate_llc
from icl_lab.model import ICLTransformer, build_model
from icl_lab.tl_bridge import tl_major_version

TL = tl_major_version()
_FOUND = "transformer-lens is not installed" if TL is None else f"transformer-lens {TL}.x is installed"
requires_tl3 = pytest.mark.skipif(TL != 3, reason=f"needs transformer-lens 3.x (HookedTransformer): {_FOUND}; "
                                  "the default setup (`make test`) has 3.9")
requires_tl4 = pytest.mark.skipif(TL != 4, reason=f"needs transformer-lens 4.x (TransformerBridge): {_FOUND}; "
                                  "`make test-tl4` runs these")
LINES = [pytest.param("to_hooked_transformer", marks=requires_tl3, id="tl3"),
         pytest.param("to_transformer_bridge", marks=requires_tl4, id="tl4")]

# A model small enough for SGLD chains in seconds, with the features an export must carry: learned positions,
# absent attention and input biases (zero placeholders on the TransformerLens side), the `token` read-out.
TINY = {"preset": "hoogland", "D": 2, "K": 3, "n_layers": 1, "d_model": 8, "n_heads": 2, "d_head": 4, "d_mlp": 8}


def export(line: str, model: ICLTransformer) -> torch.nn.Module:
    import icl_lab.interp
    import icl_lab.tl_bridge

    module = icl_lab.interp if line == "to_hooked_transformer" else icl_lab.tl_bridge
    return getattr(module, line)(model)


def inputs(B: int, K: int, D: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, K, D, generator=g), torch.randn(B, K, generator=g)


@pytest.mark.parametrize("line", LINES)
@pytest.mark.parametrize("preset", ["seed", "hoogland", "raventos-small"])
def test_export_gives_equal_outputs(line, preset):
    cfg = build_run_config(overrides={"preset": preset, "D": 5, "K": 6})
    model = build_model(cfg.task, cfg.model, seed=2)
    exported = export(line, model)
    x, y = inputs(8, 6, 5)
    with torch.no_grad():
        assert torch.allclose(exported(x, y), model(x, y), atol=1e-5)


@pytest.mark.parametrize("line", LINES)
def test_hooks_see_the_models_residual_and_attention(line):
    """The user's habit, `transformer.run_with_cache(hidden, start_at_layer=0)`, under the same hook names."""
    cfg = build_run_config(overrides={"preset": "hoogland", "D": 3, "K": 5})
    model = build_model(cfg.task, cfg.model, seed=0)
    exported = export(line, model)
    x, y = inputs(4, 5, 3)
    with torch.no_grad():
        hidden = exported.embed(x, y)
        _, cache = exported.transformer.run_with_cache(hidden, start_at_layer=0)
        assert torch.allclose(cache["blocks.0.hook_resid_pre"], model.residual_in(x, y), atol=1e-6)
        patterns = attention_patterns(model, x, y)
        for layer in range(cfg.model.n_layers):
            assert torch.allclose(cache[f"blocks.{layer}.attn.hook_pattern"], patterns[layer], atol=1e-5)


@pytest.mark.parametrize("line", LINES)
def test_llc_of_the_export_equals_the_llc_of_the_model(line, one_torch_thread):
    """Same data, settings and seed: the same d, and λ̂ within the chains' error.

    The targets are the model's own outputs, so w* is a minimum (loss 0) and the chains are well behaved. The two
    parameterisations order their entries differently, so the chains see different noise: the two λ̂ are
    independent estimates, compared within 4 combined Monte-Carlo standard errors (MCSE, from the draws'
    autocorrelation; ESS >= 100 keeps the MCSE itself reliable).
    """
    cfg = build_run_config(overrides=TINY)
    model = build_model(cfg.task, cfg.model, seed=0)
    x, y = inputs(64, 3, 2, seed=1)
    with torch.no_grad():
        target = model(x, y)
    mse = lambda forward, batch: (forward(batch[0], batch[1]) - batch[2]).square().mean()
    llc_cfg = LLCConfig(num_chains=4, num_draws=300, num_burnin=100, step_size=3e-3, localization=10.0,
                        batch_size=None)
    ours = estimate_llc(model, (x, y, target), mse, config=llc_cfg, seed=0)
    theirs = estimate_llc(export(line, model), (x, y, target), mse, config=llc_cfg, seed=0)
    assert theirs.d == ours.d  # the token and position tables are unused, the zero placeholders frozen
    for res in (ours, theirs):
        assert not res.diagnostics, res.diagnostics
        assert res.ess >= 100 and res.llc_mean > 0
    tolerance = 4 * math.hypot(ours.llc_mcse, theirs.llc_mcse)
    assert abs(theirs.llc_mean - ours.llc_mean) <= tolerance, (ours.llc_mean, theirs.llc_mean, tolerance)


@pytest.mark.skipif(TL is None, reason="needs transformer-lens (3.x or 4.x): it is not installed")
def test_to_transformer_lens_uses_the_installed_line():
    from icl_lab.tl_bridge import to_transformer_lens

    cfg = build_run_config(overrides=TINY)
    model = build_model(cfg.task, cfg.model, seed=0)
    exported = to_transformer_lens(model)
    expected = "HookedTransformer" if TL == 3 else "TransformerBridge"
    assert type(exported.transformer).__name__ == expected
    x, y = inputs(4, 3, 2)
    with torch.no_grad():
        assert torch.allclose(exported(x, y), model(x, y), atol=1e-5)


@requires_tl4
def test_the_3x_export_on_4x_points_to_the_bridge():
    from icl_lab.interp import to_hooked_transformer

    cfg = build_run_config(overrides=TINY)
    with pytest.raises(ImportError, match="to_transformer_bridge"):
        to_hooked_transformer(build_model(cfg.task, cfg.model, seed=0))


@requires_tl4
def test_the_4x_export_leaves_the_global_rng_alone():
    from icl_lab.tl_bridge import to_transformer_bridge

    cfg = build_run_config(overrides=TINY)
    model = build_model(cfg.task, cfg.model, seed=0)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    to_transformer_bridge(model)
    assert torch.equal(torch.rand(3), expected)


def test_importing_icl_lab_does_not_import_transformer_lens():
    code = ("import sys, icl_lab.interp, icl_lab.tl_bridge, icl_lab.llc; "
            "sys.exit('transformer_lens' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@requires_tl3
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
