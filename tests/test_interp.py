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
