"""Ground-truth models (icl_lab.ground_truth): the closed forms, the models and data, and the LLC estimator against
them.

Thresholds, fixed before any measurement: every estimate must land within 10% of λ (|λ̂ − λ|/λ <= 0.10). No case has
λ = 0 (a DLN with d > 0 has λ > 0, even at rank 0), so no absolute tolerance is needed.
Fast tests run estimate_llc at fixed, stated settings; the `slow` ones run the user's procedure (calibrate with the
library defaults, then estimate) through `validate`.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from icl_lab.ground_truth import (
    SUITE,
    Case,
    DeepLinearNetwork,
    aoyagi_subset,
    dln_llc,
    make_data,
    make_model,
    mse_loss,
    regular_llc,
    rrr_llc,
    true_parameter,
    validate,
)
from icl_lab.llc import LLCConfig, default_nbeta, estimate_llc

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------------------------


def brute_force_subsets(m: list[int]) -> list[tuple[int, ...]]:
    """Every subset of indices (any size) meeting Aoyagi's three conditions, by exhaustive search."""
    found = []
    for k in range(1, len(m) + 1):
        for sub in itertools.combinations(range(len(m)), k):
            vals = [m[j] for j in sub]
            rest = [m[j] for j in range(len(m)) if j not in sub]
            ell, s = k - 1, sum(vals)
            if (not rest or max(vals) < min(rest)) and s >= ell * max(vals) and (not rest or s < ell * min(rest)):
                found.append(sub)
    return found


def test_single_matrix_is_regular():
    """L = 1 (linear regression): λ = H_1 H_2 / 2 = d/2 whatever the rank of the true matrix."""
    for h1, h2 in itertools.product(range(1, 9), repeat=2):
        for r in range(min(h1, h2) + 1):
            assert dln_llc((h1, h2), r) == h1 * h2 / 2 == regular_llc(h1 * h2)


def test_dln_two_layers_equals_reduced_rank_regression():
    """Aoyagi's DLN formula at L = 2 against the independent Aoyagi & Watanabe closed form, every shape in 1..8³ and
    every rank (all four cases of the latter occur)."""
    cases = set()
    for M, H, N in itertools.product(range(1, 9), repeat=3):
        for r in range(min(M, H, N) + 1):
            assert dln_llc((M, H, N), r) == pytest.approx(rrr_llc(M, H, N, r), abs=1e-12), (M, H, N, r)
            cases.add("1" if N + r <= M + H and M + r <= N + H and H + r <= M + N else
                      "2" if M + H < N + r else "3" if N + H < M + r else "4")
    assert cases == {"1", "2", "3", "4"}


def test_known_values():
    """Aoyagi & Watanabe's cases (also in test_llc.py) and small hand-checked values."""
    assert rrr_llc(3, 2, 3) == 2.5  # case 1, even
    assert rrr_llc(5, 3, 5) == 6.5  # case 1, odd
    assert rrr_llc(4, 3, 8) == 6.0  # case 2
    assert rrr_llc(8, 3, 4) == 6.0  # case 3
    assert rrr_llc(1, 4, 1) == 0.5  # case 4
    assert dln_llc((3, 3, 3), 0) == 3.5  # the module docstring's example (the local λ at A = 0, B = I is 9/2)
    assert dln_llc((1, 1, 1), 0) == 0.5  # ab = 0 at the origin: K = a²b², λ = 1/2
    assert dln_llc((2, 1, 2), 0) == 1.0  # ‖a‖²‖b‖²: λ = min(2, 2)/2
    assert dln_llc((1, 1, 1, 1), 0) == 0.5  # (abc)²: λ = 1/2 (multiplicity 3)


def test_rank_sanity():
    """Full rank: the DLN of equal widths H at rank H is the product's regular H² / 2; a bottleneck of width H at
    rank H: the dimension of rank-H matrices / 2, H(H_1 + H_{L+1} − H)/2; rank 0 below d/2; λ <= d/2 always."""
    for H in range(1, 6):
        for L in range(1, 6):
            assert dln_llc((H,) * (L + 1), H) == H * H / 2
    assert dln_llc((7, 3, 5), 3) == 3 * (7 + 5 - 3) / 2
    assert dln_llc((7, 8, 3, 9, 5), 3) == 3 * (7 + 5 - 3) / 2
    for case in SUITE.values():
        assert 0 < case.llc <= case.d / 2


def test_rank_splits_off_a_regular_part():
    """λ(H, r) = r(H_1 + H_{L+1} − r)/2 + λ(H − r, 0): the rank-r part is regular (Aoyagi's first term)."""
    for L in range(1, 5):
        for widths in itertools.product(range(2, 6), repeat=L + 1):
            for r in range(1, min(widths)):
                rest = tuple(h - r for h in widths)
                assert dln_llc(widths, r) == pytest.approx(r * (widths[0] + widths[-1] - r) / 2 + dln_llc(rest, 0))


def test_aoyagi_subset_is_unique_and_found():
    """The prefix search finds exactly the subset an exhaustive search over all subsets finds, for every widths
    in 1..5^(L+1), L <= 4, and every rank."""
    for L in range(1, 5):
        for widths in itertools.product(range(1, 6), repeat=L + 1):
            for r in range(min(widths) + 1):
                m = [h - r for h in widths]
                assert brute_force_subsets(m) == [aoyagi_subset(m)], (widths, r)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="rank"):
        dln_llc((3, 2, 3), 3)
    with pytest.raises(ValueError, match="widths"):
        dln_llc((3,), 0)
    with pytest.raises(ValueError, match="rank"):
        Case("bad", (4, 2, 4), 5)


# ----------------------------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("widths,rank", [((5, 4), 0), ((5, 4), 3), ((6, 3, 5), 2), ((4, 6, 5, 3), 0),
                                         ((4, 6, 5, 3), 3), ((3, 4, 4, 4, 4, 3), 2)])
def test_true_parameter_is_most_singular(widths, rank):
    ws = true_parameter(widths, rank, seed=1)
    assert [tuple(w.shape) for w in ws] == [(b, a) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    for w in ws:
        assert int(torch.linalg.matrix_rank(w)) == rank
    p = torch.eye(widths[0], dtype=F64)
    for w in ws:
        p = w @ p
    sv = torch.linalg.svdvals(p)
    assert torch.allclose(sv[:rank], torch.ones(rank, dtype=F64), atol=1e-12)
    assert torch.all(sv[rank:] < 1e-12)


def test_model_shapes_and_d():
    case = Case("t", (4, 6, 5, 3), 2)
    model = make_model(case)
    assert isinstance(model, DeepLinearNetwork)
    assert case.depth == 3
    assert case.d == 4 * 6 + 6 * 5 + 5 * 3 == sum(p.numel() for p in model.parameters())
    x, y = make_data(case, 50)
    assert x.shape == (50, 4) and y.shape == (50, 3) and x.dtype == torch.float32
    assert torch.allclose(model(x), x @ model.product().T, atol=1e-5)
    with pytest.raises(ValueError, match="n must exceed"):
        make_data(case, 4)


@pytest.mark.parametrize("name", list(SUITE))
def test_noiseless_w0_is_an_exact_minimum(name):
    """ℓ_n(w0) = 0 and ∇ℓ_n(w0) = 0 (float64) on noiseless data."""
    case = SUITE[name]
    model = make_model(case, dtype=F64)
    data = make_data(case, 256, dtype=F64)
    loss = mse_loss(model, data)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.item() < 1e-24
    assert max(float(g.abs().max()) for g in grads) < 1e-12


def test_projected_noise_keeps_the_landscape():
    """keep_minimum: ℓ_n(w) − ℓ_n(w0) is the noiseless one at random w (so w0 stays the minimiser and ∇ℓ_n(w0) = 0);
    plain noise moves the minimiser (∇ℓ_n(w0) ≠ 0)."""
    case = Case("t", (6, 4, 5), 2)
    w0 = make_model(case, dtype=F64)
    clean = make_data(case, 300, dtype=F64)
    kept = make_data(case, 300, noise_std=0.7, dtype=F64)
    plain = make_data(case, 300, noise_std=0.7, keep_minimum=False, dtype=F64)
    assert torch.equal(clean[0], kept[0])
    assert float((kept[0].T @ (kept[1] - clean[1])).abs().max()) < 1e-10
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        w = DeepLinearNetwork(case.widths, dtype=F64)
        with torch.no_grad():
            for layer in w.layers:
                layer.weight.normal_(generator=g)
            excess_clean = mse_loss(w, clean) - mse_loss(w0, clean)
            excess_kept = mse_loss(w, kept) - mse_loss(w0, kept)
        assert excess_kept.item() == pytest.approx(excess_clean.item(), rel=1e-9)
    grad_kept = torch.autograd.grad(mse_loss(w0, kept), list(w0.parameters()))
    grad_plain = torch.autograd.grad(mse_loss(w0, plain), list(w0.parameters()))
    assert max(float(t.abs().max()) for t in grad_kept) < 1e-10
    assert max(float(t.abs().max()) for t in grad_plain) > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# The estimator against the theory, at fixed settings (benchmarks/results/llc_ground_truth.md)
# ----------------------------------------------------------------------------------------------------------------

N = 4096
NBETA = default_nbeta(N)


@pytest.mark.parametrize("name,step_size,gamma_ratio,burnin,draws", [
    ("regular_10x10", 1e-4, 0.03, 1000, 1000),
    ("dln2_r0", 3e-4, 0.01, 2000, 1000),
])
def test_estimate_at_fixed_settings_within_10_percent(name, step_size, gamma_ratio, burnin, draws):
    """λ̂ within 10% of λ at n = 4096, nβ = n / log n, minibatch 256, 4 chains, seed 0, small γ/nβ."""
    case = SUITE[name]
    cfg = LLCConfig(step_size=step_size, localization=gamma_ratio * NBETA, num_chains=4, num_draws=draws,
                    num_burnin=burnin, batch_size=256)
    res = estimate_llc(make_model(case), make_data(case, N), mse_loss, config=cfg, seed=0)
    assert math.isfinite(res.llc_mean)
    assert abs(res.llc_mean - case.llc) / case.llc <= 0.10, (case.llc, res.summary())


# ----------------------------------------------------------------------------------------------------------------
# The user's procedure (calibrate with the library defaults, then estimate)
# ----------------------------------------------------------------------------------------------------------------


def test_validate_runs_the_procedure():
    """validate: with a fixed config it estimates once; without, it calibrates first (tiny budget here: a smoke
    test of the plumbing, not of accuracy)."""
    case = Case("tiny", (3, 2, 3), 0)
    small = LLCConfig(step_size=1e-4, localization=10.0, num_chains=2, num_draws=20, num_burnin=10)
    v = validate(case, n=256, config=small)
    assert v.reason == "fixed config" and v.calibrate_seconds == 0.0 and not v.table
    assert v.llc_theory == 2.5 and math.isfinite(v.llc_mean) and v.config["step_size"] == 1e-4
    assert v.rel_error == pytest.approx((v.llc_mean - 2.5) / 2.5)
    row = v.row()
    assert row["d"] == 12 and row["case"] == "tiny"
    v = validate(case, n=256, base=small, calibrate_kwargs={"step_sizes": [1e-4, 3e-4], "localizations": [100.0],
                                                          "max_burnin": 50})
    assert v.table and v.calibrate_seconds > 0 and v.reason != "fixed config"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SUITE))
def test_suite_through_calibrate(name):
    v = validate(SUITE[name], n=N, seed=0)
    print(v.row())
    assert v.config is not None, v.reason
    assert abs(v.rel_error) <= 0.10, v.row()
