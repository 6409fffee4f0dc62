"""Essential dynamics and joint trajectory PCA (icl_lab.trajectory): closed forms and slow references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl_lab import plots
from icl_lab import trajectory as tr

# ----------------------------------------------------------------------------------------- data matrix


def test_prediction_matrix_is_sequence_major_token_minor():
    T, B, K = 3, 4, 5
    preds = np.arange(T * B * K, dtype=float).reshape(T, B, K)
    A = tr.prediction_matrix(preds)
    assert A.shape == (T, B * K)
    for t in range(T):
        for b in range(B):
            for k in range(K):
                assert A[t, b * K + k] == preds[t, b, k]
    np.testing.assert_array_equal(tr.prediction_matrix(list(preds)), A)


def test_prediction_matrix_accepts_torch_and_rejects_ragged():
    preds = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(tr.prediction_matrix(preds), preds.double().numpy().reshape(2, 12))
    np.testing.assert_allclose(
        tr.prediction_matrix([p for p in preds]), preds.double().numpy().reshape(2, 12)
    )
    with pytest.raises(ValueError, match="different shapes"):
        tr.prediction_matrix([np.zeros((3, 4)), np.zeros((3, 5))])


# ------------------------------------------------------------------------------------------------- PCA


def _plane_data(rng, N=40, F=6):
    basis, _ = np.linalg.qr(rng.normal(size=(F, 2)))  # (F, 2) orthonormal columns
    coeffs = rng.normal(size=(N, 2)) * np.array([3.0, 1.0])
    offset = rng.normal(size=F)
    return coeffs @ basis.T + offset, basis, offset


def test_pca_recovers_a_known_plane_and_matches_numpy_svd():
    rng = np.random.default_rng(0)
    X, basis, offset = _plane_data(rng)
    pca = tr.fit_pca(X, 2)
    # the fitted components span the plane: equal orthogonal projectors
    np.testing.assert_allclose(pca.components.T @ pca.components, basis @ basis.T, atol=1e-10)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(2), atol=1e-12)
    # all variance lies in the plane
    np.testing.assert_allclose(pca.explained_variance_ratio.sum(), 1.0, atol=1e-12)
    assert np.all(np.diff(pca.explained_variance_ratio) <= 0)
    # singular values / variances against a direct SVD of the centred matrix
    s = np.linalg.svd(X - X.mean(0), compute_uv=False)
    np.testing.assert_allclose(pca.singular_values, s[:2], rtol=1e-10)
    np.testing.assert_allclose(pca.explained_variance, s[:2] ** 2 / (len(X) - 1), rtol=1e-10)
    np.testing.assert_allclose(pca.explained_variance, np.var(pca.transform(X), axis=0, ddof=1), rtol=1e-10)
    # the mean projects to 0 and points on the plane are reconstructed exactly
    np.testing.assert_allclose(pca.transform(X.mean(0)), 0.0, atol=1e-12)
    np.testing.assert_allclose(pca.inverse_transform(pca.transform(X)), X, atol=1e-10)


def test_pca_explained_variance_of_noisy_data_sums_below_one_and_signs_are_fixed():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 8)) * np.arange(8, 0, -1)
    pca = tr.fit_pca(X, 3)
    assert 0 < pca.explained_variance_ratio.sum() < 1
    lead = pca.components[np.arange(3), np.argmax(np.abs(pca.components), axis=1)]
    assert np.all(lead > 0)
    # deterministic whatever the row order (SVD signs alone are arbitrary)
    pca2 = tr.fit_pca(X[::-1], 3)
    np.testing.assert_allclose(pca2.components, pca.components, atol=1e-10)
    with pytest.raises(ValueError):
        tr.fit_pca(X, 9)


# ------------------------------------------------------------------------------------------- smoothing


def _slow_smooth(Z, sigma):
    """Direct loop over output points: renormalised, truncated Gaussian with per-index σ."""
    T = len(Z)
    out = np.empty_like(Z)
    for i in range(T):
        if sigma[i] == 0:
            out[i] = Z[i]
            continue
        num, den = 0.0, 0.0
        for j in range(T):
            u = (j - i) / sigma[i]
            if abs(u) <= 4.0:
                w = np.exp(-0.5 * u * u)
                num = num + w * Z[j]
                den += w
        out[i] = num / den
    return out


def test_smoothing_matches_slow_loop_with_variable_sigma():
    rng = np.random.default_rng(2)
    Z = rng.normal(size=(60, 2))
    sigma = tr.sigma_schedule(60, 0.5, 6.0, "sqrt")
    np.testing.assert_allclose(tr.smooth_trajectory(Z, sigma), _slow_smooth(Z, sigma), atol=1e-12)


def test_reflect_mode_matches_scipy_gaussian_filter():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(3)
    z = rng.normal(size=50)
    for s in (0.75, 2.0, 30.0):  # truncate·σ integral (scipy rounds the radius); 30 > T: repeated reflection
        ref = ndimage.gaussian_filter1d(z, s, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(tr.smooth_trajectory(z, s, method="reflect"), ref, atol=1e-12)


@pytest.mark.parametrize("method", ["renormalize", "reflect", "local_linear"])
def test_smoothing_identity_constant_and_no_shift(method):
    rng = np.random.default_rng(4)
    Z = rng.normal(size=(80, 3))
    np.testing.assert_array_equal(tr.smooth_trajectory(Z, 0.0, method=method), Z)
    np.testing.assert_allclose(tr.smooth_trajectory(Z, 1e-3, method=method), Z, atol=1e-12)
    sig = np.where(np.arange(80) % 2 == 0, 0.0, 3.0)  # σ = 0 at some points leaves those points unchanged
    np.testing.assert_array_equal(tr.smooth_trajectory(Z, sig, method=method)[::2], Z[::2])
    const = np.full((80, 2), 1.7)
    np.testing.assert_allclose(
        tr.smooth_trajectory(const, tr.sigma_schedule(80, 1, 20), method=method), const
    )
    t = np.arange(80)
    for centre in (20, 40, 63):
        bump = np.exp(-0.5 * ((t - centre) / 4.0) ** 2)
        assert np.argmax(tr.smooth_trajectory(bump, 3.0, method=method)) == centre


def test_local_linear_is_exact_for_linear_trends_on_irregular_grids():
    x = np.log1p(np.unique(np.round(np.geomspace(1, 1e4, 40))))
    y = np.stack([2.0 * x - 1.0, -0.5 * x], axis=1)
    np.testing.assert_allclose(tr.smooth_trajectory(y, 0.5, x=x, method="local_linear"), y, atol=1e-10)
    # the plain renormalised kernel is biased at the ends, which is why local_linear exists
    assert np.abs(tr.smooth_trajectory(y, 0.5, x=x)[-1] - y[-1]).max() > 1e-2


# -------------------------------------------------------------------------------------------- geometry


def test_osculating_circle_of_a_circle_is_the_circle():
    t = np.linspace(0.0, 1.5 * np.pi, 300)
    c = np.stack([3.0 + 2.0 * np.cos(t), -1.0 + 2.0 * np.sin(t)], axis=1)
    centres, radii = tr.osculating_circles(c)
    np.testing.assert_allclose(centres, np.tile([3.0, -1.0], (300, 1)), atol=2e-4)
    np.testing.assert_allclose(radii, 2.0, rtol=1e-4)
    np.testing.assert_allclose(tr.curvature(c), 0.5, rtol=1e-4)
    np.testing.assert_allclose(tr.curvature(c[::-1], signed=True), -0.5, rtol=1e-4)  # clockwise
    # the same circle embedded in 3-D has the same curvature
    c3 = (
        np.concatenate([c, np.zeros((300, 1))], axis=1)
        @ np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    )
    np.testing.assert_allclose(tr.curvature(c3), 0.5, rtol=1e-4)


def test_curvature_closed_forms_parabola_and_line():
    x = np.linspace(-1, 1, 201)
    k = tr.curvature(np.stack([x, x**2], axis=1))
    np.testing.assert_allclose(k, 2.0 / (1 + 4 * x**2) ** 1.5, rtol=1e-3)
    centres, radii = tr.osculating_circles(np.stack([x, 3 * x + 1], axis=1))
    assert np.all(np.isinf(radii)) and np.all(np.isnan(centres))


def _semicubical(n=101, shift=0.0):
    t = (np.arange(n) - n // 2 + shift) * 0.02
    return t, np.stack([t**2, t**3], axis=1)


def _ellipse(n=400, a=2.0, b=1.0):
    t = np.linspace(-np.pi / 4 - 0.3, 7 * np.pi / 4 + 0.3, n, endpoint=False)
    return t, np.stack([a * np.cos(t), b * np.sin(t)], axis=1)


def test_cusp_of_the_semicubical_parabola_is_found():
    t, z = _semicubical()
    np.testing.assert_array_equal(tr.find_cusps(z), [50])
    t, z = _semicubical(shift=0.5)  # t = 0 falls between two samples
    (i,) = tr.find_cusps(z)
    assert abs(t[i]) <= 0.02
    # a rotated, scaled copy has the same cusp; a smooth curve has none
    R = np.array([[np.cos(1.0), -np.sin(1.0)], [np.sin(1.0), np.cos(1.0)]])
    (j,) = tr.find_cusps(5.0 * z @ R.T)
    assert abs(j - i) <= 1  # two equally slow samples straddle the cusp
    assert tr.find_cusps(_ellipse()[1]).size == 0


def test_ellipse_has_four_vertices_at_the_axis_ends():
    t, z = _ellipse()
    v = tr.find_vertices(z)
    expected = np.array([0.0, np.pi / 2, np.pi, 3 * np.pi / 2])
    assert v.size == 4
    np.testing.assert_allclose(t[v], expected, atol=0.02)
    # vertices are the cusps of the evolute
    ev = tr.find_cusps(tr.evolute(z))
    assert ev.size == 4 and np.abs(ev - v).max() <= 1
    # a circle has constant curvature: no vertices
    s = np.linspace(0, 5, 300)
    assert tr.find_vertices(np.stack([np.cos(s), np.sin(s)], axis=1)).size == 0


def test_vertices_survive_noise_after_smoothing():
    t, z = _ellipse()
    noisy = z + np.random.default_rng(5).normal(0, 0.003, z.shape)
    v = tr.find_vertices(tr.smooth_trajectory(noisy, 8.0))
    assert v.size == 4
    np.testing.assert_allclose(t[v], [0.0, np.pi / 2, np.pi, 3 * np.pi / 2], atol=0.15)


# ---------------------------------------------------------------------------------- essential dynamics


def _embed(path, B=6, K=4, seed=0):
    """Predictions (T, B, K) whose trajectory is `path` (T, d) in a random d-plane of R^{BK} (an isometry)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(B * K, path.shape[1])))
    A = path @ basis.T + rng.normal(size=B * K)
    return A.reshape(len(path), B, K)


def test_essential_dynamics_finds_the_cusp_of_an_embedded_trajectory():
    t, z = _semicubical()
    steps = np.arange(len(t)) * 10 + 5
    ed = tr.essential_dynamics(_embed(z), steps, n_components=2, sigma=0.0)
    assert ed.scores.shape == (len(t), 2) and ed.smoothed.shape == (len(t), 2)
    np.testing.assert_allclose(ed.explained_variance_ratio.sum(), 1.0, atol=1e-10)
    np.testing.assert_array_equal(ed.cusp_steps(0, 1), [steps[50]])
    assert steps[50] in ed.event_steps()
    # distances are preserved by the PCA (rotation of the plane): same speed profile
    np.testing.assert_allclose(tr.speed(ed.scores), tr.speed(z), atol=1e-10)


def test_essential_dynamics_three_components_pairs_and_smoothing():
    t, z = _ellipse(n=200)
    path = np.concatenate([z, 0.3 * np.sin(3 * t)[:, None]], axis=1)
    rng = np.random.default_rng(6)
    basis, _ = np.linalg.qr(rng.normal(size=(24, 3)))
    preds = (path @ basis.T + 0.002 * rng.normal(size=(200, 24))).reshape(200, 6, 4)
    ed = tr.essential_dynamics(preds, np.arange(200), n_components=3, sigma=4.0)
    assert set(ed.features) == {(0, 1), (0, 2), (1, 2)}
    assert ed.explained_variance_ratio.sum() > 0.99
    np.testing.assert_allclose(ed.smoothed, tr.smooth_trajectory(ed.scores, 4.0))
    # the PC1/PC2 plane is the ellipse plane (variances 2², 1² vs 0.3²): its 4 vertices are found (vertex
    # detection differentiates twice, so smoothing must match the noise: σ = 2 still leaves one extra)
    v = ed.features[(0, 1)].vertices
    assert v.size == 4
    np.testing.assert_allclose(np.sort(t[v]), [0.0, np.pi / 2, np.pi, 3 * np.pi / 2], atol=0.1)


# ------------------------------------------------------------------------------------ joint trajectory


def _runs(seed=7):
    rng = np.random.default_rng(seed)
    B, K = 5, 4
    return {
        "M=1": rng.normal(size=(12, B, K)),
        "M=2": rng.normal(size=(9, B, K)) + 1.0,
        "M=inf": rng.normal(size=(15, B, K)) - 0.5,
    }, rng


def test_joint_pca_is_one_pca_on_stacked_rows_and_ignores_references():
    runs, rng = _runs()
    refs = {"dMMSE": rng.normal(size=(5, 4)), "ridge": rng.normal(size=(5, 4))}
    jp = tr.joint_trajectory_pca(runs, refs, n_components=3)
    stacked = np.concatenate([tr.prediction_matrix(p) for p in runs.values()])
    direct = tr.fit_pca(stacked, 3)
    np.testing.assert_allclose(jp.pca.components, direct.components, atol=1e-12)
    for name, p in runs.items():
        np.testing.assert_allclose(jp.curves[name], direct.transform(tr.prediction_matrix(p)), atol=1e-12)
        assert jp.curves[name].shape == (len(p), 3)
        np.testing.assert_array_equal(jp.smoothed[name], jp.curves[name])
    np.testing.assert_allclose(
        jp.references["ridge"], direct.transform(refs["ridge"].reshape(-1)), atol=1e-12
    )
    # a reference far away changes nothing in the fit
    far = {**refs, "far": np.full((5, 4), 1e6)}
    jp2 = tr.joint_trajectory_pca(runs, far, n_components=3)
    np.testing.assert_allclose(jp2.pca.components, jp.pca.components, atol=1e-12)
    np.testing.assert_allclose(jp2.explained_variance_ratio, jp.explained_variance_ratio, atol=1e-12)
    assert np.linalg.norm(jp2.references["far"]) > 1e5
    # whereas adding it as a run would
    jp3 = tr.joint_trajectory_pca({**runs, "far": np.full((1, 5, 4), 1e6)}, None, n_components=3)
    assert not np.allclose(jp3.pca.components, jp.pca.components)


def test_joint_pca_validates_shapes_and_smooths_per_run():
    runs, _ = _runs()
    with pytest.raises(ValueError, match="different sizes"):
        tr.joint_trajectory_pca({**runs, "bad": np.zeros((3, 5, 5))})
    with pytest.raises(ValueError, match="reference"):
        tr.joint_trajectory_pca(runs, {"ridge": np.zeros((4, 4))})
    steps = {"M=1": np.arange(12) * 100}
    jp = tr.joint_trajectory_pca(runs, None, 2, steps_by_run=steps, sigma=1.5)
    np.testing.assert_array_equal(jp.steps["M=1"], steps["M=1"])
    np.testing.assert_allclose(jp.smoothed["M=2"], tr.smooth_trajectory(jp.curves["M=2"], 1.5))


# --------------------------------------------------------------------------------------------- figures


def test_figures_are_written_as_png_and_pdf(tmp_path):
    t, z = _semicubical(n=61)
    path = np.concatenate([z, 0.01 * t[:, None] ** 2], axis=1)
    ed = tr.essential_dynamics(_embed(path, B=4, K=3), np.arange(61) * 3, n_components=3, sigma=1.0)
    png, pdf = plots.plot_pc_pairs(ed, tmp_path / "ed.png", osculating=True)
    runs, rng = _runs()
    png2, pdf2 = plots.plot_joint_pca(
        tr.joint_trajectory_pca(runs, {"dMMSE_2": rng.normal(size=(5, 4)), "ridge": rng.normal(size=(5, 4))}),
        tmp_path / "sub" / "joint",
        ref_runs={"dMMSE_2": "M=2"},
    )
    for p in (png, pdf, png2, pdf2):
        assert p.exists() and p.stat().st_size > 1000
    assert png.name == "ed.png" and pdf.name == "ed.pdf" and pdf2.name == "joint.pdf"
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ed.pdf", "ed.png", "sub"]  # no temp files left


# ------------------------------------------------------------------------------------ forms: all pairs agree


def _pairs(**events):
    """{(i, j): PairFeatures} from keyword 'p01=([cusps], [vertices])'."""
    out = {}
    for key, (c, v) in events.items():
        i, j = int(key[1]), int(key[2])
        out[(i, j)] = tr.PairFeatures((i, j), np.array(c, dtype=np.int64), np.array(v, dtype=np.int64))
    return out


def test_forms_need_every_pc_pair_and_the_union_is_an_option():
    # pair (0,1) turns at 10 and 40; (0,2) at 11 (vertex) and 70; (1,2) at 9 (cusp) and 41: only the turn near 10
    # is seen by all three pairs; 40/41 is missing in (0,2), 70 only in (0,2)
    feats = _pairs(p01=([10], [40]), p02=([], [11, 70]), p12=([9, 41], []))
    np.testing.assert_array_equal(tr.find_forms(feats), [10])  # group {9, 10, 11}: its median
    np.testing.assert_array_equal(tr.find_forms(feats, "union"), [9, 10, 11, 40, 41, 70])
    # a window of 0 needs the exact same checkpoint in every pair: none here
    assert tr.find_forms(feats, window=0).size == 0
    # 40/41 becomes a form once (0,2) has an event within 3 of it
    feats[(0, 2)] = tr.PairFeatures((0, 2), np.array([43]), np.array([11, 70]))
    np.testing.assert_array_equal(tr.find_forms(feats), [10, 41])
    with pytest.raises(ValueError, match="form rule must be one of all, union"):
        tr.find_forms(feats, "any")


def test_event_steps_default_to_forms_on_an_essential_dynamics_result():
    steps = np.arange(100) * 10
    ed = tr.EssentialDynamics(steps, None, np.zeros((100, 3)), np.zeros((100, 3)), np.ones(100),
                              _pairs(p01=([20], []), p02=([], [21, 80]), p12=([], [50])))
    assert ed.event_steps().size == 0  # no time at which all three pairs agree
    np.testing.assert_array_equal(ed.event_steps("union"), [200, 210, 500, 800])
    ed.features[(1, 2)] = tr.PairFeatures((1, 2), np.array([], dtype=np.int64), np.array([19, 50]))
    np.testing.assert_array_equal(ed.event_steps(), [200])
    assert "all 3 PC pairs" in ed.describe_rule() and "union" in ed.describe_rule("union")
    # one pair (2 components): both rules give its events
    one = tr.EssentialDynamics(steps, None, np.zeros((100, 2)), np.zeros((100, 2)), np.ones(100),
                               _pairs(p01=([5], [60])))
    np.testing.assert_array_equal(one.event_steps(), one.event_steps("union"))
