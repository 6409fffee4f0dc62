"""Ensembles in one process: several runs of one architecture (different seeds, task diversities M, learning rates,
weight decays ...) trained together.

Each member is a `icl_lab.train.Member`, set up, evaluated, checkpointed, resumed and checked for NaN by `train`'s
own code (`open_member`, `run_loop`): its own init, task pool, training stream, eval sets, LR schedule, gradient
clipping and AdamW. Only the updates are taken together (`MemberGroups`), and every member's run directory is an
ordinary one that `train(resume=True)` can also continue; nothing downstream can tell it from a separate run.

Where the members run (`train_ensemble(groups=, stack=)`): on a GPU, as one stack: the parameters stacked along a
leading model axis (`torch.func.stack_module_state`), the forward pass `torch.func.vmap` over that axis of
`functional_call` on one meta-device copy of the architecture, and `StackedAdamW` (torch.optim.AdamW's arithmetic
with each member's lr and weight decay), since tiny models one at a time leave a GPU idle. Members are independent
(the loss is a sum of per-member losses), so a stacked member equals the separately trained run up to float
rounding. On a CPU, the members split into one group per torch thread, the groups stepping concurrently on their
own threads with one intra-op thread each, and within a group each member takes `train`'s own step: a model of
the seed's size at batch 32 keeps one core busy and a second one poorly, so the cores go further on separate
members than on every op together (benchmarks/results/ensemble_throughput.md). A member is then bit-identical to
`train` at one thread. `stack=True` keeps stacking on a CPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from icl_lab.attention import vmappable_sdpa
from icl_lab.config import RunConfig
from icl_lab.store import Run
from icl_lab.threads import split_evenly, thread_pool
from icl_lab.train import Member, lr_factor, open_member, run_loop, track, train

__all__ = ["EnsembleError", "MemberGroups", "SHARED_TASK_FIELDS", "SHARED_TRAIN_FIELDS", "StackedAdamW",
           "StackedModels", "check_stackable", "clip_grad_norms_", "default_groups", "ensemble_step",
           "group_stackable", "sample_stacked", "stack_key", "train_ensemble"]

# Fields every member must share (the stacked computation and the common step/checkpoint loop need them equal).
# Members may differ in: seed, name, task.family, task.M, task.noise_var, train.lr, train.weight_decay,
# train.grad_clip.
SHARED_TASK_FIELDS = ("D", "K")
SHARED_TRAIN_FIELDS = ("steps", "batch_size", "betas", "schedule", "warmup_frac", "cooldown_frac",
                       "n_checkpoints_linear", "n_checkpoints_log", "eval_every", "eval_size", "device")
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
        self.factor = 1.0  # the schedule multiplier of the last update
        self.exp_avg = {k: torch.zeros_like(p, memory_format=torch.preserve_format) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p, memory_format=torch.preserve_format) for k, p in params.items()}
        self.decay = {k: p.dim() >= 3 for k, p in params.items()}  # member tensor >= 2-D

    def _per_member(self, values: Tensor, like: Tensor) -> Tensor:
        return values.to(like.dtype).view(self.n, *([1] * (like.dim() - 1)))

    @torch.no_grad()
    def step(self, factor: float = 1.0) -> None:
        """One AdamW update with member i's lr = lrs[i] * factor (the shared schedule multiplier)."""
        self.t += 1
        self.factor = factor
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
        """Fill `opt` (make_optimizer(model, ...) of member i) with member i's moments, step count and the lr of its
        last update, as torch.optim.AdamW would hold them after `train`'s steps."""
        for group in opt.param_groups:
            group["lr"] = self.lrs[i] * self.factor
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
def sample_stacked(members: Sequence[Member]) -> tuple[Tensor, Tensor]:
    """One batch per member from its own pool and generator (exactly `train`'s draws): x (N, B, K, D), y (N, B, K)."""
    batches = [m.batch() for m in members]
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
    """An ensemble's members (`icl_lab.train.Member`) in `groups` groups of contiguous members (sizes differing by
    at most one) that step concurrently, each on its own thread with torch.get_num_threads() // groups (at least
    1) intra-op threads (icl_lab.threads). Within a group the members are either
      - one stack (stack=True): StackedModels + StackedAdamW, one vmapped step for the group, or
      - updated one after another (stack=False) with `train`'s own step (`Member.update`).
    Every member's generator, model and optimizer belong to one thread, so results do not depend on scheduling.
    Stacks start from the members' models and AdamW states (resumed ones included); `sync` writes the stacks'
    state back into them. Use as a context manager (it owns the thread pool).
    """

    def __init__(self, members: Sequence[Member], groups: int = 1, stack: bool = True):
        _check_groups(groups, len(members))
        self.members = list(members)
        self.groups = split_evenly(len(members), groups)
        self.stacks: list[StackedModels] = []
        self.stack_opts: list[StackedAdamW] = []
        if stack:
            for idx in self.groups:
                group = [self.members[i] for i in idx]
                st = StackedModels([m.model for m in group])
                opt = StackedAdamW(st.params, [m.config.train.lr for m in group],
                                   [m.config.train.weight_decay for m in group], group[0].config.train.betas)
                counts = {opt.load_member_state(j, m.model, m.opt) for j, m in enumerate(group)}
                if len(counts) != 1:
                    raise ValueError(f"cannot stack: members' optimizer step counts differ ({sorted(counts)})")
                opt.t = counts.pop()
                self.stacks.append(st)
                self.stack_opts.append(opt)
        self._exit = contextlib.ExitStack()
        self._pool = None if groups == 1 else self._exit.enter_context(thread_pool(groups, "icl-ensemble"))

    def __enter__(self) -> MemberGroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self._exit.close()

    def step(self, step: int) -> Tensor:
        """Update `step` of every member; per-member losses (N,) before it (a member whose loss is not finite is
        not updated)."""

        def one(g: int) -> Tensor:
            group = [self.members[i] for i in self.groups[g]]
            if not self.stacks:
                return torch.stack([m.update(step) for m in group])
            x, y = sample_stacked(group)
            clips = [m.config.train.grad_clip for m in group]
            factor = lr_factor(step, group[0].config.train)
            return ensemble_step(self.stacks[g], self.stack_opts[g], x, y, clips, factor).detach()

        if self._pool is None:
            return one(0)
        # stacks: entered once here, since its switches are process-wide, not safe to toggle per thread
        with vmappable_sdpa() if self.stacks else contextlib.nullcontext():
            return torch.cat(list(self._pool.map(one, range(len(self.groups)))))

    def sync(self, optimizer: bool = False) -> None:
        """Every member's current weights (and with optimizer=True its AdamW state) in its model (and opt)."""
        for st, opt, idx in zip(self.stacks, self.stack_opts, self.groups, strict=True):
            for j, i in enumerate(idx):
                m = self.members[i]
                st.copy_to(j, m.model)
                if optimizer:
                    opt.member_state(j, m.model, m.opt)


def train_ensemble(configs: Sequence[RunConfig], out_dirs: Sequence[str | Path], *, resume: bool = False,
                   overwrite: bool = False, progress: bool = True, stop_after: int | None = None,
                   groups: int | None = None, stack: bool | None = None, wandb: str | None = None) -> list[Run]:
    """Train the members `configs` together, writing member i as a normal run directory `out_dirs[i]`.

    Every member is set up, evaluated, checkpointed, resumed and checked for NaN by `train`'s own code
    (`icl_lab.train.open_member` and `run_loop`); only its updates are taken together (MemberGroups).
    resume: continue every member from its saved state (members stopped at different steps are first brought
    level with `train(resume=True, stop_after=...)`). stop_after: stop once this many steps are done.
    groups: how many groups of members step concurrently (MemberGroups; default `default_groups`: one per torch
    thread on a CPU, one elsewhere). stack: vmap each group as one stack (default: on GPUs and other accelerators;
    on a CPU the members of a group take `train`'s own steps one after another, which is faster there
    (benchmarks/results/ensemble_throughput.md) and bit-identical to `train` with the same intra-op threads).
    wandb: a Weights & Biases project; each member gets its own wandb run, as `train` gives a run.
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
    device = configs[0].train.device
    groups = default_groups(n, device) if groups is None else groups
    stack = torch.device(device).type != "cpu" if stack is None else stack
    _check_groups(groups, n)  # before any run directory is written

    if resume:  # a kill between members' writes can leave some a checkpoint behind: bring them level first
        saved = [_saved_step(cfg, out) for cfg, out in zip(configs, out_dirs, strict=True)]
        for cfg, out, s in zip(configs, out_dirs, saved, strict=True):
            if s < max(saved):
                train(cfg, out, resume=True, progress=False, stop_after=max(saved))
    members = [open_member(cfg, out, resume=resume, overwrite=overwrite)
               for cfg, out in zip(configs, out_dirs, strict=True)]
    with contextlib.ExitStack() as trackers, MemberGroups(members, groups, stack) as ens:
        for m in members:
            trackers.enter_context(track(m, wandb))
        run_loop(members, ens.step, sync=ens.sync if stack else None, progress=progress, stop_after=stop_after,
                 resume_hint="train_ensemble(..., resume=True)")
    return [m.run for m in members]


def _saved_step(config: RunConfig, out: Path) -> int:
    """The step of a run's resumable state (read from the safetensors metadata only); checks that the run can be
    resumed with `config`."""
    run = Run.load(out)
    if run.config != config:
        raise ValueError(f"cannot resume {out}: its config differs from the one given")
    if not run.state_path.exists():
        raise ValueError(f"cannot resume {out}: no resumable state at {run.state_path}")
    with safe_open(str(run.state_path), framework="pt") as f:
        return int((f.metadata() or {})["step"])
