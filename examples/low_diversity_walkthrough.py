# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # How does the seed model solve M = 1 and M = 2? A walkthrough with the Python API
#
# The same study as `icl-lab study low-diversity`, one step at a time, for interactive use (VS Code / Jupyter
# understand the `# %%` cells; `python examples/low_diversity_walkthrough.py` runs it top to bottom).
# Sizes are small so that it finishes in about ten minutes on a laptop CPU; raise STEPS, the checkpoints and the LLC
# draws for the real thing.

# %%
import os
from pathlib import Path

import numpy as np
import torch

from icl_lab.config import LLCConfig, build_run_config
from icl_lab.llc_run import LLCSettings, estimate_run
from icl_lab.plots import plot_run
from icl_lab.store import Run
from icl_lab.studies.common import llc_stages
from icl_lab.train import train

OUT = Path(os.environ.get("WALKTHROUGH_OUT", "runs/walkthrough"))
SIZE = os.environ.get("WALKTHROUGH_SIZE", "full")  # "tiny" and "quick": the test suite's smoke sizes
STEPS = {"tiny": 60, "quick": 300}.get(SIZE, 2000)
CHECKPOINTS = {"tiny": dict(n_checkpoints_linear=3, n_checkpoints_log=3),
               "quick": dict(n_checkpoints_linear=3, n_checkpoints_log=4)}.get(
                   SIZE, dict(n_checkpoints_linear=4, n_checkpoints_log=10))
SAMPLER = {"tiny": dict(num_chains=2, num_draws=20), "quick": dict(num_chains=2, num_draws=40)}.get(
    SIZE, dict(num_chains=4, num_draws=100))
LLC_N = 256 if SIZE == "tiny" else 2048
torch.set_num_threads(2)

# %% [markdown]
# ## 1. Train the user's model (the `seed` preset) on unit-norm, noiseless tasks
# Each run gets its own directory; training again with the same config reuses it.

# %%
runs = {}
for M in (1, 2):
    cfg = build_run_config(overrides=dict(preset="seed", family="unit_norm", noise_var=0.0, M=M, steps=STEPS,
                                          **CHECKPOINTS))
    path = OUT / f"M{M}"
    runs[M] = Run.load(path) if (path / "config.json").exists() and Run.load(path).finished else train(cfg, path)
    print(runs[M], "final in-distribution loss", runs[M].metrics["id_loss"].iloc[-1])

# %% [markdown]
# ## 2. Loss against step, per token, against the Bayes-optimal baselines
# For M = 2 the final loss at k = 1 should be ‖w₁ − w₂‖²/4 (the pool-mean prediction) and ~0 from k = 2 on.

# %%
from icl_lab.tasks import task_pool  # noqa: E402

pool = task_pool("unit_norm", 2, 8, seed=0)
print("‖w1 − w2‖²/4 =", float((pool[0] - pool[1]).square().sum() / 4))
last = runs[2].metrics.iloc[-1]
print("final ℓ_1 =", last["id_loss_k1"], " max ℓ_k (k ≥ 2) =", max(last[f"id_loss_k{k}"] for k in range(2, 17)))
for run in runs.values():
    print(plot_run(run))

# %% [markdown]
# ## 3. LLC over training, and where the complexity sits (λ̂ per context position)
# At full size the estimates use the library's validated defaults (`LLCConfig()`: ε = 1e-4, γ = 0.01·nβ, burn-in
# ≈ 3/(εγ), 4 chains × 500 draws; docs/llc.md), which cost tens of minutes per checkpoint on 2 CPU cores, so only
# a few checkpoints are estimated: the last one of M = 1 and four of M = 2 placed where its loss moves. The smoke
# sizes use short chains that check the code path, not the number. `refine=["position", "task"]` adds λ̂ per
# context position and per pool task, evaluated along the same chains (the data-refined LLC); they average to λ̂.

# %%
sampler = LLCConfig() if SIZE == "full" else LLCConfig(**SAMPLER, num_burnin=20, batch_size=32)
settings = LLCSettings(sampler=sampler, n=LLC_N, refine=["position", "task"])
loss2 = runs[2].metrics.drop_duplicates("step").set_index("step").loc[runs[2].checkpoint_steps, "id_loss"]
moving = loss2.index[np.searchsorted(-loss2.to_numpy(), -np.linspace(loss2.iloc[0], loss2.iloc[-1], 5)[1:-1])]
llc_at = {1: [runs[1].checkpoint_steps[-1]], 2: sorted({*map(int, moving), runs[2].checkpoint_steps[-1]})}
for M, run in runs.items():
    llc = estimate_run(run, steps=llc_at[M], settings=settings)
    print(f"M={M}", llc[["step", "llc_mean", "llc_lo", "llc_hi", "ok"]])
    plot_run(run)  # now with the LLC panel
last = runs[2].llc.sort_values("step").iloc[-1]
print("M=2, final checkpoint: λ̂ at k = 1:", round(last["llc_refined_k0"], 2),
      " mean over k ≥ 2:", round(np.mean([last[f"llc_refined_k{k}"] for k in range(1, 16)]), 2),
      " per task:", [round(last[f"llc_refined_task{j}"], 2) for j in range(2)])

# %% [markdown]
# ## 4. Stages: critical points of the LLC against log step (M = 2)
# Only trustworthy estimates place boundaries (λ̂ > 0, no sampler flag); the others are shown but not used. With a
# few estimated checkpoints the stages are coarse: estimate more of them (or all) for a finer picture.

# %%
llc = runs[2].llc.sort_values("step")
llc = llc[np.isfinite(llc["llc_mean"])]
loss = runs[2].metrics.drop_duplicates("step").set_index("step").loc[llc["step"], "id_loss"].to_numpy()
stages = llc_stages(llc, loss)
print(f"M=2: {int(stages.trusted.sum())} of {len(llc)} estimates trusted")
print(stages.table[["stage", "start", "end", "delta_loss", "delta_llc", "type"]])

# %% [markdown]
# ## 5. Look inside: attention patterns and a probe for the task identity (M = 2)

# %%
from icl_lab.interp import attention_patterns, probe_residual, to_hooked_transformer  # noqa: E402
from icl_lab.tasks import make_generator, sample_batch  # noqa: E402

model = runs[2].load_checkpoint(runs[2].checkpoint_steps[-1])
batch = sample_batch(runs[2].config.task, pool, 2048, make_generator(0, "walkthrough"))
pattern = attention_patterns(model, batch.x[:64], batch.y[:64]).mean(1)  # (layers, heads, 2K, 2K)
print("layer 0 head 0 attention from x_3 (row 4):", pattern[0, 0, 4, :6].numpy().round(2))
print("task-identity probe accuracy per position:",
      probe_residual(model, batch.x, batch.y, batch.task_index, classify=True).numpy().round(2))

# %% [markdown]
# Prefer TransformerLens hooks? Export the trained model (needs `pip install 'icl-lab[tl]'`):

# %%
try:
    hooked = to_hooked_transformer(model)
    _, cache = hooked.transformer.run_with_cache(hooked.embed(batch.x[:4], batch.y[:4]), start_at_layer=0)
    print("TransformerLens cache keys:", list(cache.keys())[:5])
except ImportError as err:
    print(err)
