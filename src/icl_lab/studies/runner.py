"""The Study framework: a study declares its runs, its LLC plan, its analysis, checks, figures and report sections;
`run_study` trains, estimates and reports, `rebuild_report` reports from what is on disk and computes nothing.

    study = STUDIES[cfg.study](cfg)
    run_study(cfg, out)        # train (sweep executors), calibrate once, estimate the LLC plan, analyse, report
    rebuild_report(out)        # the same report from disk; MissingOutputs names what is not there
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from icl_lab.llc_run import (
    LLCPlan,
    SharedSettings,
    calibrate_shared,
    estimate_runs,
    load_shared,
    missing_steps,
    settings_report,
)
from icl_lab.plots import plot_calibration
from icl_lab.report import Section, write_report
from icl_lab.store import Run, write_json, write_parquet
from icl_lab.studies.common import Check, PhaseTimer, StudyConfig, check_out, check_table
from icl_lab.sweep import check_options, train_named_runs
from icl_lab.tracking import open_tracker

__all__ = ["STUDIES", "MissingOutputs", "Study", "config_class", "mirror_study", "rebuild_report", "run_study",
           "study_class"]

# study name -> module; each module defines STUDY, its Study subclass
STUDIES = {
    "low-diversity": "icl_lab.studies.low_diversity",
    "task-diversity": "icl_lab.studies.task_diversity",
    "transient-ridge": "icl_lab.studies.transient_ridge",
    "stages": "icl_lab.studies.stages",
}


class MissingOutputs(ValueError):
    """`rebuild_report` found a study directory without something it would have to compute."""


def study_class(name: str) -> type[Study]:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; available: {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[name]).STUDY


def config_class(name: str) -> type[StudyConfig]:
    return study_class(name).config


class Study:
    """One study of the papers. Subclasses set `name`, `title` and `config` and write the science: `analyse`,
    `checks`, `figures`, `sections`; the runner does the rest (directories, training, the LLC plan, timing, the
    standard report sections)."""

    name: ClassVar[str]
    title: ClassVar[str]
    config: ClassVar[type[StudyConfig]]
    scale_note: ClassVar[str] = ""  # above the scale table
    reused: ClassVar[str] = "finished runs are reused and cost nothing"  # in the wall-time section

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def llc_plan(self, runs: dict[str, Run]) -> LLCPlan | None:
        """The LLCs the study needs (None: none)."""
        return None

    def analyse(self, runs: dict[str, Run], llc: SharedSettings | None, out: Path) -> Any:
        """The measurements (science only); may write numbers to OUT."""
        raise NotImplementedError

    def checks(self, r: Any) -> list[Check]:
        raise NotImplementedError

    def checks_note(self) -> str:
        """How the checks were made, after "n of m checks pass." in the expectations section."""
        return ""

    def figures(self, r: Any, figs: Path) -> dict[str, Any]:
        raise NotImplementedError

    def sections(self, r: Any, figs: dict[str, Any]) -> list[Section]:
        """The study's own report sections, between the expectations and "where this study differs"."""
        raise NotImplementedError

    def appendix(self, r: Any) -> list[Section]:
        """Sections after "where this study differs" (tables of numbers)."""
        return []

    def intro(self, r: Any) -> str:
        raise NotImplementedError

    def scale_table(self) -> pd.DataFrame | None:
        """This study's sizes next to the paper's (None: no such section)."""
        return None

    def differs(self, r: Any) -> str | None:
        """The paragraph after the list of unreproduced checks in "where this study differs" (None: no section)."""
        return None


def _runs_dir(out: Path) -> Path:
    return out / "runs"


def run_study(cfg: StudyConfig, out: str | Path, progress: bool = True) -> Path:
    """Train (reusing finished runs), calibrate and estimate the LLC plan (reusing what is on disk), analyse, and
    write OUT/report.html; returns its path. Bad settings raise before anything is written."""

    study = study_class(cfg.study)(cfg)
    out = Path(out)
    configs = cfg.run_configs()
    check_options(cfg.executor, cfg.workers, cfg.ensemble)
    check_out(out, cfg.study, configs)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "study_config.json", json.loads(cfg.model_dump_json()))
    timer = PhaseTimer()
    workers = cfg.workers or os.cpu_count() or 1
    with timer("train"):
        runs = train_named_runs(configs, _runs_dir(out), workers=workers, executor=cfg.executor, progress=progress,
                                address=cfg.address, slurm=cfg.slurm, ensemble=cfg.ensemble, wandb=cfg.wandb)
    shared, plan = None, study.llc_plan(runs)
    if plan is not None:
        with timer("llc calibration"):
            shared = calibrate_shared(out, plan, runs, cfg.device, figure=plot_calibration)
        if shared.settings is not None:
            with timer("llc estimates"):
                estimate_runs(list(runs.values()), shared.settings, steps=plan.steps(runs), workers=workers,
                              progress=progress, device=cfg.device, wandb=cfg.wandb)
    path = _report(study, out, runs, shared, timer)
    mirror_study(cfg, out)
    return path


def mirror_study(cfg: StudyConfig, out: Path) -> None:
    """With cfg.wandb, one wandb run for the study itself (its runs have their own): the study's config, how many
    checks pass, and every figure under OUT/figures. Without it, nothing (wandb is not imported)."""
    if not cfg.wandb:
        return
    with open_tracker(cfg.wandb, out, name=out.name, job_type=f"study-{cfg.study}",
                      config=json.loads(cfg.model_dump_json())) as tracker:
        checks = pd.read_parquet(out / "expectations.parquet")
        tracker.log(0, {"study/checks": len(checks), "study/checks_pass": int((checks["verdict"] == "pass").sum())})
        for png in sorted((out / "figures").rglob("*.png")):
            tracker.log_figure(png.relative_to(out / "figures").with_suffix("").as_posix(), png)


def rebuild_report(out: str | Path) -> Path:
    """Rebuild OUT/report.html from what is on disk: nothing is trained, calibrated or estimated. Raises
    MissingOutputs (one line, naming what is missing) where the report would need that."""
    out = Path(out)
    f = out / "study_config.json"
    if not f.exists():
        raise MissingOutputs(f"{out} is not a study directory: study_config.json is missing")
    saved = json.loads(f.read_text())
    cfg = config_class(saved.get("study", "low-diversity")).model_validate(saved)
    study = study_class(cfg.study)(cfg)
    missing, runs = [], {}
    for name in cfg.run_configs():
        path = _runs_dir(out) / name
        run = Run.load(path) if (path / "config.json").exists() else None
        if run is None or not run.finished:
            missing.append(f"runs/{name} (not trained{'' if run is None else ' to the end'})")
        else:
            runs[name] = run
    shared, plan = None, (study.llc_plan(runs) if not missing else None)
    if plan is not None:
        shared = load_shared(out, plan, runs)
        if shared is None:
            missing.append("llc_settings.json (the LLC calibration)")
        elif shared.settings is not None:
            steps = plan.steps(runs) or {}
            for name, run in runs.items():
                todo = missing_steps(run, shared.settings, steps.get(run.path))
                if todo:
                    missing.append(f"LLC estimates of runs/{name} at {len(todo)} checkpoint(s)")
    if missing:
        raise MissingOutputs(f"cannot rebuild {out} without computing: missing {'; '.join(missing)} (run `icl-lab "
                             f"study {cfg.study} --out {out}` to compute them)")
    return _report(study, out, runs, shared, PhaseTimer())


def _report(study: Study, out: Path, runs: dict[str, Run], shared: SharedSettings | None, timer: PhaseTimer
            ) -> Path:
    """Analyse, check, draw and write the report with the standard sections around the study's own."""
    cfg = study.cfg
    with timer("analysis"):
        r = study.analyse(runs, shared, out)
        checks = check_table(study.checks(r))
        write_parquet(out / "expectations.parquet", checks)
    with timer("figures"):
        figs = study.figures(r, out / "figures")
    with timer("report"):
        sections = []
        scale = study.scale_table()
        if scale is not None:
            sections.append(Section("Scale", study.scale_note, tables=[scale]))
        n_pass = int((checks["verdict"] == "pass").sum())
        sections.append(Section("Expectations and measured verdicts",
                                f"{n_pass} of {len(checks)} checks pass. {study.checks_note()}", tables=[checks]))
        if shared is not None:
            text, tables = settings_report(shared)
            sections.append(Section("LLC settings and their validation", text, tables=tables))
        sections += study.sections(r, figs)
        note = study.differs(r)
        if note is not None:
            diffs = checks[checks["verdict"] != "pass"]
            text = ("Every expectation that this study did not reproduce, with the measured numbers (never tuned to "
                    "agree): " + " ".join(f"[{d.verdict}] {d.expectation}{f' ({d.run})' if d.run else ''}: expected "
                                          f"{d.expected}; measured {d.measured}." for d in diffs.itertuples())
                    if len(diffs) else "Every expectation in the table was reproduced at this scale.")
            sections.append(Section("Where this study differs from the paper", f"{text}\n\n{note}"))
        sections += study.appendix(r)
        sections.append(Section("Wall time per phase", (
            "Seconds per phase in this invocation (first column; earlier ones beside it, all in "
            f"timings_history.json; executor {cfg.executor}, {cfg.workers} workers, device {cfg.device}); "
            f"{study.reused}. Writing this page is not included (timings.json has it). Per-run training times: "
            "runs/index.parquet."), tables=[timer.table(out)]))
        path = write_report(out / "report.html", study.title, study.intro(r), sections)
    timer.save(out)
    return path
