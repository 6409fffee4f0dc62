"""The transient-ridge study (Carroll et al.): t_crit and the PCA bend as pure functions against known answers, the
nested pools, the expectation rules on synthetic summaries, the scales' run configs and LLC settings, and the whole
study on a tiny configuration (report content, the shared LLC calibration, reuse of finished runs, the CLI)."""

import base64
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from icl_lab import cli
from icl_lab.config import LLCConfig
from icl_lab.llc import min_burnin
from icl_lab.llc_run import calibrate_shared, estimate_runs, load_shared
from icl_lab.store import Run
from icl_lab.studies.common import check_out, check_table
from icl_lab.studies.transient_ridge import (
    TransientRidge,
    TransientRidgeConfig,
    bootstrap_t_crit,
    critical_step,
    expectations,
    final_llc,
    llc_interval,
    ridge_approach,
    run_name,
    run_study,
    t_crit_of_mean,
)
from icl_lab.tasks import root_task_batch, task_pool

runner = CliRunner()

STEPS = np.arange(0, 101, 10)


# ------------------------------------------------------------------------------------------------ t_crit
def test_a_u_shaped_curve_has_its_minimum_as_t_crit():
    """Falls linearly from 2 to 1 at step 50, then rises to 1.25: a quarter of the drop is given back."""
    loss = np.where(STEPS <= 50, 2 - STEPS / 50, 1 + (STEPS - 50) / 200)
    c = critical_step(STEPS, loss)
    assert c.t_crit == 50 and c.u_shape and c.kind == "u-shape"
    assert (c.loss_start, c.loss_min, c.loss_end) == pytest.approx((2.0, 1.0, 1.25))
    assert c.drop == pytest.approx(1.0) and c.rise == pytest.approx(0.25) and c.rise_fraction == pytest.approx(0.25)
    # scale-free: the same shape at another loss scale gives the same answer
    c2 = critical_step(STEPS, 7.0 * loss)
    assert c2.t_crit == 50 and c2.rise_fraction == pytest.approx(0.25)
    # uneven step spacing (log + linear checkpoints): t_crit is a step, not an index
    steps = np.array([0, 1, 3, 10, 30, 100, 300, 1000])
    assert critical_step(steps, [5, 4, 3, 2, 1.5, 1.0, 1.6, 2.0]).t_crit == 100


def test_a_monotone_curve_has_t_crit_at_the_end_and_no_u_shape():
    loss = 1 + np.exp(-STEPS / 30)
    c = critical_step(STEPS, loss)
    assert c.t_crit == 100 and not c.u_shape and c.kind == "monotone"
    assert c.rise == 0 and c.rise_fraction == 0


def test_a_small_late_rise_is_not_a_u_shape_but_a_larger_one_is():
    """Drop 1.0, then a rise of 5% of it: below the default 10% it counts as late jitter; min_rise = 0.04 accepts."""
    loss = np.where(STEPS <= 80, 2 - STEPS / 80, 1 + (STEPS - 80) / 400)  # ends at 1.05
    c = critical_step(STEPS, loss)
    assert c.t_crit == 80 and not c.u_shape and c.kind == "monotone"
    assert c.rise_fraction == pytest.approx(0.05)
    assert critical_step(STEPS, loss, min_rise=0.04).u_shape


def test_a_dip_of_float_jitter_is_not_a_descent():
    """Measured in the first small-scale run: at M = 4 the OOD loss went 4.221339 -> 4.221271 at step 12 (a fall of
    0.0016%), then rose to 5.07, which without a least drop counted as a U-shape giving back 12,499x its drop."""
    loss = np.concatenate([[4.221339, 4.221271], np.linspace(4.3, 5.07, len(STEPS) - 2)])
    c = critical_step(STEPS, loss)
    assert not c.u_shape and c.kind == "no-dip" and c.t_crit == STEPS[1]
    assert critical_step(STEPS, loss, min_drop=0.0).u_shape  # the old rule
    fell = np.concatenate([[4.2, 4.1], np.linspace(4.15, 4.3, len(STEPS) - 2)])  # a 2.4% fall: a real dip
    assert critical_step(STEPS, fell).u_shape


def test_a_rising_curve_has_no_dip_and_ties_go_to_the_earliest_step():
    c = critical_step(STEPS, 1 + STEPS / 100)
    assert c.t_crit == 0 and c.kind == "no-dip" and not c.u_shape and c.drop == 0
    flat = np.array([3.0, 2.0, 1.0, 1.0, 1.0, 1.5])
    assert critical_step(np.arange(6), flat).t_crit == 2


@pytest.mark.parametrize(("steps", "loss", "kw", "message"), [
    ([0, 1, 2], [1.0, 2.0], {}, "1-D of one length"),
    ([0, 1], [1.0, 2.0], {}, "at least 3"),
    ([0, 2, 1], [1.0, 2.0, 3.0], {}, "strictly increasing"),
    ([0, 1, 2], [1.0, np.nan, 3.0], {}, "finite"),
    ([0, 1, 2], [1.0, 2.0, 3.0], {"min_rise": 1.5}, "min_rise must lie in"),
    ([0, 1, 2], [1.0, 2.0, 3.0], {"min_drop": -0.1}, "min_drop must lie in"),
])
def test_bad_curves_raise(steps, loss, kw, message):
    with pytest.raises(ValueError, match=message):
        critical_step(steps, loss, **kw)


def test_ridge_approach_measures_distances_in_the_pc_plane():
    """A curve from (0, 0) via (1, 1) (the ridge point) to (2, 0) (dMMSE_M)."""
    curve = np.array([[0.0, 0.0], [1.0, 0.9], [1.5, 0.5], [2.0, 0.0]])
    a = ridge_approach(curve, ridge=np.array([1.0, 1.0]), dmmse=np.array([2.0, 0.0]), t_index=1)
    assert a["ridge_at_crit"] == pytest.approx(0.1)
    assert a["ridge_at_end"] == pytest.approx(math.sqrt(2))
    assert a["ridge_min"] == pytest.approx(0.1) and a["dmmse_at_end"] == pytest.approx(0.0)
    assert a["bend"] == pytest.approx(0.1 / math.sqrt(2))
    with pytest.raises(ValueError, match="t_index"):
        ridge_approach(curve, np.ones(2), np.ones(2), t_index=4)
    with pytest.raises(ValueError, match=r"\(T, v\)"):
        ridge_approach(curve, np.ones(3), np.ones(2), t_index=0)


def test_deflection_is_one_or_more_on_a_straight_path_and_small_when_the_curve_visits_ridge():
    ridge, dmmse = np.array([1.0, 1.0]), np.array([2.0, 0.0])
    straight = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # passes ridge at distance 1 along the chord
    a = ridge_approach(straight, ridge, dmmse, t_index=1)
    assert a["ridge_to_chord"] == pytest.approx(1.0) and a["deflection"] == pytest.approx(1.0)
    assert a["bend"] == pytest.approx(1 / math.sqrt(2))  # the old rule's bend < 1 passed a straight path
    visit = np.array([[0.0, 0.0], [0.95, 0.9], [2.0, 0.0]])
    assert ridge_approach(visit, ridge, dmmse, t_index=1)["deflection"] == pytest.approx(math.hypot(0.05, 0.1))
    away = np.array([[0.0, 0.0], [1.0, -1.0], [2.0, 0.0]])  # bent away from ridge
    assert ridge_approach(away, ridge, dmmse, t_index=1)["deflection"] == pytest.approx(2.0)


def seed_ood(t_mins, steps=STEPS):
    """(S, T) U-shaped OOD curves: seed s falls linearly from 2 to 1 at step t_mins[s], then rises by 1 per 100."""
    return np.array([np.where(steps <= m, 2 - steps / m, 1 + (steps - m) / 100) for m in t_mins])


def test_bootstrap_t_crit_brackets_the_seeds_minima_and_counts_non_u_resamples():
    x = seed_ood([40, 50, 60])
    ci, no_u = bootstrap_t_crit(STEPS, x, n_boot=400)
    assert ci.estimate == 50 and no_u == 0.0 and 40 <= ci.lo <= 50 <= ci.hi <= 60 and ci.level == 0.95
    assert "3 units" in ci.method
    assert t_crit_of_mean(STEPS, x[:1]) == 40
    flat = 1 + np.exp(-STEPS / 30)  # monotone: no t_crit
    mixed = np.vstack([x[:1], flat, flat])  # a resample is U-shaped only if it draws seed 0 often enough
    ci, no_u = bootstrap_t_crit(STEPS, mixed, n_boot=400)
    assert math.isnan(ci.estimate) and 0.5 < no_u < 1 and math.isnan(ci.lo)
    with pytest.raises(ValueError, match="seeds, len"):
        bootstrap_t_crit(STEPS, x[:, :5])


def test_llc_interval_is_t_over_seeds_or_mcse_for_one_estimate():
    two = llc_interval([10.0, 12.0, math.nan], [1.0, 1.0, 1.0], [100, 100, 100])
    assert two.estimate == pytest.approx(11.0) and "t, 1 d.o.f." in two.method
    assert two.half_width == pytest.approx(12.706204736174698 * math.sqrt(2) / math.sqrt(2))
    one = llc_interval([10.0], [0.5], [101.0])
    assert one.estimate == 10.0 and "MCSE, ESS 101" in one.method
    assert one.half_width == pytest.approx(1.9839715185235556 * 0.5)
    assert math.isnan(llc_interval([math.nan], [1.0], [10]).estimate)


# ------------------------------------------------------------------------------------------------ nested pools
def test_pools_are_nested_and_share_the_root_task():
    """pool(M) is the first M rows of one master sequence (also across the 256-row block boundary), so every run of
    a seed holds the root task, and the joint-PCA batch D^(1) is the same whichever pool it is built from."""
    cfg = TransientRidgeConfig(Ms=[1, 3, 300, "inf"], D=4)
    runs = cfg.run_configs()
    assert {r.seed for r in runs.values()} == {0, 1, 2} and {r.task.family for r in runs.values()} == {"gaussian"}
    big = task_pool("gaussian", 300, 4, 0)
    for M in (1, 3, 256, 257):
        assert torch.equal(task_pool("gaussian", M, 4, 0), big[:M])
    task = runs["M3-seed0"].task
    a = root_task_batch(task, task_pool("gaussian", 3, 4, 0), 8, 0)
    b = root_task_batch(task, big, 8, 0)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.w, big[:1].expand(8, 4))
    assert not torch.equal(task_pool("gaussian", 3, 4, 1), big[:3])  # another seed, another master sequence


# ------------------------------------------------------------------------------------------------ expectations
def synthetic_summary(u: dict, t_crit: dict, llc: dict, bend: float = 0.4) -> pd.DataFrame:
    """A summary with the columns `expectations` reads; M = 1, 2, 4, 8, 16, ∞."""
    rows = []
    for M in (1.0, 2.0, 4.0, 8.0, 16.0, np.inf):
        rows.append({"M": M, "u_shape": u[M], "t_crit": t_crit[M], "kind": "u-shape" if u[M] else "monotone",
                     "ood_loss_start": 4.0, "ood_loss_min": 2.0, "ood_loss_end": 3.0 if u[M] else 2.0,
                     "rise_fraction": 0.5 if u[M] else 0.0, "pca_bend": bend, "pca_deflection": bend,
                     "pca_dmmse_at_end": 0.1,
                     "pca_ridge_at_end": 1.0, "llc_mean": llc[M], "llc_std": 1.0, "llc_ok": True,
                     "id_delta_dmmse": 0.01, "id_delta_ridge": 1.0, "ood_loss_final": 1.6, "ood_ridge_loss": 1.58})
    return pd.DataFrame(rows)


def _verdicts(exp: pd.DataFrame) -> dict[str, str]:
    return {r.expectation.split(" (")[0][:40]: r.verdict for r in exp.itertuples()}


def test_expectations_pass_on_a_summary_with_the_papers_pattern():
    u = {1.0: False, 2.0: False, 4.0: True, 8.0: True, 16.0: False, np.inf: False}
    t = {1.0: 0, 2.0: 900, 4.0: 300, 8.0: 700, 16.0: 1000, np.inf: 1000}
    llc = {1.0: 10.0, 2.0: 20.0, 4.0: 40.0, 8.0: 50.0, 16.0: 48.0, np.inf: 46.0}
    exp = check_table(expectations(TransientRidgeConfig(Ms=[1, 2, 4, 8, 16, "inf"]), synthetic_summary(u, t, llc)))
    assert list(exp.columns) == ["expectation", "run", "source", "expected", "measured", "verdict"]
    assert (exp["verdict"] == "pass").all(), exp[["expectation", "measured", "verdict"]].to_string()
    row = exp[exp["expectation"].str.startswith("t^crit_M grows")].iloc[0]
    assert "2^2: 300, 2^3: 700" in row["measured"] and "ρ = 1.00" in row["measured"]


def test_expectations_fail_without_transience_and_say_why():
    u = dict.fromkeys((1.0, 2.0, 4.0, 8.0, 16.0, np.inf), False)
    t = {1.0: 0, 2.0: 1000, 4.0: 1000, 8.0: 1000, 16.0: 1000, np.inf: 1000}
    llc = {1.0: 50.0, 2.0: 40.0, 4.0: 30.0, 8.0: 20.0, 16.0: 10.0, np.inf: 5.0}  # falls with M: no rise
    summary = synthetic_summary(u, t, llc, bend=2.0)
    exp = check_table(expectations(TransientRidgeConfig(Ms=[1, 2, 4, 8, 16, "inf"]), summary))
    v = dict(zip(exp["expectation"], exp["verdict"], strict=True))
    assert v[next(k for k in v if k.startswith("OOD loss against step is U-shaped"))] == "fail"
    assert v[next(k for k in v if k.startswith("t^crit_M grows"))] == "unclear"
    assert v[next(k for k in v if k.startswith("in the joint trajectory PCA"))] == "unclear"
    assert v[next(k for k in v if k.startswith("LLC at the end of training"))] == "fail"
    assert exp["measured"].str.len().min() > 5


def test_u_shaped_ends_make_the_u_shape_unclear_and_a_far_llc_crossing_fails():
    """A U-shape at the smallest M as well is not the paper's pattern (low M goes straight to dMMSE): unclear, not
    pass. λ̂ first reaches λ̂(∞) at M = 16, more than a factor 4 above the onset of transience (M = 2): fail."""
    u = {1.0: True, 2.0: True, 4.0: True, 8.0: False, 16.0: False, np.inf: False}
    t = {1.0: 100, 2.0: 200, 4.0: 400, 8.0: 1000, 16.0: 1000, np.inf: 1000}
    llc = {1.0: 10.0, 2.0: 20.0, 4.0: 30.0, 8.0: 40.0, 16.0: 50.0, np.inf: 48.0}
    exp = check_table(expectations(TransientRidgeConfig(Ms=[1, 2, 4, 8, 16, "inf"]), synthetic_summary(u, t, llc)))
    v = dict(zip(exp["expectation"], exp["verdict"], strict=True))
    assert v[next(k for k in v if k.startswith("OOD loss against step is U-shaped"))] == "unclear"
    assert v[next(k for k in v if k.startswith("t^crit_M grows"))] == "pass"  # over the intermediate Ms 2, 4
    row = exp[exp["expectation"].str.startswith("the low-M LLC crosses")].iloc[0]
    assert row["verdict"] == "fail" and "first crossing at M = 2^4" in row["measured"]
    assert "smallest U-shaped M = 2^1" in row["measured"]


# ------------------------------------------------------------------------------------------------ scales and config
def test_scales_build_valid_run_configs():
    small = TransientRidgeConfig.for_scale("small")
    runs = small.run_configs()
    assert len(runs) == 3 * len(small.Ms) and small.Ms[-1] is None and small.seeds == [0, 1, 2]
    cfg = runs["M16-seed0"]
    assert (cfg.task.D, cfg.task.K, cfg.task.noise_var, cfg.task.M, cfg.model.preset) == (4, 8, 0.125, 16, "hoogland")
    assert cfg.train.eval_every == small.eval_every and cfg.train.schedule == "triangle"
    assert list(runs)[:3] == ["Minf-seed0", "Minf-seed1", "Minf-seed2"] and small.ensemble == 3

    paper = TransientRidgeConfig.for_scale("paper")
    runs = paper.run_configs()  # dry: configs only, nothing trained
    assert paper.Ms[:8] == [1, 2, 3, 4, 6, 8, 11, 16] and paper.finite_Ms[-1] == 2**15 and paper.Ms[-1] is None
    assert len(runs) == 3 * len(paper.Ms) and {128, 181, 256, 362} <= set(paper.finite_Ms)
    cfg = runs["M362-seed0"]
    assert (cfg.task.D, cfg.task.K, cfg.task.noise_var, cfg.train.steps, cfg.train.device) == (
        8, 16, 0.125, 500_000, "cuda")
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.d_mlp) == (2, 256, 2048)

    quick = TransientRidgeConfig.for_scale("small", quick=True, workers=1)
    assert quick.quick and quick.steps < small.steps and len(quick.run_configs()) == 3 * len(quick.Ms)
    assert not quick.llc and quick.seeds_with_llc == [] and TransientRidge(quick).llc_plan({}) is None
    assert TransientRidgeConfig(Ms="8,inf,1,2").Ms == [1, 2, 8, None]
    assert json.loads(small.model_dump_json())["study"] == "transient-ridge"


@pytest.mark.parametrize("scale", ["small", "paper"])
def test_the_llc_uses_the_validated_defaults_at_the_final_checkpoint_of_the_first_seed(scale):
    """LLCConfig()'s ε, γ = 0.01·nβ (None), burn-in min_burnin (None) and 500 draws, checked once at ε = 1e-4; the
    paper keeps the authors' 8 chains and minibatch 1024; only the first seed's final checkpoints are estimated."""
    cfg = TransientRidgeConfig.for_scale(scale)
    s, d = cfg.sampler, LLCConfig()
    assert (s.step_size, s.localization, s.nbeta, s.num_burnin, s.num_draws) == (
        d.step_size, None, None, None, 500) and cfg.step_sizes == [1e-4]
    assert (s.num_chains, s.batch_size) == ((4, 256) if scale == "small" else (8, 1024))
    assert cfg.llc and cfg.seeds_with_llc == [0]
    runs = {name: type("R", (), {"path": Path(name), "checkpoint_steps": [0, 7]})()
            for name in cfg.run_configs()}
    steps = TransientRidge(cfg).llc_plan(runs).steps(runs)
    assert {p.name for p, st in steps.items() if st == [7]} == {run_name(M, 0) for M in cfg.Ms}
    assert all(st == [] for p, st in steps.items() if not p.name.endswith("seed0"))
    with pytest.raises(ValidationError, match="llc_seeds = 4 exceeds"):
        TransientRidgeConfig(llc_seeds=4, seeds=[0, 1, 2])


def test_paper_settings_have_the_papers_noise_and_preset():
    paper = TransientRidgeConfig.for_scale("paper")
    assert (paper.noise_var, paper.preset) == (0.125, "hoogland")
    assert TransientRidgeConfig.PAPER["noise_var"] == 0.125 and TransientRidgeConfig.PAPER["preset"] == "hoogland"


@pytest.mark.parametrize(("kw", "message"), [
    (dict(scale="huge"), "scale\n  Input should be 'small' or 'paper'"),
    (dict(executor="dask"), "executor\n  Input should be 'local', 'ray' or 'slurm'"),
    (dict(Ms="0,2,4,inf"), "Ms\n  Value error, M must be an integer >= 1 or 'inf', got 0"),
    (dict(Ms="1,two,4"), "M must be an integer >= 1 or 'inf', got 'two'"),
    (dict(Ms="1,4,inf"), "at least three finite task diversities"),
    (dict(Ms="1,4,4,8"), "task diversities must be distinct"),
    (dict(u_min_rise=1.5), "u_min_rise\n  Input should be less than 1"),
    (dict(workers=0), "workers\n  Input should be greater than or equal to 1"),
    (dict(learning_rate=0.1), "learning_rate\n  Extra inputs are not permitted"),
])
def test_bad_settings_name_the_field_and_the_allowed_values(kw, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        TransientRidgeConfig(**kw)


def test_quick_paper_and_bad_run_settings_are_refused():
    with pytest.raises(ValueError, match="quick.*allowed: --quick with --scale small"):
        TransientRidgeConfig.for_scale("paper", quick=True)
    with pytest.raises(ValidationError, match="quick is a minutes-long version"):
        TransientRidgeConfig(scale="paper", quick=True)
    with pytest.raises(ValueError, match="unknown model preset 'gpt9'"):
        TransientRidgeConfig(preset="gpt9").run_configs()


# ------------------------------------------------------------------------------------------------ the whole study
def tiny_study(**kw) -> TransientRidgeConfig:
    """Four runs of a 1-layer, 1.9k-parameter model, 200 steps each; an LLC calibration on a 2-point grid that
    finds a stable ε at this seed (burn-ins 30 and 10 steps at γ = 100)."""
    return TransientRidgeConfig(**{**dict(
        Ms=[1, 2, 4, "inf"], D=2, K=4, noise_var=0.1, batch_size=8, steps=200, n_evals=10, eval_size=64,
        n_checkpoints_linear=4, n_checkpoints_log=4, pca_batch=16, llc_n=256, workers=1, seeds=[0, 1, 2],
        ensemble=3, llc_seeds=3, n_boot=200,
        sampler=LLCConfig(step_size=3e-3, num_chains=2, num_draws=40, num_burnin=10, batch_size=32,
                          localization=100.0),
        step_sizes=[1e-3, 3e-3],
        model_overrides=dict(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=16)), **kw})


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("transient_ridge")
    run_study(tiny_study(), out, progress=False)
    return out


def _tables(html: str) -> list[pd.DataFrame]:
    return pd.read_html(io.StringIO(html))


def test_report_has_every_figure_numbers_and_a_filled_expectations_table(study_dir):
    html = (study_dir / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 6
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    for title in ("Scale", "Expectations and measured verdicts", "OOD loss over training and t_crit",
                  "t_crit against M", "Joint trajectory PCA", "LLC against M at the end of training",
                  "Where this study differs from the paper", "Wall time per phase", "2.65M", "hoogland",
                  "95% percentile-bootstrap", "percentile bootstrap, 200 resamples of 3 units",
                  "Student-t over the LLC seeds", "t, 2 d.o.f. (3 values)", "γ-plateau"):
        assert title in html, title
    assert "<script" not in html
    exp = next(t for t in _tables(html) if "verdict" in t.columns)
    # this tiny, seeded configuration's verdicts, row by row (most fail or stay unclear at this size)
    assert dict(zip(exp["expectation"], exp["verdict"], strict=True)) == {
        "OOD loss against step is U-shaped at intermediate M (falls towards ridge, then rises towards "
        "dMMSE_M)": "unclear",
        "t^crit_M grows with M": "fail",
        # deflection 2.00 and 1.29 (a bend < 1 passed here before: module docstring, "Pre-registered checks")
        "in the joint trajectory PCA, intermediate-M trajectories bend towards ridge before heading to dMMSE_M": "fail",
        "LLC at the end of training rises with M, then plateaus (large M and ∞ share λ̂_∞)": "fail",
        "the low-M LLC crosses λ̂_∞ near the onset of transience": "pass",
        "low M: the final model approximates dMMSE_M": "pass",
        "M = ∞: the final model is ridge-like": "fail",
    }
    assert exp["measured"].notna().all() and (exp["measured"].str.len() > 5).all()
    for key in ("U-shaped", "t^crit_M grows", "bend towards ridge", "LLC at the end of training"):
        assert exp["expectation"].str.contains(key, regex=False).any(), key
    timing = next(t for t in _tables(html) if "phase" in t.columns)
    # writing the page is timed in timings.json, not in the page's own table
    assert set(timing["phase"]) == {"train", "llc calibration", "llc estimates", "analysis", "figures"}
    for fig in ("ood_loss_vs_step", "t_crit_vs_M", "joint_pca", "pca_distance_to_ridge", "llc_vs_M",
                "t_crit_intervals"):
        assert (study_dir / "figures" / f"{fig}.png").stat().st_size > 10_000
        assert (study_dir / "figures" / f"{fig}.pdf").exists()
    assert json.loads((study_dir / "study_config.json").read_text())["study"] == "transient-ridge"


def test_summary_numbers_are_finite_and_complete(study_dir):
    summary = pd.read_parquet(study_dir / "summary.parquet")
    assert list(summary["M"]) == [1.0, 2.0, 4.0, np.inf]
    numeric = summary.select_dtypes("number").drop(columns=["M"])
    assert np.isfinite(numeric.to_numpy(dtype=float)).all(), numeric.columns[~np.isfinite(numeric).all()].tolist()
    assert set(summary["kind"]) <= {"u-shape", "monotone", "no-dip"}
    assert ((summary["t_crit"] >= 0) & (summary["t_crit"] <= 200)).all()
    inf = summary[summary["M"] == np.inf].iloc[0]
    assert inf["ood_dmmse_loss"] == pytest.approx(inf["ood_ridge_loss"])  # dMMSE is ridge at M = ∞
    crit = json.loads((study_dir / "critical_steps.json").read_text())
    assert set(crit) == {"2^0", "2^1", "2^2", "∞"}
    index = pd.read_parquet(study_dir / "runs" / "index.parquet")
    assert (index["status"] == "done").all() and len(index) == 4 * 3
    for name in ("M1-seed0", "M4-seed0", "Minf-seed0"):  # the OOD curve is evaluated every eval_every steps
        steps = pd.read_parquet(study_dir / "runs" / name / "metrics.parquet")["step"]
        assert {0, 20, 40, 60, 200} <= set(steps)


def test_one_calibrated_llc_setting_is_shared_by_every_final_checkpoint(study_dir):
    """Calibrated once at the final checkpoint of M = ∞; every run's final checkpoint is estimated with exactly that
    setting, whose burn-in is what `llc.calibrate` sets for its ε."""
    saved = json.loads((study_dir / "llc_settings.json").read_text())
    assert saved["settings"] is not None and saved["settings"]["calibrated"], saved["reason"]
    assert (saved["inputs"]["run"], saved["inputs"]["step"]) == ("Minf-seed0", 200)
    sampler = saved["settings"]["sampler"]
    assert sampler["step_size"] in (1e-3, 3e-3)
    assert sampler["num_burnin"] == max(10, min_burnin(sampler["step_size"], 100.0))
    assert (study_dir / "runs" / "Minf-seed0" / "llc_calibration.parquet").exists()
    summary = pd.read_parquet(study_dir / "summary.parquet")
    for M in (1, 2, 4, None):
        values = []
        for seed in (0, 1, 2):  # llc_seeds = 3: every seed's final checkpoint
            llc = pd.read_parquet(study_dir / "runs" / run_name(M, seed) / "llc.parquet")
            assert list(llc["step"]) == [200]  # the final checkpoint only
            row = llc.iloc[0]
            assert (row["step_size"], row["num_burnin"], row["localization"]) == (
                sampler["step_size"], sampler["num_burnin"], 100.0)
            assert (row["n"], row["num_chains"], row["num_draws"]) == (256, 2, 40)
            values.append(row["llc_mean"])
        m = summary["M"] == (np.inf if M is None else M)
        assert summary.loc[m, "llc_mean"].item() == pytest.approx(np.mean(values))
        lo, hi = summary.loc[m, "llc_lo"].item(), summary.loc[m, "llc_hi"].item()
        half = 4.302652729911275 * np.std(values, ddof=1) / np.sqrt(3)  # t_{0.975, 2}
        assert (lo, hi) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    html = (study_dir / "report.html").read_text()
    chains = sampler["num_chains"], sampler["num_draws"], sampler["num_burnin"]
    assert "{} chains × {} draws after {} burn-in".format(*chains) in html


def test_a_failed_or_stale_calibration_is_saved_reported_and_redone_only_when_stale(study_dir, tmp_path):
    """On a copy of the tiny study's runs: a grid with no stable ε gives NaN LLCs with the reason, saved so that a
    second call does not recalibrate; a saved calibration made under another burn-in rule is redone."""
    out = tmp_path / "study"
    shutil.copytree(study_dir / "runs", out / "runs")
    runs = {name: Run.load(out / "runs" / name) for name in tiny_study().run_configs()}
    bad = tiny_study(step_sizes=[30.0])  # far too large: every chain diverges
    plan = TransientRidge(bad).llc_plan(runs)
    shared = calibrate_shared(out, plan, runs)
    assert shared.settings is None and "no stable step size" in shared.reason
    rows, note = final_llc(bad, runs, shared)
    assert rows["llc_mean"].isna().all() and (rows["flags"] == "no setting").all() and len(rows) == 4 * 3
    assert note.startswith("LLC not estimated") and "no stable step size" in note
    f = out / "llc_settings.json"
    assert json.loads(f.read_text())["settings"] is None
    before = f.stat().st_mtime_ns
    assert calibrate_shared(out, plan, runs) == shared and f.stat().st_mtime_ns == before

    plan = TransientRidge(tiny_study()).llc_plan(runs)
    assert load_shared(out, plan, runs) is None  # saved from another ε grid
    shutil.copy(study_dir / "llc_settings.json", f)
    saved = json.loads(f.read_text())
    right = saved["settings"]["sampler"]["num_burnin"]
    assert load_shared(out, plan, runs).settings.sampler.num_burnin == right
    saved["inputs"]["burnin"], saved["settings"]["sampler"]["num_burnin"] = "num_burnin", right - 1  # an older rule
    f.write_text(json.dumps(saved))
    assert load_shared(out, plan, runs) is None
    shared = calibrate_shared(out, plan, runs)
    assert json.loads(f.read_text())["settings"]["sampler"]["num_burnin"] == right == shared.settings.sampler.num_burnin
    estimate_runs(list(runs.values()), shared.settings, steps=plan.steps(runs), progress=False)  # reused
    rows, _ = final_llc(tiny_study(), runs, shared)
    assert np.isfinite(rows["llc_mean"]).all()


def test_the_report_command_rebuilds_from_disk_reusing_every_run_and_llc_estimate(study_dir, registered):
    """`icl-lab report DIR` dispatches on study_config.json's "study" key and rebuilds the report from disk: no
    checkpoint, metric, LLC estimate or calibration is rewritten, and no phase trains or estimates."""
    kept = [p for p in (study_dir / "runs").rglob("*") if p.is_file() and (
        p.suffix == ".safetensors" or p.name in ("metrics.parquet", "llc.parquet", "config.json"))]
    kept.append(study_dir / "llc_settings.json")
    before = {p: p.stat().st_mtime_ns for p in kept}
    assert sum(p.name == "llc.parquet" for p in before) == 4 * 3
    report = study_dir / "report.html"
    report.unlink()
    result = runner.invoke(cli.app, ["report", str(study_dir)])
    assert result.exit_code == 0, result.output
    assert f"report: {report}" in " ".join(result.output.split()) and report.stat().st_size > 10_000
    assert [p for p, m in before.items() if p.stat().st_mtime_ns != m] == []
    assert sorted(p for p in (study_dir / "runs").rglob("*.safetensors")) == sorted(
        p for p in before if p.suffix == ".safetensors")
    timings = json.loads((study_dir / "timings.json").read_text())
    assert "train" not in timings and "llc estimates" not in timings  # nothing was trained or estimated


def test_other_settings_in_an_existing_study_are_refused_before_writing(study_dir):
    before = (study_dir / "study_config.json").read_text()
    other = tiny_study(steps=201)
    with pytest.raises(ValueError, match="holds a run with a different config"):
        check_out(study_dir, "transient-ridge", other.run_configs())
    with pytest.raises(ValueError, match="holds a run with a different config"):
        run_study(other, study_dir, progress=False)
    assert (study_dir / "study_config.json").read_text() == before


def test_another_studys_directory_is_refused_before_writing(tmp_path):
    (tmp_path / "study_config.json").write_text(json.dumps({"study": "task-diversity"}))
    with pytest.raises(ValueError, match="holds the study 'task-diversity', not 'transient-ridge'"):
        run_study(tiny_study(), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study_config.json"]
    check_out(tmp_path / "new", "transient-ridge", tiny_study().run_configs())  # an empty target is fine


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture
def registered():
    """The CLI reaches the study through the one registry (icl_lab.studies.runner.STUDIES)."""
    from icl_lab.studies.runner import STUDIES

    assert "transient-ridge" in STUDIES


def test_cli_dry_run_lists_the_paper_runs_and_refuses_bad_input(tmp_path, registered):
    out = tmp_path / "paper"
    result = runner.invoke(cli.app, ["study", "transient-ridge", "--scale", "paper", "--dry-run", "--out", str(out)])
    assert result.exit_code == 0, result.output
    n = 3 * len(TransientRidgeConfig.for_scale("paper").Ms)
    assert f"{n} runs" in result.output and "M32768-seed0" in result.output and "Minf-seed0" in result.output
    result = runner.invoke(cli.app, ["study", "transient-ridge", "--Ms", "1,4,inf", "--out", str(out)],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "at least three finite task diversities" in result.output
    assert not out.exists()
