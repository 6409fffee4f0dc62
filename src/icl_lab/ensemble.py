"""Ensembles in one process: several runs of one architecture (different seeds, task diversities M, learning rates,
weight decays ...) trained together by stacking their parameters along a leading model axis.

The forward pass is `torch.func.vmap` over the model axis of `torch.func.functional_call` on one shared
(meta-device) copy of the architecture, with the members' parameters stacked by `torch.func.stack_module_state`.
Each member keeps everything a separate run has (`icl_lab.train.train`): its own init (`build_model` with its
seed), its own task pool and training stream (`make_generator(seed, "train")`, `sample_batch` on its pool), its
own eval sets, LR schedule, per-member gradient clipping and AdamW (`StackedAdamW`: the same elementwise arithmetic
as `torch.optim.AdamW`, with each member's lr and weight decay, decay on weight matrices only as
`make_optimizer`). Members are independent (the loss is a sum of per-member losses), so an ensemble-trained member
equals the separately trained run up to float rounding (batched matmuls round differently from single ones).

`train_ensemble` writes each member as an ordinary run directory, through the same functions `train` uses
(`Run.create`, `Run.save_checkpoint`, `evaluate`, `baseline_levels`, `save_state`): config.json, scheduled
checkpoints, metrics.parquet, train_loss.parquet, baselines.json and a resumable state that `train(resume=True)`
can also continue. Nothing downstream can tell an ensemble member from a separate run.

Where the members run (`MemberGroups`, `train_ensemble(groups=, stack=)`): on a GPU, as one stack (one vmapped
step for all: tiny models leave a GPU idle one at a time). On a CPU, split into one group per torch thread, the
groups stepping concurrently, each on its own thread with one intra-op thread; within a group the members take
`train`'s own step one after another. A model of the seed's size at batch 32 keeps one core busy and a second one
poorly, so the cores go further on separate members than on every op together, and stacking adds nothing there:
its batched matmuls have the same per-member shapes as the single ones. Measured on 2 shared cores, 8 seed-preset
members at batch 32, against the 8 trained one after another on 2 threads (benchmarks/ensemble_throughput.py,
7 paired rounds): members on 2 threads 1.36x, 2 stacks of 4 on 2 threads 1.24x, one stack of 8 on 2 threads
1.19x; at one thread a stack of 4 ran ~0.9x of its members one after another. `stack=True` keeps stacking on a
CPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from icl_lab.attention import vmappable_sdpa
from icl_lab.config import RunConfig, TrainConfig
from icl_lab.evaluate import baseline_levels, evaluate, prepare_eval_sets
from icl_lab.model import build_model
from icl_lab.progress import Bar
from icl_lab.store import Run, write_json, write_parquet
from icl_lab.tasks import make_generator, sample_batch, task_pool
from icl_lab.threads import split_evenly, thread_pool
from icl_lab.train import (
    TrainingDiverged,
    _stop_on_sigint,
    checkpoint_steps,
    load_state,
    lr_factor,
    make_optimizer,
    save_state,
    train,
    train_step,
)

# Fields every member must share (the stacked computation and the common step/checkpoint loop need them equal).
# Members may differ in: seed, name, task.family, task.M, task.noise_var, train.lr, train.weight_decay,
# train.grad_clip.
SHARED_TASK_FIELDS = ("D", "K")
SHARED_TRAIN_FIELDS = ("steps", "batch_size", "betas", "schedule", "warmup_frac", "n_checkpoints_linear",
                       "n_checkpoints_log", "eval_every", "eval_size", "device")
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which make_optimizer uses


class EnsembleError(ValueError):
    """Configs that cannot be trained as one ensemble."""


def stack_key(config: RunConfig) -> str:
    """Configs with equal keys can be stacked into one ensemble (see SHARED_*_FIELDS)."""
    train = config.train.model_dump(mode="json", include=set(SHARED_TRAIN_FIELDS))
    task = config.task.model_dump(mode="json", include=set(SHARED_TASK_FIELDS))
    return repr((config.model.model_dump(mode="json"), sorted(task.items()), sorted(train.items())))


def check_stackable(configs: Sequence[RunConfig]) -> None:
    """Raise EnsembleError naming every field on which the configs differ but must agree."""
    if len(configs) == 0:
        raise EnsembleError("an ensemble needs at least one config")
    ref = configs[0]
    problems = []
    for i, cfg in enumerate(configs[1:], start=1):
        for section, fields in (("model", None), ("task", SHARED_TASK_FIELDS), ("train", SHARED_TRAIN_FIELDS)):
            a, b = getattr(ref, section), getattr(cfg, section)
            for name in fields or type(a).model_fields:
                if getattr(a, name) != getattr(b, name):
                    problems.append(f"member {i}: {section}.{name} = {getattr(b, name)!r}, member 0 has "
                                    f"{getattr(a, name)!r}")
    if problems:
        raise EnsembleError("configs cannot be stacked into one ensemble; they must share the architecture "
                            "(every model field), D, K and the train settings " + ", ".join(SHARED_TRAIN_FIELDS)
                            + " (seed, M, family, noise_var, lr, weight_decay and grad_clip may differ):\n  "
                            + "\n  ".join(problems))


def group_stackable(configs: Sequence[RunConfig]) -> list[list[int]]:
    """Indices of `configs` grouped into stackable sets (first-appearance order)."""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(stack_key(cfg), []).append(i)
    return list(groups.values())


# ------------------------------------------------------------------------------------------------ the stack
class StackedModels:
    """N models of one architecture as stacked parameters (leaves of shape (N, ...) with requires_grad).

    forward(x: (N, B, K, D), y: (N, B, K)) -> predictions (N, B, K): member i's model applied to (x[i], y[i]).
    """

    def __init__(self, models: Sequence[nn.Module]):
        if len(models) == 0:
            raise EnsembleError("no models to stack")
        self.params, self.buffers = stack_module_state(list(models))
        self.base = copy.deepcopy(models[0]).to("meta")
        self.n = len(models)
        self.names = list(self.params)

        def call(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return functional_call(self.base, (params, buffers), (x, y))

        self._forward = vmap(call, in_dims=(0, 0, 0, 0))

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        with vmappable_sdpa():  # other models / devices; icl-lab's model on CPU uses causal_attention
            return self._forward(self.params, self.buffers, x, y)

    def parameters(self) -> list[Tensor]:
        return [self.params[k] for k in self.names]

    @torch.no_grad()
    def copy_to(self, i: int, model: nn.Module) -> nn.Module:
        """Write member i's current parameters into `model` (same architecture); returns it."""
        for name, p in model.named_parameters():
            p.copy_(self.params[name][i])
        for name, b in model.named_buffers():
            b.copy_(self.buffers[name][i])
        return model

    @torch.no_grad()
    def copy_from(self, i: int, model: nn.Module) -> None:
        """Set member i's parameters from `model`."""
        for name, p in model.named_parameters():
            self.params[name][i].copy_(p)
        for name, b in model.named_buffers():
            self.buffers[name][i].copy_(b)


class StackedAdamW:
    """AdamW on stacked parameters with a learning rate and weight decay per member.

    The arithmetic is torch.optim.AdamW's (single-tensor path, decoupled decay, no amsgrad) elementwise, with the
    per-member scalars (1 − lr·wd and −lr / (1 − β1^t)) rounded to float32 exactly as torch rounds its Python
    scalars, so each member follows the same update as `torch.optim.AdamW` on that member alone. Weight decay
    applies to parameters that are ≥ 2-D per member (weight matrices), as `icl_lab.train.make_optimizer`.
    """

    def __init__(self, params: dict[str, Tensor], lrs: Sequence[float], weight_decays: Sequence[float],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = ADAM_EPS):
        self.params = params
        self.n = len(lrs)
        if len(weight_decays) != self.n or any(p.shape[0] != self.n for p in params.values()):
            raise EnsembleError("lrs, weight_decays and the stacked parameters must have one entry per member")
        self.lrs = [float(v) for v in lrs]
        self.weight_decays = [float(v) for v in weight_decays]
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = eps
        self.t = 0
        self.exp_avg = {k: torch.zeros_like(p, memory_format=torch.preserve_format) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p, memory_format=torch.preserve_format) for k, p in params.items()}
        self.decay = {k: p.dim() >= 3 for k, p in params.items()}  # member tensor >= 2-D

    def _per_member(self, values: Tensor, like: Tensor) -> Tensor:
        return values.to(like.dtype).view(self.n, *([1] * (like.dim() - 1)))

    @torch.no_grad()
    def step(self, factor: float = 1.0) -> None:
        """One AdamW update with member i's lr = lrs[i] * factor (the shared schedule multiplier)."""
        self.t += 1
        beta1, beta2 = self.betas
        lrs = [lr * factor for lr in self.lrs]
        bias_correction1 = 1 - beta1**self.t
        bias_correction2_sqrt = (1 - beta2**self.t) ** 0.5
        like = next(iter(self.params.values()))
        # Python floats (double) rounded once to the parameters' dtype, as torch rounds its scalar arguments
        shrink = torch.tensor([1 - lr * wd for lr, wd in zip(lrs, self.weight_decays, strict=True)],
                              dtype=like.dtype, device=like.device)
        neg_step = torch.tensor([-(lr / bias_correction1) for lr in lrs], dtype=like.dtype, device=like.device)
        any_decay = any(wd != 0 for wd in self.weight_decays)
        for k, p in self.params.items():
            grad = p.grad
            if grad is None:
                raise EnsembleError(f"parameter {k} has no gradient")
            if self.decay[k] and any_decay:
                p.mul_(self._per_member(shrink, p))
            exp_avg, exp_avg_sq = self.exp_avg[k], self.exp_avg_sq[k]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(exp_avg * self._per_member(neg_step, p), denom)

    # -- per-member torch.optim.AdamW state (for the run's resumable state file)
    def member_state(self, i: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Fill `opt` (make_optimizer(model, ...) of member i) with member i's moments and step count."""
        opt.state.clear()
        if self.t == 0:
            return
        for name, p in model.named_parameters():
            opt.state[p] = {"step": torch.tensor(float(self.t), dtype=torch.float32),
                            "exp_avg": self.exp_avg[name][i].detach().clone(),
                            "exp_avg_sq": self.exp_avg_sq[name][i].detach().clone()}

    @torch.no_grad()
    def load_member_state(self, i: int, model: nn.Module, opt: torch.optim.Optimizer) -> int:
        """Copy member i's moments from `opt` (loaded from its run); returns its step count (0: no state)."""
        steps = set()
        for name, p in model.named_parameters():
            st = opt.state.get(p)
            if not st:
                continue
            self.exp_avg[name][i].copy_(st["exp_avg"])
            self.exp_avg_sq[name][i].copy_(st["exp_avg_sq"])
            steps.add(int(round(float(st["step"]))))
        if len(steps) > 1:
            raise EnsembleError(f"member {i}: optimizer state has inconsistent step counts {sorted(steps)}")
        return steps.pop() if steps else 0


@torch.no_grad()
def clip_grad_norms_(params: Sequence[Tensor], max_norms: Sequence[float | None]) -> Tensor:
    """Per-member `torch.nn.utils.clip_grad_norm_`: member i's gradient (all leaves) is scaled to global L2 norm
    at most max_norms[i] (None: no clipping). Returns the per-member norms before clipping (N,)."""
    grads = [p.grad for p in params]
    n = grads[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(n, -1), 2.0, dim=1) for g in grads])  # (leaves, N)
    total = torch.linalg.vector_norm(norms, 2.0, dim=0)  # (N,)
    if all(m is None for m in max_norms):
        return total
    limit = torch.tensor([math.inf if m is None else m for m in max_norms], dtype=total.dtype, device=total.device)
    coef = torch.clamp(limit / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(n, *([1] * (g.dim() - 1))).to(g.dtype))
    return total


# ------------------------------------------------------------------------------------------------ training
def sample_stacked(configs: Sequence[RunConfig], pools: Sequence[Tensor | None], gens: Sequence[torch.Generator],
                   batch_size: int) -> tuple[Tensor, Tensor]:
    """One batch per member from its own pool and generator (exactly `train`'s draws): x (N, B, K, D), y (N, B, K)."""
    batches = [sample_batch(c.task, pool, batch_size, g) for c, pool, g in zip(configs, pools, gens, strict=True)]
    return torch.stack([b.x for b in batches]), torch.stack([b.y for b in batches])


def ensemble_step(stack: StackedModels, opt: StackedAdamW, x: Tensor, y: Tensor, clips: Sequence[float | None],
                  factor: float) -> Tensor:
    """One training step of every member: per-member squared-error loss, backward, per-member clipping, AdamW
    with lr = member lr × `factor`. Returns the per-member losses (N,) before the update; if any is not finite,
    nothing is updated (the caller decides)."""
    member_loss = (stack(x, y) - y).square().mean(dim=(1, 2))  # (N,)
    if not bool(torch.isfinite(member_loss).all()):
        return member_loss
    params = stack.parameters()
    for p in params:
        p.grad = None
    member_loss.sum().backward()
    clip_grad_norms_(params, clips)
    opt.step(factor)
    return member_loss


def default_groups(n_members: int, device: str) -> int:
    """How many groups `train_ensemble` splits its members into by default: one per torch thread on a CPU (at most
    one per member), one on other devices (a GPU runs the whole stack at once)."""
    return max(1, min(n_members, torch.get_num_threads())) if device == "cpu" else 1


def _check_groups(groups: int, n_members: int) -> None:
    if not 1 <= groups <= n_members:
        raise EnsembleError(f"groups must be between 1 and the number of members ({n_members}), got {groups}")


class MemberGroups:
    """An ensemble's members in `groups` groups of contiguous members (sizes differing by at most one) that step
    concurrently, each on its own thread with torch.get_num_threads() // groups (at least 1) intra-op threads
    (icl_lab.threads). Within a group the members are either
      - one stack (stack=True): StackedModels + StackedAdamW, one vmapped step for the group, or
      - stepped one after another (stack=False) with `train`'s own step, models and AdamW (`train_step`).
    Every member's generator, model and optimizer belong to one thread, so results do not depend on scheduling.
    `models` / `opts` are the members' ordinary models and make_optimizer AdamWs (with any resumed state); stacks
    start from them, and `sync(i)` writes member i's current state back into them. Use as a context manager (it
    owns the thread pool).
    """

    def __init__(self, models: Sequence[nn.Module], opts: Sequence[torch.optim.Optimizer],
                 configs: Sequence[RunConfig], groups: int = 1, stack: bool = True):
        _check_groups(groups, len(models))
        self.models, self.opts, self.configs = list(models), list(opts), list(configs)
        self.members = split_evenly(len(models), groups)
        self.stacks: list[StackedModels] = []
        self.stack_opts: list[StackedAdamW] = []
        if stack:
            for idx in self.members:
                st = StackedModels([self.models[i] for i in idx])
                opt = StackedAdamW(st.params, [configs[i].train.lr for i in idx],
                                   [configs[i].train.weight_decay for i in idx], configs[0].train.betas)
                counts = {opt.load_member_state(j, self.models[i], self.opts[i]) for j, i in enumerate(idx)}
                if len(counts) != 1:
                    raise ValueError(f"cannot stack: members' optimizer step counts differ ({sorted(counts)})")
                opt.t = counts.pop()
                self.stacks.append(st)
                self.stack_opts.append(opt)
        self._where = {i: (g, j) for g, idx in enumerate(self.members) for j, i in enumerate(idx)}
        self._exit = contextlib.ExitStack()
        self._pool = None if groups == 1 else self._exit.enter_context(thread_pool(groups, "icl-ensemble"))

    def __enter__(self) -> MemberGroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self._exit.close()

    def step(self, pools: Sequence[Tensor | None], gens: Sequence[torch.Generator], factor: float) -> Tensor:
        """One training step of every member at lr = member lr × `factor`; per-member losses (N,) before the
        update (a member whose loss is not finite is not updated)."""
        batch_size = self.configs[0].train.batch_size

        def one(g: int) -> Tensor:
            idx = self.members[g]
            if not self.stacks:
                return torch.stack([train_step(self.models[i], self.opts[i],
                                               sample_batch(self.configs[i].task, pools[i], batch_size, gens[i]),
                                               self.configs[i].train.lr * factor, self.configs[i].train.grad_clip)
                                    for i in idx])
            x, y = sample_stacked([self.configs[i] for i in idx], [pools[i] for i in idx], [gens[i] for i in idx],
                                  batch_size)
            clips = [self.configs[i].train.grad_clip for i in idx]
            return ensemble_step(self.stacks[g], self.stack_opts[g], x, y, clips, factor).detach()

        if self._pool is None:
            return one(0)
        with vmappable_sdpa():  # entered here once: its switches are process-wide, not safe to toggle per thread
            return torch.cat(list(self._pool.map(one, range(len(self.members)))))

    def sync(self, i: int, optimizer: bool = False) -> nn.Module:
        """Member i's current weights (and with optimizer=True its AdamW state) in models[i] (opts[i]); returns
        models[i]."""
        if self.stacks:
            g, j = self._where[i]
            self.stacks[g].copy_to(j, self.models[i])
            if optimizer:
                self.stack_opts[g].member_state(j, self.models[i], self.opts[i])
        return self.models[i]


def _flush_member(run: Run, rows: list[dict[str, float]], losses: list[float], step: int, model: nn.Module,
                  opt: torch.optim.Optimizer, gen: torch.Generator, tc: TrainConfig) -> None:
    """What `train`'s flush writes for one run: metrics, train_loss, resumable state."""
    write_parquet(run.path / "metrics.parquet", pd.DataFrame(rows))
    write_parquet(run.path / "train_loss.parquet",
                  pd.DataFrame({"step": np.arange(len(losses)), "loss": np.array(losses)}))
    for group in opt.param_groups:  # what train's optimizer holds then: the lr of the last update taken
        group["lr"] = tc.lr * lr_factor(step - 1, tc) if step > 0 else tc.lr
    save_state(run, step, model, opt, gen)


def train_ensemble(configs: Sequence[RunConfig], out_dirs: Sequence[str | Path], *, resume: bool = False,
                   overwrite: bool = False, progress: bool = True, stop_after: int | None = None,
                   groups: int | None = None, stack: bool | None = None) -> list[Run]:
    """Train the members `configs` together, writing member i as a normal run directory `out_dirs[i]`.

    Same semantics as `icl_lab.train.train` for every member (init, data stream, eval sets, schedule, checkpoint
    steps, per-member grad clipping, AdamW with decay on matrices only, NaN check, Ctrl-C saves resumable state).
    resume: continue every member from its saved state (members stopped at different steps are first brought
    level with `train(resume=True, stop_after=...)`). stop_after: stop once this many steps are done.
    groups: how many groups of members step concurrently (MemberGroups; default `default_groups`: one per torch
    thread on a CPU, one elsewhere). stack: vmap each group as one stack (default: on GPUs and other accelerators;
    on a CPU the members of a group take `train`'s own steps one after another, which measured faster there and
    is bit-identical to `train` with the same intra-op threads).
    Raises EnsembleError if the configs cannot be stacked (check_stackable), TrainingDiverged naming the members
    whose loss became non-finite.
    """
    configs, out_dirs = list(configs), [Path(p) for p in out_dirs]
    if len(configs) != len(out_dirs):
        raise EnsembleError(f"{len(configs)} configs but {len(out_dirs)} output directories")
    if len({p.resolve() for p in out_dirs}) != len(out_dirs):
        raise EnsembleError("every member needs its own output directory")
    check_stackable(configs)
    n = len(configs)
    tc0 = configs[0].train
    device = tc0.device
    groups = default_groups(n, device) if groups is None else groups
    stack = torch.device(device).type != "cpu" if stack is None else stack
    _check_groups(groups, n)  # before any run directory is written

    if resume:
        runs = []
        for cfg, out in zip(configs, out_dirs, strict=True):
            run = Run.load(out)
            if run.config != cfg:
                raise ValueError(f"cannot resume {out}: its config differs from the one given")
            if not run.state_path.exists():
                raise ValueError(f"cannot resume {out}: no resumable state at {run.state_path}")
            runs.append(run)
    else:
        runs = [Run.create(out, cfg, overwrite=overwrite) for cfg, out in zip(configs, out_dirs, strict=True)]

    pools = [task_pool(c.task.family, c.task.M, c.task.D, c.seed, device) if c.task.M is not None else None
             for c in configs]
    sets = [prepare_eval_sets(c.task, pool, c.train.eval_size, c.seed, device)
            for c, pool in zip(configs, pools, strict=True)]
    models = [build_model(c.task, c.model, c.seed, device) for c in configs]
    opts = [make_optimizer(m, c.train) for m, c in zip(models, configs, strict=True)]
    gens = [make_generator(c.seed, "train", device) for c in configs]

    ckpts = set(checkpoint_steps(tc0.steps, *tc0.checkpoint_counts))
    evals = ckpts | (set(range(0, tc0.steps + 1, tc0.eval_every)) if tc0.eval_every else set())
    rows: list[list[dict[str, float]]] = [[] for _ in range(n)]
    losses: list[list[float]] = [[] for _ in range(n)]
    start = 0
    if resume:
        saved = [_saved_step(run) for run in runs]
        start = max(saved)
        for i, s in enumerate(saved):  # a kill between members' writes can leave some a checkpoint behind
            if s < start:
                train(configs[i], out_dirs[i], resume=True, progress=False, stop_after=start)
        for i, run in enumerate(runs):
            if load_state(run, models[i], opts[i], gens[i]) != start:
                raise ValueError(f"cannot resume {run.path}: its state is not at step {start}")
            rows[i] = [r for r in run.metrics.to_dict("records") if r["step"] < start]
            losses[i] = run.train_loss["loss"].tolist()[:start]
    else:
        for run, s in zip(runs, sets, strict=True):
            write_json(run.path / "baselines.json", baseline_levels(s))

    ens = MemberGroups(models, opts, configs, groups, stack)

    pending: list[Tensor] = []  # (N,) losses not yet synced to Python floats
    last_good = [max([s for s in run.checkpoint_steps if s <= start], default=None) for run in runs]

    def sync_losses() -> None:
        if pending:
            values = torch.stack(pending).T.tolist()
            for i in range(n):
                losses[i].extend(values[i])
            pending.clear()

    def flush(step: int) -> None:
        sync_losses()
        for i in range(n):
            ens.sync(i, optimizer=True)
            _flush_member(runs[i], rows[i], losses[i], step, models[i], opts[i], gens[i], configs[i].train)

    bar = Bar(progress, tc0.steps, f"train ×{n}", completed=start, loss=float("nan"), rate=0.0,
              columns=("mean loss {task.fields[loss]:.4g}", "{task.fields[rate]:.0f} steps/s"))
    t0 = time.perf_counter()
    with _stop_on_sigint() as sig, bar, ens:
        for step in range(start, tc0.steps + 1):
            if step in evals or step in ckpts:
                for i in range(n):
                    ens.sync(i)
                    if step in evals:
                        rows[i].append({"step": step, "lr": configs[i].train.lr * lr_factor(step, configs[i].train),
                                        **evaluate(models[i], sets[i])})
                    if step in ckpts:
                        runs[i].save_checkpoint(step, models[i])
                        last_good[i] = step
                if step in ckpts:
                    flush(step)
            if step == tc0.steps:
                break
            if sig["stop"] or (stop_after is not None and step >= stop_after):
                flush(step)
                bar.stop()
                print(f"stopped at step {step}; continue with train_ensemble(..., resume=True)")
                return runs

            member_loss = ens.step(pools, gens, lr_factor(step, tc0))
            finite = torch.isfinite(member_loss)
            if not bool(finite.all()):
                bad = [i for i in range(n) if not bool(finite[i])]
                for i in range(n):
                    write_parquet(runs[i].path / "metrics.parquet", pd.DataFrame(rows[i]))
                detail = "; ".join(f"{runs[i].path} (loss {member_loss[i].item()}, last good checkpoint "
                                   f"{last_good[i]})" for i in bad)
                raise TrainingDiverged(f"training loss is not finite at step {step} for ensemble member(s) {bad}: "
                                       f"{detail} (lower --lr or set --grad-clip)")
            pending.append(member_loss)
            if len(pending) >= 200 or step + 1 == tc0.steps:
                sync_losses()
                bar.update(step + 1, loss=float(np.mean([lo[-1] for lo in losses])),
                           rate=(step + 1 - start) / (time.perf_counter() - t0))
    return runs


def _saved_step(run: Run) -> int:
    """The step a run's resumable state was saved at (read from the safetensors metadata only)."""
    from safetensors import safe_open

    with safe_open(str(run.state_path), framework="pt") as f:
        return int((f.metadata() or {})["step"])
