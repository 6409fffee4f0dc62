"""The Study framework: `icl-lab report` rebuilds from disk and refuses, naming what is missing."""

import json

from typer.testing import CliRunner

from icl_lab.cli import app
from icl_lab.studies.common import SAMPLER_FAILED, Check, check_table, sampler_worked
from icl_lab.studies.task_diversity import TaskDiversityConfig

runner = CliRunner()


def test_report_refuses_with_one_line_naming_what_is_missing(tmp_path):
    cfg = TaskDiversityConfig(Ms=[1, 2, "inf"], steps=10)
    (tmp_path / "study_config.json").write_text(cfg.model_dump_json())
    result = runner.invoke(app, ["report", str(tmp_path)], env={"COLUMNS": "500"})
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "runs/M1-B32-seed0 (not trained)" in lines[0]
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "runs").exists()


def test_report_refuses_a_directory_that_is_not_a_study(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)], env={"COLUMNS": "500"})
    assert result.exit_code == 2 and "study_config.json is missing" in result.output


def test_a_check_states_its_verdict_and_every_table_has_the_same_columns():
    table = check_table([Check("a", "x < 1", "0.5", True), Check("b", "x < 1", "2", False, run="r"),
                         Check("c", "x < 1", "not measured", None, source="§A")])
    assert table["verdict"].tolist() == ["pass", "fail", "unclear"]
    assert list(table.columns) == ["expectation", "run", "source", "expected", "measured", "verdict"]


def test_sampler_worked_reads_the_flags_llc_emits():
    import inspect

    from icl_lab import llc

    source = inspect.getsource(llc)
    assert all(f'flags["{f}"]' in source for f in SAMPLER_FAILED)  # every flag named is one llc raises
    assert sampler_worked(float("nan")) and sampler_worked("negative;few_effective_draws")
    assert not sampler_worked("negative;not_stationary") and not sampler_worked("diverged")
    assert json.dumps(sorted(SAMPLER_FAILED)) == '["chains_disagree", "diverged", "not_stationary"]'
