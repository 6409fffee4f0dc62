"""The task-diversity study (Raventós et al.): the threshold criterion as a pure function, the whole study on a tiny
configuration (report content, reuse of finished runs), the scales' run configs, and the CLI's bad-input handling."""

import base64
import io
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from icl_lab.cli import app
from icl_lab.plots.studies import delta_vs_m_figure
from icl_lab.studies.common import check_table
from icl_lab.studies.task_diversity import (
    TaskDiversityConfig,
    analyse,
    bootstrap_m_star,
    doubling_threshold,
    expectations,
    log_ratio_intervals,
    mean_over_seeds,
    per_seed_deltas,
    phase_sets,
    run_study,
)

runner = CliRunner()
POW2 = np.array([2.0**j for j in range(11)])


# ------------------------------------------------------------------------------------------------ the criterion
def curves(Ms, r, scale=0.3):
    """Δ_B and Δ_2B with ln(Δ_2B / Δ_B) = r at each M (Δ_B falls with M, as Δ to ridge does)."""
    d_b = scale * np.asarray(Ms) ** -0.2
    return d_b, d_b * np.exp(r)


def test_a_clean_crossing_is_found_where_the_curves_cross():
    r = 0.2 * (5.5 - np.log2(POW2))  # doubling B raises Δ below 2^5.5, lowers it above
    c = doubling_threshold(POW2, *curves(POW2, r))
    assert c.M_star == pytest.approx(2**5.5, rel=1e-9)
    assert c.bracket == (32.0, 64.0) and c.side == "inside" and c.clean
    assert c.n_sign_changes == 1 and c.n_down_crossings == 1 and c.agreement == 1.0
    # scale-free: multiplying both curves by a constant does not move M*
    assert doubling_threshold(POW2, *curves(POW2, r, scale=7.0)).M_star == pytest.approx(c.M_star)


def test_m_star_is_interpolated_linearly_in_log2_m():
    Ms = [1, 2, 4, 8]
    c = doubling_threshold(Ms, *curves(Ms, [0.5, 0.3, 0.1, -0.3]))
    assert math.log2(c.M_star) == pytest.approx(2 + 0.1 / 0.4)  # between 4 and 8, a quarter of the way


def test_a_small_spurious_sign_change_does_not_move_m_star():
    Ms = POW2[:6]
    r = np.array([0.4, -0.02, 0.5, 0.3, -0.6, -0.5])  # a dip at M = 2 is noise; the crossing is between 8 and 16
    c = doubling_threshold(Ms, *curves(Ms, r))
    assert c.bracket == (8.0, 16.0)
    assert math.log2(c.M_star) == pytest.approx(3 + 0.3 / 0.9)
    assert c.n_sign_changes == 3 and c.n_down_crossings == 2 and not c.clean
    assert c.agreement == pytest.approx(5 / 6)


@pytest.mark.parametrize(("r", "side"), [([0.3, 0.2, 0.1, 0.05], "above"), ([-0.1, -0.2, -0.3, -0.1], "below"),
                                         ([-0.3, -0.1, 0.1, 0.2], "below")])
def test_no_crossing_in_range_says_on_which_side_the_threshold_lies(r, side):
    """No + → − crossing: the best step cut is at an end (an inverted − → + pattern also ends up at an end)."""
    c = doubling_threshold([1, 2, 4, 8], *curves([1, 2, 4, 8], r))
    assert c.M_star is None and c.bracket is None and c.side == side and not c.clean
    assert ("above the largest" if side == "above" else "below the smallest") in c.reason


@pytest.mark.parametrize(("Ms", "a", "b", "message"), [
    ([1, 2], [1.0], [1.0, 2.0], "one length"),
    ([1], [1.0], [1.0], "at least two"),
    ([2, 1], [1.0, 1.0], [1.0, 1.0], "strictly increasing"),
    ([1, np.inf], [1.0, 1.0], [1.0, 1.0], "finite"),
    ([1, 2], [1.0, 0.0], [1.0, 1.0], "> 0"),
    ([1, 2], [1.0, np.nan], [1.0, 1.0], "> 0"),
])
def test_bad_criterion_input_raises(Ms, a, b, message):
    with pytest.raises(ValueError, match=message):
        doubling_threshold(Ms, a, b)


def test_phase_sets_relative_to_m_star():
    c = doubling_threshold(POW2, *curves(POW2, 0.2 * (5.5 - np.log2(POW2))))
    low, below, above = phase_sets(c, list(POW2))
    assert low == [1.0, 2.0, 4.0] and below == [1, 2, 4, 8, 16, 32] and above[:2] == [64, 128]
    assert above[-1] == np.inf


# ------------------------------------------------------------------------------------------------ scales
# ------------------------------------------------------------------------------------------------ power
def seed_curves(offsets, m_star_log2=4.5, slope=0.3):
    """Per-seed (S, 11) Δ_B and Δ_2B on POW2 with ln(Δ_2B/Δ_B) = slope·(log2 M* − log2 M) + offset_s: seed s crosses
    at 2^(log2 M* + offset_s/slope); the seed-mean curves (Δ_B is the same for every seed) cross at
    2^(log2 M* + ln(mean_s e^offset_s)/slope)."""
    r = slope * (m_star_log2 - np.log2(POW2))[None, :] + np.asarray(offsets, dtype=float)[:, None]
    d_b = np.tile(0.3 * POW2 ** -0.2, (len(offsets), 1))
    return d_b, d_b * np.exp(r)


def test_bootstrap_m_star_brackets_a_known_crossover_within_the_seeds_spread():
    """Offsets ±0.05 move a seed's crossing by ±1/6 octave; every resample mean crosses within that spread."""
    offsets = np.array([-0.05, 0.0, 0.05])
    a, b = seed_curves(offsets)
    ci, undefined = bootstrap_m_star(POW2, a, b, n_boot=500)
    expected = 2 ** (4.5 + math.log(np.exp(offsets).mean()) / 0.3)
    assert ci.estimate == pytest.approx(expected) and undefined == 0.0 and ci.level == 0.95
    assert 2 ** (4.5 - 1 / 6) - 1e-9 <= ci.lo < 2**4.5 < ci.hi <= 2 ** (4.5 + 1 / 6) + 1e-9
    assert "bootstrap" in ci.method and "3 units" in ci.method
    wide, _ = bootstrap_m_star(POW2, *seed_curves([-0.6, 0.0, 0.6]), n_boot=500)  # ±2 octaves: a wider interval
    assert wide.lo < ci.lo and wide.hi > ci.hi and wide.lo < 2**3 and wide.hi > 2**6
    same = bootstrap_m_star(POW2, a, b, n_boot=500)  # seeded: the same interval again
    assert same[0] == ci


def test_bootstrap_m_star_counts_resamples_without_a_crossover():
    """One seed of three is shifted by 5/0.3 = 16.7 octaves: any resample that draws it crosses above 2^10, so the
    fraction without a crossover is 1 − (2/3)^3 = 0.70, over half: the interval is undefined, and says so."""
    a, b = seed_curves([0.0, 0.0, 5.0])
    ci, undefined = bootstrap_m_star(POW2, a, b, n_boot=2000)
    assert undefined == pytest.approx(1 - (2 / 3) ** 3, abs=0.03)
    assert math.isnan(ci.lo) and math.isnan(ci.hi) and math.isnan(ci.estimate)  # the mean of all three: no crossing
    one, frac = bootstrap_m_star(POW2, a[:1], b[:1])
    assert one.estimate == pytest.approx(2**4.5) and math.isnan(one.lo) and math.isnan(frac)  # 1 seed: no interval
    with pytest.raises(ValueError, match=r"\(seeds, len\(Ms\)\)"):
        bootstrap_m_star(POW2, a[:, :5], b)


def test_log_ratio_intervals_are_t_intervals_over_seeds():
    a, b = seed_curves([-0.1, 0.0, 0.1])
    iv = log_ratio_intervals(a, b)
    r = np.log(b) - np.log(a)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2} · s / √3 with s = 0.1
    for j, i in enumerate(iv):
        assert i.estimate == pytest.approx(r[:, j].mean()) and i.half_width == pytest.approx(half, rel=1e-6)
    assert "2 d.o.f." in iv[0].method


def test_per_seed_deltas_reads_the_summary_rows_and_refuses_gaps():
    rows = [{"M": m, "B": B, "seed": s, "ood_delta_ridge": 10 * s + m + B / 100}
            for m in (1.0, 2.0, np.inf) for B in (8, 16) for s in (0, 1)]
    Ms, seeds, v = per_seed_deltas(pd.DataFrame(rows), 16)
    assert Ms.tolist() == [1.0, 2.0] and seeds.tolist() == [0, 1]
    assert v.tolist() == [[1.16, 2.16], [11.16, 12.16]]
    with pytest.raises(ValueError, match="cells have no"):
        per_seed_deltas(pd.DataFrame([r for r in rows if (r["M"], r["B"], r["seed"]) != (2.0, 16, 1)]), 16)


def test_scales_build_valid_run_configs():
    small = TaskDiversityConfig.for_scale("small")
    runs = small.run_configs()
    assert len(runs) == 12 * 2 * 3 and small.batch_sizes == [32, 64] and small.seeds == [0, 1, 2]
    assert small.ensemble == 3  # each (M, B) cell's seeds are consecutive in run_configs: one ensemble job
    assert list(runs)[:3] == ["M1-B64-seed0", "M1-B64-seed1", "M1-B64-seed2"]
    cfg = runs["M1024-B64-seed0"]
    assert (cfg.task.family, cfg.task.D, cfg.task.K, cfg.task.noise_var, cfg.task.M) == ("gaussian", 4, 8, 0.125, 1024)
    assert cfg.model.preset == "hoogland" and cfg.train.steps == 16_000 and cfg.train.schedule == "triangle"
    assert runs["Minf-B32-seed0"].task.M is None
    assert next(iter(runs)).endswith("B64-seed0")  # the larger batch (longer jobs) first

    paper = TaskDiversityConfig.for_scale("paper")
    runs = paper.run_configs()
    assert len(runs) == 22 * 3 * 3 and paper.batch_sizes == [256, 512, 1024] and paper.seeds == [0, 1, 2]
    cfg = runs[f"M{2**20}-B512-seed0"]
    assert (cfg.task.D, cfg.task.K, cfg.task.noise_var, cfg.model.preset, cfg.model.n_layers, cfg.model.d_model) == (
        8, 16, 0.25, "raventos-base", 8, 128)
    assert cfg.train.steps == 500_000 and cfg.train.device == "cuda"

    quick = TaskDiversityConfig.for_scale("small", quick=True)
    assert len(quick.run_configs()) == 12 * 3 and quick.steps == 2000 and quick.ensemble == 3
    with pytest.raises(ValueError, match="quick"):
        TaskDiversityConfig.for_scale("paper", quick=True)
    assert TaskDiversityConfig(Ms="8,inf,1,2").Ms == [1, 2, 8, None]


# ------------------------------------------------------------------------------------------------ the whole study
def tiny_study(**kw) -> TaskDiversityConfig:
    return TaskDiversityConfig(**{**dict(
        Ms=[1, 2, 4, "inf"], D=2, K=4, noise_var=0.1, batch_size=8, steps=30, eval_size=64, n_checkpoints_linear=4,
        n_checkpoints_log=4, workers=1, seeds=[0, 1, 2], ensemble=3, n_boot=200,
        model_overrides=dict(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=16)),
        **kw})


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("task_diversity")
    run_study(tiny_study(), out, progress=False)
    return out


def _tables(html: str) -> list[pd.DataFrame]:
    return pd.read_html(io.StringIO(html))


def test_report_has_every_figure_numbers_and_a_filled_expectations_table(study_dir):
    html = (study_dir / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 5
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    for title in ("Scale", "Expectations and measured verdicts", "The task-diversity threshold M*",
                  "Distance to dMMSE and ridge against task diversity", "Final per-token losses",
                  "Distance to ridge over training", "Where this study differs from the paper",
                  "Wall time per phase", "hoogland", "500,000", "95% percentile bootstrap, 200 resamples of 3 units",
                  "95% Student-t interval", "t, 2 d.o.f. (3 values)"):
        assert title in html, title
    assert "<script" not in html
    exp = next(t for t in _tables(html) if "verdict" in t.columns)
    assert {"expectation", "source", "expected", "measured", "verdict"} <= set(exp.columns)
    assert len(exp) >= 12
    assert exp["measured"].notna().all()
    # this tiny, seeded configuration's verdicts, row by row (most fail or stay unclear at this size)
    assert dict(zip(exp["expectation"], exp["verdict"], strict=True)) == {
        "dMMSE is best on T_Pretrain, ridge on T_True (estimator sanity)": "pass",
        "Δ(Ridge, dMMSE) on T_True shrinks as M grows": "pass",
        "a task-diversity threshold M*: the Δ_True(PT, Ridge) curves of B and 2B cross once, 2B above below M* "
        "and below above it": "pass",
        "at M = ∞, doubling B lowers Δ_True(PT, Ridge) (more data → more ridge-like)": "pass",
        "at small scale the threshold lies below the paper's (smaller model, fewer steps, lower D)": "pass",
        "low-diversity phase: the PT tracks dMMSE on T_Pretrain": "pass",
        "low-diversity phase: the PT underperforms ridge on T_True, like dMMSE": "pass",
        "above M*: the PT is ridge-like on T_True": "fail",
        "M = ∞: the PT matches ridge on T_True": "fail",
        "above M*: final T_True loss like M = ∞'s (Fig. 10)": "fail",
        "well below M*: more data lowers Δ_Pretrain(PT, dMMSE) (paper: M ≤ 2^10, 4 octaves under M*)": "pass",
        "below M*: more data makes the PT less ridge-like on T_Pretrain too": "fail",
        "above M*: more data makes the PT more ridge-like on T_Pretrain too": "pass",
        "low M: the final per-token loss on T_Pretrain follows dMMSE's, not ridge's": "fail",
        "above M* and at ∞: the final per-token loss on T_True follows ridge's": "fail",
    }
    row = exp[exp["expectation"].str.startswith("at small scale the threshold")].iloc[0]
    assert "whole 95% bootstrap interval below 2^11" in row["expected"] and "no crossover in" in row["measured"]
    timing = next(t for t in _tables(html) if "phase" in t.columns)
    assert set(timing["phase"]) == {"train", "analysis", "figures"}
    for fig in ("delta_vs_M", "crossover", "per_token", "delta_ridge_vs_step", "log_ratio_intervals"):
        assert (study_dir / "figures" / f"{fig}.png").stat().st_size > 10_000
        assert (study_dir / "figures" / f"{fig}.pdf").exists()


def test_summary_numbers_are_finite_and_complete(study_dir):
    summary = pd.read_parquet(study_dir / "summary.parquet")
    assert len(summary) == 4 * 2 * 3 and set(summary["B"]) == {8, 16} and set(summary["seed"]) == {0, 1, 2}
    assert set(summary["M"]) == {1.0, 2.0, 4.0, np.inf}
    numeric = summary.select_dtypes("number").drop(columns=["M"])
    assert np.isfinite(numeric.to_numpy()).all()
    for s in ("id", "ood"):
        assert {f"{s}_loss_k1", f"{s}_loss_k4", f"{s}_delta_dmmse", f"{s}_delta_ridge", f"{s}_ridge_loss_k4"} <= set(
            summary.columns)
    inf = summary[summary["M"] == np.inf]
    assert np.allclose(inf["ood_delta_dmmse"], inf["ood_delta_ridge"])  # dMMSE is ridge at M = ∞
    assert (inf["ood_delta_ridge_dmmse"] == 0).all()
    threshold = json.loads((study_dir / "threshold.json").read_text())
    c = threshold["B8->B16"]
    assert c["side"] in {"inside", "above", "below"} and len(c["log_ratio"]) == 3
    assert np.isfinite(c["log_ratio"]).all()
    index = pd.read_parquet(study_dir / "runs" / "index.parquet")
    assert (index["status"] == "done").all() and len(index) == 8 * 3
    ci = threshold["m_star_interval"]
    assert ci["level"] == 0.95 and "bootstrap" in ci["method"] and 0 <= ci["no_crossover_fraction"] <= 1
    assert len(threshold["log_ratio_intervals"]) == 3 and "t, 2 d.o.f." in threshold["log_ratio_intervals"][0]["method"]


def test_known_threshold_flows_through_the_analysis_and_the_figure(study_dir, tmp_path):
    """A synthetic Δ-vs-M input (the tiny study's summary with Δ_True(PT, Ridge) replaced) whose crossover is known."""
    summary = pd.read_parquet(study_dir / "summary.parquet")
    r = lambda M: 0.3 * (1.5 - np.log2(M)) if np.isfinite(M) else -0.5  # M* = 2^1.5
    summary.loc[summary["B"] == 8, "ood_delta_ridge"] = 1.0
    summary.loc[summary["B"] == 16, "ood_delta_ridge"] = [math.exp(r(M)) for M in summary.loc[summary["B"] == 16, "M"]]
    analysis = analyse(summary, [8, 16])
    c = analysis[8, 16]
    assert c.M_star == pytest.approx(2**1.5) and c.bracket == (2.0, 4.0) and c.clean
    exp = check_table(expectations(tiny_study(), summary, analysis))
    row = exp[exp["expectation"].str.startswith("a task-diversity threshold M*")].iloc[0]
    assert row["verdict"] == "pass" and "2^1.50" in row["measured"]
    row = exp[exp["expectation"].str.startswith("at M = ∞, doubling B lowers")].iloc[0]
    assert row["verdict"] == "pass"
    png, pdf = delta_vs_m_figure(summary, mean_over_seeds(summary), int(summary["D"].iloc[0]), c, tmp_path / "fig2")
    assert png.stat().st_size > 10_000 and pdf.exists()


def test_report_command_rebuilds_and_reuses_every_run(study_dir):
    before = {p: p.stat().st_mtime_ns for p in (study_dir / "runs").rglob("*.parquet") if p.name != "index.parquet"}
    t0 = time.perf_counter()
    result = runner.invoke(app, ["report", str(study_dir)])
    assert result.exit_code == 0, result.output
    assert "report:" in result.output
    timings = json.loads((study_dir / "timings.json").read_text())
    assert "train" not in timings and "llc estimates" not in timings  # nothing was trained or estimated
    assert not [p for p, m in before.items() if p.stat().st_mtime_ns != m]
    assert time.perf_counter() - t0 < 60


def test_cli_refuses_other_settings_in_an_existing_study_before_writing(study_dir, tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_study(steps=31).model_dump(mode="json", exclude={"scale", "quick"})))
    before = (study_dir / "study_config.json").read_text()
    result = runner.invoke(app, ["study", "task-diversity", "--config", str(cfg), "--out", str(study_dir)],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "holds a run with a different config" in result.output
    assert (study_dir / "study_config.json").read_text() == before
    result = runner.invoke(app, ["study", "task-diversity", "--config", str(cfg), "--dry-run",
                                 "--out", str(tmp_path / "new")])
    assert result.exit_code == 0 and "24 runs" in result.output


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.mark.parametrize(("args", "message"), [
    (["--scale", "huge"], "scale: Input should be 'small' or 'paper'"),
    (["--executor", "dask"], "executor: Input should be 'local', 'ray' or 'slurm'"),
    (["--Ms", "0,2,inf"], "Ms: Value error, M must be an integer >= 1 or 'inf', got 0"),
    (["--Ms", "1,two"], "M must be an integer >= 1 or 'inf', got 'two'"),
    (["--Ms", "4,inf"], "at least two finite task diversities"),
    (["--workers", "0"], "workers: Input should be greater than or equal to 1"),
    (["--steps", "0"], "steps: Input should be greater than or equal to 1"),
    (["--seeds", "a"], "seeds: 'a' is not allowed; allowed: comma-separated integers"),
    (["--quick", "--scale", "paper"], "quick: the quick version shrinks the small scale"),
])
def test_cli_bad_input_exits_2_before_anything_is_written(tmp_path, args, message):
    out = tmp_path / "study"
    result = runner.invoke(app, ["study", "task-diversity", "--out", str(out), *args], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in " ".join(result.output.split())
    assert not out.exists()


def test_cli_bad_config_file_and_unknown_study(tmp_path):
    cfg = tmp_path / "td.toml"
    cfg.write_text('preset = "gpt9"\n')
    result = runner.invoke(app, ["study", "task-diversity", "--config", str(cfg), "--out", str(tmp_path / "s")],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "unknown model preset 'gpt9'; allowed presets:" in result.output
    cfg.write_text("learning_rate = 0.1\n")
    result = runner.invoke(app, ["study", "task-diversity", "--config", str(cfg), "--out", str(tmp_path / "s")],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "learning_rate: Extra inputs are not permitted" in result.output
    result = runner.invoke(app, ["study", "task-diverse", "--out", str(tmp_path / "s")], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "available: low-diversity, task-diversity, transient-ridge, stages" in result.output
    result = runner.invoke(app, ["study", "low-diversity", "--scale", "paper", "--out", str(tmp_path / "s")],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "the study low-diversity has no paper scale (allowed: scale 'small')" in result.output
    assert not (tmp_path / "s").exists()


def test_cli_dry_run_validates_the_paper_scale_and_writes_nothing(tmp_path):
    out = tmp_path / "paper"
    result = runner.invoke(app, ["study", "task-diversity", "--scale", "paper", "--dry-run", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "198 runs" in result.output and "M1048576-B1024-seed2" in result.output
    assert "Minf-B256-seed0" in result.output
    result = runner.invoke(app, ["study", "task-diversity", "--dry-run", "--Ms", "1,2,inf", "--seeds", "0,1",
                                 "--out", str(out)])
    assert result.exit_code == 0 and "12 runs" in result.output
    assert not out.exists()
