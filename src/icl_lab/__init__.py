"""icl-lab: developmental interpretability of in-context linear regression.

The public API below is importable from the package (`from icl_lab import estimate_llc`). Each name is imported
from its module on first use (PEP 562), so `import icl_lab` and the numpy-only modules (trajectory, stages,
convergence) stay light: torch and matplotlib load only when something needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
_API = {
    "LLCConfig": "config", "ModelConfig": "config", "PRESETS": "config", "RunConfig": "config",
    "TaskConfig": "config", "TrainConfig": "config", "build_run_config": "config",
    "derive_seed": "seeding", "make_generator": "seeding",
    "Batch": "tasks", "eval_sets": "tasks", "root_task_batch": "tasks", "sample_batch": "tasks", "task_pool": "tasks",
    "ICLTransformer": "model", "build_model": "model", "count_parameters": "model",
    "dmmse_predict": "baselines", "ridge_predict": "baselines", "zero_predict": "baselines",
    "per_token_loss": "evaluate", "predict": "evaluate",
    "TrainingDiverged": "train",
    "Run": "store",
    "Calibration": "llc", "LLCResult": "llc", "calibrate": "llc", "estimate_llc": "llc",
    "LLCSettings": "llc_run", "calibrate_run": "llc_run", "estimate_run": "llc_run",
    "essential_dynamics": "trajectory", "joint_trajectory_pca": "trajectory",
    "find_milestones": "stages", "llc_milestones": "stages", "stage_table": "stages",
    "run_sweep": "sweep",
    "plot_run": "plots",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(f"icl_lab.{_API[name]}"), name)
        globals()[name] = value  # cached: the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'icl_lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
