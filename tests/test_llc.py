"""LLC estimator (llc.py): closed forms, known learning coefficients, determinism, isolation, refined LLC,
diagnostics, calibration, bad input, and the user's / icl-lab's transformers.

Reference values:
- regular model, loss ℓ* + ΔᵀHΔ: exact sampling gives λ = Σ nβh/(2nβh + γ) → d/2 (docs/papers.md §D2); the SGLD chain
  with step ε has the exact stationary law N(0, 1/(a(1 − εa/4))) per eigen-direction, a = 2nβh + γ.
- reduced-rank regression y = BAx, true map 0: Aoyagi & Watanabe (2005), "Stochastic complexities of reduced rank
  regression in Bayesian estimation", Neural Networks 18(7) — the RLCT formula in `aoyagi_watanabe`.
- loss Σ_i w_i^{2k_i}: λ = Σ_i 1/(2k_i) (each coordinate alone: E[nβ w^{2k}] = 1/(2k) under exp(−nβ w^{2k})).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from icl_lab.llc import (
    Calibration,
    LLCConfig,
    LLCResult,
    Observable,
    Thresholds,
    _gamma_order,
    burnin_note,
    calibrate,
    default_nbeta,
    diagnose,
    estimate_llc,
    head_mask,
    llc_per_chain,
    min_burnin,
    pick,
    pick_settings,
    refined_per_chain,
    resolve,
    sampler_ok,
    sgld_step,
)
from icl_lab.plots import plot_calibration

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear_mse(forward, batch):
    x, y = batch
    return (forward(x).squeeze(-1) - y).square().mean()


def linear_problem(d: int, n: int = 1000, seed: int = 0, noise: float = 0.1):
    """ŷ = wᵀx at w* = the exact least-squares solution of the data; H = XᵀX/n (loss = ℓ* + ΔᵀHΔ)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = X @ torch.randn(d, generator=g, dtype=F64) + noise * torch.randn(n, generator=g, dtype=F64)
    w_star = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    model = nn.Linear(d, 1, bias=False, dtype=F64)
    with torch.no_grad():
        model.weight.copy_(w_star[None])
    H = torch.linalg.eigvalsh(X.T @ X / n)
    return model, (X, y), H


class Analytic(nn.Module):
    """A model whose 'output' is an analytic population loss K(w) >= 0 with K(w*) = 0 at w* = 0."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], K):
        super().__init__()
        self.ws = nn.ParameterDict({k: nn.Parameter(torch.zeros(s, dtype=F64)) for k, s in shapes.items()})
        self.K = K

    def forward(self, x):
        return self.K(self.ws)


def analytic_loss(forward, batch):
    return forward(batch[0])


DUMMY = (torch.zeros(2, 1, dtype=F64),)  # n only matters through nβ, which these tests set explicitly


def aoyagi_watanabe(M: int, H: int, N: int, r: int = 0) -> float:
    """RLCT of reduced-rank regression (input M, hidden H, output N, true rank r), Aoyagi & Watanabe (2005)."""
    if N + r <= M + H and M + r <= N + H and H + r <= M + N:
        lam = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
        return (lam + (1 if (M + H + N + r) % 2 else 0)) / 8
    if M + H < N + r:
        return (H * M - H * r + N * r) / 2
    if N + H < M + r:
        return (H * N - H * r + M * r) / 2
    return M * N / 2  # M + N < H + r


def rrr_model(M: int, H: int, N: int) -> Analytic:
    return Analytic({"A": (H, M), "B": (N, H)}, lambda w: (w["B"] @ w["A"]).square().sum())


class SmallMLP(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Parameter(torch.randn(3, 8, generator=g, dtype=F64) / 2)
        self.fc2 = nn.Parameter(torch.randn(8, generator=g, dtype=F64) / 3)
        self.unused = nn.Parameter(torch.ones(5, dtype=F64))  # never used in forward: grad is None
        self.frozen = nn.Parameter(torch.ones(2, dtype=F64), requires_grad=False)

    def forward(self, x):
        return torch.tanh(x @ self.fc1) @ self.fc2 + self.frozen.sum()


def mlp_data(n: int = 200):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    return x, torch.sin(x.sum(-1))


def mlp_mse(forward, batch):
    return (forward(batch[0]) - batch[1]).square().mean()


SMALL = LLCConfig(step_size=1e-3, localization=10.0, num_chains=3, num_draws=40, num_burnin=10, batch_size=32)


# ------------------------------------------------------------------------------------------- pure pieces


def test_sgld_step_is_a_gradient_step_without_noise_and_localisation():
    theta, grad = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, 0.5, -1.0])
    out = sgld_step(theta, grad, theta, torch.zeros(3), step_size=0.1, nbeta=4.0, localization=7.0)
    torch.testing.assert_close(out, theta - 0.05 * 4.0 * grad)  # θ = θ*: localisation term vanishes
    star, noise = torch.zeros(3), torch.tensor([1.0, 2.0, -1.0])
    out = sgld_step(theta, grad, star, noise, step_size=0.01, nbeta=4.0, localization=7.0)
    torch.testing.assert_close(out, theta - 0.005 * (4.0 * grad + 7.0 * theta) + 0.1 * noise)
    mask = torch.tensor([1.0, 0.0, 1.0])
    out = sgld_step(theta, grad, star, noise, step_size=0.01, nbeta=4.0, localization=7.0, mask=mask)
    assert out[1] == theta[1] and out[0] != theta[0]


def test_estimator_formula_and_default_nbeta():
    trace = np.array([[1.0, 3.0], [2.0, 2.0]])
    np.testing.assert_allclose(llc_per_chain(trace, init_loss=1.5, nbeta=10.0), [5.0, 5.0])
    assert default_nbeta(1000) == pytest.approx(1000 / math.log(1000))
    with pytest.raises(ValueError, match="n must be >= 2"):
        default_nbeta(1)


# ------------------------------------------------------------------------------ validation against theory


def test_regular_d10_matches_closed_forms():
    """λ̂ within 5% of d/2, and statistically equal to the exact stationary value of the ε-discretised chain
    (minibatch gradient noise is ~1e-4 of the injected noise here, so the closed form holds)."""
    model, data, H = linear_problem(10)
    eps, gamma = 1e-4, 1.0
    cfg = LLCConfig(step_size=eps, localization=gamma, num_chains=64, num_draws=900, num_burnin=300, batch_size=100)
    res = estimate_llc(model, data, linear_mse, config=cfg, seed=0)
    nb = res.nbeta
    a = 2 * nb * H + gamma
    exact = float((nb * H / a).sum())  # exact sampling, finite γ
    sgld = float((nb * H / (a * (1 - eps * a / 4))).sum())  # the ε-discretised chain's stationary value
    assert res.d == 10 and res.n == 1000 and nb == pytest.approx(1000 / math.log(1000))
    assert exact == pytest.approx(5.0, rel=0.01)
    assert res.llc_mean == pytest.approx(5.0, rel=0.05), res.summary()
    assert abs(res.llc_mean - sgld) < 4 * res.llc_se, (res.summary(), sgld)
    assert res.ok, res.diagnostics


def test_regular_d100_minibatch_within_5_percent_of_half_d():
    model, data, _ = linear_problem(100)
    cfg = LLCConfig(step_size=1e-4, localization=1.0, num_chains=16, num_draws=900, num_burnin=300, batch_size=100)
    res = estimate_llc(model, data, linear_mse, config=cfg, seed=0)
    assert res.d == 100
    assert res.llc_mean == pytest.approx(50.0, rel=0.05), res.summary()
    assert res.ok, res.diagnostics


def test_aoyagi_watanabe_formula_cases():
    assert aoyagi_watanabe(3, 2, 3) == 2.5  # case 1, M+H+N even
    assert aoyagi_watanabe(5, 3, 5) == 6.5  # case 1, odd
    assert aoyagi_watanabe(4, 3, 8) == 6.0  # case 2: M + H < N
    assert aoyagi_watanabe(8, 3, 4) == 6.0  # case 3: N + H < M
    assert aoyagi_watanabe(1, 4, 1) == 0.5  # case 4: M + N < H
    assert aoyagi_watanabe(3, 2, 3, r=2) == 4.0  # r = H: regular, dim of rank-H matrices / 2 = H(M + N − H)/2


# Along the flat directions of {BA = 0} the chains diffuse slowly (about 1/(γε) steps to cross the localised
# region), so these chains are long; at ε = 1e-4 and 1,500 draws λ̂ came out about 10% low.
RRR_CFG = LLCConfig(step_size=2e-4, localization=1.0, nbeta=1e3, num_chains=16, num_draws=2500, num_burnin=500,
                    batch_size=None)


def test_reduced_rank_regression_matches_aoyagi_watanabe():
    """Two-layer linear network at the origin of {BA = 0}: λ = 2.5 while d/2 = 6 (singular)."""
    res = estimate_llc(rrr_model(3, 2, 3), DUMMY, analytic_loss, config=RRR_CFG, seed=0)
    assert res.d == 12
    assert res.llc_mean == pytest.approx(aoyagi_watanabe(3, 2, 3), rel=0.10), res.summary()
    assert res.ok, res.diagnostics


@pytest.mark.slow
@pytest.mark.parametrize("M,H,N", [(5, 3, 5), (4, 3, 8), (8, 3, 4), (2, 4, 2)])
def test_reduced_rank_regression_more_cases(M, H, N):
    # larger networks are stiffer along {BA = 0}: a smaller ε (ε = 2e-4 gave +14% for (4, 3, 8)), longer chains
    cfg = RRR_CFG.model_copy(update={"step_size": 5e-5, "num_draws": 6000, "num_burnin": 2000})
    res = estimate_llc(rrr_model(M, H, N), DUMMY, analytic_loss, config=cfg, seed=0)
    assert res.llc_mean == pytest.approx(aoyagi_watanabe(M, H, N), rel=0.10), res.summary()


def test_monomial_loss_gives_sum_of_inverse_powers():
    ks = torch.tensor([1, 2, 2, 3])
    model = Analytic({"w": (4,)}, lambda w: (w["w"] ** (2 * ks)).sum())
    cfg = LLCConfig(step_size=1e-4, localization=1.0, nbeta=1e3, num_chains=64, num_draws=1200, num_burnin=300,
                    batch_size=None)
    res = estimate_llc(model, DUMMY, analytic_loss, config=cfg, seed=0)
    expected = float((1 / (2 * ks)).sum())  # 7/6, far below d/2 = 2
    assert res.llc_mean == pytest.approx(expected, rel=0.10), res.summary()
    assert res.ok, res.diagnostics


def sloped_quadratic(g: torch.Tensor, h: torch.Tensor) -> Analytic:
    """ℓ(w) = gᵀw + ½ Σ hᵢwᵢ² at w* = 0: a checkpoint on a slope (∇ℓ(w*) = g) of curvatures h ≥ 0."""
    return Analytic({"w": (len(g),)}, lambda w: (g * w["w"]).sum() + 0.5 * (h * w["w"] ** 2).sum())


def test_slope_term_and_its_bias_match_the_quadratic_closed_form():
    """With A = nβH + γI: slope term S = −nβ²gᵀA⁻¹g, and λ̂ = ½nβ tr(HA⁻¹) − Σ nβ²gᵢ²(nβhᵢ + 2γ)/(2aᵢ²), whose
    second part lies between S and S/2 (diagnose's message); at g = 0 both vanish and nothing is flagged."""
    h = torch.tensor([0.0, 0.0, 0.05, 0.5, 2.0, 10.0], dtype=F64)
    g = torch.tensor([0.2, -0.1, 0.2, 0.1, -0.4, 0.2], dtype=F64)
    nb, gamma = 20.0, 20.0
    a = nb * h + gamma
    cfg = LLCConfig(step_size=1e-3, localization=gamma, nbeta=nb, num_chains=64, num_draws=2000, num_burnin=500,
                    batch_size=None)
    res = estimate_llc(sloped_quadratic(g, h), DUMMY, analytic_loss, config=cfg, seed=0)
    lam0 = float((0.5 * nb * h / a).sum())
    S = float(-(nb**2 * g**2 / a).sum())
    bias = float(-(nb**2 * g**2 * (nb * h + 2 * gamma) / (2 * a**2)).sum())
    assert S <= bias <= S / 2 < 0 and lam0 + bias < 0  # the slope outweighs λ here: λ̂ reads negative
    assert res.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)
    # the discretised chain's stationary mean is exact (−nβA⁻¹g); S's noise here is ~1.6% (64 chains of ~10
    # effective draws along the flat directions), so 6% is about 4 standard errors
    assert res.llc_slope == pytest.approx(S, rel=0.06), (res.llc_slope, S)
    assert abs(res.llc_mean - (lam0 + bias)) < 4 * res.llc_se + 0.03 * abs(lam0 + bias), (res.summary(), lam0 + bias)
    assert "not_at_minimum" in res.diagnostics and "drift downhill" in res.diagnostics["not_at_minimum"]
    row = res.to_row()
    assert row["llc_slope"] == res.llc_slope and row["grad_norm"] == res.grad_norm

    flat = estimate_llc(sloped_quadratic(0 * g, h), DUMMY, analytic_loss, config=cfg, seed=0)
    assert flat.grad_norm == 0.0 and flat.llc_slope == 0.0
    assert flat.llc_mean == pytest.approx(lam0, rel=0.1) and "not_at_minimum" not in flat.diagnostics


def test_slope_term_is_the_same_on_both_paths():
    model, data = SmallMLP(), mlp_data()
    vec = estimate_llc(model, data, mlp_mse, config=SMALL.model_copy(update={"vectorize": True}), seed=3)
    seq = estimate_llc(model, data, mlp_mse, config=SMALL.model_copy(update={"vectorize": False}), seed=3)
    assert vec.grad_norm == pytest.approx(seq.grad_norm, rel=1e-12) and vec.grad_norm > 0
    assert vec.llc_slope == pytest.approx(seq.llc_slope, rel=1e-6, abs=1e-9)


# ------------------------------------------------------------------------------ samplers and the tilted loss


def quadrature_llc(energy, observable, lim: float = 3.0, points: int = 400_001) -> float:
    """E[observable(w)] under p(w) ∝ exp(−energy(w)) in one dimension, by the trapezoid rule on [−lim, lim]
    (an independent reference for the sampler)."""
    w = np.linspace(-lim, lim, points)
    u = energy(w)
    p = np.exp(-(u - u.min()))
    return float(np.trapezoid(observable(w) * p, w) / np.trapezoid(p, w))


def test_mala_is_exact_where_sgld_is_biased():
    """A stiff quadratic at a large ε: SGLD's stationary variance per direction is 1/(a(1 − εa/4)), 33% too wide
    at εa = 1, while MALA's Metropolis step removes the bias (closed form Σ ½·nβh/a, a = nβh + γ)."""
    h = torch.tensor([0.5, 2.0, 5.0, 10.0], dtype=F64)
    nb, gamma, eps = 20.0, 2.0, 1 / (20.0 * 10.0 + 2.0)  # εa = 1 along the stiffest direction
    model = sloped_quadratic(0 * h, h)
    a = nb * h + gamma
    exact = float((0.5 * nb * h / a).sum())
    sgld_biased = float((0.5 * nb * h / (a * (1 - eps * a / 4))).sum())
    base = dict(step_size=eps, localization=gamma, nbeta=nb, num_chains=16, num_draws=2000, num_burnin=200,
                batch_size=None)
    mala = estimate_llc(model, DUMMY, analytic_loss, config=LLCConfig(sampler="mala", **base), seed=0)
    sgld = estimate_llc(model, DUMMY, analytic_loss, config=LLCConfig(**base), seed=0)
    assert sgld_biased > 1.08 * exact  # the bias is large enough to be seen
    assert abs(mala.llc_mean - exact) < 4 * mala.llc_mcse, (mala.summary(), exact, mala.llc_mcse)
    assert abs(sgld.llc_mean - sgld_biased) < 4 * sgld.llc_mcse, (sgld.summary(), sgld_biased)
    assert mala.acceptance_rate.shape == (16,) and 0.3 < mala.acceptance_rate.mean() < 1.0
    assert mala.to_row()["acceptance_rate"] == pytest.approx(float(mala.acceptance_rate.mean()))
    assert sgld.acceptance_rate is None


def test_tilted_loss_removes_the_slope_of_a_quadratic_with_negative_curvature():
    """ℓ = gᵀw + ½Σhᵢwᵢ² with one hᵢ < 0 (γ > nβ|hᵢ| keeps the localised posterior proper): the tilted loss drops
    gᵀw, so λ̂_tilted = Σ ½·nβhᵢ/aᵢ exactly (a = nβh + γ), a negative term included; the plain λ̂ also carries
    ½nβhᵢ(nβgᵢ/aᵢ)² + nβgᵢ(−nβgᵢ/aᵢ) per direction."""
    h = torch.tensor([-0.4, 0.0, 0.5, 2.0, 6.0], dtype=F64)
    g = torch.tensor([0.3, -0.2, 0.2, 0.4, -0.3], dtype=F64)
    nb, gamma = 20.0, 10.0
    a = nb * h + gamma
    tilted_exact = float((0.5 * nb * h / a).sum())
    mean = -nb * g / a
    plain_exact = float((0.5 * nb * h * (1 / a + mean**2) + nb * g * mean).sum())
    cfg = LLCConfig(sampler="mala", step_size=0.02, localization=gamma, nbeta=nb, num_chains=16, num_draws=2000,
                    num_burnin=200, batch_size=None, tilted=True)
    res = estimate_llc(sloped_quadratic(g, h), DUMMY, analytic_loss, config=cfg, seed=0)
    assert abs(res.llc_tilted - tilted_exact) < 4 * res.llc_tilted_mcse + 0.01, (res.llc_tilted, tilted_exact)
    assert abs(res.llc_mean - plain_exact) < 4 * res.llc_mcse + 0.01, (res.llc_mean, plain_exact)
    assert plain_exact < tilted_exact - 1  # the slope's bias is large, and the tilt removes it
    assert res.llc_tilted_per_chain.shape == (16,) and res.to_row()["llc_tilted"] == res.llc_tilted


def test_tilted_loss_on_a_quartic_matches_quadrature():
    """ℓ = g·w + c·w⁴ per coordinate: no quadratic part, so the tilt is not exact here; both λ̂ are compared with
    one-dimensional quadrature of their definitions (the plain one under exp(−nβℓ − γw²/2), the tilted one under
    exp(−nβcw⁴ − γw²/2))."""
    c = torch.tensor([1.0, 3.0], dtype=F64)
    g = torch.tensor([0.2, -0.3], dtype=F64)
    nb, gamma = 200.0, 1.0
    model = Analytic({"w": (2,)}, lambda w: (g * w["w"]).sum() + (c * w["w"] ** 4).sum())
    cfg = LLCConfig(sampler="mala", step_size=2e-3, localization=gamma, nbeta=nb, num_chains=16, num_draws=3000,
                    num_burnin=300, batch_size=None, tilted=True)
    res = estimate_llc(model, DUMMY, analytic_loss, config=cfg, seed=0)
    plain = sum(quadrature_llc(lambda w, gi=gi, ci=ci: nb * (gi * w + ci * w**4) + gamma * w**2 / 2,
                               lambda w, gi=gi, ci=ci: nb * (gi * w + ci * w**4))
                for gi, ci in zip(g.tolist(), c.tolist(), strict=True))
    tilted = sum(quadrature_llc(lambda w, ci=ci: nb * ci * w**4 + gamma * w**2 / 2, lambda w, ci=ci: nb * ci * w**4)
                 for ci in c.tolist())
    assert tilted == pytest.approx(0.5, rel=0.1)  # two quartic coordinates, 1/4 each
    assert abs(res.llc_tilted - tilted) < 4 * res.llc_tilted_mcse + 0.005, (res.llc_tilted, tilted)
    assert abs(res.llc_mean - plain) < 4 * res.llc_mcse + 0.005, (res.llc_mean, plain)


def test_rmsprop_sgld_preconditioner_is_adapted_in_burnin_then_frozen():
    """Curvatures over four decades: the preconditioner G (scaled so the stiffest direction keeps step ε) gives the
    soft directions larger steps, stays under the cap 0.1/(εγ), stops changing after burn-in (a longer run ends
    with the same G), and the frozen chain has the stationary law of its discretisation: per direction the update
    Δ ← (1 − εGa/2)Δ + √(εG)ξ, a = nβh + γ, has variance 1/(a(1 − εGa/4)), so λ̂ = Σ ½nβh/(a(1 − εGa/4))."""
    h = torch.tensor([0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0], dtype=F64)
    nb, gamma, eps = 50.0, 0.5, 5e-5
    a = (nb * h + gamma).numpy()
    base = dict(step_size=eps, localization=gamma, nbeta=nb, num_chains=8, num_draws=3000, num_burnin=1000,
                batch_size=None, sampler="rmsprop_sgld")
    model = sloped_quadratic(0 * h, h)
    rms = estimate_llc(model, DUMMY, analytic_loss, config=LLCConfig(**base), seed=0)
    short = estimate_llc(model, DUMMY, analytic_loss, config=LLCConfig(**{**base, "num_draws": 10}), seed=0)
    assert rms.preconditioner.shape == (8, 9)
    np.testing.assert_array_equal(rms.preconditioner, short.preconditioner)  # frozen after burn-in
    G = rms.preconditioner
    assert (G[:, 0] > 10 * G[:, -1]).all() and (G >= 1 - 1e-9).all()  # soft directions get the larger steps
    assert G.max() <= 0.1 / (eps * gamma) + 1e-9  # the cap that bounds the localised step
    per_chain = (0.5 * nb * h.numpy() / (a * (1 - eps * G * a / 4))).sum(axis=1)  # (C,) the discretised law
    expected = float(per_chain.mean())
    exact = float((0.5 * nb * h.numpy() / a).sum())
    assert abs(expected - exact) < 0.05 * exact  # at this ε the discretisation moves λ by under 5%
    assert abs(rms.llc_mean - expected) < 4 * rms.llc_mcse, (rms.summary(), expected, rms.llc_mcse)
    assert rms.to_row()["precond_max"] == pytest.approx(float(G.max()))


@pytest.mark.parametrize("sampler", ["rmsprop_sgld", "mala"])
def test_samplers_agree_on_both_paths(sampler):
    model, data = SmallMLP(), mlp_data()
    cfg = SMALL.model_copy(update={"sampler": sampler, "tilted": True,
                                   "batch_size": None if sampler == "mala" else 32})
    vec = estimate_llc(model, data, mlp_mse, config=cfg.model_copy(update={"vectorize": True}), seed=3)
    seq = estimate_llc(model, data, mlp_mse, config=cfg.model_copy(update={"vectorize": False}), seed=3)
    assert vec.vectorized and not seq.vectorized
    np.testing.assert_allclose(vec.loss_trace, seq.loss_trace, rtol=1e-9, atol=1e-12)
    assert vec.llc_tilted == pytest.approx(seq.llc_tilted, rel=1e-9)


def test_mala_refuses_minibatches():
    with pytest.raises(ValidationError, match="batch_size"):
        LLCConfig(sampler="mala")


# ------------------------------------------------------------------------------ determinism and isolation


def test_vectorised_and_sequential_chains_agree():
    model, data = SmallMLP(), mlp_data()
    vec = estimate_llc(model, data, mlp_mse, config=SMALL, seed=3)
    seq = estimate_llc(model, data, mlp_mse, config=SMALL.model_copy(update={"vectorize": False}), seed=3)
    assert vec.vectorized and not seq.vectorized
    np.testing.assert_allclose(vec.loss_trace, seq.loss_trace, rtol=1e-9, atol=0)
    np.testing.assert_allclose(vec.burnin_trace, seq.burnin_trace, rtol=1e-9, atol=0)
    assert vec.llc_mean == pytest.approx(seq.llc_mean, rel=1e-8)


def test_concurrent_sequential_chains_equal_one_thread(tiny_icl):
    """The sequential path runs chains concurrently over the caller's torch threads (one intra-op thread and one
    model copy each): every chain's trace equals the one-thread run bit for bit, with 2 threads and with more threads
    than chains, and torch's thread count is left as it was."""
    model, data = tiny_icl
    cfg = SMALL.model_copy(update={"vectorize": False, "num_draws": 12, "num_burnin": 2, "step_size": 1e-4,
                                   "tilted": True})  # tilted: a second sampling pass on the same thread copies
    before = torch.get_num_threads()
    traces = {}
    try:
        for threads in (1, 2, 5):
            torch.set_num_threads(threads)
            res = estimate_llc(model, data, icl_mse, config=cfg, seed=4)
            assert torch.get_num_threads() == threads
            traces[threads] = (res.burnin_trace, res.loss_trace, res.llc_tilted_per_chain)
    finally:
        torch.set_num_threads(before)
    for threads in (2, 5):
        for a, b in zip(traces[1][:2], traces[threads][:2], strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(traces[1][2], traces[threads][2], rtol=1e-5)  # float32 rounding
    assert np.isfinite(traces[1][1]).all() and len({tuple(row) for row in traces[1][1]}) == cfg.num_chains


class InplaceModel(nn.Module):
    """Writes batched inputs into a fresh unbatched buffer, like the seed's ICLTransformer: vmap cannot do it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.2, 0.1], dtype=F64))

    def forward(self, x):
        buf = torch.zeros(x.shape[0], 4, dtype=F64)
        buf[:, :3] = x
        return buf[:, :3] @ self.w


def test_vmap_through_attention_matches_sequential(tiny_icl):
    """icl-lab's transformer (scaled_dot_product_attention, LayerNorm) vectorised over chains."""
    model, data = tiny_icl
    cfg = SMALL.model_copy(update={"num_chains": 2, "num_draws": 10, "num_burnin": 0, "step_size": 1e-4})
    vec = estimate_llc(model, data, icl_mse, config=cfg.model_copy(update={"vectorize": True}), seed=0)
    seq = estimate_llc(model, data, icl_mse, config=cfg.model_copy(update={"vectorize": False}), seed=0)
    assert vec.vectorized and not seq.vectorized
    assert not [n for n in vec.notes if "burn-in" not in n]  # no vmap fallback
    np.testing.assert_allclose(vec.loss_trace, seq.loss_trace, rtol=1e-4)


def test_automatic_fallback_when_vmap_fails_gives_the_sequential_result():
    model, data = InplaceModel(), mlp_data()
    auto = estimate_llc(model, data, mlp_mse, config=SMALL, seed=0)
    seq = estimate_llc(model, data, mlp_mse, config=SMALL.model_copy(update={"vectorize": False}), seed=0)
    assert not auto.vectorized
    assert any("fell back" in note for note in auto.notes)
    np.testing.assert_array_equal(auto.loss_trace, seq.loss_trace)


def test_bit_identical_repeat_and_global_rng_untouched():
    model, data = SmallMLP(), mlp_data()
    rng_before = torch.get_rng_state().clone()
    a = estimate_llc(model, data, mlp_mse, config=SMALL, seed=11)
    assert torch.equal(torch.get_rng_state(), rng_before)
    torch.manual_seed(12345)  # the global RNG must not matter either
    b = estimate_llc(model, data, mlp_mse, config=SMALL, seed=11)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    np.testing.assert_array_equal(a.burnin_trace, b.burnin_trace)
    assert a.llc_mean == b.llc_mean and a.fingerprint == b.fingerprint
    c = estimate_llc(model, data, mlp_mse, config=SMALL, seed=12)
    assert not np.array_equal(a.loss_trace, c.loss_trace) and a.fingerprint != c.fingerprint


def test_model_is_never_modified():
    model, data = SmallMLP(), mlp_data()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    estimate_llc(model, data, mlp_mse, config=SMALL, seed=0)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert model.training
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_unused_and_frozen_parameters_are_not_sampled_or_counted():
    model, data = SmallMLP(), mlp_data()
    res = estimate_llc(model, data, mlp_mse, config=SMALL, seed=0)
    assert res.d == 3 * 8 + 8  # fc1 + fc2; not `unused` (5) nor `frozen` (2)
    assert res.sampled == ["fc1", "fc2"]
    assert "gradient is None" in res.excluded["unused"]
    assert "requires_grad=False" in res.excluded["frozen"]


# ------------------------------------------------------------------------------------------- refined LLC


@pytest.fixture(scope="module")
def tiny_icl():
    from icl_lab.config import ModelConfig, TaskConfig
    from icl_lab.model import build_model

    task = TaskConfig(D=3, K=4, M=2)
    model = build_model(task, ModelConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_mlp=8), seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 3, generator=g)
    y = x @ torch.tensor([1.0, 0.0, 0.0])
    return model, (x, y)


def icl_mse(forward, batch):
    x, y = batch
    return (forward(x, y) - y).square().mean()


def numel(model, names):
    params = dict(model.named_parameters())
    return sum(params[k].numel() for k in names)


def test_refined_llc_selects_by_pattern_and_head(tiny_icl):
    model, data = tiny_icl
    cfg = SMALL.model_copy(update={"num_draws": 8, "num_burnin": 2, "step_size": 1e-4})
    names = [k for k, _ in model.named_parameters()]
    block0 = [k for k in names if k.startswith("blocks.0.")]
    mlps = [k for k in names if ".mlp." in k]
    for params, expected in [("blocks.0.*", block0), ("blocks.0", block0), (["*.mlp.*"], mlps),
                             ("re:blocks\\.[01]\\.mlp\\..*", mlps)]:
        res = estimate_llc(model, data, icl_mse, config=cfg, seed=0, params=params)
        assert sorted(res.sampled) == sorted(expected), params
        assert res.d == numel(model, expected)
        assert all(res.excluded[k] == "not selected" for k in names if k not in expected)
    masks = head_mask(model, layer=1, head=0)
    assert sorted(k.rsplit(".", 1)[1] for k in masks) == ["W_K", "W_O", "W_Q", "W_V", "b_K", "b_Q", "b_V"]
    res = estimate_llc(model, data, icl_mse, config=cfg, seed=0, params=masks)
    assert res.d == 4 * 8 * 4 + 3 * 4  # W_Q, W_K, W_V, W_O slices of one head + its three biases
    assert np.isfinite(res.llc_mean)


def test_masked_entries_do_not_move():
    """The loss depends only on w[1]; sampling only w[0] leaves every loss exactly at ℓ(w*), so λ̂ = 0."""
    model = Analytic({"w": (2,)}, lambda w: (w["w"][1] - 0.0) ** 2 + 1.0)
    mask = {"ws.w": torch.tensor([True, False])}
    cfg = LLCConfig(step_size=1e-2, localization=1.0, nbeta=10.0, num_chains=2, num_draws=20, num_burnin=0,
                    batch_size=None)
    res = estimate_llc(model, DUMMY, analytic_loss, config=cfg, seed=0, params=mask)
    assert res.d == 1
    np.testing.assert_array_equal(res.loss_trace, 1.0)
    assert res.llc_mean == 0.0
    full = estimate_llc(model, DUMMY, analytic_loss, config=cfg, seed=0)
    assert full.d == 2 and full.llc_mean > 0


def test_head_mask_errors(tiny_icl):
    model, _ = tiny_icl
    with pytest.raises(ValueError, match="out of range"):
        head_mask(model, layer=0, head=2)
    with pytest.raises(ValueError, match="no parameters named"):
        head_mask(model, layer=5, head=0)


# ------------------------------------------------------------------------------------------- diagnostics


def synthetic_trace(C=4, T=400, mean=5.0, seed=0):
    return np.random.default_rng(seed).normal(mean, 1.0, size=(C, T))


def test_diagnose_flags_each_failure_and_passes_a_clean_trace():
    kw = dict(init_loss=0.0, nbeta=1.0, d=100)
    burn = np.zeros((4, 10))
    clean = synthetic_trace()
    assert diagnose(clean, burn, **kw) == {}
    nan = clean.copy()
    nan[2, 50] = np.nan
    assert "NaN" in diagnose(nan, burn, **kw)["diverged"]
    assert "exploded" in diagnose(clean * np.r_[1, 1, 1, 1e6][:, None], burn, **kw)["diverged"]
    assert "not a local minimum" in diagnose(synthetic_trace(mean=-3.0), burn, **kw)["negative"]
    rising = clean + np.linspace(0, 4, 400)
    assert "still rising" in diagnose(rising, burn, **kw)["not_stationary"]
    offset = clean + np.array([0.0, 0.0, 0.0, 3.0])[:, None]
    assert "R̂" in diagnose(offset, burn, **kw)["chains_disagree"]
    assert "exceeds d/2" in diagnose(synthetic_trace(mean=60.0), burn, **kw)["exceeds_half_d"]
    assert diagnose(synthetic_trace(mean=60.0), burn, **kw, thresholds=Thresholds(exceed_se=1e9)) == {}
    assert diagnose(synthetic_trace(mean=52.0), burn, **kw) == {}  # within the 5% slack above d/2
    # slope term S = nβ·mean(slope) = -2 against λ̂ = 5: |S|/2 = 1 > 10% of λ̂, and far beyond its noise
    downhill = np.random.default_rng(1).normal(-2.0, 0.1, size=(4, 400))
    msg = diagnose(clean, burn, **kw, slope_trace=downhill, grad_norm=0.3)["not_at_minimum"]
    assert "‖∇ℓ_n(w*)‖ = 0.3" in msg and "by between 1 and 2" in msg
    assert diagnose(clean, burn, **kw, slope_trace=downhill * 0.4) == {}  # |S|/2 = 0.4 < 10% of λ̂ = 5
    assert diagnose(clean, burn, **kw, slope_trace=-downhill) == {}  # uphill on average: not a slope bias
    noisy = np.repeat([[-12.0], [8.0], [-10.0], [6.0]], 400, axis=1)  # S = -2, its standard error 5.0
    assert "not_at_minimum" not in diagnose(clean, burn, **kw, slope_trace=noisy)


def test_large_step_size_is_reported_as_diverged_not_raised():
    model, data, _ = linear_problem(10)
    cfg = LLCConfig(step_size=0.1, localization=1.0, num_chains=2, num_draws=400, num_burnin=0, batch_size=100)
    res = estimate_llc(model, data, linear_mse, config=cfg, seed=0)
    assert not res.ok and "diverged" in res.diagnostics
    assert any("stopped" in note for note in res.notes)
    seq = estimate_llc(model, data, linear_mse, config=cfg.model_copy(update={"vectorize": False}), seed=0)
    assert not seq.ok and "diverged" in seq.diagnostics  # each chain stops itself; the others are not cut short
    stopped = [n for n in seq.notes if "stopped" in n]
    assert [re.sub(r"step \d+", "step t", n) for n in stopped] == [
        f"sampling stopped at step t of chain {c}: non-finite parameters" for c in range(2)]


def test_result_row_is_flat_and_parquet_ready(tmp_path):
    model, data = SmallMLP(), mlp_data()
    res = estimate_llc(model, data, mlp_mse, config=SMALL, seed=0)
    assert isinstance(res, LLCResult)
    assert res.loss_trace.shape == (3, 40) and res.burnin_trace.shape == (3, 10)
    assert res.llc_per_chain.shape == (3,)
    assert res.llc_mean == pytest.approx(res.llc_per_chain.mean())
    assert res.llc_std == pytest.approx(res.llc_per_chain.std(ddof=1))
    with torch.no_grad():
        assert res.init_loss == pytest.approx(float(mlp_mse(model, data)))
    row = res.to_row()
    for key in ("llc_mean", "llc_std", "llc_per_chain", "init_loss", "nbeta", "n", "d", "step_size", "localization",
                "num_chains", "num_draws", "num_burnin", "batch_size", "seed", "ok", "flags", "diagnostics"):
        assert key in row
    assert all(not isinstance(v, (np.ndarray, torch.Tensor, dict)) for v in row.values())
    pd.DataFrame([{"step": 0, **row}]).to_parquet(tmp_path / "llc.parquet")
    back = pd.read_parquet(tmp_path / "llc.parquet")
    assert list(back["llc_per_chain"][0]) == pytest.approx(list(res.llc_per_chain))


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make_config,match", [
    (lambda: LLCConfig(step_size=0.0), "step_size"),
    (lambda: LLCConfig(step_size=-1e-4), "step_size"),
    (lambda: LLCConfig(localization=0.0), "localization"),
    (lambda: LLCConfig(nbeta=-5.0), "nbeta"),
    (lambda: LLCConfig(nbeta=float("inf")), "nbeta"),
    (lambda: LLCConfig(num_draws=0), "num_draws"),
    (lambda: LLCConfig(num_burnin=-1), "num_burnin"),
    (lambda: LLCConfig(num_chains=0), "num_chains"),
    (lambda: LLCConfig(batch_size=0), "batch_size"),
])
def test_bad_config_values_are_refused(make_config, match):
    with pytest.raises(ValidationError, match=match):
        make_config()


def test_bad_config_assignment_is_refused():
    cfg = LLCConfig()
    with pytest.raises(ValueError, match="step_size"):
        cfg.step_size = -1.0


class CountingLoss:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, forward, batch):
        self.calls += 1
        return self.fn(forward, batch)


@pytest.mark.parametrize("data,params,match", [
    ((torch.zeros(1, 3, dtype=F64), torch.zeros(1, dtype=F64)), None, "n >= 2"),
    ((torch.zeros(5, 3, dtype=F64), torch.zeros(4, dtype=F64)), None, "different lengths"),
    ((), None, "empty tuple"),
    (torch.zeros(5, 3), None, "tuple of tensors"),
    (None, "nothing.*", "matches no parameter"),
    (None, [], "empty"),
    (None, {"fc1": torch.zeros(3, 8, dtype=torch.bool)}, "empty parameter selection"),
    (None, {"fc1": torch.ones(3, dtype=torch.bool)}, "shape"),
    (None, {"nope": torch.ones(3, dtype=torch.bool)}, "no parameter named"),
    (None, "unused", "empty parameter selection"),
    (None, "frozen", "empty parameter selection"),
])
def test_bad_input_raises_before_sampling(data, params, match):
    loss = CountingLoss(mlp_mse)
    with pytest.raises(ValueError, match=match):
        estimate_llc(SmallMLP(), mlp_data() if data is None else data, loss, config=SMALL, params=params)
    assert loss.calls <= 1  # at most the single probe forward at w*, never a chain step


def test_non_scalar_loss_is_refused():
    loss = CountingLoss(lambda f, b: (f(b[0]) - b[1]).square())
    with pytest.raises(ValueError, match="scalar"):
        estimate_llc(SmallMLP(), mlp_data(), loss, config=SMALL)
    assert loss.calls == 1


# ------------------------------------------------------------------------------------------- calibration


def test_pick_rule_on_a_synthetic_table():
    def table(llc, ok):
        eps = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3][: len(llc)]
        return pd.DataFrame({"step_size": eps, "localization": 1.0, "nbeta": 10.0, "llc_mean": llc, "ok": ok})

    idx, reason = pick(table([2.0, 5.0, 5.2, 5.4, 9.0], [False, True, True, True, False]))
    assert idx == 3 and "plateau of 3" in reason
    idx, _ = pick(table([5.0, 5.1, 8.0, 8.1, 8.2], [True] * 5))  # the longer plateau wins
    assert idx == 4
    idx, reason = pick(table([2.0, 5.0, 9.0], [True, True, True]))
    assert idx == 0 and "smallest stable" in reason  # no plateau: the least-biased stable ε
    idx, reason = pick(table([2.0, 5.0], [False, False]))
    assert idx is None and "every grid point" in reason
    # "not_at_minimum" is about the checkpoint, not ε: it does not break a plateau; sampler flags do
    assert sampler_ok("") and sampler_ok(None) and sampler_ok(float("nan")) and sampler_ok("not_at_minimum")
    assert not sampler_ok("negative;not_at_minimum") and not sampler_ok("chains_disagree")
    tab = table([5.0, 5.1, 5.2], [False, False, False]).assign(flags=["not_at_minimum", "not_at_minimum", ""])
    assert pick(tab)[0] == 2
    assert pick(tab.assign(flags=["not_at_minimum", "chains_disagree;not_at_minimum", ""]))[0] == 0


def test_pick_accepts_differences_within_two_standard_errors():
    tab = pd.DataFrame({"step_size": [1e-5, 3e-5, 1e-4], "localization": 1.0, "nbeta": 10.0,
                        "llc_mean": [4.0, 5.0, 9.0], "llc_se": [0.4, 0.4, 0.4], "ok": True})
    idx, reason = pick(tab)  # |5 - 4| = 1 ≤ 2·√(0.4² + 0.4²) = 1.13; |9 - 5| > 1.13
    assert idx == 1 and "plateau of 2" in reason and "standard errors" in reason
    idx, reason = pick(tab.assign(llc_se=0.3))  # 1 > 2·√0.18 = 0.85: no plateau
    assert idx == 0 and "smallest stable" in reason
    idx, _ = pick(tab.assign(llc_se=[float("nan")] * 3))  # one chain: no spread, the relative rule alone
    assert idx == 0


def gamma_table(llc: dict[float, float], flags: dict[float, str] | None = None, nbeta: float = 490.0):
    """A calibration table: at each γ, an ε plateau (1e-4, 3e-4) at λ̂ = llc[γ], standard error 0.2."""
    rows = []
    for gamma, lam in llc.items():
        for eps in (1e-4, 3e-4):
            rows.append({"step_size": eps, "localization": gamma, "nbeta": nbeta, "role": "grid", "llc_mean": lam,
                         "llc_se": 0.2, "ok": True, "flags": (flags or {}).get(gamma, "")})
    return pd.DataFrame(rows)


def test_pick_settings_wants_a_gamma_plateau():
    # λ̂ still rises as γ falls from 49 to 24.5; from 12.25 down it is flat: 12.25 is the first whose γ/2 and 2γ agree
    tab = gamma_table({49.0: 10.0, 24.5: 14.0, 12.25: 14.5, 6.125: 14.6})
    idx, reason, plateau = pick_settings(tab)
    assert plateau and tab.loc[idx, "localization"] == 12.25 and tab.loc[idx, "step_size"] == 3e-4
    assert "γ-plateau" in reason
    # a flagged estimate at γ/2 cannot confirm the plateau
    idx, _, plateau = pick_settings(gamma_table({49.0: 10.0, 24.5: 14.0, 12.25: 14.5, 6.125: 14.6},
                                                flags={6.125: "not_stationary"}))
    assert not plateau
    # λ̂ moves at every γ: no plateau, the smallest stationary γ is the fallback, and the reason says so
    idx, reason, plateau = pick_settings(gamma_table({49.0: 5.0, 24.5: 10.0, 12.25: 20.0}))
    assert not plateau and tab.loc[idx, "localization"] == 12.25 and "no γ-plateau" in reason
    assert "smallest γ whose chains were stationary is γ = 12.25" in reason
    # the fallback is the stationary γ nearest the validated γ/nβ = 0.01 (4.9 here), not always the smallest
    wide = gamma_table({49.0: 5.0, 9.8: 10.0, 2.45: 20.0, 0.6125: 40.0})
    idx, reason, plateau = pick_settings(wide)
    assert not plateau and wide.loc[idx, "localization"] in (9.8, 2.45) and "γ = 0.6125" in reason
    # γ/nβ ≤ 0.1 is tried first, the largest γ first (it relaxes fastest)
    assert _gamma_order([1.0, 98.0, 49.0, 10.0], 490.0, 0.1) == [49.0, 10.0, 1.0, 98.0]


def test_min_burnin_is_three_relaxation_times_of_the_localised_ar1():
    # Where ∇ℓ ≈ 0: Δ_{t+1} = (1 − εγ/2)Δ_t + N(0, ε), so Var Δ_t = v∞ (1 − a^{2t}) with a = 1 − εγ/2.
    for eps, gamma in [(1e-5, 1000.0), (3e-5, 1000.0), (1e-4, 100.0), (0.01, 10.0)]:
        b = min_burnin(eps, gamma)
        a = 1 - eps * gamma / 2
        assert a ** (2 * b) <= math.exp(-3) < a ** (2 * (b - 1))  # the first step within e^-3 of stationarity
        assert b == pytest.approx(3 / (eps * gamma), rel=0.05)
    assert min_burnin(3e-5, 1000.0) == 100 and min_burnin(1e-5, 1000.0) == 300
    assert min_burnin(1.0, 10.0) == 0  # εγ/2 ≥ 1: no relaxation time


def test_min_burnin_matches_a_simulated_flat_direction():
    """Pure localisation (ℓ constant): the empirical variance of 4,000 chains reaches 95% of its limit at
    min_burnin(ε, γ), and not at a third of it."""
    eps, gamma = 1e-3, 20.0
    g = torch.Generator().manual_seed(0)
    w = torch.zeros(4000, dtype=F64)
    limit = eps / (1 - (1 - eps * gamma / 2) ** 2)
    need = min_burnin(eps, gamma)
    var = []
    for _ in range(need):
        w = sgld_step(w, torch.zeros_like(w), torch.zeros_like(w), torch.randn(4000, generator=g, dtype=F64),
                      step_size=eps, nbeta=1.0, localization=gamma)
        var.append(float(w.var()))
    assert var[-1] / limit == pytest.approx(0.95, abs=0.05)
    assert var[need // 3 - 1] / limit < 0.7


def test_short_burnin_is_noted_and_kept_in_the_row():
    model, data, _ = linear_problem(10)
    cfg = LLCConfig(step_size=1e-4, localization=1.0, num_chains=2, num_draws=40, num_burnin=10, batch_size=100)
    assert "short burn-in" in burnin_note(cfg) and burnin_note(cfg.model_copy(update={"num_burnin": 30_000})) is None
    res = estimate_llc(model, data, linear_mse, config=cfg, seed=0)
    assert any("short burn-in" in n for n in res.notes) and "short burn-in" in res.to_row()["notes"]


def test_calibrate_burns_in_each_step_size_for_its_relaxation_time():
    model, data, _ = linear_problem(10)
    base = LLCConfig(localization=100.0, num_chains=2, num_draws=40, num_burnin=50, batch_size=100)
    cal = calibrate(model, data, linear_mse, step_sizes=[3e-5, 1e-4, 1e-3], localizations=[100.0], base=base,
                    seed=0, max_burnin=500)
    # min_burnin: 1000 (capped at 500), 300, 30 (below the base's 50); the γ checks at 50 and 200 burn in for theirs
    grid = cal.table["role"] == "grid"
    assert list(cal.table.loc[grid, "num_burnin"]) == [500, 300, 50]
    assert [r.burnin_trace.shape[1] for r in cal.results] == list(cal.table["num_burnin"])
    checks = cal.table[~grid]
    assert sorted(checks["localization"]) == [50.0, 200.0] and len(set(checks["step_size"])) == 1
    assert (cal.table["llc_se"] > 0).all()
    assert cal.chosen is not None and cal.chosen.num_burnin == int(cal.table.loc[cal.index, "num_burnin"])


def test_calibrate_default_gamma_grid_is_relative_to_nbeta():
    model, data, _ = linear_problem(10)
    nb = default_nbeta(1000)
    base = LLCConfig(num_chains=4, num_draws=400, num_burnin=5, batch_size=100)
    cal = calibrate(model, data, linear_mse, step_sizes=[3e-4], localizations=[None], base=base, seed=0,
                    max_burnin=200)
    grid = cal.table[cal.table["role"] == "grid"]
    assert grid["localization"].tolist() == pytest.approx([0.01 * nb])  # None: the validated γ/nβ
    checks = cal.table[cal.table["role"] == "check"]
    assert sorted(checks["localization"]) == pytest.approx([0.005 * nb, 0.02 * nb])
    assert (cal.table["num_burnin"] == 200).all()  # min_burnin capped at max_burnin
    assert LLCConfig().localization is None and LLCConfig().num_burnin is None
    resolved = resolve(LLCConfig(), nb)
    assert resolved.localization == pytest.approx(0.01 * nb) and resolved.num_burnin == min_burnin(1e-4, 0.01 * nb)


def test_calibrate_finds_the_plateau_and_plots(tmp_path):
    """ε = 3e-5 has not mixed (flagged), 1e-4 and 3e-4 agree (the plateau), 0.1 diverges: pick 3e-4."""
    model, data, _ = linear_problem(10)
    base = LLCConfig(localization=1.0, num_chains=16, num_draws=1200, num_burnin=200, batch_size=100)
    # γ = 1 makes min_burnin (the flat-direction bound) 10⁴-10⁵ steps, but this regular model has no flat
    # direction: keep the base's 200 (each such point carries a burn-in note)
    cal = calibrate(model, data, linear_mse, step_sizes=[3e-5, 1e-4, 3e-4, 0.1], localizations=[1.0], base=base,
                    seed=0, max_burnin=200)
    assert list(cal.table["num_burnin"]) == [200] * 6
    assert isinstance(cal, Calibration) and len(cal.results) == 6
    # a regular model's λ̂ = Σ nβ·2h/(2(nβ·2h + γ)) ≈ d/2 for γ ≪ nβ·h: halving or doubling γ = 1 moves nothing
    assert cal.on_plateau and "γ-plateau" in cal.reason
    assert list(cal.table["role"]) == ["grid"] * 4 + ["check"] * 2
    tab = cal.table[cal.table["role"] == "grid"]
    assert list(tab["step_size"]) == [3e-5, 1e-4, 3e-4, 0.1]
    assert {"step_size", "localization", "nbeta", "llc_mean", "llc_std", "ok", "flags"} <= set(tab.columns)
    assert list(tab["ok"]) == [False, True, True, False]
    assert "diverged" in tab.loc[3, "flags"]
    assert cal.index == 2 and "plateau of 2" in cal.reason
    assert cal.chosen == base.model_copy(update={"step_size": 3e-4})
    assert tab.loc[2, "llc_mean"] == pytest.approx(5.0, rel=0.1)
    paths = plot_calibration(cal, tmp_path / "cal")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)


# ------------------------------------------------------------------------------ the user's and icl-lab's models


def briefly_train(model, data, loss_fn, steps, lr, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = data[0].shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        loss = loss_fn(model, tuple(t[idx] for t in data))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def regression_data(n, K, D, M, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = torch.randn(M, D, generator=g)
    tasks = tasks / tasks.norm(dim=-1, keepdim=True)
    w = tasks[torch.randint(0, M, (n,), generator=g)]
    x = torch.randn(n, K, D, generator=g)
    return x, torch.einsum("nkd,nd->nk", x, w)


def test_icl_lab_seed_preset_gives_finite_positive_llc():
    from icl_lab.config import ModelConfig, TaskConfig
    from icl_lab.model import build_model

    model = build_model(TaskConfig(D=8, K=16, M=2), ModelConfig(), seed=0)
    data = regression_data(512, 16, 8, 2)
    final = briefly_train(model, data, icl_mse, steps=100, lr=3e-3, batch=32)
    assert final < 1.0
    cfg = LLCConfig(step_size=1e-4, localization=100.0, num_chains=2, num_draws=40, num_burnin=20, batch_size=16)
    res = estimate_llc(model, data, icl_mse, config=cfg, seed=0)
    assert not res.vectorized  # auto: sequential chains on CPU for a 100k-parameter model (faster there)
    assert res.d == sum(p.numel() for p in model.parameters())
    assert np.isfinite(res.llc_per_chain).all() and res.llc_mean > 0, res.summary()
    assert res.llc_mean < res.d / 2


def seed_model_loss(forward, batch):
    x, y = batch
    return (forward(x, y) - y).square().mean()


def test_users_transformer_lens_model_small():
    pytest.importorskip("transformer_lens.HookedTransformer", reason="the user's model needs transformer-lens 3.x")
    from seed_model import ICLTransformer

    torch.manual_seed(0)  # TransformerLens initialises from the global RNG; the estimator itself never does
    model = ICLTransformer(3, seq_length=4, d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=32)
    data = regression_data(256, 4, 3, 1)
    final = briefly_train(model, data, seed_model_loss, steps=60, lr=1e-2, batch=64)
    assert final < 0.05
    cfg = LLCConfig(step_size=1e-3, localization=100.0, num_chains=2, num_draws=60, num_burnin=20, batch_size=32)
    res = estimate_llc(model, data, seed_model_loss, config=cfg, seed=0)
    assert not res.vectorized and any("fell back" in note for note in res.notes)  # its forward writes in place
    unused = {"transformer.embed.W_E", "transformer.pos_embed.W_pos"}
    assert unused <= set(res.excluded) and not unused & set(res.sampled)
    assert res.d == sum(p.numel() for k, p in model.named_parameters() if k not in unused)
    assert np.isfinite(res.llc_per_chain).all() and 0 < res.llc_mean < res.d / 2, res.summary()
    short = cfg.model_copy(update={"num_draws": 10, "num_burnin": 0})
    heads = estimate_llc(model, data, seed_model_loss, config=short, seed=0, params=head_mask(model, 0, 1))
    assert heads.d == 4 * 16 * 8 + 3 * 8
    assert np.isfinite(heads.llc_mean)


@pytest.mark.slow
def test_users_transformer_lens_model_full_size():
    pytest.importorskip("transformer_lens.HookedTransformer", reason="the user's model needs transformer-lens 3.x")
    from seed_model import ICLTransformer

    torch.manual_seed(0)
    model = ICLTransformer(8)
    data = regression_data(1024, 16, 8, 1)
    briefly_train(model, data, seed_model_loss, steps=300, lr=3e-3, batch=32)
    cfg = LLCConfig(step_size=1e-5, localization=100.0, num_chains=2, num_draws=100, num_burnin=50, batch_size=32)
    res = estimate_llc(model, data, seed_model_loss, config=cfg, seed=0)
    assert res.d == 104_073 - 576 - 2048
    assert np.isfinite(res.llc_per_chain).all() and 0 < res.llc_mean < res.d / 2, res.summary()


# ------------------------------------------------------------------------------ data-refined LLC (observables)


class PerPosition(nn.Module):
    """Output at position k reads only its own block w_k (d_k entries): ŷ_k = x_k[:d_k] · w_k. x: (n, K, D)."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims
        for k, d in enumerate(dims):
            self.register_parameter(f"w{k}", nn.Parameter(torch.zeros(d)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, k, :d] @ getattr(self, f"w{k}") for k, d in enumerate(self.dims)], dim=1)


def per_position_problem(dims=(1, 2, 3, 4), n: int = 2000, seed: int = 0):
    """w* is the exact least-squares solution of each block, so every ℓ_k is quadratic with its minimum at w*."""
    g = torch.Generator().manual_seed(seed)
    K, D = len(dims), max(dims)
    x = torch.randn(n, K, D, generator=g, dtype=torch.float64)
    y = torch.randn(n, K, generator=g, dtype=torch.float64)
    model = PerPosition(dims).double()
    A = []
    with torch.no_grad():
        for k, d in enumerate(dims):
            X = x[:, k, :d]
            getattr(model, f"w{k}").copy_(torch.linalg.lstsq(X, y[:, k]).solution)
            A.append((X.T @ X / n).numpy())
    return model, (x, y), A


def position_mse(forward, batch):
    x, y = batch
    return (forward(x) - y).square().mean()


def position_components(forward, batch):
    x, y = batch
    return (forward(x) - y).square().mean(0)  # (K,)


def test_per_position_llc_matches_the_closed_form():
    """ℓ = mean_k ℓ_k with disjoint regular blocks: the tempered posterior gives block k precision
    2nβA_k/K + γ, so λ̂_k = nβ·tr(A_k (2nβA_k/K + γ)⁻¹) → K·d_k/2, and mean_k λ̂_k = λ̂ exactly (same draws)."""
    dims = (1, 2, 3, 4)
    K = len(dims)
    model, data, A = per_position_problem(dims)
    cfg = LLCConfig(step_size=1e-4, localization=1.0, num_chains=16, num_draws=3000, num_burnin=600,
                    batch_size=None, vectorize=True)
    obs = Observable(tuple(f"k{k}" for k in range(K)), position_components)
    res = estimate_llc(model, data, position_mse, config=cfg, seed=0, observables=obs)
    nb, gamma = res.nbeta, 1.0
    exact = np.array([sum(nb * a / (2 * nb * a / K + gamma) for a in np.linalg.eigvalsh(Ak)) for Ak in A])
    assert exact == pytest.approx(K * np.array(dims) / 2, rel=0.01)
    table = res.refined()
    assert list(table["name"]) == ["k0", "k1", "k2", "k3"]
    assert table["llc"].to_numpy() == pytest.approx(exact, rel=0.06), (table, exact)
    assert (np.abs(table["llc"] - exact) < 4 * table["mcse"]).all(), (table, exact)
    assert table["llc"].mean() == pytest.approx(res.llc_mean, rel=1e-9)  # the same draws, the same batch
    assert res.llc_mean == pytest.approx(sum(dims) / 2, rel=0.05)
    assert res.refined_init == pytest.approx(
        position_components(model, data).detach().numpy(), rel=1e-12)
    row = res.to_row()
    assert row["llc_refined_k3"] == pytest.approx(table["llc"].iloc[3])
    assert row["llc_refined_k3_lo"] < row["llc_refined_k3"] < row["llc_refined_k3_hi"]
    assert row["llc_lo"] < row["llc_mean"] < row["llc_hi"]


def test_refined_paths_agree_and_tilted_chains_do_not_record():
    model, data, _ = per_position_problem((1, 2), n=400)
    obs = Observable(("k0", "k1"), position_components)
    out = {}
    for v in (True, False):
        cfg = LLCConfig(step_size=1e-4, localization=1.0, num_chains=2, num_draws=50, num_burnin=20, batch_size=64,
                        vectorize=v, tilted=True)
        out[v] = estimate_llc(model, data, position_mse, config=cfg, seed=3, observables=obs)
    assert out[True].llc_refined == pytest.approx(out[False].llc_refined, rel=1e-6, abs=1e-9)
    assert out[True].llc_refined.mean() == pytest.approx(out[True].llc_mean, rel=1e-9)


def test_refined_components_absent_from_a_minibatch_are_skipped():
    """A component that is nan in some draws (a task not in the minibatch) averages over the draws it has."""
    trace = np.array([[[1.0, np.nan], [3.0, 2.0]]])  # (C=1, T=2, J=2)
    out = refined_per_chain(trace, np.array([0.5, 1.0]), nbeta=10.0)
    assert out == pytest.approx(np.array([[15.0, 10.0]]))
    with pytest.raises(ValueError, match="distinct"):
        Observable(("a", "a"), position_components)
    model, data, _ = per_position_problem((1, 2), n=100)
    with pytest.raises(ValueError, match="3 names"):
        estimate_llc(model, data, position_mse, config=LLCConfig(num_draws=5, num_burnin=1),
                     observables=Observable(("a", "b", "c"), position_components))
