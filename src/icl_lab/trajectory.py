"""Essential dynamics and joint trajectory PCA: behavioural trajectories of a model over training.

Essential dynamics (ED; Hoogland et al. 2024, Eq. 7, docs/papers.md §D3)
    Fix a batch of inputs. At checkpoint t the model's outputs on that batch, concatenated, give a vector
    a_t ∈ R^F. Stack the checkpoints into A ∈ R^{T×F}, mean-centre, and take the top v principal components
    (the "essential subspace"). The developmental trajectory is the (lightly smoothed) curve γ(t) of PC
    scores; its 2-D projections γ_{i,j}(t) = (u_iᵀγ(t), u_jᵀγ(t)) are studied for geometric features:

    - a *cusp* at t0, where γ′_{i,j}(t0) = γ″_{i,j}(t0) = 0 (the curve stops and turns back);
    - a *vertex*, a point of order-4 contact with a circle, i.e. an extremum of the curvature κ; vertices are
      the cusps of the evolute (the locus of the osculating-circle centres).

    A "form" is a time at which every PC pair shows a cusp or a vertex (Carroll et al. 2025, §4.2: a form
    counts only when all PC pairs agree; Hoogland et al. §D3); forms near stage boundaries corroborate the LLC
    milestones (§D4, see :mod:`icl_lab.stages`). :meth:`EssentialDynamics.event_steps` gives the forms by
    default (`rule="all"`: every pair has a cusp or vertex within `form_window` checkpoints); `rule="union"`, the
    looser reading, gives every cusp and vertex of any pair, and a report that uses it must say so
    (:data:`FORM_RULES`).

Joint trajectory PCA (Carroll et al. 2025, §4.2, docs/papers.md §E2)
    Several runs (e.g. one per task diversity M) are evaluated on ONE shared batch (root-task sequences);
    each checkpoint gives a row f(D, w_t) ∈ R^{BK} (sequence-major, token-minor). All rows of all runs are
    stacked and one PCA is fitted on them. Idealised predictors (dMMSE_M, ridge) evaluated on the same batch
    are projected into the same axes as single points but are NOT used to fit the PCA.

Geometry follows the Timaeus ED notebooks (timaeus-research/icl): derivatives by central differences in the curve's
index, r′_t = (c_{t+1} − c_{t−1})/2, r″_t = c_{t+1} − 2c_t + c_{t−1}, curvature κ = |r′ × r″| / |r′|³,
osculating-circle centre c_t + n̂/κ; Gaussian smoothing along the trajectory with a per-index σ.

Everything here is a pure function of numpy arrays (torch tensors are accepted and converted); the figures of
these results are drawn in :mod:`icl_lab.plots` (plot_pc_pairs, plot_joint_pca).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

ArrayLike: TypeAlias = "np.ndarray | torch.Tensor | Sequence[Any]"

__all__ = [
    "PCA",
    "EssentialDynamics",
    "FORM_RULES",
    "FORM_WINDOW",
    "FormRule",
    "JointTrajectoryPCA",
    "PairFeatures",
    "curvature",
    "essential_dynamics",
    "evolute",
    "find_cusps",
    "find_forms",
    "find_vertices",
    "fit_pca",
    "joint_trajectory_pca",
    "osculating_circles",
    "prediction_matrix",
    "sigma_schedule",
    "smooth_trajectory",
    "speed",
    "to_numpy",
    "turning_angle",
]


# ----------------------------------------------------------------------------------------------------
# conversion helpers


def to_numpy(a: Any) -> np.ndarray:
    """A numpy float64 copy/view of an array, a torch tensor (any device) or a nested sequence of them."""
    if hasattr(a, "detach"):  # torch.Tensor, without importing torch
        a = a.detach().to("cpu").double().numpy()
    elif isinstance(a, list | tuple) and len(a) > 0 and hasattr(a[0], "detach"):
        a = np.stack([to_numpy(x) for x in a])
    return np.asarray(a, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------
# PCA


def prediction_matrix(preds: ArrayLike) -> np.ndarray:
    """Flatten per-checkpoint predictions into the ED / joint-PCA data matrix.

    Args:
        preds: predictions of T checkpoints on one fixed batch, an array/tensor of shape (T, B, K) or a list
            of T arrays/tensors of shape (B, K). Extra trailing axes (e.g. (T, B, K, m) for m outputs per
            position) are flattened too.

    Returns:
        (T, B*K) float64 array. Row t is f(D, w_t) in the order of Carroll et al. §4.2: sequence-major,
        token-minor (column b*K + k holds sequence b, position k), i.e. a C-order reshape.
    """
    if isinstance(preds, list | tuple):
        rows = [to_numpy(p) for p in preds]
        if not rows:
            raise ValueError("prediction_matrix: empty list of predictions")
        shapes = {r.shape for r in rows}
        if len(shapes) != 1:
            raise ValueError(f"prediction_matrix: checkpoints have different shapes {sorted(shapes)}")
        arr = np.stack(rows)
    else:
        arr = to_numpy(preds)
    if arr.ndim < 2:
        raise ValueError(f"prediction_matrix: expected (T, B, K), got shape {arr.shape}")
    return arr.reshape(arr.shape[0], -1)


@dataclass(eq=False)
class PCA:
    """A fitted principal component analysis (mean-centred, unscaled; Hoogland et al. Eq. 7).

    Attributes:
        components: (v, F) orthonormal rows u_1..u_v (the loadings), ordered by decreasing variance. Sign
            convention: the entry of largest |loading| in each row is positive (first one on ties).
        explained_variance: (v,) variance along each component, s_i² / (N − 1).
        explained_variance_ratio: (v,) s_i² / Σ_all s_j²; sums to ≤ 1.
        singular_values: (v,) singular values s_i of the centred data matrix.
        mean: (F,) the mean row that was subtracted.
        n_samples: N, the number of rows the PCA was fitted on.
    """

    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    singular_values: np.ndarray
    mean: np.ndarray
    n_samples: int

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def transform(self, Y: ArrayLike) -> np.ndarray:
        """Project rows into the essential subspace: π_v(y) = (y − mean) V_v. (..., F) → (..., v)."""
        y = to_numpy(Y)
        if y.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"PCA.transform: expected last axis {self.mean.shape[0]}, got shape {y.shape}")
        return (y - self.mean) @ self.components.T

    def inverse_transform(self, Z: ArrayLike) -> np.ndarray:
        """Map scores back to feature space: mean + z V_vᵀ. (..., v) → (..., F)."""
        return to_numpy(Z) @ self.components + self.mean


def fit_pca(A: ArrayLike, n_components: int = 3) -> PCA:
    """Fit a PCA by the SVD of the mean-centred data matrix.

    Args:
        A: (N, F) data matrix, one row per checkpoint (see :func:`prediction_matrix`).
        n_components: v, the number of components kept; 1 ≤ v ≤ min(N, F).

    Returns:
        A :class:`PCA`. Deterministic: the sign of each component is fixed so that its largest-|loading|
        entry is positive. Cost: one thin SVD, O(N·F·min(N, F)).
    """
    X = to_numpy(A)
    if X.ndim != 2:
        raise ValueError(f"fit_pca: expected a (N, F) matrix, got shape {X.shape}")
    N, F = X.shape
    if not 1 <= n_components <= min(N, F):
        raise ValueError(f"fit_pca: n_components must be in [1, min(N, F) = {min(N, F)}], got {n_components}")
    if not np.all(np.isfinite(X)):
        raise ValueError("fit_pca: data matrix contains NaN or inf")
    mean = X.mean(axis=0)
    Xc = X - mean
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    comps = vt[:n_components].copy()
    lead = np.argmax(np.abs(comps), axis=1)
    signs = np.sign(comps[np.arange(n_components), lead])
    signs[signs == 0] = 1.0
    comps *= signs[:, None]
    s2 = s**2
    total = float(s2.sum())
    ratio = s2[:n_components] / total if total > 0 else np.zeros(n_components)
    var = s2[:n_components] / (N - 1) if N > 1 else np.zeros(n_components)
    return PCA(
        components=comps,
        explained_variance=var,
        explained_variance_ratio=ratio,
        singular_values=s[:n_components].copy(),
        mean=mean,
        n_samples=N,
    )


# ----------------------------------------------------------------------------------------------------
# smoothing


def sigma_schedule(
    T: int, start: float, end: float, kind: Literal["constant", "linear", "sqrt", "log"] = "linear"
) -> np.ndarray:
    """A per-index smoothing width σ_t (in index units) growing from `start` to `end`, as in the Timaeus ED
    notebooks (timaeus-research/icl: σ linear 0.1 → 300; also sqrt and log schedules). Late checkpoints move slowly
    and noisily, so they take more smoothing than early ones. Returns (T,)."""
    if T < 1:
        raise ValueError("sigma_schedule: T must be >= 1")
    u = np.linspace(0.0, 1.0, T)
    if kind == "constant":
        return np.full(T, float(start))
    if kind == "linear":
        return start + (end - start) * u
    if kind == "sqrt":
        return start + (end - start) * np.sqrt(u)
    if kind == "log":
        if start <= 0 or end <= 0:
            raise ValueError("sigma_schedule: the 'log' schedule needs start, end > 0")
        return np.geomspace(start, end, T)
    raise ValueError(f"sigma_schedule: unknown kind {kind!r}")


def _as_sigma(sigma: float | ArrayLike, T: int) -> np.ndarray:
    s = to_numpy(sigma)
    s = np.full(T, float(s)) if s.ndim == 0 else s.reshape(-1)
    if s.shape != (T,):
        raise ValueError(f"sigma must be a scalar or have shape ({T},), got {s.shape}")
    if np.any(~np.isfinite(s)) or np.any(s < 0):
        raise ValueError("sigma must be finite and >= 0")
    return s


def _row_chunks(T: int, width: int, budget: int = 2_000_000) -> list[np.ndarray]:
    step = max(1, budget // max(width, 1))
    return [np.arange(i, min(i + step, T)) for i in range(0, T, step)]


def _kernel_rows(x: np.ndarray, sigma: np.ndarray, rows: np.ndarray, truncate: float):
    """Gaussian weights w[r, j] = exp(−(x_j − x_i)²/(2σ_i²)) for i = rows[r], cut at
    |x_j − x_i| > truncate·σ_i. σ_i = 0 gives the identity row.
    Returns (w, d) with d[r, j] = x_j − x_i; both (len(rows), T)."""
    d = x[None, :] - x[rows, None]
    s = sigma[rows, None]
    pos = s > 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        u = np.where(pos, d / np.where(pos, s, 1.0), np.where(d == 0, 0.0, np.inf))
        w = np.where(np.abs(u) <= truncate, np.exp(-0.5 * np.minimum(u * u, 1e6)), 0.0)
    return w, d


def _local_linear(
    x: np.ndarray, Y: np.ndarray, sigma: np.ndarray, truncate: float = 4.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian-weighted local linear regression of Y (T, v) on x (T,), centred at every x_i.

    Fits Y_j ≈ a_i + b_i (x_j − x_i) with weights exp(−(x_j − x_i)²/(2σ_i²)). a is a smoothed value that is
    exact for linear trends (no design bias on irregular grids or at the edges, hence no shift of features);
    b is the smoothed slope dY/dx. Returns (a, b, ok) where ok[i] is False when fewer than two points carry
    weight (then a = Y_i and b = NaN)."""
    T = x.shape[0]
    a = np.empty_like(Y)
    b = np.empty_like(Y)
    ok = np.zeros(T, dtype=bool)
    for rows in _row_chunks(T, T):
        w, d = _kernel_rows(x, sigma, rows, truncate)
        s0 = w.sum(1)
        s1 = (w * d).sum(1)
        s2 = (w * d * d).sum(1)
        t0 = w @ Y
        t1 = (w * d) @ Y
        det = s0 * s2 - s1 * s1
        good = ((w > 0).sum(1) >= 2) & (det > 1e-12 * np.maximum(s0 * s2, 1e-300))
        with np.errstate(divide="ignore", invalid="ignore"):
            aa = (s2[:, None] * t0 - s1[:, None] * t1) / det[:, None]
            bb = (s0[:, None] * t1 - s1[:, None] * t0) / det[:, None]
        a[rows] = np.where(good[:, None], aa, Y[rows])
        b[rows] = np.where(good[:, None], bb, np.nan)
        ok[rows] = good
    return a, b, ok


def smooth_trajectory(
    Z: ArrayLike,
    sigma: float | ArrayLike,
    *,
    x: ArrayLike | None = None,
    method: Literal["renormalize", "reflect", "local_linear"] = "renormalize",
    truncate: float = 4.0,
) -> np.ndarray:
    """Gaussian smoothing of a trajectory along time, with a per-index width σ_t (Timaeus ED smoothing).

    Output t is Σ_j w_tj Z_j / Σ_j w_tj with w_tj = exp(−(x_j − x_t)²/(2σ_t²)), |x_j − x_t| ≤ truncate·σ_t.
    The kernel is centred on every output point, so features are never shifted in time.

    Args:
        Z: (T,) or (T, v) trajectory (e.g. PC scores), rows in time order.
        sigma: width, a scalar or a (T,) array (see :func:`sigma_schedule`); units of `x` (index units when
            `x` is None). σ = 0 leaves the point unchanged, so σ → 0 is the identity.
        x: optional (T,) increasing time coordinate (e.g. log(step + 1)) in which σ is measured.
        method: edge handling. "renormalize" (default; as in Timaeus): the kernel is truncated at the ends of
            the curve and renormalised. "reflect": the curve is mirrored at its ends (half-sample symmetric,
            index coordinates only). "local_linear": a Gaussian-weighted local linear fit, unbiased for linear
            trends at the edges and on irregular `x` grids.
        truncate: the kernel is cut at this many σ.

    Returns:
        Array of the shape of `Z`.
    """
    Y = to_numpy(Z)
    squeeze = Y.ndim == 1
    if squeeze:
        Y = Y[:, None]
    if Y.ndim != 2:
        raise ValueError(f"smooth_trajectory: expected (T,) or (T, v), got shape {Y.shape}")
    T = Y.shape[0]
    s = _as_sigma(sigma, T)
    if T == 0 or np.all(s == 0):
        out = Y.copy()
        return out[:, 0] if squeeze else out
    if x is None:
        xx = np.arange(T, dtype=np.float64)
    else:
        xx = to_numpy(x).reshape(-1)
        if xx.shape != (T,) or np.any(np.diff(xx) <= 0):
            raise ValueError("smooth_trajectory: x must be a strictly increasing (T,) array")
    if method == "renormalize":
        out = np.empty_like(Y)
        for rows in _row_chunks(T, T):
            w, _ = _kernel_rows(xx, s, rows, truncate)
            out[rows] = (w @ Y) / w.sum(1, keepdims=True)
    elif method == "local_linear":
        out, _, _ = _local_linear(xx, Y, s, truncate)
    elif method == "reflect":
        if x is not None:
            raise ValueError("smooth_trajectory: method='reflect' works in index coordinates only (x=None)")
        R = int(np.ceil(truncate * s.max()))
        offsets = np.arange(-R, R + 1)
        out = np.empty_like(Y)
        for rows in _row_chunks(T, 2 * R + 1):
            idx = rows[:, None] + offsets[None, :]
            period = 2 * T
            m = np.mod(idx, period)
            idx = np.where(m >= T, period - 1 - m, m)
            sr = s[rows, None]
            pos = sr > 0
            with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
                u = np.where(
                    pos, offsets[None, :] / np.where(pos, sr, 1.0), np.where(offsets == 0, 0.0, np.inf)
                )
                w = np.where(np.abs(u) <= truncate, np.exp(-0.5 * np.minimum(u * u, 1e6)), 0.0)
            out[rows] = np.einsum("ro,rov->rv", w, Y[idx]) / w.sum(1, keepdims=True)
    else:
        raise ValueError(f"smooth_trajectory: unknown method {method!r}")
    return out[:, 0] if squeeze else out


# ----------------------------------------------------------------------------------------------------
# differential geometry of sampled curves


def _curve(Z: ArrayLike, min_len: int = 3) -> np.ndarray:
    c = to_numpy(Z)
    if c.ndim != 2 or c.shape[0] < min_len:
        raise ValueError(f"expected a (T, d) curve with T >= {min_len}, got shape {c.shape}")
    return c


def _derivatives(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central differences in the index: r′_t = (c_{t+1} − c_{t−1})/2, r″_t = c_{t+1} − 2c_t + c_{t−1};
    second-order one-sided stencils at the two ends. (T, d) → ((T, d), (T, d))."""
    T = c.shape[0]
    d1 = np.empty_like(c)
    d2 = np.empty_like(c)
    d1[1:-1] = (c[2:] - c[:-2]) / 2.0
    d1[0] = (-3.0 * c[0] + 4.0 * c[1] - c[2]) / 2.0
    d1[-1] = (3.0 * c[-1] - 4.0 * c[-2] + c[-3]) / 2.0
    d2[1:-1] = c[2:] - 2.0 * c[1:-1] + c[:-2]
    if T >= 4:
        d2[0] = 2.0 * c[0] - 5.0 * c[1] + 4.0 * c[2] - c[3]
        d2[-1] = 2.0 * c[-1] - 5.0 * c[-2] + 4.0 * c[-3] - c[-4]
    else:
        d2[0] = d2[1]
        d2[-1] = d2[-2]
    return d1, d2


def speed(Z: ArrayLike) -> np.ndarray:
    """|r′_t| by central differences in the index. (T, d) → (T,)."""
    d1, _ = _derivatives(_curve(Z))
    return np.linalg.norm(d1, axis=1)


def curvature(Z: ArrayLike, *, signed: bool = False) -> np.ndarray:
    """Curvature of a sampled curve, κ = |r′ × r″| / |r′|³ (Timaeus `get_osculating_circle`).

    Args:
        Z: (T, d) curve, d ≥ 2 (for d > 2, |r′ × r″| = sqrt(|r′|²|r″|² − (r′·r″)²)).
        signed: for d = 2 only, return (r′ × r″)/|r′|³ (positive when the curve turns counter-clockwise);
            vertices are the extrema of the signed curvature.

    Returns:
        (T,) curvature; inf where the curve stops (|r′| = 0) while r″ ≠ 0, NaN where both vanish.
    """
    c = _curve(Z)
    d1, d2 = _derivatives(c)
    sp = np.linalg.norm(d1, axis=1)
    if c.shape[1] == 2:
        cross = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
        num = cross if signed else np.abs(cross)
    else:
        if signed:
            raise ValueError("curvature: signed curvature needs a 2-D curve")
        g = (sp**2) * np.sum(d2 * d2, axis=1) - np.sum(d1 * d2, axis=1) ** 2
        num = np.sqrt(np.maximum(g, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / sp**3


def osculating_circles(Z2: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Osculating circles of a planar curve by central differences (Timaeus / devinterp `forms.py`).

    Centre = c_t + n̂/κ = c_t + (|r′|² / (r′ × r″)) · rot90(r′), radius = 1/κ.

    Args:
        Z2: (T, 2) curve.

    Returns:
        centres (T, 2) (NaN where the curve is locally straight: κ = 0, or radius > 1e12 step lengths) and
        radii (T,) (inf there).
        The centres trace the evolute.
    """
    c = _curve(Z2)
    if c.shape[1] != 2:
        raise ValueError(f"osculating_circles: expected a (T, 2) curve, got shape {c.shape}")
    d1, d2 = _derivatives(c)
    cross = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    sp2 = np.sum(d1 * d1, axis=1)
    # rounding noise on a straight stretch: radius above 1e12 step lengths counts as straight
    cross = np.where(np.abs(cross) <= 1e-12 * sp2, 0.0, cross)
    normal = np.stack([-d1[:, 1], d1[:, 0]], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(cross != 0, sp2 / np.where(cross != 0, cross, 1.0), np.nan)
        radii = np.where(cross != 0, sp2**1.5 / np.abs(np.where(cross != 0, cross, 1.0)), np.inf)
    centres = c + scale[:, None] * normal
    return centres, radii


def evolute(Z2: ArrayLike) -> np.ndarray:
    """The evolute (locus of osculating-circle centres) of a planar curve. (T, 2) → (T, 2)."""
    return osculating_circles(Z2)[0]


def turning_angle(Z: ArrayLike, window: int = 3) -> np.ndarray:
    """Angle in degrees between the incoming chord c_t − c_{t−w} and the outgoing chord c_{t+w} − c_t.

    0° = going straight on, 180° = reversing. NaN within `window` of the ends or where a chord is zero.
    (T, d) → (T,)."""
    c = _curve(Z, min_len=1)
    T = c.shape[0]
    out = np.full(T, np.nan)
    if T < 2 * window + 1:
        return out
    a = c[window:-window] - c[: T - 2 * window]
    b = c[2 * window :] - c[window:-window]
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.sum(a * b, axis=1) / (na * nb)
    ang = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    ang[(na == 0) | (nb == 0)] = np.nan
    out[window:-window] = ang
    return out


def _merge_close(idx: np.ndarray, score: np.ndarray, gap: int) -> np.ndarray:
    """Group sorted indices closer than `gap` and keep the one with the lowest score in each group."""
    if idx.size == 0:
        return idx.astype(np.int64)
    keep: list[int] = []
    group = [int(idx[0])]
    for i in idx[1:]:
        if i - group[-1] <= gap:
            group.append(int(i))
        else:
            keep.append(min(group, key=lambda j: score[j]))
            group = [int(i)]
    keep.append(min(group, key=lambda j: score[j]))
    return np.asarray(keep, dtype=np.int64)


def find_cusps(
    Z: ArrayLike,
    *,
    window: int = 3,
    max_speed_ratio: float = 0.2,
    min_turn_deg: float = 90.0,
) -> np.ndarray:
    """Cusps of a sampled curve: points where it (nearly) stops and turns back, γ′ ≈ γ″ ≈ 0 (Hoogland §D3).

    A point t (at least `window` from either end) is a cusp when all of:
      1. the speed |r′_t| (central differences) is a local minimum (≤ both neighbours);
      2. it is near zero relative to its surroundings: |r′_t| ≤ max_speed_ratio · max |r′| over t ± window
         (a local contrast, so slow late-training stretches are not all flagged);
      3. the direction turns sharply: the angle between the chords c_t − c_{t−window} and
         c_{t+window} − c_t is at least `min_turn_deg`.
    Detections within `window` of each other are merged (the slowest point is kept).

    Defaults: window 3 (chords over 3 checkpoints — long enough to see the turn through light noise, short
    enough not to bridge two events); speed ratio 0.2; turn ≥ 90° (a cusp reverses direction, 180° in the
    limit; a smooth bend of a regular curve turns by far less over 2·window points).

    Args:
        Z: (T, d) curve (a PC pair, d = 2; any d works). Index parameterisation: pass the curve in time order.

    Returns:
        Sorted int64 indices of the cusps.
    """
    c = _curve(Z)
    T = c.shape[0]
    if T < 2 * window + 1:
        return np.zeros(0, dtype=np.int64)
    sp = speed(c)
    ang = turning_angle(c, window)
    cand = []
    for t in range(window, T - window):
        if sp[t] > sp[t - 1] or sp[t] > sp[t + 1]:
            continue
        local = sp[t - window : t + window + 1].max()
        if local <= 0 or sp[t] > max_speed_ratio * local:
            continue
        if np.isnan(ang[t]) or ang[t] < min_turn_deg:
            continue
        cand.append(t)
    return _merge_close(np.asarray(cand, dtype=np.int64), sp, window)


def _prominence(y: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """Topographic prominence of local maxima `peaks` of y (as scipy.signal.peak_prominences)."""
    prom = np.empty(peaks.size)
    for n, i in enumerate(peaks):
        left = y[:i][::-1]
        higher = np.nonzero(left > y[i])[0]
        lmin = left[: higher[0]].min() if higher.size else (left.min() if left.size else y[i])
        right = y[i + 1 :]
        higher = np.nonzero(right > y[i])[0]
        rmin = right[: higher[0]].min() if higher.size else (right.min() if right.size else y[i])
        prom[n] = y[i] - max(lmin, rmin)
    return prom


def find_vertices(
    Z2: ArrayLike,
    *,
    min_prominence: float = 0.5,
    order: int | np.ndarray = 3,
    edge: int = 2,
    exclude: Sequence[int] | np.ndarray | None = None,
    exclude_window: int = 3,
) -> np.ndarray:
    """Vertices of a planar curve: local extrema of the signed curvature κ (= cusps of the evolute; §D3).

    Maxima and minima of κ are found with their topographic prominence (how far κ must drop/rise before a more
    extreme value is reached), and kept when the prominence is at least `min_prominence · median |κ|`, which
    makes the threshold independent of the curve's scale and filters the small ripples that noise leaves in κ.
    Signed κ is used so that inflection points (κ crossing 0) are not counted as vertices.

    Args:
        Z2: (T, 2) curve in time order.
        min_prominence: relative prominence threshold (default 0.5: κ must change by half its typical value).
        order: an extremum must be the most extreme value over ± `order` points (default 3; or a (T,) array),
            which rejects the short ripples that noise leaves in κ; real vertices are extrema over many
            checkpoints. After Gaussian smoothing of width σ the ripples are a few σ long, so
            :func:`essential_dynamics` uses max(3, ⌈2σ_t⌉).
        edge: ignore this many points at each end (one-sided differences there are less accurate).
        exclude: indices to ignore (typically the cusps, where κ blows up), each with ± `exclude_window`.

    Returns:
        Sorted int64 indices of the vertices.
    """
    c = _curve(Z2)
    if c.shape[1] != 2:
        raise ValueError(f"find_vertices: expected a (T, 2) curve, got shape {c.shape}")
    k = curvature(c, signed=True)
    T = k.size
    orders = np.broadcast_to(np.asarray(order, dtype=np.int64), (T,))
    valid = np.isfinite(k)
    if exclude is not None:
        for e in np.asarray(exclude, dtype=np.int64).reshape(-1):
            valid[max(0, e - exclude_window) : e + exclude_window + 1] = False
    finite = k[valid]
    if finite.size < 3:
        return np.zeros(0, dtype=np.int64)
    scale = float(np.median(np.abs(finite)))
    if scale == 0:
        return np.zeros(0, dtype=np.int64)
    # invalid points split the curve; fill them with the nearest valid value so they are never extrema
    kf = k.copy()
    bad = ~valid
    if bad.any():
        good_idx = np.nonzero(valid)[0]
        pos = np.clip(np.searchsorted(good_idx, np.nonzero(bad)[0]), 0, good_idx.size - 1)
        kf[bad] = k[good_idx[pos]]
    found: list[int] = []
    for y in (kf, -kf):
        inner = np.arange(max(edge, 1), T - max(edge, 1))
        is_peak = (y[inner] > y[inner - 1]) & (y[inner] >= y[inner + 1]) & valid[inner]
        peaks = inner[is_peak]
        # extreme over ± order points, not just the neighbours
        peaks = np.array(
            [p for p in peaks if y[p] >= y[max(0, p - orders[p]) : p + orders[p] + 1].max()], dtype=np.int64
        )
        if peaks.size:
            prom = _prominence(y, peaks)
            found.extend(int(p) for p in peaks[prom >= min_prominence * scale])
    return np.asarray(sorted(found), dtype=np.int64)


# ----------------------------------------------------------------------------------------------------
# essential dynamics


FormRule = Literal["all", "union"]
# A form needs every PC pair to show a cusp or vertex within FORM_WINDOW checkpoints of each other: the window of
# `find_cusps` (3), so that the same event, found one or two checkpoints apart in two pairs (smoothing moves it),
# counts once. Fixed here, before any study used it.
FORM_WINDOW = 3
FORM_RULES: dict[str, str] = {
    "all": "a form is a time at which all {pairs} PC pairs show a cusp or vertex within {window} checkpoints "
           "(Carroll et al. §4.2, the paper's rule)",
    "union": "every cusp and vertex of any of the {pairs} PC pairs counts (the looser union; not the paper's rule)",
}


def find_forms(features: Mapping[tuple[int, int], Any], rule: FormRule = "all",
               window: int = FORM_WINDOW) -> np.ndarray:
    """Checkpoint indices of the ED forms from per-pair cusps and vertices (docs/papers.md §D3, §E2).

    Args:
        features: {(i, j): PairFeatures} (cusps, vertices: index arrays), one entry per PC pair.
        rule: "all": a form is where every pair has an event (cusp or vertex) within `window` indices: each event
            index e of any pair with an event of every pair in [e − window, e + window] is a candidate, candidates
            closer than `window` are grouped, and each group gives one form at its median (rounded down to a
            candidate); "union": every event index of every pair (sorted, unique).
        window: ≥ 0, in checkpoint-index units.
    Returns:
        (F,) sorted int64 indices.
    """
    if rule not in FORM_RULES:
        raise ValueError(f"form rule must be one of {', '.join(FORM_RULES)}, got {rule!r}")
    if window < 0:
        raise ValueError(f"form window must be >= 0, got {window}")
    per_pair = [np.unique(np.concatenate([np.asarray(f.cusps), np.asarray(f.vertices)]).astype(np.int64))
                for f in features.values()]
    if not per_pair:
        return np.zeros(0, dtype=np.int64)
    events = np.unique(np.concatenate(per_pair))
    if rule == "union":
        return events
    cand = np.array([e for e in events if all(p.size and np.abs(p - e).min() <= window for p in per_pair)],
                    dtype=np.int64)
    if cand.size == 0:
        return cand
    groups = np.split(cand, np.nonzero(np.diff(cand) > window)[0] + 1)
    return np.array([g[(g.size - 1) // 2] for g in groups], dtype=np.int64)


@dataclass(eq=False)
class PairFeatures:
    """Cusps and vertices of one smoothed PC-pair curve γ_{i,j} (indices into the checkpoint axis)."""

    pcs: tuple[int, int]
    cusps: np.ndarray
    vertices: np.ndarray


@dataclass(eq=False)
class EssentialDynamics:
    """Result of :func:`essential_dynamics` (Hoogland et al. Eq. 7).

    Attributes:
        steps: (T,) training steps of the checkpoints.
        pca: the fitted :class:`PCA` (components (v, F), explained variance, mean).
        scores: (T, v) raw PC scores π(a_t).
        smoothed: (T, v) the developmental trajectory γ(t), scores smoothed along time.
        sigma: (T,) the smoothing width used, in index units.
        features: {(i, j): PairFeatures} for every PC pair i < j (0-based), found on `smoothed`.
    """

    steps: np.ndarray
    pca: PCA
    scores: np.ndarray
    smoothed: np.ndarray
    sigma: np.ndarray
    features: dict[tuple[int, int], PairFeatures] = field(default_factory=dict)

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return self.pca.explained_variance_ratio

    def cusp_steps(self, i: int, j: int) -> np.ndarray:
        return self.steps[self.features[(i, j)].cusps]

    def vertex_steps(self, i: int, j: int) -> np.ndarray:
        return self.steps[self.features[(i, j)].vertices]

    def event_steps(self, rule: FormRule = "all", window: int = FORM_WINDOW) -> np.ndarray:
        """Steps of the ED forms (for `stages.cross_check`), sorted (see :func:`find_forms`).

        rule "all" (default, the paper's): times at which every PC pair has a cusp or vertex within `window`
        checkpoints; "union" (looser, name it in a report): every cusp and vertex of any pair."""
        idx = find_forms(self.features, rule, window)
        return self.steps[idx] if idx.size else np.zeros(0)

    def describe_rule(self, rule: FormRule = "all", window: int = FORM_WINDOW) -> str:
        """One sentence naming the form rule, for reports."""
        return FORM_RULES[rule].format(window=window, pairs=len(self.features))


def essential_dynamics(
    preds: ArrayLike,
    steps: ArrayLike,
    n_components: int = 3,
    sigma: float | ArrayLike = 1.0,
    *,
    smooth_method: Literal["renormalize", "reflect", "local_linear"] = "renormalize",
    cusp_kwargs: Mapping[str, Any] | None = None,
    vertex_kwargs: Mapping[str, Any] | None = None,
) -> EssentialDynamics:
    """Essential dynamics of one run (Hoogland et al. 2024, Eq. 7; docs/papers.md §D3).

    Args:
        preds: (T, B, K) predictions of T checkpoints on one fixed batch (or a list of (B, K)); see
            :func:`prediction_matrix`.
        steps: (T,) increasing training steps of the checkpoints.
        n_components: v, number of PCs kept (the paper plots 3).
        sigma: smoothing width in checkpoint-index units, scalar or (T,) (e.g. :func:`sigma_schedule`).
            Default 1.0: light smoothing that removes checkpoint-to-checkpoint jitter without rounding off
            cusps; Timaeus used up to hundreds of indices on 5,000-checkpoint runs.
        smooth_method: edge handling of :func:`smooth_trajectory`.
        cusp_kwargs, vertex_kwargs: passed to :func:`find_cusps` / :func:`find_vertices` (vertex `order`
            defaults to max(3, ⌈2σ_t⌉) so that noise ripples left by the smoothing are not counted).

    Returns:
        :class:`EssentialDynamics` with the PCA, raw and smoothed scores and cusps/vertices per PC pair
        (vertices within the cusp window of a cusp are excluded, since κ blows up there).
    """
    A = prediction_matrix(preds)
    st = to_numpy(steps).reshape(-1)
    if st.shape[0] != A.shape[0]:
        raise ValueError(f"essential_dynamics: {A.shape[0]} checkpoints but {st.shape[0]} steps")
    if np.any(np.diff(st) <= 0):
        raise ValueError("essential_dynamics: steps must be strictly increasing")
    pca = fit_pca(A, n_components)
    scores = pca.transform(A)
    s = _as_sigma(sigma, A.shape[0])
    smoothed = smooth_trajectory(scores, s, method=smooth_method)
    ck = dict(cusp_kwargs or {})
    vk = dict(vertex_kwargs or {})
    vk.setdefault("exclude_window", int(ck.get("window", 3)))
    vk.setdefault("order", np.maximum(3, np.ceil(2.0 * s)).astype(np.int64))
    feats: dict[tuple[int, int], PairFeatures] = {}
    if A.shape[0] >= 3:
        for i in range(n_components):
            for j in range(i + 1, n_components):
                z = smoothed[:, [i, j]]
                cusps = find_cusps(z, **ck)
                vertices = find_vertices(z, exclude=cusps, **vk)
                feats[(i, j)] = PairFeatures((i, j), cusps, vertices)
    return EssentialDynamics(st, pca, scores, smoothed, s, feats)


# ----------------------------------------------------------------------------------------------------
# joint trajectory PCA


@dataclass(eq=False)
class JointTrajectoryPCA:
    """Result of :func:`joint_trajectory_pca` (Carroll et al. 2025, §4.2).

    Attributes:
        pca: the PCA fitted on the stacked checkpoint rows of all runs (references excluded).
        curves: {run: (T_r, v)} raw per-run curves γ_M(t) = π_v(f(D, w_t^M)).
        smoothed: {run: (T_r, v)} the same, smoothed along time (equal to `curves` when σ = 0).
        steps: {run: (T_r,)} checkpoint steps (0..T_r−1 when not given).
        references: {name: (v,)} projections of the idealised predictors (e.g. dMMSE_M, ridge).
    """

    pca: PCA
    curves: dict[str, np.ndarray]
    smoothed: dict[str, np.ndarray]
    steps: dict[str, np.ndarray]
    references: dict[str, np.ndarray]

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return self.pca.explained_variance_ratio


def joint_trajectory_pca(
    preds_by_run: Mapping[str, ArrayLike],
    references: Mapping[str, ArrayLike] | None = None,
    n_components: int = 2,
    *,
    steps_by_run: Mapping[str, ArrayLike] | None = None,
    sigma: float = 0.0,
) -> JointTrajectoryPCA:
    """Joint trajectory PCA of several runs on one shared batch (Carroll et al. 2025 §4.2; docs/papers.md §E2).

    Args:
        preds_by_run: {run name: (T_r, B, K)} predictions of each run's checkpoints on the SAME batch (e.g.
            B root-task sequences). Rows are flattened sequence-major, token-minor and stacked over runs into
            F ∈ R^{(Σ T_r) × BK}; one mean-centred PCA is fitted on F.
        references: {name: (B, K)} predictions of idealised predictors (dMMSE_M, ridge) on that batch; they
            are projected into the same axes as points and are NOT used in fitting.
        n_components: v (the paper uses 2; its appendix 4).
        steps_by_run: optional {run name: (T_r,)} checkpoint steps, for plots and smoothing order.
        sigma: light Gaussian smoothing of each curve along its index (0 = raw; Carroll et al. plot lightly
            smoothed curves).

    Returns:
        :class:`JointTrajectoryPCA`.
    """
    if not preds_by_run:
        raise ValueError("joint_trajectory_pca: no runs given")
    mats = {name: prediction_matrix(p) for name, p in preds_by_run.items()}
    widths = {m.shape[1] for m in mats.values()}
    if len(widths) != 1:
        raise ValueError(f"joint_trajectory_pca: runs were evaluated on batches of different sizes {widths}")
    F = widths.pop()
    pca = fit_pca(np.concatenate(list(mats.values()), axis=0), n_components)
    curves = {name: pca.transform(m) for name, m in mats.items()}
    smoothed = {name: smooth_trajectory(c, sigma) if sigma > 0 else c.copy() for name, c in curves.items()}
    steps: dict[str, np.ndarray] = {}
    for name, m in mats.items():
        if steps_by_run is not None and name in steps_by_run:
            st = to_numpy(steps_by_run[name]).reshape(-1)
            if st.shape[0] != m.shape[0]:
                raise ValueError(
                    f"joint_trajectory_pca: run {name!r} has {m.shape[0]} rows but {st.shape[0]} steps"
                )
            steps[name] = st
        else:
            steps[name] = np.arange(m.shape[0], dtype=np.float64)
    refs: dict[str, np.ndarray] = {}
    for name, r in (references or {}).items():
        v = to_numpy(r).reshape(-1)
        if v.shape[0] != F:
            raise ValueError(
                f"joint_trajectory_pca: reference {name!r} has {v.shape[0]} entries, runs have {F}"
            )
        refs[name] = pca.transform(v)
    return JointTrajectoryPCA(pca, curves, smoothed, steps, refs)
