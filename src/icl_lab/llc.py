"""Local learning coefficient (LLC) estimation with localised SGLD, chains vectorised with torch.func.

The estimator (Hoogland et al. 2024, Eqs. 5-6; Carroll et al. 2025, Eq. 9; docs/papers.md §D2):

    λ̂(w*) = nβ · ( E^β_{w | w*, γ}[ ℓ_n(w) ] − ℓ_n(w*) ),
    p(w; w*, β, γ) ∝ exp{ −nβ ℓ_n(w) − (γ/2) ‖w − w*‖² },        nβ = n / log n by default (β* = 1 / log n),

with the expectation taken by stochastic-gradient Langevin dynamics (Welling & Teh 2011) localised at w*:

    w_{t+1} = w_t − (ε/2) [ nβ ∇ℓ_m(w_t) + γ (w_t − w*) ] + η_t,        η_t ~ N(0, ε I),

where ℓ_m is the mean loss of a minibatch of m rows of the fixed data. Each chain is ONE Markov chain started at
w*; the first `num_burnin` draws are discarded and ℓ_m(w_t) is recorded at every later step, read from the same
forward pass as the gradient. ℓ_n(w*) is the loss at the exact, unperturbed w* on the whole data. Other samplers
(`LLCConfig.sampler`, `_Kernel`): RMSProp-preconditioned SGLD with the preconditioner frozen after burn-in, and
MALA (exact, full data) as a reference; `LLCConfig.tilted` also samples the tilted loss ℓ_n(w) − ∇ℓ_n(w*)ᵀ(w − w*).
Every estimate reports split-R̂, the effective sample size and the Monte-Carlo standard error of λ̂
(icl_lab.convergence), and `calibrate` chooses ε and γ (a γ-plateau; docs/llc.md).

Layout: pure pieces (`default_nbeta`, `sgld_step`, `llc_per_chain`, `diagnose`, `pick`) and a thin
`estimate_llc` that owns the copy of the model, the generators and the loop. Shapes use C = chains, T = draws,
P = length of the flattened sampled-parameter vector, m = minibatch size.

Randomness: chain c draws its minibatch indices and its SGLD noise from two generators of its own, seeded from
(`seed`, "llc/chain{c}/batches" | "llc/chain{c}/noise") alone, so the global torch RNG is never touched and the
vectorised and sequential paths consume identical random numbers. Minibatches are drawn without replacement within
an epoch (a fresh permutation of the n rows per epoch, consumed m rows at a time; a batch may straddle two epochs).

Execution: all chains at once through vmap(grad_and_value(functional_call)) over a flat (C, P) parameter matrix, or
each chain's steps one after another with plain autograd (vectorize=False, the automatic fallback when vmap fails,
and the default on CPU for models above 20k sampled parameters, where it is the faster path). On CPU that
path runs the chains concurrently over the caller's torch threads, one intra-op thread and one model copy per
thread (icl_lab.threads); the numbers do not depend on it. The hot loop has no
per-parameter Python loop in the update, no host synchronisation except a finiteness check every 50 steps, and
draws its random numbers in blocks. User-facing documentation: docs/llc.md.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from icl_lab.attention import BATCHING_WARNING, vmappable_sdpa
from icl_lab.config import LLCConfig
from icl_lab.convergence import ess, mcse_mean, split_rhat, summarize
from icl_lab.evaluate import eval_chunk
from icl_lab.intervals import Interval, t_interval
from icl_lab.llc_flags import sampler_ok, stable_rows
from icl_lab.seeding import make_generator
from icl_lab.threads import split_evenly, thread_pool

__all__ = [
    "DEFAULT_LOCALIZATION_RATIO",
    "DEFAULT_LOCALIZATION_RATIOS",
    "DEFAULT_STEP_SIZES",
    "Calibration",
    "LLCConfig",
    "LLCResult",
    "Observable",
    "Thresholds",
    "burnin_note",
    "calibrate",
    "combine_observables",
    "default_nbeta",
    "diagnose",
    "estimate_llc",
    "head_mask",
    "llc_per_chain",
    "min_burnin",
    "pick",
    "pick_settings",
    "refined_per_chain",
    "resolve",
    "sampler_ok",
    "sgld_step",
    "vectorizes",
]

Forward = Callable[..., Any]
LossFn = Callable[[Forward, tuple[Tensor, ...]], Tensor]
ParamSpec = str | Sequence[str] | dict[str, Tensor] | None

# vectorize=None: on CPU, vmap only pays for small models, where per-step Python overhead dominates; above this size
# the sequential path (chains on threads) is as fast or faster (measurements in docs/llc.md). On CUDA, batching the
# chains wins.
_AUTO_VMAP_MAX_CPU = 20_000
_CHECK_EVERY = 50  # steps between (synchronising) finiteness checks of the chain state
DEFAULT_STEP_SIZES = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3)  # calibration grid of ε
_HEAD_LEAVES = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")


# ----------------------------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------------------------


def default_nbeta(n: int) -> float:
    """nβ = n / log n, i.e. the inverse temperature β* = 1 / log n of Watanabe's WBIC (Hoogland et al. §2.2)."""
    if n < 2:
        raise ValueError(f"n must be >= 2 for nβ = n / log n, got n={n}")
    return n / math.log(n)


DEFAULT_LOCALIZATION_RATIO = 0.01  # γ/nβ of LLCConfig(localization=None); docs/llc.md, "Defaults"


def resolve(config: LLCConfig, nbeta: float) -> LLCConfig:
    """config with γ and burn-in made concrete for this nβ: localization None → DEFAULT_LOCALIZATION_RATIO · nβ,
    num_burnin None → min_burnin(ε, γ). An estimate records the resolved config."""
    gamma = DEFAULT_LOCALIZATION_RATIO * nbeta if config.localization is None else config.localization
    burnin = min_burnin(config.step_size, gamma) if config.num_burnin is None else config.num_burnin
    return config.model_copy(update={"localization": float(gamma), "num_burnin": int(burnin)})


def vectorizes(config: LLCConfig, n_sampled: int, device: torch.device | str) -> bool:
    """Whether estimate_llc tries the vmapped path: config.vectorize, or if None (auto) on accelerators and on CPU
    for models with at most 20k sampled parameters (n_sampled)."""
    if config.vectorize is not None:
        return config.vectorize
    return torch.device(device).type != "cpu" or n_sampled <= _AUTO_VMAP_MAX_CPU


def sgld_step(theta: Tensor, grad: Tensor, theta_star: Tensor, noise: Tensor, *, step_size: float, nbeta: float,
              localization: float, mask: Tensor | None = None) -> Tensor:
    """One localised SGLD update (docs/papers.md §D2), returned as a new tensor.

    theta, grad, noise: (..., P) — current point, ∇ℓ_m(theta), standard normal draws; theta_star: (P,) or (..., P).
    mask: (P,) of 0/1 or None; entries with 0 are not moved.
    Returns theta − (ε/2)(nβ·grad + γ(theta − theta*)) + √ε·noise.
    """
    delta = torch.sub(theta, theta_star).mul_(localization).add_(grad, alpha=nbeta)  # the drift, one allocation
    delta.mul_(-0.5 * step_size).add_(noise, alpha=math.sqrt(step_size))
    if mask is not None:
        delta.mul_(mask)
    return delta.add_(theta)


class _Kernel:
    """One step of the configured sampler for a block of chains, the state each chain carries, and what is recorded.

    The target is p(w) ∝ exp(−U(w)), U(w) = nβ ℓ(w) + (γ/2)‖w − w*‖² (tilted: ℓ(w) − gᵀ(w − w*), g = ∇ℓ_n(w*)).
    The caller evaluates ℓ_m and its gradient at the point `step` returned last (w* first) and passes them in;
    `step` returns (next point to evaluate, the point to record, its loss). Rows are chains: theta, grad: (R, P),
    loss: (R,), rows: the chains' indices into the per-chain state (C, P).

    sgld: `sgld_step`; the evaluated point is recorded.
    rmsprop_sgld (Li et al. 2016, pSGLD, with the adaptation stopped after burn-in so that the chain targets p
        exactly up to O(ε)): a diagonal preconditioner G from the running mean V of the squared drift gradient
        (nβ∇ℓ_m)², G = max(√V) / (√V + δ), so the stiffest direction keeps the step ε that calibration sets and
        softer ones take larger steps, capped at 0.1 / (εγ) so that along flat directions the localised step stays
        within the SGLD bias of about εGγ/4 ≤ 2.5%; updated during burn-in, frozen after. The update is
        w − (ε/2) G ⊙ ∇U + √(εG) ⊙ ξ (a constant G leaves exp(−U) stationary up to the O(εGa) bias of each
        direction of curvature a).
    mala (Roberts & Tweedie 1996): the SGLD move as a proposal from the current point, accepted with the
        Metropolis-Hastings probability on the full-data U; the current point (after accept / reject) is recorded.
        Exact for any ε: a reference for small models.
    """

    def __init__(self, config: LLCConfig, nbeta: float, theta_star: Tensor, grad_star: Tensor, mask: Tensor | None,
                 chains: int, tilted: bool, accept_gens: list[torch.Generator] | None = None):
        self.kind, self.eps, self.nbeta, self.gamma = config.sampler, config.step_size, nbeta, config.localization
        self.burnin, self.alpha = config.num_burnin, config.rmsprop_alpha
        self.theta_star, self.mask = theta_star, mask
        self.tilt = grad_star if tilted else None
        P = theta_star.numel()
        if self.kind == "rmsprop_sgld":
            self.V = theta_star.new_zeros(chains, P)
            self.G = theta_star.new_ones(chains, P)
            self.g_max = 0.1 / (self.eps * self.gamma)
        if self.kind == "mala":
            self.cur = theta_star.expand(chains, -1).clone()  # current point, its U and ∇U
            self.cur_u = torch.zeros(chains, dtype=torch.float64, device=theta_star.device)
            self.cur_grad = torch.zeros_like(self.cur)
            self.cur_loss = torch.zeros_like(self.cur_u)
            self.accepted = torch.zeros(chains, dtype=torch.float64, device=theta_star.device)
            self.accept_gens = accept_gens

    def _tilted(self, grad: Tensor) -> Tensor:
        """∇ of the sampled loss: ∇ℓ, or ∇ℓ − g for the tilted one. (R, P)."""
        return grad if self.tilt is None else grad - self.tilt

    def _drift(self, theta: Tensor, g: Tensor) -> Tensor:
        """∇U = nβ·g + γ(w − w*), masked, with g from `_tilted`. (R, P)."""
        d = torch.sub(theta, self.theta_star).mul_(self.gamma).add_(g, alpha=self.nbeta)
        return d if self.mask is None else d.mul_(self.mask)

    def _energy(self, theta: Tensor, loss: Tensor) -> Tensor:
        """U at theta: (R,) float64."""
        diff = torch.sub(theta, self.theta_star)
        u = self.nbeta * loss.double() + 0.5 * self.gamma * diff.double().square().sum(-1)
        if self.tilt is not None:
            u = u - self.nbeta * (diff.double() @ self.tilt.double())
        return u

    def step(self, t: int, theta: Tensor, loss: Tensor, grad: Tensor, noise: Tensor, rows: slice
             ) -> tuple[Tensor, Tensor, Tensor]:
        """theta, grad, noise: (R, P); loss: (R,). Returns (next theta to evaluate, recorded theta, recorded loss)."""
        g = self._tilted(grad)
        if self.kind == "sgld":
            return sgld_step(theta, g, self.theta_star, noise, step_size=self.eps, nbeta=self.nbeta,
                             localization=self.gamma, mask=self.mask), theta, loss
        if self.kind == "rmsprop_sgld":
            drift = self._drift(theta, g)
            if t < self.burnin:
                sq = g.square().mul_(self.nbeta**2)
                V = self.V[rows]
                V.copy_(sq) if t == 0 else V.mul_(self.alpha).add_(sq, alpha=1 - self.alpha)
                root = V.sqrt()
                scale = root.amax(dim=-1, keepdim=True)  # masked entries have V = 0: they never set the max
                G = scale / root.add_(1e-12 * scale + 1e-30)
                G = torch.where(scale > 0, G, torch.ones_like(G))  # no gradient yet (a chain at an exact minimum)
                self.G[rows] = G.clamp_(max=self.g_max)
            G = self.G[rows]
            move = drift.mul_(G).mul_(-0.5 * self.eps).add_(noise.mul(G.sqrt()), alpha=math.sqrt(self.eps))
            if self.mask is not None:
                move.mul_(self.mask)
            return move.add_(theta), theta, loss
        # mala: theta is the proposal evaluated by the caller (w* at t = 0, always accepted)
        u, drift = self._energy(theta, loss), self._drift(theta, g)
        if t == 0:
            accept = torch.ones_like(u, dtype=torch.bool)
        else:
            cur, cur_drift = self.cur[rows], self.cur_grad[rows]
            fwd = torch.sub(theta, cur).add_(cur_drift, alpha=0.5 * self.eps)  # θ' − θ + (ε/2)∇U(θ)
            bwd = torch.sub(cur, theta).add_(drift, alpha=0.5 * self.eps)
            log_q = (fwd.double().square().sum(-1) - bwd.double().square().sum(-1)) / (2 * self.eps)
            log_a = self.cur_u[rows] - u + log_q
            uniform = torch.stack([torch.rand((), generator=self.accept_gens[c], dtype=torch.float64,
                                              device=u.device) for c in range(rows.start, rows.stop)])
            accept = torch.isfinite(u) & (uniform.log() < log_a)
            self.accepted[rows] += accept.double()
        a = accept[:, None]
        self.cur[rows] = torch.where(a, theta, self.cur[rows])
        self.cur_grad[rows] = torch.where(a, drift, self.cur_grad[rows])
        self.cur_u[rows] = torch.where(accept, u, self.cur_u[rows])
        self.cur_loss[rows] = torch.where(accept, loss.double(), self.cur_loss[rows])
        cur = self.cur[rows]
        proposal = torch.sub(cur, self.cur_grad[rows], alpha=0.5 * self.eps)
        step_noise = noise if self.mask is None else noise * self.mask
        proposal.add_(step_noise, alpha=math.sqrt(self.eps))
        return proposal, cur, self.cur_loss[rows]

    def acceptance(self, draws: int) -> np.ndarray | None:
        """MALA's acceptance rate per chain over all proposals; None for the other samplers."""
        if self.kind != "mala":
            return None
        return (self.accepted / max(draws - 1, 1)).cpu().numpy()

    def preconditioner(self) -> np.ndarray | None:
        """rmsprop_sgld's frozen G: (C, P); None for the other samplers."""
        return self.G.cpu().numpy() if self.kind == "rmsprop_sgld" else None


def llc_per_chain(loss_trace: np.ndarray, init_loss: float, nbeta: float) -> np.ndarray:
    """λ̂ of each chain: nβ (mean_t loss_trace[c, t] − ℓ_n(w*)). loss_trace: (C, T) post burn-in -> (C,)."""
    trace = np.asarray(loss_trace, dtype=np.float64)
    with np.errstate(all="ignore"):  # a diverged chain gives inf / nan here, and a "diverged" flag
        return nbeta * (trace.mean(axis=1) - init_loss)


def min_burnin(step_size: float, localization: float, e_folds: float = 3.0) -> int:
    """Burn-in steps the localised chain needs to relax along flat directions of ℓ_n.

    Where ∇ℓ_n ≈ 0 the update is Δ ← (1 − εγ/2)Δ + N(0, ε), an AR(1) process whose variance approaches its limit
    as 1 − (1 − εγ/2)^{2t}: after B ≥ e_folds / (−2 log(1 − εγ/2)) ≈ e_folds / (εγ) steps it is within e^{−e_folds}
    (5% for 3) of it. Stiffer directions (nβ h ≫ γ) relax faster, so this bounds the slowest mode. Burn-in shorter
    than this leaves the draws on the rise and λ̂ biased low (docs/llc.md, "Burn-in grows as ε and γ shrink").
    """
    rate = step_size * localization / 2
    if rate >= 1:  # the localisation alone overshoots: no relaxation time is meaningful (and ε is far too large)
        return 0
    return math.ceil(e_folds / (-2 * math.log1p(-rate)))


def burnin_note(config: LLCConfig) -> str | None:
    """A note when config.num_burnin < min_burnin(ε, γ), else None.

    A note, not a diagnostic flag: the bound is exact for the flat directions of a singular model (the seed's
    transformer), but a model without flat directions (a regular one, where nβ·h ≫ γ everywhere) relaxes much
    faster, so a shorter burn-in can be right there; `not_stationary` judges the draws themselves.
    """
    if config.localization is None or config.num_burnin is None:
        return None  # resolved per estimate: γ = 0.01·nβ, burn-in = min_burnin(ε, γ)
    need = min_burnin(config.step_size, config.localization)
    if config.num_burnin >= need:
        return None
    return (f"short burn-in: {config.num_burnin} steps < {need} = min_burnin(ε = {config.step_size:g}, "
            f"γ = {config.localization:g}) ≈ 3/(εγ); along flat directions the draws are still rising and λ̂ is "
            "biased low")


@dataclass(frozen=True)
class Thresholds:
    """Tolerances of the diagnostics (see `diagnose` and docs/llc.md).

    divergence_factor: a draw with ℓ > ℓ_n(w*) + factor · max(|ℓ_n(w*)|, d/(2nβ)) counts as exploding
        (d/(2nβ) is the largest mean excess loss a λ ≤ d/2 allows).
    stationarity_rel, stationarity_z: "not stationary" when Δ, the change of the mean between the first and second
        half of the post-burn-in draws (in λ units, averaged over chains), exceeds stationarity_rel × |λ̂| AND
        stationarity_z standard errors of Δ (from its spread over chains; this part is skipped for one chain).
    rhat: "chains disagree" when the split-R̂ of the post-burn-in traces (icl_lab.convergence; each chain's halves
        count as two chains, so a trend inside a chain also raises it) exceeds this.
    min_ess: "few effective draws" when the effective sample size of the post-burn-in loss draws (all chains) is
        below this: Vehtari et al. (2021) ask for at least 100 before R̂ and the Monte-Carlo standard error (MCSE)
        can be relied on.
    exceed_rel, exceed_se: "exceeds d/2" when λ̂ − exceed_se · (standard error over chains) > (1 + exceed_rel) d/2;
        the slack keeps a regular model, whose λ is exactly d/2, from tripping it on noise and O(ε) bias.
    slope_rel, slope_z: "not at a minimum" when the slope term S = nβ·E[∇ℓ_n(w*)ᵀ(w − w*)] is negative with
        |S|/2 (the least it lowers λ̂, see `diagnose`) above slope_rel × |λ̂| AND |S| above slope_z standard errors
        (from its spread over chains; skipped for one chain).
    """

    divergence_factor: float = 100.0
    stationarity_rel: float = 0.1
    stationarity_z: float = 3.0
    rhat: float = 1.1
    min_ess: float = 100.0
    exceed_rel: float = 0.05
    exceed_se: float = 2.0
    slope_rel: float = 0.1
    slope_z: float = 3.0


def diagnose(loss_trace: np.ndarray, burnin_trace: np.ndarray, init_loss: float, nbeta: float, d: int,
             thresholds: Thresholds | None = None, *, slope_trace: np.ndarray | None = None,
             grad_norm: float = float("nan")) -> dict[str, str]:
    """Flags raised on one estimate, each with a plain-language message; an empty dict means no problem found.

    loss_trace: (C, T) minibatch losses after burn-in; burnin_trace: (C, B); init_loss: ℓ_n(w*); d: sampled
    parameters; slope_trace: (C, T) values of ∇ℓ_n(w*)ᵀ(w_t − w*) at the same draws, or None; grad_norm:
    ‖∇ℓ_n(w*)‖ (for the message). Flags: "diverged", "negative", "not_stationary", "chains_disagree",
    "exceeds_half_d", and with slope_trace "not_at_minimum".

    "not_at_minimum" reads the slope term S = nβ·mean(slope_trace). For a quadratic loss
    ℓ_n(w*) + gᵀΔ + ½ΔᵀHΔ with H ⪰ 0 and A = nβH + γI, the localised posterior has mean Δ̄ = −nβA⁻¹g, so
    S = −nβ²gᵀA⁻¹g, and λ̂ falls short of its value at g = 0 by Σᵢ nβ²gᵢ²(nβhᵢ + 2γ)/(2aᵢ²), which lies between
    |S|/2 and |S|: a checkpoint on a slope reads low by at least |S|/2.
    """
    th = thresholds or Thresholds()
    trace = np.asarray(loss_trace, dtype=np.float64)
    burn = np.asarray(burnin_trace, dtype=np.float64)
    flags: dict[str, str] = {}
    C, T = trace.shape
    scale = max(abs(init_loss), d / (2 * nbeta))
    limit = init_loss + th.divergence_factor * scale
    if not (np.isfinite(trace).all() and np.isfinite(burn).all()):
        bad = ~np.isfinite(np.concatenate([burn, trace], axis=1))
        chains = sorted({int(c) for c in np.nonzero(bad.any(axis=1))[0]})
        first = int(np.argmax(bad.any(axis=0)))
        flags["diverged"] = (f"the loss became NaN/inf (chains {chains}, first at step {first} counting burn-in): "
                             "the step size ε is too large for this nβ and γ; calibrate with a smaller ε")
        return flags
    if trace.max() > limit:
        flags["diverged"] = (f"the loss exploded to {trace.max():.4g}, more than {th.divergence_factor:g}x the scale "
                             f"{scale:.3g} above ℓ_n(w*) = {init_loss:.4g}: ε is too large; calibrate")
        return flags  # the other statistics of an exploding chain mean nothing
    per_chain = llc_per_chain(trace, init_loss, nbeta)
    mean = float(per_chain.mean())
    if mean < 0:
        n_neg = int((per_chain < 0).sum())
        flags["negative"] = (f"λ̂ = {mean:.4g} < 0 ({n_neg}/{C} chains negative): the chains found lower loss than "
                             "at w*, so w* is not a local minimum of ℓ_n (e.g. a checkpoint mid-descent) or ε is too "
                             "large; the value is not an LLC")
    if T >= 4:
        half = T // 2
        first, second = trace[:, :half], trace[:, T - half:]
        delta = float(nbeta * (second.mean() - first.mean()))
        # the error of Δ from each half's autocorrelation (MCSE); where a half is too short for that, from the
        # spread of the per-chain changes (C > 1), else none (then only the relative test applies)
        se = nbeta * math.hypot(mcse_mean(first, split=False), mcse_mean(second, split=False))
        if not math.isfinite(se):
            trend = nbeta * (second.mean(axis=1) - first.mean(axis=1))
            se = float(trend.std(ddof=1)) / math.sqrt(C) if C > 1 else 0.0
        tol = max(th.stationarity_rel * abs(mean), th.stationarity_z * se)
        if abs(delta) > tol:
            direction = "rising" if delta > 0 else "falling"
            flags["not_stationary"] = (f"the chains are still {direction} after burn-in: the mean of the second half "
                                       f"of the draws differs from the first half by {delta:+.4g} in λ units "
                                       f"(more than {th.stationarity_rel:.0%} of λ̂ and {th.stationarity_z:g} "
                                       "standard errors); use more burn-in or a larger ε")
    rhat = split_rhat(trace)
    if math.isfinite(rhat) and rhat > th.rhat or rhat == float("inf"):
        flags["chains_disagree"] = (f"the chains disagree: per-chain λ̂ from {per_chain.min():.4g} to "
                                    f"{per_chain.max():.4g}, split-R̂ = {rhat:.3f} > {th.rhat}; they have not mixed "
                                    "(more draws, larger ε) or sit in different basins")
    n_eff = ess(trace)
    if math.isfinite(n_eff) and n_eff < th.min_ess:
        flags["few_effective_draws"] = (f"only {n_eff:.0f} effective draws (of {C * T}) < {th.min_ess:g}: the draws "
                                        "are strongly autocorrelated, so λ̂'s standard error is itself unreliable; "
                                        "use more draws or chains, or a sampler that mixes faster")
    se = float(per_chain.std(ddof=1) / math.sqrt(C)) if C > 1 else 0.0
    if mean - th.exceed_se * se > (1 + th.exceed_rel) * d / 2:
        flags["exceeds_half_d"] = (f"λ̂ = {mean:.4g} exceeds d/2 = {d / 2:g}, impossible for an LLC: the chain is "
                                   "not sampling the local posterior (ε too large, or γ too small to localise)")
    if slope_trace is not None:
        slope = nbeta * np.asarray(slope_trace, dtype=np.float64).mean(axis=1)  # (C,) per-chain slope terms
        S = float(slope.mean())
        se_s = float(slope.std(ddof=1)) / math.sqrt(C) if C > 1 else 0.0
        if S < 0 and -S / 2 > th.slope_rel * abs(mean) and -S > th.slope_z * se_s:
            flags["not_at_minimum"] = (
                f"w* is not a local minimum: ‖∇ℓ_n(w*)‖ = {grad_norm:.3g} and the chains drift downhill along it; "
                f"the slope term nβ·E[∇ℓ_n(w*)ᵀ(w − w*)] = {S:.4g} lowers λ̂ = {mean:.4g} by between {-S / 2:.3g} and "
                f"{-S:.3g} (exact for a locally quadratic loss), more than {th.slope_rel:.0%} of λ̂: the value "
                "mixes the LLC with the slope at w*, so compare it across checkpoints with care")
    return flags


# ----------------------------------------------------------------------------------------------------------------
# Results
@dataclass(frozen=True)
class Observable:
    """Components of the loss to evaluate along the chains: the data-refined LLC (docs/papers.md §D2, Hoogland et
    al.'s per-token LLC; Wang et al.'s data-refined LLC).

    The chains sample the full tempered posterior of ℓ_n; each component ℓ_j is an observable along them, and
        λ̂_j = nβ · ( E_w[ ℓ_j(w) ] − ℓ_j(w*) ),
    with E_w over the same post-burn-in draws (and minibatches) as λ̂ and ℓ_j(w*) on the whole data. Where the
    components average to the loss (ℓ = mean_j ℓ_j, e.g. the loss at each context position), mean_j λ̂_j = λ̂.

    names: (J,) labels of the components.
    fn(forward, batch) -> (J,): each component's mean loss on `batch` (a tuple like the data: the chain's minibatch,
        or the whole data at w*); nan for a component with no rows in the batch (a task not drawn). It may ignore
        the batch and evaluate fixed data of its own (e.g. fresh tasks). Must be vmap-able like the loss.
    """

    names: tuple[str, ...]
    fn: Callable[[Forward, tuple[Tensor, ...]], Tensor]

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names) or not self.names:
            raise ValueError(f"Observable.names must be distinct and non-empty, got {self.names}")


def combine_observables(*parts: Observable) -> Observable:
    """One Observable whose components are those of `parts`, in order (names must stay distinct)."""
    fns = [p.fn for p in parts]
    return Observable(tuple(n for p in parts for n in p.names),
                      lambda forward, batch: torch.cat([f(forward, batch).reshape(-1) for f in fns]))


def refined_per_chain(obs_trace: np.ndarray, obs_star: np.ndarray, nbeta: float) -> np.ndarray:
    """λ̂_j of each chain: nβ (nanmean_t obs_trace[c, t, j] − ℓ_j(w*)). obs_trace: (C, T, J); obs_star: (J,) -> (C, J).
    Draws where a component was undefined (nan: no rows of it in the minibatch) are skipped."""
    trace = np.asarray(obs_trace, dtype=np.float64)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-nan component stays nan
        return nbeta * (np.nanmean(trace, axis=1) - np.asarray(obs_star, dtype=np.float64)[None, :])


# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LLCResult:
    """One LLC estimate. Arrays are numpy float64.

    llc_per_chain: (C,); loss_trace: (C, T) post-burn-in minibatch losses; burnin_trace: (C, B).
    llc_std is the sample standard deviation over chains (ddof = 1; nan for a single chain).
    diagnostics: flag -> message (see `diagnose`); empty when nothing looks wrong.
    sampled: names of the parameters that were moved; excluded: name -> why it was not sampled.
    grad_norm: ‖∇ℓ_n(w*)‖ over the sampled entries (0 at a critical point).
    llc_slope: nβ · E[∇ℓ_n(w*)ᵀ(w − w*)] over the post-burn-in draws, the first-order (slope) part of λ̂: near 0 at
        a local minimum; when w* sits on a slope the chains drift downhill and this is negative (see `diagnose`).
    rhat, ess: split-R̂ and effective sample size of the post-burn-in loss trace (icl_lab.convergence);
    llc_mcse: Monte-Carlo standard error of λ̂ from all draws and their autocorrelation (nβ · MCSE of the mean loss).
    llc_tilted, llc_tilted_per_chain, llc_tilted_mcse: with config.tilted, λ̂ of the tilted loss
        ℓ_n(w) − ∇ℓ_n(w*)ᵀ(w − w*), sampled by a second set of chains with the same random numbers. For a loss that
        is quadratic near w* it equals the λ̂ the checkpoint would read at a minimum of the same curvature;
        read it where `not_at_minimum` is raised. NaN otherwise.
    acceptance_rate: (C,) MALA's acceptance rate per chain (sampler "mala"), else None.
    preconditioner: (C, P) rmsprop_sgld's frozen diagonal preconditioner G, else None.
    refined_names, llc_refined (J,), llc_refined_per_chain (C, J), llc_refined_mcse (J,), refined_init (J,): with
        an `Observable`, the data-refined λ̂_j of each component from the same draws, and ℓ_j(w*); else empty/None.
    """

    llc_mean: float
    llc_std: float
    llc_per_chain: np.ndarray
    loss_trace: np.ndarray
    burnin_trace: np.ndarray
    init_loss: float
    nbeta: float
    n: int
    d: int
    config: LLCConfig
    seed: int
    diagnostics: dict[str, str]
    sampled: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    vectorized: bool = True
    data_hash: str = ""
    fingerprint: str = ""
    grad_norm: float = float("nan")
    llc_slope: float = float("nan")
    seconds: float = float("nan")
    rhat: float = float("nan")
    ess: float = float("nan")
    llc_mcse: float = float("nan")
    llc_tilted: float = float("nan")
    llc_tilted_per_chain: np.ndarray | None = None
    llc_tilted_mcse: float = float("nan")
    acceptance_rate: np.ndarray | None = None
    preconditioner: np.ndarray | None = None
    refined_names: tuple[str, ...] = ()
    llc_refined: np.ndarray | None = None
    llc_refined_per_chain: np.ndarray | None = None
    llc_refined_mcse: np.ndarray | None = None
    refined_init: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        """True when no diagnostic flag was raised."""
        return not self.diagnostics

    @property
    def llc_se(self) -> float:
        """Standard error of llc_mean over chains (llc_std / √C)."""
        return self.llc_std / math.sqrt(len(self.llc_per_chain))

    @property
    def llc_interval(self) -> Interval:
        """95% interval of λ̂: mean ± t_{0.975, C−1}·SE over the C chains (intervals.t_interval)."""
        return t_interval(self.llc_per_chain)

    def refined(self) -> pd.DataFrame:
        """The data-refined λ̂_j, one row per component: name, llc, lo, hi (95% t over chains), mcse, init_loss."""
        if self.llc_refined_per_chain is None:
            return pd.DataFrame(columns=["name", "llc", "lo", "hi", "mcse", "init_loss"])
        ivs = [t_interval(self.llc_refined_per_chain[:, j]) for j in range(len(self.refined_names))]
        return pd.DataFrame({"name": list(self.refined_names), "llc": [iv.estimate for iv in ivs],
                             "lo": [iv.lo for iv in ivs], "hi": [iv.hi for iv in ivs],
                             "mcse": self.llc_refined_mcse, "init_loss": self.refined_init})

    def summary(self) -> str:
        flags = ", ".join(self.diagnostics) or "ok"
        return f"λ̂ = {self.llc_mean:.4g} ± {self.llc_std:.3g} (d = {self.d}, nβ = {self.nbeta:.4g}; {flags})"

    def to_row(self) -> dict[str, Any]:
        """A flat dict for one parquet row (callers add e.g. `step`). llc_lo/llc_hi: the 95% t interval over chains;
        each refined component j adds llc_refined_<name> with _lo/_hi (95% t over chains) and _mcse."""
        cfg = self.config
        iv = self.llc_interval
        refined: dict[str, Any] = {}
        for r in self.refined().itertuples():
            refined |= {f"llc_refined_{r.name}": float(r.llc), f"llc_refined_{r.name}_lo": float(r.lo),
                        f"llc_refined_{r.name}_hi": float(r.hi), f"llc_refined_{r.name}_mcse": float(r.mcse)}
        return {
            "llc_lo": iv.lo,
            "llc_hi": iv.hi,
            "llc_mean": self.llc_mean,
            "llc_std": self.llc_std,
            "llc_per_chain": [float(v) for v in self.llc_per_chain],
            "init_loss": self.init_loss,
            "grad_norm": self.grad_norm,
            "llc_slope": self.llc_slope,
            "nbeta": self.nbeta,
            "n": self.n,
            "d": self.d,
            "step_size": cfg.step_size,
            "localization": cfg.localization,
            "num_chains": cfg.num_chains,
            "num_draws": cfg.num_draws,
            "num_burnin": cfg.num_burnin,
            "batch_size": cfg.batch_size,
            "seed": self.seed,
            "ok": self.ok,
            "flags": ";".join(self.diagnostics),
            "diagnostics": " | ".join(f"{k}: {v}" for k, v in self.diagnostics.items()),
            "notes": " | ".join(self.notes),
            "vectorized": self.vectorized,
            "data_hash": self.data_hash,
            "fingerprint": self.fingerprint,
            "seconds": self.seconds,
            "sampler": cfg.sampler,
            "llc_mcse": self.llc_mcse,
            "rhat": self.rhat,
            "ess": self.ess,
            "llc_tilted": self.llc_tilted,
            "llc_tilted_mcse": self.llc_tilted_mcse,
            "acceptance_rate": float("nan") if self.acceptance_rate is None else float(self.acceptance_rate.mean()),
            "precond_median": float("nan") if self.preconditioner is None else float(np.median(self.preconditioner)),
            "precond_max": float("nan") if self.preconditioner is None else float(self.preconditioner.max()),
            **refined,
        }


# ----------------------------------------------------------------------------------------------------------------
# Parameter selection (refined LLC)
# ----------------------------------------------------------------------------------------------------------------


def _matches(name: str, pattern: str) -> bool:
    """Glob (fnmatch) match, a regex when the pattern starts with "re:", or a module prefix ("blocks.0")."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def _requested(named: dict[str, Tensor], params: ParamSpec) -> tuple[dict[str, Tensor | None], dict[str, str]]:
    """Resolve `params` to {name: mask or None (= whole tensor)} and {name: reason excluded}."""
    excluded: dict[str, str] = {}
    trainable = {}
    for name, p in named.items():
        if p.requires_grad:
            trainable[name] = p
        else:
            excluded[name] = "requires_grad=False"
    if params is None:
        return {name: None for name in trainable}, excluded
    if isinstance(params, dict):
        chosen: dict[str, Tensor | None] = {}
        for name, mask in params.items():
            if name not in named:
                raise ValueError(f"params: no parameter named {name!r}; parameters are: {', '.join(named)}")
            if name not in trainable:
                raise ValueError(f"params: parameter {name!r} has requires_grad=False and cannot be sampled")
            mask = torch.as_tensor(mask)
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(named[name].shape):
                raise ValueError(f"params: the mask of {name!r} must be a bool tensor of shape "
                                 f"{tuple(named[name].shape)}, got dtype {mask.dtype} and shape {tuple(mask.shape)}")
            if bool(mask.any()):
                chosen[name] = None if bool(mask.all()) else mask
        for name in trainable:
            if name not in chosen:
                excluded[name] = "not selected"
        if not chosen:
            raise ValueError("params: empty parameter selection (every mask is all False)")
        return chosen, excluded
    patterns = [params] if isinstance(params, str) else list(params)
    if not patterns:
        raise ValueError("params: empty list of name patterns")
    for pattern in patterns:
        if not any(_matches(name, pattern) for name in named):
            raise ValueError(f"params: pattern {pattern!r} matches no parameter; parameters are: {', '.join(named)}")
    chosen = {name: None for name in trainable if any(_matches(name, pat) for pat in patterns)}
    for name in trainable:
        if name not in chosen:
            excluded[name] = "not selected"
    if not chosen:
        raise ValueError(f"params: empty parameter selection: {patterns} match only parameters with "
                         "requires_grad=False")
    return chosen, excluded


def head_mask(model: nn.Module, layer: int, head: int) -> dict[str, Tensor]:
    """Masks selecting one attention head, for `estimate_llc(..., params=head_mask(model, layer, head))`.

    Works for any model whose attention parameters follow the TransformerLens naming and layout
    (`…blocks.{layer}.attn.W_Q/W_K/W_V`: (H, d_model, d_head), `W_O`: (H, d_head, d_model), `b_Q/b_K/b_V`: (H, d_head)),
    i.e. icl-lab's model and a `HookedTransformer`, also wrapped (`transformer.blocks.0.attn.W_Q`). The head's slice
    is index `head` of the leading axis; the shared output bias b_O is not part of any head.
    Returns {name: bool mask of the parameter's shape}.
    """
    suffixes = {leaf: f"blocks.{layer}.attn.{leaf}" for leaf in _HEAD_LEAVES}
    masks: dict[str, Tensor] = {}
    n_heads = None
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in suffixes and (name == suffixes[leaf] or name.endswith("." + suffixes[leaf])):
            if n_heads is None:
                n_heads = p.shape[0]
            if p.dim() < 2 or p.shape[0] != n_heads:
                raise ValueError(f"head_mask: {name} has shape {tuple(p.shape)}; expected a leading head axis of "
                                 f"size {n_heads} (TransformerLens layout)")
            if not 0 <= head < n_heads:
                raise ValueError(f"head_mask: head={head} out of range; layer {layer} has {n_heads} heads")
            mask = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
            mask[head] = True
            masks[name] = mask
    if not masks:
        raise ValueError(f"head_mask: no parameters named '…blocks.{layer}.attn.W_Q' etc. in this model "
                         "(TransformerLens naming expected)")
    return masks


# ----------------------------------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------------------------------


def _check_data(data: Sequence[Tensor]) -> tuple[tuple[Tensor, ...], int]:
    if isinstance(data, Tensor) or not isinstance(data, (tuple, list)):
        raise ValueError(f"data must be a tuple of tensors with a leading sample axis, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data is an empty tuple; it needs at least one tensor with a leading sample axis")
    for i, t in enumerate(data):
        if not isinstance(t, Tensor) or t.dim() == 0:
            raise ValueError(f"data[{i}] must be a tensor with a leading sample axis, got {type(t).__name__}")
    lengths = [t.shape[0] for t in data]
    if len(set(lengths)) != 1:
        raise ValueError(f"data tensors have different lengths along the sample axis: {lengths}")
    n = lengths[0]
    if n < 2:
        raise ValueError(f"data must hold n >= 2 samples (nβ = n / log n needs n >= 2), got n={n}")
    return tuple(data), n


def _hash_data(data: tuple[Tensor, ...]) -> str:
    h = hashlib.sha256()
    for t in data:
        a = t.detach().cpu().contiguous()
        h.update(f"{a.dtype}{tuple(a.shape)}".encode())
        h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()[:16]


class _ChainRandomness:
    """One chain's minibatch indices and SGLD noise, each from its own generator seeded by (seed, chain) alone.

    Indices: without replacement within an epoch (a fresh permutation of the n rows per epoch, consumed m at a
    time; a minibatch may straddle two epochs). Both are drawn in blocks of `block` steps (one RNG call per block,
    not per step); the vectorised and sequential paths use the same blocks, so they see identical numbers.
    """

    def __init__(self, seed: int, chain: int, n: int, m: int, device: torch.device):
        self.n, self.m, self.device = n, m, device
        self.noise_gen = make_generator(seed, f"llc/chain{chain}/noise", device)
        self.batch_gen = make_generator(seed, f"llc/chain{chain}/batches", device)
        self.buf = torch.empty(0, dtype=torch.long, device=device)

    def fill_noise(self, out: Tensor) -> None:
        """Standard normal draws into out: (block, P)."""
        torch.randn(out.shape, generator=self.noise_gen, out=out)

    def indices(self, block: int) -> Tensor:
        """(block, m) minibatch indices into the data."""
        need = block * self.m
        while self.buf.numel() < need:
            perm = torch.randperm(self.n, generator=self.batch_gen, device=self.device)
            self.buf = torch.cat([self.buf, perm])
        idx, self.buf = self.buf[:need], self.buf[need:]
        return idx.view(block, self.m)


def _block_size(P: int) -> int:
    """Steps of randomness drawn at once: up to 64, with at most ~1M noise numbers per chain and block."""
    return max(1, min(64, 2**20 // max(P, 1)))


def _select_parameters(work: nn.Module, params: ParamSpec, loss_fn: LossFn, probe: tuple[Tensor, ...]
                       ) -> tuple[dict[str, Tensor | None], dict[str, str]]:
    """Resolve `params` on the private copy, then drop what gets no gradient in one forward + backward at w*.

    Also checks that loss_fn returns a scalar. Leaves every parameter of `work` with requires_grad=False.
    Returns ({name: bool mask or None (whole tensor)}, {name: why it is not sampled}).
    """
    named = dict(work.named_parameters())
    chosen, excluded = _requested(named, params)
    for p in named.values():
        p.requires_grad_(False)
    candidates = list(chosen)
    for name in candidates:
        named[name].requires_grad_(True)
    loss = loss_fn(work, probe)
    if not isinstance(loss, Tensor) or loss.numel() != 1 or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor (the mean loss of the batch), got {shape}")
    if not loss.requires_grad:
        raise ValueError("params: empty parameter selection: the loss does not depend on any selected parameter")
    grads = torch.autograd.grad(loss, [named[k] for k in candidates], allow_unused=True)
    for name, g in zip(candidates, grads, strict=True):
        named[name].requires_grad_(False)
        if g is None:
            excluded[name] = "unused: gradient is None at w*"
            del chosen[name]
    if not chosen:
        raise ValueError("params: empty parameter selection: every selected parameter gets no gradient")
    return chosen, excluded


@dataclass
class _Flat:
    """The sampled parameters as one flat vector: w* (P,), the 0/1 mask (P,) or None, and d = entries sampled."""

    names: list[str]
    shapes: list[torch.Size]
    numels: list[int]
    theta_star: Tensor
    mask: Tensor | None
    d: int

    @classmethod
    def of(cls, work: nn.Module, chosen: dict[str, Tensor | None], device: torch.device) -> _Flat:
        named = dict(work.named_parameters())
        names = list(chosen)
        dtypes = {named[k].dtype for k in names}
        if len(dtypes) != 1:
            raise ValueError(f"sampled parameters must share one dtype, got {sorted(map(str, dtypes))}")
        theta_star = torch.cat([named[k].detach().reshape(-1) for k in names])
        mask, d = None, theta_star.numel()
        if any(chosen[k] is not None for k in names):
            full = lambda k: torch.ones(named[k].shape, dtype=torch.bool) if chosen[k] is None else chosen[k]
            mask = torch.cat([full(k).to(device).reshape(-1) for k in names]).to(theta_star.dtype)
            d = int(mask.sum().item())
        return cls(names, [named[k].shape for k in names], [named[k].numel() for k in names], theta_star, mask, d)

    def views(self, theta: Tensor) -> dict[str, Tensor]:
        """{name: view of theta (P,) in the parameter's shape}."""
        return {k: v.view(s) for k, v, s in zip(self.names, theta.split(self.numels), self.shapes, strict=True)}


def estimate_llc(model: nn.Module, data: Sequence[Tensor], loss_fn: LossFn, *, config: LLCConfig | None = None,
                 seed: int = 0, params: ParamSpec = None, thresholds: Thresholds | None = None,
                 observables: Observable | None = None) -> LLCResult:
    """Estimate the local learning coefficient of `model` at its current weights w* (Hoogland et al. Eq. 5-6,
    Carroll et al. Eq. 9); see the module docstring for the estimator and the SGLD update.

    model: any nn.Module; never modified (sampling runs on a deep copy in eval mode).
    data: tuple of tensors with a common leading sample axis of length n (the fixed dataset; n sets nβ = n/log n).
    loss_fn(forward, batch) -> scalar tensor: the MEAN loss of `batch` (a tuple like `data`, m rows), where
        forward(*inputs) runs the model, e.g. `lambda f, b: ((f(b[0], b[1]) - b[1]) ** 2).mean()`.
    config: LLCConfig (ε = step_size, γ = localization, nβ, chains, draws, burn-in, minibatch size, sampler,
        tilted); None fields are resolved for this n by `resolve` (γ = 0.01·nβ, burn-in = min_burnin(ε, γ)).
    seed: the only source of the chains' randomness (minibatches and noise).
    params: which parameters to sample (refined LLC): None = all trainable ones that get a gradient; a glob
        pattern or list of them ("blocks.0.*", "*.mlp.*", a module prefix "blocks.1", or "re:<regex>"); or
        {name: bool mask} for parts of tensors (e.g. `head_mask`). Unselected and masked entries stay at w*.
        Parameters whose gradient is None at w* (unused in forward) are excluded and not counted in d.
    thresholds: tolerances of the diagnostics (defaults: `Thresholds()`).
    observables: components of the loss (an `Observable`) evaluated at every post-burn-in draw of the (untilted)
        chains on the chain's minibatch, and once at w* on the whole data: the data-refined λ̂_j. Costs one extra
        forward pass (no backward) per recorded draw.
    Returns an LLCResult; its `diagnostics` say when the number cannot be trusted.
    """
    t_start = time.perf_counter()
    config = LLCConfig() if config is None else LLCConfig.model_validate(config.model_dump())
    data, n = _check_data(data)
    nbeta = default_nbeta(n) if config.nbeta is None else float(config.nbeta)
    config = resolve(config, nbeta)

    work = copy.deepcopy(model).eval()  # private: the caller's model is never touched
    device = next(work.parameters()).device
    data = tuple(t.to(device) for t in data)
    m = n if config.batch_size is None else min(config.batch_size, n)
    chosen, excluded = _select_parameters(work, params, loss_fn, tuple(t[:m] for t in data))
    flat = _Flat.of(work, chosen, device)
    init_loss, grad_star = _loss_and_grad_at(work, flat, loss_fn, data, n)
    if not math.isfinite(init_loss):
        raise ValueError(f"the loss at w* is not finite ({init_loss}); cannot estimate an LLC there")

    if observables is not None:
        with torch.no_grad():
            obs_star = observables.fn(work, data).detach().double().reshape(-1).cpu().numpy()
        if obs_star.shape != (len(observables.names),):
            raise ValueError(f"observables.fn returned {obs_star.size} values for {len(observables.names)} names")

    def functional(fn: Callable[[Forward, tuple[Tensor, ...]], Tensor]) -> Callable[[Tensor, tuple], Tensor]:
        """fn at the flat parameter vector theta: (P,) (vmap-able: goes through functional_call)."""
        def at(theta: Tensor, batch: tuple[Tensor, ...]) -> Tensor:
            views = flat.views(theta)
            return fn(lambda *inputs: torch.func.functional_call(work, views, inputs), batch)
        return at

    chain_loss = functional(loss_fn)  # ℓ_m at theta
    tied = len(list(work.named_parameters(remove_duplicate=False))) != len(list(work.named_parameters()))

    def direct(model: nn.Module, fn: Callable = loss_fn) -> Callable[[Tensor, tuple[Tensor, ...]], Tensor]:
        """fn at theta for the sequential path on `model` (the private copy, or a copy of it per thread), without
        functional_call's per-step bookkeeping: its parameter slots are pointed at views of theta (tied weights
        fall back to functional_call on `model`)."""
        if tied:
            return lambda theta, batch: fn(
                lambda *inputs: torch.func.functional_call(model, flat.views(theta), inputs), batch)
        slots = [_slot(model, k) for k in flat.names]

        def at(theta: Tensor, batch: tuple[Tensor, ...]) -> Tensor:
            for (module, attr), view in zip(slots, flat.views(theta).values(), strict=True):
                module._parameters[attr] = view
            return fn(model, batch)

        return at

    C, S = config.num_chains, config.num_burnin + config.num_draws

    def randomness() -> list[_ChainRandomness]:
        """Fresh per-chain generators (so a failed vectorised attempt leaves no trace in the fallback)."""
        return [_ChainRandomness(seed, c, n, m, device) for c in range(C)]

    minibatch = m < n
    notes: list[str] = []
    vectorized = vectorizes(config, flat.theta_star.numel(), device)
    thread_models: list[nn.Module] = []  # the sequential path's model copies, one per thread: made once, reused

    obs_trace = None if observables is None else torch.full(
        (C, config.num_draws, len(observables.names)), float("nan"), dtype=torch.float64, device=device)

    def recorder(tilted: bool) -> _Recorder | None:
        """Where the untilted chains record the observables (None: nothing to record)."""
        if observables is None or tilted:
            return None
        obs_trace.fill_(float("nan"))  # a failed vectorised attempt leaves no partial record
        return _Recorder(observables.fn, functional(observables.fn), obs_trace, config.num_burnin)

    def sample(tilted: bool) -> tuple[Tensor, Tensor, _Kernel]:
        """Run the C chains; returns ℓ at the recorded points (C, S), ∇ℓ_n(w*)ᵀ(w_t − w*) (C, S), the kernel."""
        nonlocal vectorized
        trace = torch.full((C, S), float("nan"), dtype=torch.float64, device=device)
        slope = torch.full((C, S), float("nan"), dtype=torch.float64, device=device)

        def kernel() -> _Kernel:
            gens = [make_generator(seed, f"llc/chain{c}/accept", device) for c in range(C)]
            return _Kernel(config, nbeta, flat.theta_star, grad_star, flat.mask, C, tilted, gens)

        if vectorized:
            try:
                k = kernel()
                _run_vectorized(chain_loss, data, minibatch, flat.theta_star, grad_star, trace, slope, randomness(),
                                k, notes, recorder(tilted))
                return trace, slope, k
            except _VmapUnsupported as e:
                vectorized = False
                notes.append(f"vectorised chains failed ({e}); fell back to running the chains one after another")
        if not thread_models:  # one copy per thread, made before any sequential sampling points its slots at views
            threads = torch.get_num_threads() if device.type == "cpu" else 1
            thread_models.extend([work] + [copy.deepcopy(work) for _ in range(max(1, min(threads, C)) - 1)])
        k = kernel()
        _run_sequential(thread_models, direct, data, minibatch, flat.theta_star, grad_star, trace, slope,
                        randomness(), k, notes, recorder(tilted))
        return trace, slope, k

    trace, slope, kernel = sample(tilted=False)
    tilted_stats: dict[str, Any] = {}
    if config.tilted:
        t_trace, t_slope, _ = sample(tilted=True)
        tilted_post = (t_trace - t_slope).cpu().numpy()[:, config.num_burnin:]  # ℓ(w) − gᵀ(w − w*)
        t_chain = llc_per_chain(tilted_post, init_loss, nbeta)
        with np.errstate(all="ignore"):
            tilted_stats = {"llc_tilted": float(t_chain.mean()), "llc_tilted_per_chain": t_chain,
                            "llc_tilted_mcse": float(nbeta * mcse_mean(tilted_post))}
    trace_np = trace.cpu().numpy()
    burn, post = trace_np[:, : config.num_burnin], trace_np[:, config.num_burnin:]
    per_chain = llc_per_chain(post, init_loss, nbeta)
    slope_post = slope.cpu().numpy()[:, config.num_burnin:]
    grad_norm = float(grad_star.double().norm())
    diagnostics = diagnose(post, burn, init_loss, nbeta, flat.d, thresholds, slope_trace=slope_post,
                           grad_norm=grad_norm)
    if (note := burnin_note(config)) is not None:
        notes.append(note)
    data_hash = _hash_data(data)
    selection = {k: (None if chosen[k] is None else hashlib.sha256(
        chosen[k].cpu().numpy().tobytes()).hexdigest()[:12]) for k in flat.names}
    fingerprint = hashlib.sha256(json.dumps(
        [config.model_dump(), nbeta, seed, selection, data_hash], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    with np.errstate(all="ignore"):
        llc_mean = float(per_chain.mean())
        llc_std = float(per_chain.std(ddof=1)) if C > 1 else float("nan")
        llc_slope = float(nbeta * slope_post.mean())
    stats = summarize(post) if np.isfinite(post).all() else {"rhat": math.nan, "ess": math.nan, "mcse": math.nan}
    refined: dict[str, Any] = {}
    if observables is not None:
        obs_np = obs_trace.cpu().numpy()
        mcse = [nbeta * mcse_mean(obs_np[:, :, j]) for j in range(obs_np.shape[2])]  # nan where a draw is nan
        refined = {"refined_names": tuple(observables.names), "refined_init": obs_star,
                   "llc_refined_per_chain": refined_per_chain(obs_np, obs_star, nbeta),
                   "llc_refined_mcse": np.array(mcse, dtype=np.float64)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            refined["llc_refined"] = refined["llc_refined_per_chain"].mean(axis=0)
    accept = kernel.acceptance(S)
    precond = kernel.preconditioner()
    return LLCResult(
        llc_mean=llc_mean,
        llc_std=llc_std,
        llc_per_chain=per_chain, loss_trace=post, burnin_trace=burn, init_loss=init_loss, nbeta=nbeta, n=n,
        d=flat.d, config=config, seed=seed, diagnostics=diagnostics, sampled=flat.names, excluded=excluded, notes=notes,
        vectorized=vectorized, data_hash=data_hash, fingerprint=fingerprint, grad_norm=grad_norm,
        llc_slope=llc_slope, seconds=time.perf_counter() - t_start,
        rhat=stats["rhat"], ess=stats["ess"], llc_mcse=nbeta * stats["mcse"],
        acceptance_rate=accept, preconditioner=precond, **tilted_stats, **refined,
    )


def _loss_and_grad_at(work: nn.Module, flat: _Flat, loss_fn: LossFn, data: tuple[Tensor, ...], n: int
                      ) -> tuple[float, Tensor]:
    """ℓ_n(w*) and ∇ℓ_n(w*): (P,) over the sampled entries (masked ones 0), on the whole data in chunks
    (loss_fn is a mean). One forward + backward of the n rows; leaves requires_grad False on every parameter."""
    named = dict(work.named_parameters())
    leaves = [named[k] for k in flat.names]
    grads = [torch.zeros_like(p) for p in leaves]
    total = 0.0
    size = eval_chunk(data[0].device)  # small chunks stay in a CPU's cache
    for p in leaves:
        p.requires_grad_(True)
    try:
        for start in range(0, n, size):
            chunk = tuple(t[start:start + size] for t in data)
            rows = chunk[0].shape[0]
            loss = loss_fn(work, chunk)
            total += float(loss.detach().double()) * rows
            for acc, g in zip(grads, torch.autograd.grad(loss, leaves, allow_unused=True), strict=True):
                if g is not None:
                    acc.add_(g, alpha=rows / n)
    finally:
        for p in leaves:
            p.requires_grad_(False)
    grad = torch.cat([g.reshape(-1) for g in grads])
    return total / n, grad if flat.mask is None else grad * flat.mask


def _slot(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(owning module, attribute) of the parameter `name`."""
    prefix, _, attr = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), attr


class _VmapUnsupported(RuntimeError):
    pass


@dataclass
class _Recorder:
    """The observables of the data-refined LLC: fn(forward, batch) (sequential path), at(theta, batch) (vectorised
    path), and trace (C, T, J), filled at post-burn-in step t (of S) in row t − start."""

    fn: Callable[[Forward, tuple[Tensor, ...]], Tensor]
    at: Callable[[Tensor, tuple[Tensor, ...]], Tensor]
    trace: Tensor
    start: int


def _run_vectorized(chain_loss: Callable, data: tuple[Tensor, ...], minibatch: bool, theta_star: Tensor,
                    grad_star: Tensor, trace: Tensor, slope: Tensor, rands: list[_ChainRandomness],
                    kernel: _Kernel, notes: list[str], record: _Recorder | None = None) -> None:
    """All chains at once: vmap over the chain axis of grad_and_value(chain_loss). Fills trace (C, S) with ℓ_m(w_t)
    and slope (C, S) with ∇ℓ_n(w*)ᵀ(w_t − w*) in place (grad_star: (P,)), and record.trace with the observables
    at the recorded points after burn-in.

    Raises _VmapUnsupported if the first step cannot be vectorised (nothing has been sampled then).
    """
    C, S = trace.shape
    P = theta_star.numel()
    block = _block_size(P)
    step = torch.func.vmap(torch.func.grad_and_value(chain_loss), in_dims=(0, 0 if minibatch else None))
    observe = None if record is None else torch.func.vmap(record.at, in_dims=(0, 0 if minibatch else None))
    theta = theta_star.expand(C, -1).clone()  # (C, P)
    noise = theta.new_empty(C, block, P)
    idx = None
    # The math SDPA kernel decomposes into ops that have batching rules (the fused CPU kernel has none); ops
    # without a batching rule still work, one chain at a time, and are reported once in `notes`.
    with vmappable_sdpa():
        for t in range(S):
            j = t % block
            if j == 0:
                for c, r in enumerate(rands):
                    r.fill_noise(noise[c])
                if minibatch:
                    idx = torch.stack([r.indices(block) for r in rands], dim=1)  # (block, C, m)
            batch = tuple(x[idx[j]] for x in data) if minibatch else data  # each (C, m, ...) or the full data
            if t == 0:
                grad, loss = _first_vmapped_step(step, theta, batch, notes)
            else:
                grad, loss = step(theta, batch)
            with torch.no_grad():
                theta, point, point_loss = kernel.step(t, theta, loss.detach(), grad, noise[:, j], slice(0, C))
                trace[:, t] = point_loss
                slope[:, t] = torch.sub(point, theta_star) @ grad_star
                if observe is not None and t >= record.start:
                    record.trace[:, t - record.start] = observe(point, batch).double()
            if (t + 1) % _CHECK_EVERY == 0 and not bool(torch.isfinite(theta).all()):
                notes.append(f"sampling stopped at step {t + 1}: non-finite parameters")
                return


def _first_vmapped_step(step: Callable, theta: Tensor, batch: tuple[Tensor, ...], notes: list[str]
                        ) -> tuple[Tensor, Tensor]:
    """The first vectorised step, which decides whether vmap works for this model; notes batching fallbacks."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = step(theta, batch)
        except Exception as e:  # noqa: BLE001 - any failure of the functorch transform means "fall back"
            raise _VmapUnsupported(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    for w in caught:
        if BATCHING_WARNING in str(w.message):
            notes.append(f"vmap: {str(w.message).splitlines()[0][:160]}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out


def _run_sequential(models: list[nn.Module], direct: Callable[..., Callable], data: tuple[Tensor, ...],
                    minibatch: bool, theta_star: Tensor, grad_star: Tensor, trace: Tensor, slope: Tensor,
                    rands: list[_ChainRandomness], kernel: _Kernel, notes: list[str],
                    record: _Recorder | None = None) -> None:
    """The chains with plain autograd, each chain's steps one after another (for models that cannot be vmapped, and
    large models on CPU). Fills trace, slope and record as `_run_vectorized` does; a chain whose
    parameters become non-finite stops there.

    models: one private copy of the model per thread (estimate_llc makes min(chains, torch threads) on CPU); with
    more than one, the chains run that many at a time, each group on its own thread with one intra-op thread and
    its own copy. A model this small at minibatch 32-256 keeps one core busy and a second one poorly, so the
    cores go further on separate chains. Every chain's numbers come from its own generators and its own model
    copy, so the trace does not depend on the number of threads or scheduling (up to the bits in which one and
    two intra-op threads round differently).
    """
    C, S = trace.shape
    P = theta_star.numel()
    block = _block_size(P)

    def run(chains: list[int], model: nn.Module) -> list[str]:
        chain_loss, noise, stopped = direct(model), theta_star.new_empty(block, P), []
        observe = None if record is None else direct(model, record.fn)
        for c in chains:
            r, theta, idx = rands[c], theta_star.clone(), None
            for t in range(S):
                j = t % block
                if j == 0:
                    r.fill_noise(noise)
                    if minibatch:
                        idx = r.indices(block)  # (block, m)
                batch = tuple(x[idx[j]] for x in data) if minibatch else data
                leaf = theta.detach().requires_grad_(True)
                loss = chain_loss(leaf, batch)
                (grad,) = torch.autograd.grad(loss, leaf)
                with torch.no_grad():
                    nxt, point, point_loss = kernel.step(t, theta[None], loss.detach()[None], grad[None],
                                                         noise[j][None], slice(c, c + 1))
                    theta = nxt[0]
                    trace[c, t] = point_loss[0]
                    slope[c, t] = torch.dot(torch.sub(point[0], theta_star), grad_star)
                    if observe is not None and t >= record.start:
                        record.trace[c, t - record.start] = observe(point[0], batch).double()
                if (t + 1) % _CHECK_EVERY == 0 and not bool(torch.isfinite(theta).all()):
                    stopped.append(f"sampling stopped at step {t + 1} of chain {c}: non-finite parameters")
                    break
        return stopped

    groups = split_evenly(C, max(1, min(C, len(models))))
    if len(groups) == 1:
        notes += run(groups[0], models[0])
        return
    with thread_pool(len(groups), "icl-llc-chains") as pool:
        for stopped in pool.map(run, groups, models):
            notes += stopped


# ----------------------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """A grid of LLC estimates at one checkpoint and the settings `pick_settings` chose.

    table: one row per estimate (step_size, localization, nbeta, role, llc_mean, llc_se, ok, flags, …); role "grid"
        for the ε sweep at a γ, "check" for the estimates at γ/2 and 2γ that test the γ-plateau;
    results: the LLCResult of each row (same order; traces for plotting);
    chosen: the base config with the picked (ε, γ, nβ), or None; index: its row; reason: why;
    on_plateau: whether halving and doubling γ left λ̂ within tolerance (False: `chosen` is a fallback).
    """

    table: pd.DataFrame
    results: list[LLCResult]
    base: LLCConfig
    chosen: LLCConfig | None
    index: int | None
    reason: str
    on_plateau: bool = False

    def repick(self, rel_tol: float = 0.1) -> Calibration:
        index, reason, plateau = pick_settings(self.table, rel_tol=rel_tol)
        chosen = None if index is None else _config_of_row(self.base, self.table.loc[index])
        return Calibration(self.table, self.results, self.base, chosen, index, reason, plateau)


def _config_of_row(base: LLCConfig, row: pd.Series) -> LLCConfig:
    nbeta = None if pd.isna(row["nbeta_setting"]) else float(row["nbeta_setting"])
    burnin = int(row["num_burnin"]) if "num_burnin" in row.index else base.num_burnin
    return base.model_copy(update={"step_size": float(row["step_size"]), "localization": float(row["localization"]),
                                   "nbeta": nbeta, "num_burnin": burnin})


def _finite(x: float) -> float:
    """x as a float, with NaN (e.g. the spread of a single chain) read as 0."""
    x = float(x)
    return x if math.isfinite(x) else 0.0


def _agree(a: pd.Series, b: pd.Series, rel_tol: float) -> bool:
    """λ̂ of two rows within rel_tol of the first's |λ̂| or within 2·√(se₁² + se₂²) (column llc_se, when present)."""
    tol = rel_tol * abs(a["llc_mean"])
    if "llc_se" in a.index:
        tol = max(tol, 2 * math.hypot(_finite(a["llc_se"]), _finite(b["llc_se"])))
    return abs(b["llc_mean"] - a["llc_mean"]) <= tol


def pick(table: pd.DataFrame, *, rel_tol: float = 0.1) -> tuple[int | None, str]:
    """Choose the largest ε inside the stable plateau of a calibration table (the ε rule, at fixed γ and nβ).

    Within each (localization, nbeta) group, sort by ε. A point is stable when its sampler raised no flag
    (`stable_rows`: "not_at_minimum", a property of w*, and "few_effective_draws", a matter of budget, do not
    count). Two grid-neighbouring stable points agree when their λ̂ differ by at most rel_tol (relative to the
    smaller ε's λ̂) or by at most twice the standard error of the difference, 2·√(se₁² + se₂²) (column `llc_se`,
    when present): a difference the chains cannot resolve is not evidence that λ̂ still moves with ε. A plateau is a
    run of grid-consecutive stable, agreeing points. The longest plateau (ties: larger ε) over all groups wins, and
    its largest ε is picked. Without any plateau of two points, the smallest stable ε is picked (the least
    discretisation bias; reason says so); with no stable point, None.
    Returns (row index | None, reason).
    """
    best: tuple[int, float, int] | None = None  # (length, ε, row index)
    stable_any: list[tuple[float, int]] = []
    stable = stable_rows(table)
    for _, group in table.groupby(["localization", "nbeta"], sort=False, dropna=False):
        group = group.sort_values("step_size")
        run: list[int] = []
        for idx, row in group.iterrows():
            if not stable[idx]:
                run = []
                continue
            stable_any.append((float(row["step_size"]), idx))
            agrees = bool(run) and _agree(table.loc[run[-1]], row, rel_tol)
            run = [*run, idx] if agrees else [idx]
            if len(run) >= 2:
                key = (len(run), float(row["step_size"]), idx)
                if best is None or key[:2] > best[:2]:
                    best = key
    if best is not None:
        length, eps, idx = best
        return idx, (f"largest ε = {eps:g} of a stable plateau of {length} grid points (no sampler flag, each λ̂ "
                     f"within {rel_tol:.0%} or two standard errors of the next smaller ε)")
    if stable_any:  # no plateau: λ̂ still moves with ε, so take the least biased (smallest) stable ε
        eps, idx = min(stable_any)
        return idx, f"no plateau of two stable, agreeing ε; fell back to the smallest stable ε = {eps:g}"
    return None, "every grid point raised a diagnostic flag; widen the grid (smaller ε) or change γ / nβ"


def _gamma_order(gammas: Sequence[float], nbeta: float, max_ratio: float) -> list[float]:
    """The order in which γ values are tried: those with γ/nβ ≤ max_ratio first, each part from the largest γ down
    (a larger γ relaxes the chain faster, 1/(εγ) steps, so it is the cheapest that can pass)."""
    gs = sorted({float(g) for g in gammas}, reverse=True)
    limit = max_ratio * nbeta * (1 + 1e-9)
    return [g for g in gs if g <= limit] + [g for g in gs if g > limit]


def _rows_at(table: pd.DataFrame, eps: float, gamma: float, nbeta: float) -> pd.DataFrame:
    close = lambda col, v: np.isclose(table[col].astype(float), v, rtol=1e-6, atol=0.0)
    return table[close("step_size", eps) & close("localization", gamma) & close("nbeta", nbeta)]


def pick_settings(table: pd.DataFrame, *, rel_tol: float = 0.1, max_ratio: float = 0.1
                  ) -> tuple[int | None, str, bool]:
    """Choose (ε, γ, nβ) from a calibration table: an ε plateau at a γ that sits on a γ-plateau.

    For each nβ (in table order) and each γ (`_gamma_order`: γ/nβ ≤ max_ratio first, largest first), `pick` chooses
    ε among that γ's grid rows. The γ is on a plateau when rows at the same ε and nβ exist for γ/2 and 2γ (role
    "check" or grid rows), are stable, and each agrees with it (`_agree`: within rel_tol or two standard errors).
    Localisation suppresses a direction of curvature h by nβh/(nβh + γ) (docs/llc.md), so λ̂ that does not move
    when γ halves or doubles no longer depends on it. The first γ that passes is chosen. Without one, the pick
    at the stationary γ nearest DEFAULT_LOCALIZATION_RATIO · nβ is returned as a fallback, with on_plateau False
    and a reason that also names the smallest stationary γ. (Not the smallest γ itself: on deep linear networks a
    weakly localised chain leaves the most singular point, and λ̂ then overshoots the learning coefficient.)
    Returns (row index | None, reason, on_plateau).
    """
    stable = stable_rows(table)
    roles = table["role"] if "role" in table.columns else pd.Series("grid", index=table.index)
    grid = table[roles == "grid"]
    stationary: list[tuple[float, float, int, str]] = []  # (γ, nβ, row, reason of its ε pick)
    tried: list[str] = []
    for nb in pd.unique(grid["nbeta"]):
        at_nb = grid[np.isclose(grid["nbeta"].astype(float), float(nb), rtol=1e-9)]
        for gamma in _gamma_order(at_nb["localization"], float(nb), max_ratio):
            rows = at_nb[np.isclose(at_nb["localization"].astype(float), gamma, rtol=1e-9)]
            idx, why = pick(rows, rel_tol=rel_tol)
            if idx is None:
                tried.append(f"γ = {gamma:.4g}: no stable ε")
                continue
            stationary.append((gamma, float(nb), idx, why))
            row = table.loc[idx]
            eps = float(row["step_size"])
            verdicts = []
            for factor in (0.5, 2.0):
                other = _rows_at(table, eps, gamma * factor, float(nb))
                if other.empty:
                    verdicts.append(f"no estimate at {factor:g}γ")
                elif not stable[other.index[0]]:
                    verdicts.append(f"{factor:g}γ flagged ({other.iloc[0]['flags']})")
                elif not _agree(row, other.iloc[0], rel_tol):
                    verdicts.append(f"{factor:g}γ gives λ̂ = {other.iloc[0]['llc_mean']:.4g} vs {row['llc_mean']:.4g}")
            if not verdicts:
                return idx, (f"γ = {gamma:.4g} (γ/nβ = {gamma / float(nb):.3g}) on a γ-plateau: λ̂ = "
                             f"{row['llc_mean']:.4g} moves by less than {rel_tol:.0%} or two standard errors when γ "
                             f"is halved or doubled; {why}"), True
            tried.append(f"γ = {gamma:.4g}: " + "; ".join(verdicts))
    if not stationary:
        counts = pd.Series([f for fl in table.get("flags", pd.Series(dtype=str)).fillna("") for f in fl.split(";")
                            if f]).value_counts()
        common = ", ".join(f"{k} ({v})" for k, v in counts.items())
        hint = ("the chains are too short to mix: raise num_draws (or num_chains)"
                if {"chains_disagree", "not_stationary"} & set(counts.index[:1]) else
                "widen the grid (smaller ε) or change γ / nβ")
        return None, f"every estimate raised a sampler flag ({common}); {hint}", False
    smallest = min(g for g, *_ in stationary)
    gamma, nb, idx, why = min(stationary, key=lambda r: abs(math.log(r[0] / (DEFAULT_LOCALIZATION_RATIO * r[1]))))
    return idx, (f"no γ-plateau within the grid ({' | '.join(tried)}); the smallest γ whose chains were stationary "
                 f"is γ = {smallest:.4g}; fell back to γ = {gamma:.4g} (γ/nβ = {gamma / nb:.3g}, the stationary γ "
                 f"nearest the validated ratio {DEFAULT_LOCALIZATION_RATIO:g}): λ̂ there still depends on γ, so it "
                 f"is not the LLC the papers mean; {why}"), False


DEFAULT_LOCALIZATION_RATIOS = (0.02, 0.01, 0.005)  # γ/nβ tried by `calibrate` (each checked at γ/2 and 2γ)


def calibrate(model: nn.Module, data: Sequence[Tensor], loss_fn: LossFn, *,
              step_sizes: Sequence[float] | None = None,
              localizations: Sequence[float] | None = None, nbetas: Sequence[float | None] | None = None,
              base: LLCConfig | None = None, seed: int = 0, params: ParamSpec = None, rel_tol: float = 0.1,
              max_burnin: int = 10_000, max_ratio: float = 0.1,
              progress: Callable[[int, int, LLCResult], None] | None = None) -> Calibration:
    """Choose ε, γ (and nβ when asked) at one checkpoint with `estimate_llc` and `pick_settings`.

    step_sizes default to DEFAULT_STEP_SIZES (1e-6 … 1e-3, half-decades); localizations default to
    DEFAULT_LOCALIZATION_RATIOS × nβ (a None entry: DEFAULT_LOCALIZATION_RATIO × nβ); nbetas default to the base
    config's single value (None means n / log n).
    For each nβ, γ is tried in `_gamma_order` (γ/nβ ≤ max_ratio first, largest first): the ε grid at that γ, then,
    at the ε that `pick` chooses, one estimate each at γ/2 and 2γ (role "check"). The first γ whose λ̂ they
    confirm is chosen and the sweep stops; otherwise every γ is tried and the fallback of `pick_settings` is
    returned with on_plateau False. Each estimate burns in for max(base.num_burnin, min_burnin(ε, γ)) steps, at
    most max(max_burnin, base.num_burnin) (such a point carries a `burnin_note`), so small εγ are not judged on
    chains whose flat directions have not relaxed; the picked config carries its burn-in. Every estimate uses the
    same seed (common random numbers), data and parameter selection. progress(i, total, result) is called after
    each estimate (total is an upper bound).
    Returns a Calibration (table, traces, chosen config).
    """
    base = base or LLCConfig()
    step_sizes = DEFAULT_STEP_SIZES if step_sizes is None else step_sizes
    nbs = list(nbetas) if nbetas is not None else [base.nbeta]
    if not step_sizes or (localizations is not None and not list(localizations)) or not nbs:
        raise ValueError("calibrate: step_sizes, localizations and nbetas must each hold at least one value")
    n = _check_data(data)[1]
    rows: list[dict[str, Any]] = []
    results: list[LLCResult] = []
    n_gammas = len(DEFAULT_LOCALIZATION_RATIOS) if localizations is None else len(list(localizations))
    total = len(nbs) * n_gammas * (len(step_sizes) + 2)

    def run(eps: float, gamma: float, nb: float | None, role: str) -> None:
        floor = base.num_burnin or 0
        burnin = min(max(floor, min_burnin(eps, gamma)), max(max_burnin, floor))
        cfg = base.model_copy(update={"step_size": eps, "localization": gamma, "nbeta": nb, "num_burnin": burnin})
        cfg = LLCConfig.model_validate(cfg.model_dump())
        res = estimate_llc(model, data, loss_fn, config=cfg, seed=seed, params=params)
        results.append(res)
        rows.append({"step_size": eps, "localization": gamma, "nbeta": res.nbeta, "nbeta_setting": nb, "role": role,
                     "num_burnin": burnin, "llc_mean": res.llc_mean, "llc_std": res.llc_std,
                     "llc_se": max(_finite(res.llc_se), _finite(res.llc_mcse)), "llc_mcse": res.llc_mcse,
                     "rhat": res.rhat, "ess": res.ess, "ok": res.ok, "flags": ";".join(res.diagnostics),
                     "init_loss": res.init_loss, "d": res.d, "llc_slope": res.llc_slope, "seconds": res.seconds})
        if progress is not None:
            progress(len(rows), max(total, len(rows)), res)

    def sweep(nb: float | None) -> bool:
        """The γ values at one nβ, largest first; True as soon as one sits on a γ-plateau."""
        nbeta = default_nbeta(n) if nb is None else float(nb)
        gammas = ([r * nbeta for r in DEFAULT_LOCALIZATION_RATIOS] if localizations is None else
                  [DEFAULT_LOCALIZATION_RATIO * nbeta if g is None else float(g) for g in localizations])
        for gamma in _gamma_order(gammas, nbeta, max_ratio):
            for eps in step_sizes:
                run(float(eps), gamma, nb, "grid")
            table = pd.DataFrame(rows)
            at = table[(table["role"] == "grid") & np.isclose(table["localization"], gamma)
                       & np.isclose(table["nbeta"], nbeta)]
            idx, _ = pick(at, rel_tol=rel_tol)
            if idx is None:
                continue
            eps = float(table.loc[idx, "step_size"])
            for factor in (0.5, 2.0):
                if _rows_at(table, eps, gamma * factor, nbeta).empty:
                    run(eps, gamma * factor, nb, "check")
            if pick_settings(pd.DataFrame(rows), rel_tol=rel_tol, max_ratio=max_ratio)[2]:
                return True
        return False

    for nb in nbs:
        if sweep(nb):
            break
    table = pd.DataFrame(rows)
    index, reason, plateau = pick_settings(table, rel_tol=rel_tol, max_ratio=max_ratio)
    chosen = None if index is None else _config_of_row(base, table.loc[index])
    return Calibration(table, results, base, chosen, index, reason, plateau)
