"""Shared tiny configurations. Everything is seeded; nothing touches the network."""

from __future__ import annotations

import pytest
import torch

from icl_lab.config import LLCConfig, RunConfig, build_run_config

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_overrides(**kw) -> dict:
    """A model and run small enough to train in about a second on CPU."""
    base = dict(
        D=4,
        K=6,
        M=2,
        n_layers=1,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_mlp=16,
        steps=40,
        batch_size=16,
        eval_size=64,
        n_checkpoints_linear=5,
        n_checkpoints_log=5,
    )
    base.update(kw)
    return base


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test (restored after): for tiny models a second thread only adds
    synchronisation, and hurts on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config() -> RunConfig:
    return build_run_config(overrides=tiny_overrides())


def tiny_study():
    """The low-diversity study with every group (main M = 1, 2 and the three M = 2 controls) at a size that runs in a
    minute or two, with a tiny explicit tilted sampler so that the LLC path (settings, sparse checkpoints, the
    data-refined columns, stages) is exercised."""
    from icl_lab.studies.low_diversity import LowDiversityConfig

    return LowDiversityConfig.for_scale(
        quick=True, steps=120, D=3, K=5, workers=1, llc_n=128, eval_size=64, ed_batch=16,
        sampler=LLCConfig(num_chains=2, num_draws=10, num_burnin=4, batch_size=16, localization=100.0, tilted=True),
        step_sizes=[1e-4, 1e-3], n_checkpoints_linear=3, n_checkpoints_log=6, llc=True, llc_points=3,
        control_llc_points=2)
