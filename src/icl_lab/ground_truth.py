"""Models whose learning coefficient λ is known in closed form, for validating the LLC estimator (llc.py).

The suite: deep linear networks (DLN) f(x) = W_L ⋯ W_1 x without biases, of layer widths
(H_1 = input, …, H_{L+1} = output), at a true parameter w0 whose product W_L ⋯ W_1 has rank r:

- λ of a DLN: Aoyagi, "Consideration on the learning efficiency of multiple-layered neural networks with linear
  units" (Neural Networks), the formula used by Lau, Furman, Wang, Murfet & Wei, "The local learning
  coefficient: a singularity-aware complexity measure", to validate the LLC (`dln_llc`);
- λ of reduced-rank regression (the DLN with L = 2): Aoyagi & Watanabe, "Stochastic complexities of reduced rank
  regression in Bayesian estimation" (Neural Networks), an independent closed form (`rrr_llc`);
- L = 1 is linear regression, a regular model: λ = d/2 (`regular_llc`); `dln_llc` gives the same.

Which point w0. λ above is the learning coefficient of the whole set of true parameters, the minimum of the
local ones over that set; the LLC at a given w0 equals it only where that minimum is attained. Away from it the
local λ is larger: for widths (3, 3, 3) and r = 0, λ = 7/2 at the origin, but at A = 0, B = I (a true parameter
too, BA = 0) the loss is ‖(I + δB) δA‖² ≈ ‖δA‖², a regular quadratic in 9 directions, so the local λ is 9/2.
`true_parameter` therefore builds the most singular point: every factor W_j has rank exactly r (all zero for
r = 0), W_j = Q_{j+1} Q_jᵀ with orthonormal Q_j ∈ R^{H_j×r}, so the product Q_{L+1} Q_1ᵀ has r singular values 1.
Aoyagi's proof splits such a point into a regular rank-r part (the first term of `dln_llc`, half the dimension of
the rank-r matrices) and a rank-0 DLN of widths H_j − r at the origin.

Data and loss (`make_data`, `mse_loss`). x ~ N(0, I_{H_1}), y = P0 x (+ optional Gaussian noise), n rows, and
ℓ_n(w) = (1/n) Σ_i ‖f_w(x_i) − y_i‖² (squared error summed over the outputs, averaged over rows), so the population
loss is ‖P(w) − P0‖_F² (+ the noise variance × H_{L+1}). A constant factor c on the loss leaves λ unchanged but acts
like nβ → c·nβ at finite n (torch's `mse_loss`, a mean over the outputs too, is c = 1/H_{L+1}); for a regular
direction of curvature h the localised estimator reads 1/(1 + γ/(nβ h)) of its share, so the scale matters at
finite γ/nβ. Noiseless, w0 is an exact minimiser of ℓ_n (ℓ_n(w0) = 0) and ℓ_n has the population's zero set
{P(w) = P0} once n ≥ H_1. With plain noise it is not: the least-squares fit moves off w0 and λ̂ at w0 picks up
a (negative) slope term. `make_data(..., keep_minimum=True)` (the default) therefore projects the noise onto the
orthogonal complement of the columns of X, so Xᵀe = 0 and ℓ_n(w) = ℓ_n^{noiseless}(w) + ‖e‖²/n exactly: w0
stays the exact minimiser, the landscape ℓ_n(w) − ℓ_n(w0) is the noiseless one, and the minibatch losses and
gradients carry the noise SGLD sees in practice. keep_minimum=False gives plain noise (w0 on a slope).

Validation (`validate`): the procedure a user runs, `calibrate` with the library defaults and then `estimate_llc`
with the chosen settings on an independent seed, compared with the theory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

from icl_lab.config import LLCConfig
from icl_lab.llc import calibrate, estimate_llc
from icl_lab.seeding import make_generator

__all__ = [
    "SUITE",
    "Case",
    "DeepLinearNetwork",
    "Validation",
    "aoyagi_subset",
    "dln_llc",
    "make_data",
    "make_model",
    "mse_loss",
    "regular_llc",
    "rrr_llc",
    "true_parameter",
    "validate",
]


# ----------------------------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------------------------


def _check_widths(widths: Sequence[int], rank: int) -> tuple[int, ...]:
    widths = tuple(int(h) for h in widths)
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"widths must hold >= 2 positive layer widths (input, ..., output), got {widths}")
    if not 0 <= rank <= min(widths):
        raise ValueError(f"rank must lie in [0, min(widths) = {min(widths)}], got {rank}")
    return widths


def aoyagi_subset(m: Sequence[int]) -> tuple[int, ...]:
    """The unique subset Σ of Aoyagi's DLN theorem, as sorted indices into m (M_j = H_j − r, length L + 1).

    Σ, of size ℓ + 1 with ℓ >= 1, satisfies max_{j∈Σ} M_j < min_{k∉Σ} M_k, Σ_{j∈Σ} M_j >= ℓ · max_{j∈Σ} M_j and
    Σ_{j∈Σ} M_j < ℓ · min_{k∉Σ} M_k (the last two with no complement: only the middle one). The first condition
    makes Σ a set of the smallest M_j, so only the prefixes of m sorted ascending are candidates; raises if not
    exactly one qualifies.
    """
    order = sorted(range(len(m)), key=lambda j: m[j])
    found = []
    for k in range(2, len(m) + 1):
        sub, rest = [m[j] for j in order[:k]], [m[j] for j in order[k:]]
        ell, s = k - 1, sum(sub)
        if rest and not max(sub) < min(rest):
            continue
        if s < ell * max(sub):
            continue
        if rest and not s < ell * min(rest):
            continue
        found.append(tuple(sorted(order[:k])))
    if len(found) != 1:
        raise RuntimeError(f"Aoyagi's subset is not unique for M = {list(m)}: candidates {found}")
    return found[0]


def dln_llc(widths: Sequence[int], rank: int = 0) -> float:
    """λ of a deep linear network of layer widths (H_1 = input, …, H_{L+1} = output) at a true map of rank r
    (Aoyagi's theorem; Lau et al. use it to validate the LLC).

    With M_j = H_j − r, Σ = `aoyagi_subset`(M), ℓ = |Σ| − 1, S = Σ_{j∈Σ} M_j, M = ⌈S/ℓ⌉, a = S − (M − 1)ℓ:
        λ = (−r² + r(H_1 + H_{L+1}))/2 + a(ℓ − a)/(4ℓ) − ℓ(ℓ − 1)/4 · (S/ℓ)² + ½ Σ_{i<j∈Σ} M_i M_j.
    For L = 1 (one matrix, linear regression) Σ = {1, 2} and this is H_1 H_2 / 2 = d/2 whatever r. Exact
    (rational arithmetic), returned as a float.
    """
    widths = _check_widths(widths, rank)
    r = rank
    m = [h - r for h in widths]
    sub = [m[j] for j in aoyagi_subset(m)]
    ell, s = len(sub) - 1, sum(sub)
    big_m = -(-s // ell)  # ⌈S/ℓ⌉
    a = s - (big_m - 1) * ell
    pairs = Fraction(s * s - sum(v * v for v in sub), 2)  # Σ_{i<j} M_i M_j
    lam = (Fraction(-r * r + r * (widths[0] + widths[-1]), 2) + Fraction(a * (ell - a), 4 * ell)
           - Fraction(ell * (ell - 1), 4) * Fraction(s, ell) ** 2 + pairs / 2)
    return float(lam)


def rrr_llc(m_in: int, h: int, n_out: int, rank: int = 0) -> float:
    """λ of reduced-rank regression y = BAx, A: (H, M), B: (N, H), at a true map of rank r (Aoyagi & Watanabe).

    Case 1 (N + r <= M + H, M + r <= N + H, H + r <= M + N): λ = [2(H + r)(M + N) − (M − N)² − (H + r)²]/8, plus
    1/8 when M + H + N + r is odd. Case 2 (M + H < N + r): λ = (HM − Hr + Nr)/2. Case 3 (N + H < M + r):
    λ = (HN − Hr + Mr)/2. Case 4 (M + N < H + r): λ = MN/2.
    """
    M, H, N, r = m_in, h, n_out, rank
    _check_widths((M, H, N), r)
    if N + r <= M + H and M + r <= N + H and H + r <= M + N:
        return (2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2 + (M + H + N + r) % 2) / 8
    if M + H < N + r:
        return (H * M - H * r + N * r) / 2
    if N + H < M + r:
        return (H * N - H * r + M * r) / 2
    return M * N / 2


def regular_llc(d: int) -> float:
    """λ = d/2 of a regular (identifiable, positive-definite Fisher information) model with d parameters."""
    return d / 2


# ----------------------------------------------------------------------------------------------------------------
# Cases, models, data
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One ground-truth model: a DLN of `widths` (H_1 = input, …, H_{L+1} = output) at a rank-`rank` true map.
    L = 1 is linear regression (regular)."""

    name: str
    widths: tuple[int, ...]
    rank: int = 0

    def __post_init__(self) -> None:
        _check_widths(self.widths, self.rank)

    @property
    def depth(self) -> int:
        """L, the number of weight matrices."""
        return len(self.widths) - 1

    @property
    def d(self) -> int:
        """Number of parameters, Σ_j H_j H_{j+1}."""
        return sum(a * b for a, b in zip(self.widths[:-1], self.widths[1:], strict=True))

    @property
    def llc(self) -> float:
        """The theoretical λ (`dln_llc`; d/2 for L = 1)."""
        return dln_llc(self.widths, self.rank)


# Spanning d from ~10² to a few thousand, depths 1-5, ranks 0 and > 0 (the benchmark's and the slow tests' cases).
SUITE: dict[str, Case] = {c.name: c for c in [
    Case("regular_10x10", (10, 10), 0),
    Case("dln2_r0", (10, 6, 10), 0),
    Case("dln2_r2", (12, 8, 10), 2),
    Case("dln3_r1", (10, 12, 8, 10), 1),
    Case("dln4_r0", (12, 16, 16, 16, 12), 0),
    Case("dln5_r3", (20, 24, 24, 24, 24, 20), 3),
]}


class DeepLinearNetwork(nn.Module):
    """f(x) = W_L ⋯ W_1 x without biases; layer j is `layers[j]` (nn.Linear, weight (H_{j+1}, H_j)).
    x: (..., H_1) -> (..., H_{L+1})."""

    def __init__(self, widths: Sequence[int], dtype: torch.dtype = torch.float32):
        super().__init__()
        widths = _check_widths(widths, 0)
        self.widths = widths
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False, dtype=dtype)
                                    for a, b in zip(widths[:-1], widths[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def product(self) -> Tensor:
        """P = W_L ⋯ W_1: (H_{L+1}, H_1)."""
        p = self.layers[0].weight
        for layer in self.layers[1:]:
            p = layer.weight @ p
        return p


def true_parameter(widths: Sequence[int], rank: int, seed: int = 0) -> list[Tensor]:
    """The most singular true parameter of product rank r: W_j = Q_{j+1} Q_jᵀ, Q_j ∈ R^{H_j×r} with orthonormal
    columns drawn at random (all zeros for r = 0). Returns [W_1: (H_2, H_1), …, W_L: (H_{L+1}, H_L)] in float64;
    every W_j has rank r and the product has r singular values equal to 1."""
    widths = _check_widths(widths, rank)
    g = make_generator(seed, "ground_truth/w0")
    frames = [torch.linalg.qr(torch.randn(h, rank, generator=g, dtype=torch.float64))[0] for h in widths]
    return [frames[j + 1] @ frames[j].T for j in range(len(widths) - 1)]


def make_model(case: Case, seed: int = 0, dtype: torch.dtype = torch.float32) -> DeepLinearNetwork:
    """The DLN of `case` with its weights set to `true_parameter(case.widths, case.rank, seed)`."""
    model = DeepLinearNetwork(case.widths, dtype=dtype)
    with torch.no_grad():
        for layer, w in zip(model.layers, true_parameter(case.widths, case.rank, seed), strict=True):
            layer.weight.copy_(w)
    return model


def make_data(case: Case, n: int, *, noise_std: float = 0.0, keep_minimum: bool = True, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(x: (n, H_1), y: (n, H_{L+1})) with x ~ N(0, I), y = P0 x + e, P0 the product of `true_parameter(case,
    seed)` and e ~ N(0, noise_std² I).

    keep_minimum (used when noise_std > 0): replace e by its projection orthogonal to the columns of x, so xᵀe = 0
    and ℓ_n(w) − ℓ_n(w0) equals its noiseless value for every w: w0 stays the exact minimiser of ℓ_n (module
    docstring). Needs n > H_1. False: plain noise, whose least-squares fit is not w0.
    """
    if n <= case.widths[0]:
        raise ValueError(f"n must exceed the input width H_1 = {case.widths[0]} (the zero set of ℓ_n is then the "
                         f"population's), got n={n}")
    g = make_generator(seed, "ground_truth/data")
    x = torch.randn(n, case.widths[0], generator=g, dtype=torch.float64)
    p0 = torch.eye(case.widths[0], dtype=torch.float64)
    for w in true_parameter(case.widths, case.rank, seed):
        p0 = w @ p0
    y = x @ p0.T
    if noise_std > 0:
        e = noise_std * torch.randn(n, case.widths[-1], generator=g, dtype=torch.float64)
        if keep_minimum:
            e = e - x @ torch.linalg.lstsq(x, e).solution
        y = y + e
    return x.to(dtype), y.to(dtype)


def mse_loss(forward: Any, batch: tuple[Tensor, ...]) -> Tensor:
    """Mean over rows of the squared error summed over the outputs, ‖f(x) − y‖² (the module docstring's scaling).
    batch: (x: (m, H_1), y: (m, H_{L+1})) -> scalar."""
    x, y = batch
    return (forward(x) - y).square().sum(-1).mean()


# ----------------------------------------------------------------------------------------------------------------
# Validation: the user's procedure against the theory
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Validation:
    """Theory vs measurement on one case. rel_error = (λ̂ − λ)/λ; llc_se = std over chains / √chains; flags:
    the estimate's diagnostics (";"-joined); config: the settings estimated with (None when calibration chose
    nothing); reason: the calibration's reason (or "fixed config")."""

    case: Case
    n: int
    llc_theory: float
    llc_mean: float
    llc_se: float
    rel_error: float
    flags: str
    config: dict[str, Any] | None
    reason: str
    calibrate_seconds: float
    estimate_seconds: float
    table: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.calibrate_seconds + self.estimate_seconds

    def row(self) -> dict[str, Any]:
        """A flat dict for a results table."""
        c = self.case
        return {"case": c.name, "widths": list(c.widths), "rank": c.rank, "depth": c.depth, "d": c.d, "n": self.n,
                "llc_theory": self.llc_theory, "llc_mean": self.llc_mean, "llc_se": self.llc_se,
                "rel_error": self.rel_error, "flags": self.flags, "config": self.config, "reason": self.reason,
                "calibrate_seconds": self.calibrate_seconds, "estimate_seconds": self.estimate_seconds}


def validate(case: Case, *, n: int = 4096, noise_std: float = 0.0, keep_minimum: bool = True, seed: int = 0,
             config: LLCConfig | None = None, base: LLCConfig | None = None,
             calibrate_kwargs: dict[str, Any] | None = None) -> Validation:
    """Run what a user runs on `case` and compare with its λ.

    config None: `calibrate(model, data, mse_loss, base=base or LLCConfig(), seed=seed, **calibrate_kwargs)` with
    the library's defaults, then `estimate_llc` with `result.chosen` on seed + 1 (an independent chain, not the
    calibration's own grid point, whose selection would bias it). config given: skip calibration, estimate with it.
    """
    model = make_model(case, seed=seed)
    data = make_data(case, n, noise_std=noise_std, keep_minimum=keep_minimum, seed=seed)
    lam = case.llc
    cal_s, table, reason = 0.0, [], "fixed config"
    if config is None:
        t0 = time.perf_counter()
        cal = calibrate(model, data, mse_loss, base=base or LLCConfig(), seed=seed, **(calibrate_kwargs or {}))
        cal_s = time.perf_counter() - t0
        config, reason = cal.chosen, cal.reason
        table = cal.table.to_dict("records")
    if config is None:
        nan = float("nan")
        return Validation(case, n, lam, nan, nan, nan, "", None, reason, cal_s, 0.0, table)
    res = estimate_llc(model, data, mse_loss, config=config, seed=seed + 1)
    return Validation(case, n, lam, res.llc_mean, res.llc_se, (res.llc_mean - lam) / lam,
                      ";".join(res.diagnostics), config.model_dump(), reason, cal_s, res.seconds, table)
