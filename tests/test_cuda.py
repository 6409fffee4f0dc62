"""End to end on CUDA where a GPU exists; skipped with a visible reason elsewhere.

The same tiny configurations as the CPU tests, with device "cuda": training, LLC estimation and the whole
low-diversity study with its report. CUDA is not bit-identical to CPU, so the checks are on completeness and
finiteness, plus agreement with the CPU run within a loose tolerance after a few steps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from icl_lab.config import build_run_config
from icl_lab.store import Run
from icl_lab.train import train

from conftest import tiny_overrides, tiny_study

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device on this machine (torch.cuda.is_available() is False)")


def test_training_on_cuda_matches_cpu_early_and_finishes(tmp_path):
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = build_run_config(overrides=tiny_overrides(device=device, steps=40))
        runs[device] = Run.load(train(cfg, tmp_path / device, progress=False).path)
    cpu, gpu = runs["cpu"].metrics, runs["cuda"].metrics
    assert np.isfinite(gpu["id_loss"]).all()
    # Step 0 (before any update) must agree closely; later steps drift apart only by float rounding.
    assert math.isclose(cpu["id_loss"].iloc[0], gpu["id_loss"].iloc[0], rel_tol=1e-4)
    assert math.isclose(cpu["id_loss"].iloc[-1], gpu["id_loss"].iloc[-1], rel_tol=0.05)


def test_tiny_low_diversity_study_on_cuda(tmp_path):
    from icl_lab.studies.low_diversity import run_study

    cfg = tiny_study().model_copy(update={"device": "cuda"})
    report = run_study(cfg, tmp_path, progress=False)
    html = report.read_text()
    assert "Expectations and measured verdicts" in html
    for name in ("M1-seed0", "M2-seed0"):
        llc = Run.load(tmp_path / "runs" / name).llc
        assert llc is not None and np.isfinite(llc["llc_mean"]).any()
        assert (llc["device"] == "cuda").all()  # the LLC ran on the study's device, not on the CPU
