"""The walkthrough in examples/ runs top to bottom through the public API (at its smoke-test size)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "low_diversity_walkthrough.py"


@pytest.mark.slow
def test_low_diversity_walkthrough_runs(tmp_path):
    env = {**os.environ, "WALKTHROUGH_QUICK": "1", "WALKTHROUGH_OUT": str(tmp_path / "walk"), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(EXAMPLE)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "‖w1 − w2‖²/4 =" in out and "chosen:" in out and "task-identity probe accuracy" in out
    assert out.count("stage") >= 2  # the stage table of each run
    for M in (1, 2):
        assert (tmp_path / "walk" / f"M{M}" / "llc.parquet").exists()
