import pytest
import torch

from icl_lab.config import ModelConfig, TaskConfig, build_run_config
from icl_lab.model import PRESETS, build_model, count_parameters, interleave, linear

SEED_PARAMS = 101_449  # hand count below; the user's TL model has 104,073 of which 101,449 get gradients


def seed_hand_count(D: int = 8, d: int = 64, H: int = 4, e: int = 32, mlp: int = 128, L: int = 2) -> int:
    attn = 3 * H * d * e + 3 * H * e + H * e * d + d  # W_Q,K,V + b_Q,K,V + W_O + b_O
    block = attn + 2 * 2 * d + (d * mlp + mlp + mlp * d + d)  # + ln1, ln2 + MLP
    return L * block + 2 * d + d * (D + 1) + (D + 1) + (D + 1) * d + d  # ln_final, W_U, b_U, input proj


def test_seed_parameter_count_matches_hand_count():
    model = build_model(TaskConfig(D=8, K=16), ModelConfig(), seed=0)
    assert seed_hand_count() == SEED_PARAMS
    assert count_parameters(model) == SEED_PARAMS


def test_seed_parameter_count_matches_transformer_lens():
    pytest.importorskip("transformer_lens.HookedTransformer", reason="the user's model needs transformer-lens 3.x")
    from seed_model import ICLTransformer as SeedModel

    torch.manual_seed(0)
    seed = SeedModel(input_dim=8, seq_length=16)
    x, y = torch.randn(4, 16, 8), torch.randn(4, 16)
    ((seed(x, y) - y) ** 2).mean().backward()
    with_grad = sum(p.numel() for p in seed.parameters() if p.grad is not None)
    total = sum(p.numel() for p in seed.parameters())
    assert total == 104_073
    assert with_grad == SEED_PARAMS == count_parameters(build_model(TaskConfig(), ModelConfig(), seed=0))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_build_and_every_parameter_gets_a_gradient(preset):
    cfg = build_run_config(overrides={"preset": preset, "D": 3, "K": 5})
    model = build_model(cfg.task, cfg.model, seed=0)
    x, y = torch.randn(2, 5, 3), torch.randn(2, 5)
    out = model(x, y)
    assert out.shape == (2, 5)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_raventos_base_size():
    cfg = build_run_config(overrides={"preset": "raventos-base", "D": 8, "K": 16})
    # 1,591,808 as counted for Raventós et al.'s Flax model (docs/papers.md §C1), whose read-in and read-out
    # have no bias
    assert count_parameters(build_model(cfg.task, cfg.model, seed=0)) == 1_591_808


@pytest.mark.parametrize("preset", ["seed", "hoogland", "raventos-small"])
def test_causality_prediction_k_never_sees_y_k_or_later(preset):
    cfg = build_run_config(overrides={"preset": preset, "D": 4, "K": 7})
    model = build_model(cfg.task, cfg.model, seed=1).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    y = torch.randn(3, 7, generator=g, dtype=torch.float64)
    base = model(x, y)
    for k in range(7):
        x2, y2 = x.clone(), y.clone()
        y2[:, k:] += 10 * torch.randn(3, 7 - k, generator=g, dtype=torch.float64)  # y_k and later
        x2[:, k + 1 :] += 10 * torch.randn(3, 6 - k, 4, generator=g, dtype=torch.float64)  # x after x_k
        out = model(x2, y2)
        assert torch.allclose(out[:, : k + 1], base[:, : k + 1], atol=1e-12)
        if k < 6:  # and the perturbation is visible later, so the check has teeth
            assert not torch.allclose(out[:, k + 1 :], base[:, k + 1 :])


def test_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_model(TaskConfig(), ModelConfig(), seed=3)
    b = build_model(TaskConfig(), ModelConfig(), seed=3)
    c = build_model(TaskConfig(), ModelConfig(), seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.blocks[0].attn.W_Q, c.blocks[0].attn.W_Q)
    # TransformerLens init: N(0, 0.8/sqrt(d_model)) for W_*
    assert abs(a.blocks[0].mlp.W_in.std().item() - 0.1) < 0.005


def test_interleave_layout():
    x = torch.arange(6.0).reshape(1, 2, 3)
    y = torch.tensor([[10.0, 20.0]])
    t = interleave(x, y)
    expected = torch.tensor([[[0, 1, 2, 0], [0, 0, 0, 10], [3, 4, 5, 0], [0, 0, 0, 20]]], dtype=torch.float32)
    assert torch.equal(t, expected)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_under_vmap_and_grad_equals_the_written_out_product(bias):
    """linear against einsum under vmap, in every combination of mapped arguments, through grad-of-vmap (ensembles)
    and vmap-of-grad (LLC chains)."""
    g = torch.Generator().manual_seed(0)
    N, B, T, di, do = 3, 4, 5, 6, 7
    h = torch.randn(N, B, T, di, generator=g, dtype=torch.float64)
    W = torch.randn(N, di, do, generator=g, dtype=torch.float64)
    b = torch.randn(N, do, generator=g, dtype=torch.float64) if bias else None

    def ref(h, W, b):  # h: (N, B, T, di) or (B, T, di); W: (N, di, do) or (di, do)
        out = torch.einsum("nbti,nio->nbto" if W.dim() == 3 else "...i,io->...o", h, W)
        if b is not None:
            out = out + (b[:, None, None, :] if b.dim() == 2 else b)
        return out

    b_dims = (0, None) if bias else (None,)
    for hd, Wd, bd in [(0, 0, 0), (0, None, None), (None, 0, 0), (0, 0, None), (0, None, 0)]:
        if bd not in b_dims:
            continue
        args = (h if hd == 0 else h[0], W if Wd == 0 else W[0], None if b is None else (b if bd == 0 else b[0]))
        got = torch.func.vmap(linear, in_dims=(hd, Wd, bd if bias else None))(*args)
        full = tuple(a if d == 0 or a is None else a.expand(N, *a.shape)
                     for a, d in zip(args, (hd, Wd, bd), strict=True))
        torch.testing.assert_close(got, ref(*full))
    # gradients: grad of a vmapped sum (the ensemble's backward) and vmap of per-member grads (vectorised chains)
    target = torch.randn(N, B, T, do, generator=g, dtype=torch.float64)

    def loss(h, W, b, t):
        return (linear(h, W, b) - t).square().sum()

    def ref_loss(h, W, b, t):
        return (ref(h, W, b) - t).square().sum()

    leaves = [x.clone().requires_grad_() for x in (h, W) + ((b,) if bias else ())]
    torch.func.vmap(loss, in_dims=(0, 0, 0 if bias else None, 0))(*leaves[:2], leaves[2] if bias else None,
                                                                  target).sum().backward()
    expect = torch.autograd.grad(ref_loss(*leaves[:2], leaves[2] if bias else None, target), leaves)
    for leaf, e in zip(leaves, expect, strict=True):
        torch.testing.assert_close(leaf.grad, e)
    per_member = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(0, 0, 0 if bias else None, 0))(
        h, W, b, target)
    for got, e in zip(per_member, expect[:2], strict=True):
        torch.testing.assert_close(got, e)


def test_outputs_and_gradients_equal_the_saved_reference(one_torch_thread):
    """Outputs, gradients (plain and under vmap(grad)) and a 30-step training run on fixed seeds equal the values
    the model gave when they were saved (tests/model_reference.py), up to float rounding: a change of
    implementation must not change the numbers."""
    from safetensors.torch import load_file

    from model_reference import PATH, reference_values

    saved, now = load_file(str(PATH)), reference_values()
    assert sorted(saved) == sorted(now)
    for key, value in saved.items():
        if key.startswith("train/final/") and key.endswith("attn.b_K"):
            continue  # its gradient is rounding noise (see test_ensemble.NON_IDENTIFIABLE), which Adam amplifies
        torch.testing.assert_close(now[key], value, rtol=1e-5, atol=1e-6, msg=key)
