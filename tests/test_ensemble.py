"""Ensembles (icl_lab.ensemble): stacked AdamW and clipping against torch's, the vmapped forward, and members of
an ensemble-trained run against separately trained runs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from icl_lab.config import build_run_config
from icl_lab.ensemble import (
    EnsembleError,
    StackedAdamW,
    StackedModels,
    check_stackable,
    clip_grad_norms_,
    group_stackable,
    train_ensemble,
)
from icl_lab.model import build_model
from icl_lab.store import Run, load_tensors
from icl_lab.tasks import make_generator, sample_batch
from icl_lab.train import TrainingDiverged, train

from conftest import tiny_overrides

# The key bias b_K shifts every attention score of a query by the same amount, which softmax ignores: its exact
# gradient is zero and what autograd returns is rounding noise, which Adam normalises into lr-sized steps. Two
# runs that round differently (batched vs single matmuls) therefore disagree on b_K, and on nothing that matters.
NON_IDENTIFIABLE = ("attn.b_K",)


def cfg(**kw):
    return build_run_config(overrides=tiny_overrides(**{"steps": 60, "eval_size": 64, **kw}))


def test_stacked_adamw_equals_torch_adamw_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    n, lrs, wds = 3, [1e-2, 3e-3, 1e-3], [0.1, 0.0, 0.5]
    shapes = {"w": (5, 7), "b": (7,), "h": (2, 3, 4)}
    params = {k: torch.randn(n, *s, generator=g).requires_grad_() for k, s in shapes.items()}
    opt = StackedAdamW(params, lrs, wds, betas=(0.9, 0.99))
    refs = []
    for i in range(n):
        ps = {k: torch.nn.Parameter(v[i].detach().clone()) for k, v in params.items()}
        groups = [{"params": [ps["w"], ps["h"]], "weight_decay": wds[i]}, {"params": [ps["b"]], "weight_decay": 0.0}]
        refs.append((ps, torch.optim.AdamW(groups, lr=lrs[i], betas=(0.9, 0.99))))
    for t in range(40):
        grads = {k: torch.randn(n, *s, generator=g) for k, s in shapes.items()}
        factor = 0.5 + t / 80  # a schedule multiplier
        for k in params:
            params[k].grad = grads[k].clone()
        opt.step(factor)
        for i, (ps, o) in enumerate(refs):
            for group in o.param_groups:
                group["lr"] = lrs[i] * factor
            for k in ps:
                ps[k].grad = grads[k][i].clone()
            o.step()
    for i, (ps, _) in enumerate(refs):
        for k in ps:
            assert torch.equal(ps[k].detach(), params[k][i].detach()), (i, k)


def test_per_member_clipping_equals_clip_grad_norm():
    g = torch.Generator().manual_seed(1)
    n, limits = 3, [0.5, None, 100.0]
    grads = [torch.randn(n, 4, 5, generator=g), torch.randn(n, 5, generator=g)]
    params = [torch.zeros_like(x, requires_grad=True) for x in grads]
    for p, x in zip(params, grads, strict=True):
        p.grad = x.clone()
    norms = clip_grad_norms_(params, limits)
    for i in range(n):
        ref = [torch.zeros_like(x[i], requires_grad=True) for x in grads]
        for p, x in zip(ref, grads, strict=True):
            p.grad = x[i].clone()
        total = torch.nn.utils.clip_grad_norm_(ref, limits[i]) if limits[i] else torch.linalg.vector_norm(
            torch.cat([x[i].reshape(-1) for x in grads]))
        assert norms[i].item() == pytest.approx(total.item(), rel=1e-6)
        for p, r in zip(params, ref, strict=True):
            torch.testing.assert_close(p.grad[i], r.grad, rtol=1e-6, atol=0)
    assert torch.equal(params[0].grad[1], grads[0][1])  # no clipping for None


def test_vmapped_forward_and_gradients_equal_each_models():
    configs = [cfg(seed=s, n_layers=2, pos_emb=True) for s in range(3)]
    models = [build_model(c.task, c.model, c.seed) for c in configs]
    stack = StackedModels(models)
    batches = [sample_batch(c.task, None, 8, make_generator(c.seed, "x")) for c in configs]
    x, y = torch.stack([b.x for b in batches]), torch.stack([b.y for b in batches])
    pred = stack(x, y)
    assert pred.shape == (3, 8, configs[0].task.K)
    (pred - y).square().mean(dim=(1, 2)).sum().backward()
    for i, m in enumerate(models):
        ref = m(x[i], y[i])
        torch.testing.assert_close(pred[i], ref, rtol=1e-5, atol=1e-6)
        (ref - y[i]).square().mean().backward()
        for name, p in m.named_parameters():
            if not name.endswith(NON_IDENTIFIABLE):
                torch.testing.assert_close(stack.params[name].grad[i], p.grad, rtol=1e-4, atol=1e-6)
    copy = build_model(configs[1].task, configs[1].model, 99)
    stack.copy_to(1, copy)
    assert all(torch.equal(copy.state_dict()[k], models[1].state_dict()[k]) for k in copy.state_dict())


def test_stackability_is_checked_with_a_clear_error():
    ok = [cfg(seed=0), cfg(seed=1, M=None, lr=1e-2, weight_decay=0.1, grad_clip=1.0, noise_var=0.1)]
    check_stackable(ok)
    with pytest.raises(EnsembleError, match=r"(?s)member 1: model.d_model = 32.*member 1: task.K = 5.*member 1: "
                                            r"train.steps = 61"):
        check_stackable([cfg(), cfg(d_model=32, K=5, steps=61)])
    with pytest.raises(EnsembleError, match="train.batch_size"):
        check_stackable([cfg(), cfg(batch_size=8)])
    with pytest.raises(EnsembleError, match="train.schedule"):
        check_stackable([cfg(), cfg(schedule="cosine")])
    assert group_stackable([cfg(seed=0), cfg(d_model=32), cfg(seed=2)]) == [[0, 2], [1]]


def test_ensemble_members_equal_separate_runs(tmp_path):
    """Different seeds, M (finite and infinite), lr, weight decay, grad clipping and a triangle schedule: each
    member's run directory matches the separately trained run within float tolerance, file for file."""
    configs = [
        cfg(seed=0, M=1, lr=1e-2, schedule="triangle"),
        cfg(seed=1, M=4, lr=3e-3, weight_decay=0.1, grad_clip=0.5, schedule="triangle"),
        cfg(seed=2, M=None, lr=1e-2, grad_clip=1e-3, noise_var=0.25, family="gaussian", schedule="triangle"),
    ]
    members = train_ensemble(configs, [tmp_path / f"ens{i}" for i in range(3)], progress=False, stack=True)
    for i, c in enumerate(configs):
        ens, sep = members[i], train(c, tmp_path / f"sep{i}", progress=False)
        assert sorted(p.name for p in ens.path.iterdir()) == sorted(p.name for p in sep.path.iterdir())
        assert Run.load(ens.path).config == c and ens.finished
        assert ens.checkpoint_steps == sep.checkpoint_steps
        assert json.loads((ens.path / "baselines.json").read_text()) == json.loads(
            (sep.path / "baselines.json").read_text())
        for step in (0, sep.checkpoint_steps[1], c.train.steps):
            a, b = ens.load_checkpoint(step).state_dict(), sep.load_checkpoint(step).state_dict()
            for k in b:
                if not k.endswith(NON_IDENTIFIABLE):
                    torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"member {i} step {step} {k}")
            if step == 0:
                assert all(torch.equal(a[k], b[k]) for k in b)  # same init
        pd.testing.assert_index_equal(ens.metrics.columns, sep.metrics.columns)
        pd.testing.assert_frame_equal(ens.metrics, sep.metrics, rtol=1e-4, atol=1e-6)
        pd.testing.assert_frame_equal(ens.train_loss, sep.train_loss, rtol=1e-4, atol=1e-7)
        assert ens.metrics["id_loss"].iloc[-1] < ens.metrics["id_loss"].iloc[0]


def test_ensemble_member_is_bit_identical_to_train_at_one_thread(tmp_path, one_torch_thread):
    """With the CPU defaults (at one thread: one group, members unstacked) every member's run directory is the one
    `train` writes for its config, bit for bit: every checkpoint, metrics, train_loss and the resumable state;
    also after a stop and a resume of the whole ensemble."""
    configs = [cfg(seed=0, M=1, schedule="triangle"),
               cfg(seed=1, M=None, lr=3e-3, weight_decay=0.1, grad_clip=0.5, noise_var=0.1, schedule="triangle")]
    straight = train_ensemble(configs, [tmp_path / f"e{i}" for i in range(2)], progress=False)
    outs = [tmp_path / f"r{i}" for i in range(2)]
    train_ensemble(configs, outs, progress=False, stop_after=17)
    resumed = train_ensemble(configs, outs, resume=True, progress=False)
    for i, c in enumerate(configs):
        sep = train(c, tmp_path / f"sep{i}", progress=False)
        for ens in (straight[i], resumed[i]):
            assert ens.checkpoint_steps == sep.checkpoint_steps
            for step in sep.checkpoint_steps:
                a, b = ens.load_checkpoint(step).state_dict(), sep.load_checkpoint(step).state_dict()
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), (i, step)
            pd.testing.assert_frame_equal(ens.metrics, sep.metrics, check_exact=True)
            pd.testing.assert_frame_equal(ens.train_loss, sep.train_loss, check_exact=True)
            (ta, ma), (tb, mb) = load_tensors(ens.state_path), load_tensors(sep.state_path)
            assert ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in tb)


@pytest.mark.parametrize("stack", [True, False])
def test_ensemble_resume_is_bit_identical_and_member_state_is_train_compatible(tmp_path, stack):
    configs = [cfg(seed=0, steps=40), cfg(seed=1, M=3, steps=40, weight_decay=0.05)]
    straight = train_ensemble(configs, [tmp_path / f"a{i}" for i in range(2)], progress=False, stack=stack)
    outs = [tmp_path / f"b{i}" for i in range(2)]
    stopped = train_ensemble(configs, outs, progress=False, stop_after=17, stack=stack)
    assert not any(r.finished for r in stopped)
    resumed = train_ensemble(configs, outs, resume=True, progress=False, stack=stack)
    for a, b in zip(straight, resumed, strict=True):
        wa, wb = a.load_checkpoint(40).state_dict(), b.load_checkpoint(40).state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        pd.testing.assert_frame_equal(a.metrics, b.metrics)
        pd.testing.assert_frame_equal(a.train_loss, b.train_loss)
    # a member's resumable state is train()'s own format: plain train(resume=True) continues it
    single = [tmp_path / "c0", tmp_path / "c1"]
    train_ensemble(configs, single, progress=False, stop_after=17, stack=stack)
    run = train(configs[1], single[1], resume=True, progress=False)
    ref = train(configs[1], tmp_path / "ref", progress=False)
    wa, wb = run.load_checkpoint(40).state_dict(), ref.load_checkpoint(40).state_dict()
    for k in wb:
        if not k.endswith(NON_IDENTIFIABLE):
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    # members left at different steps (a kill between their writes) are brought level, then resumed together
    train(configs[0], single[0], resume=True, progress=False, stop_after=30)
    level = train_ensemble(configs, single, resume=True, progress=False, stack=stack)
    assert all(r.finished for r in level)


def test_ensemble_errors(tmp_path):
    with pytest.raises(EnsembleError, match="output directories"):
        train_ensemble([cfg()], [], progress=False)
    with pytest.raises(EnsembleError, match="its own output directory"):
        train_ensemble([cfg(seed=0), cfg(seed=1)], [tmp_path / "x", tmp_path / "x"], progress=False)
    with pytest.raises(EnsembleError, match="cannot be stacked"):
        train_ensemble([cfg(), cfg(n_heads=4)], [tmp_path / "p", tmp_path / "q"], progress=False)
    assert not (tmp_path / "p").exists()
    with pytest.raises(TrainingDiverged, match=r"member\(s\) \[1\]"):
        train_ensemble([cfg(seed=0), cfg(seed=1, lr=1e30)], [tmp_path / "d0", tmp_path / "d1"], progress=False)


@pytest.mark.parametrize("groups", [2, 3])
def test_concurrent_groups_stacked_or_not_equal_one_stack(tmp_path, groups):
    """Members split into groups stepped on their own threads, stacked or not, train as one stack does (float
    tolerance: stacks of other sizes round differently), repeat bit for bit, and unstacked members equal `train`
    at one thread bit for bit; torch's thread count and attention switches are left as they were."""
    configs = [cfg(seed=0, M=1), cfg(seed=1, M=4, weight_decay=0.1, grad_clip=0.5), cfg(seed=2, M=None, lr=1e-2)]
    threads = torch.get_num_threads()
    sdp = torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()

    def ens(name, **kw):
        return train_ensemble(configs, [tmp_path / f"{name}{i}" for i in range(3)], progress=False, **kw)

    def weights(run):
        return run.load_checkpoint(60).state_dict()

    torch.set_num_threads(groups)  # one intra-op thread per group (so unstacked members equal train at 1 thread)
    try:
        one = ens("one", groups=1, stack=True)
        for stack in (True, False):
            split = ens(f"g{stack}", groups=groups, stack=stack)
            assert torch.get_num_threads() == groups
            assert (torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == sdp
            for a, b in zip(one, split, strict=True):
                wa, wb = weights(a), weights(b)
                for k in wa:
                    if not k.endswith(NON_IDENTIFIABLE):
                        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
                pd.testing.assert_frame_equal(a.train_loss, b.train_loss, rtol=1e-4, atol=1e-7)
            again = ens(f"h{stack}", groups=groups, stack=stack)
            for a, b in zip(split, again, strict=True):  # concurrency does not make results depend on scheduling
                assert all(torch.equal(weights(a)[k], v) for k, v in weights(b).items())
        torch.set_num_threads(1)
        for c, member in zip(configs, split, strict=True):  # split: the last, unstacked ensemble
            ref = train(c, tmp_path / f"ref{c.seed}", progress=False)
            assert all(torch.equal(weights(ref)[k], v) for k, v in weights(member).items())
            pd.testing.assert_frame_equal(ref.metrics, member.metrics)
            pd.testing.assert_frame_equal(ref.train_loss, member.train_loss)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(EnsembleError, match=r"groups must be between 1 and the number of members \(3\), got 4"):
        ens("x", groups=4)
    assert not (tmp_path / "x0").exists()
