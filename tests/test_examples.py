"""The walkthrough in examples/: the notebook and the script are the same cells (jupytext pairing), and the
notebook runs top to bottom on a tiny configuration (nbclient); the script at its quick size is a slow test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPT = EXAMPLES / "low_diversity_walkthrough.py"
NOTEBOOK = EXAMPLES / "low_diversity_walkthrough.ipynb"


def test_notebook_and_script_hold_the_same_cells():
    jupytext = pytest.importorskip("jupytext", reason="jupytext is not installed (the `dev` extra)")
    script, notebook = jupytext.read(SCRIPT), jupytext.read(NOTEBOOK)
    cells = [(c.cell_type, c.source) for c in script.cells]
    assert len(cells) > 5
    assert cells == [(c.cell_type, c.source) for c in notebook.cells], (
        "the paired files drifted: edit one, then run `jupytext --sync examples/low_diversity_walkthrough.py`")
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), "commit it without outputs"


def test_notebook_runs_on_a_tiny_configuration(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (the `dev` extra)")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (the `dev` extra)")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (the `dev` extra)")
    monkeypatch.setenv("WALKTHROUGH_SIZE", "tiny")
    monkeypatch.setenv("WALKTHROUGH_OUT", str(tmp_path / "walk"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell on any error
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "‖w1 − w2‖²/4 =" in text and "λ̂ at k = 1:" in text and "task-identity probe accuracy" in text
    assert text.count("estimates trusted") == 1  # the stage table of M = 2
    for M in (1, 2):
        assert (tmp_path / "walk" / f"M{M}" / "llc.parquet").exists()


@pytest.mark.slow
def test_walkthrough_script_runs_at_its_quick_size(tmp_path):
    env = {**os.environ, "WALKTHROUGH_SIZE": "quick", "WALKTHROUGH_OUT": str(tmp_path / "walk"), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "‖w1 − w2‖²/4 =" in out and "λ̂ at k = 1:" in out and "task-identity probe accuracy" in out
    assert out.count("estimates trusted") == 1
    for M in (1, 2):
        assert (tmp_path / "walk" / f"M{M}" / "llc.parquet").exists()
