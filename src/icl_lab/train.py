"""The training loop: AdamW, LR schedules, the checkpoint schedule, periodic evaluation, resume.

One loop serves single runs and ensembles: `open_member` sets up (or resumes) a run as a `Member`, and `run_loop`
drives one or more members through the evaluation and checkpoint schedule, flushes, Ctrl-C and the NaN check,
taking their updates through a callable (`Member.update` one after another for `train`; stacked or concurrent
groups for `icl_lab.ensemble.train_ensemble`).

Training only trains. Analyses (LLC, essential dynamics) read the saved checkpoints afterwards, with their own
generators, so they can never change the training trajectory (docs/papers.md §F2 item 4).
"""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from icl_lab.config import RunConfig, TrainConfig
from icl_lab.evaluate import EvalSet, baseline_levels, evaluate, prepare_eval_sets
from icl_lab.model import ICLTransformer, build_model
from icl_lab.progress import Bar
from icl_lab.store import Run, load_strict, load_tensors, save_tensors, write_json, write_parquet
from icl_lab.tasks import Batch, make_generator, sample_batch, task_pool
from icl_lab.tracking import Tracker, evaluation_values, open_tracker

__all__ = ["Member", "TrainingDiverged", "checkpoint_steps", "load_state", "lr_factor", "make_optimizer", "track",
           "open_member", "run_loop", "save_state", "train", "train_step"]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------------ schedules
def checkpoint_steps(steps: int, n_linear: int, n_log: int) -> list[int]:
    """Union of n_linear linearly spaced steps in [0, steps] and n_log log-spaced steps in [1, steps],
    always with step 0 (before any update) and the final step (Hoogland et al.; Carroll et al. App. A.4)."""
    lin = np.linspace(0, steps, n_linear) if n_linear > 0 else np.array([])
    log = np.logspace(0, math.log10(steps), n_log) if n_log > 0 and steps >= 1 else np.array([])
    out = {0, steps} | {int(round(s)) for s in lin} | {int(round(s)) for s in log}
    return sorted(s for s in out if 0 <= s <= steps)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at `step` (0-based update index).

    constant: 1. triangle (Raventós; Hoogland's linear OneCycle): linear rise over warmup_frac·steps to 1,
    then linear decay to 0 at the end. cosine: linear warm-up, then cosine decay to 0. constant_cooldown: 1, then
    over the last cooldown_frac·steps a linear decay to 0 at the end (a cool-down, so the final checkpoints sit near
    a minimum, where λ̂ is defined; docs/papers.md §D2).
    """
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "constant_cooldown":
        start = (1.0 - cfg.cooldown_frac) * cfg.steps
        t = step + 1
        return 1.0 if t <= start else max(1.0 - (t - start) / max(cfg.steps - start, 1.0), 0.0)
    warm = cfg.warmup_frac * cfg.steps
    t = step + 1  # the update about to be taken
    if t <= warm:
        return t / warm
    rest = max(cfg.steps - warm, 1.0)
    progress = min((t - warm) / rest, 1.0)
    if cfg.schedule == "triangle":
        return max(1.0 - progress, 0.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices (≥ 2-D) only, not on biases or LayerNorm gains (nanoGPT).

    The fused kernel (one call for all parameters, on CPU and CUDA) is faster than the default per-parameter
    loop for models of these sizes; it computes the same update up to float rounding.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)


# ------------------------------------------------------------------------------------------------ state I/O
def save_state(run: Run, step: int, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    """Everything needed to continue bit-identically, without pickle: weights, AdamW moments, generator."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value)
    tensors["rng.train"] = gen.get_state()
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in sd["param_groups"]]
    save_tensors(run.state_path, tensors, {"step": str(step), "param_groups": json.dumps(groups),
                                           "generator_device": str(gen.device)})


def load_state(run: Run, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> int:
    """Restore from run.state_path; returns the step it was saved at."""
    if not run.state_path.exists():
        raise ValueError(f"cannot resume {run.path}: no resumable state at {run.state_path}")
    tensors, meta = load_tensors(run.state_path)
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    load_strict(model, model_sd, str(run.state_path))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    gen.set_state(tensors["rng.train"])
    return int(meta["step"])


# ------------------------------------------------------------------------------------------------ the loop
@contextmanager
def _stop_on_sigint() -> Iterator[dict[str, bool]]:
    """Turn Ctrl-C into a flag that the loop checks between steps, so the saved state is consistent."""
    flag = {"stop": False}
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: flag.__setitem__("stop", True))
    except ValueError:  # not in the main thread
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch, lr: float,
               grad_clip: float | None) -> Tensor:
    """One training step: squared-error loss on batch (x: (B, K, D), y: (B, K)), backward, optional gradient
    clipping to global norm grad_clip, then `opt` (make_optimizer's AdamW) at learning rate lr. Returns the loss
    before the update (detached); if it is not finite, nothing is updated and the caller decides."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = (model(batch.x, batch.y) - batch.y).square().mean()
    if not torch.isfinite(loss):
        return loss.detach()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.detach()


@dataclass
class Member:
    """One run in training: its directory, task pool, eval sets, model, AdamW, data generator and logs.

    `open_member` builds it; `run_loop` trains it (alone in `train`, with others in `ensemble.train_ensemble`).
    start: the step its state is at (0, or the step it was resumed from); last_good: its last checkpoint.
    """

    config: RunConfig
    run: Run
    pool: Tensor | None
    sets: dict[str, EvalSet]
    model: ICLTransformer
    opt: torch.optim.AdamW
    gen: torch.Generator
    start: int = 0
    rows: list[dict[str, float]] = field(default_factory=list)  # metrics, one row per evaluation
    losses: list[float] = field(default_factory=list)  # training loss of every update taken
    last_good: int | None = None
    tracker: Tracker = field(default_factory=Tracker)  # mirrors the logs (icl_lab.tracking); default: nothing
    mirrored: tuple[int, int] = (0, 0)  # losses and metric rows already sent to the tracker

    def lr(self, step: int) -> float:
        """The learning rate of update `step`."""
        return self.config.train.lr * lr_factor(step, self.config.train)

    def batch(self) -> Batch:
        """The next training batch from the member's own pool and generator."""
        return sample_batch(self.config.task, self.pool, self.config.train.batch_size, self.gen)

    def update(self, step: int) -> Tensor:
        """Update `step` (train_step on the next batch); the loss before it, 0-d."""
        return train_step(self.model, self.opt, self.batch(), self.lr(step), self.config.train.grad_clip)

    def evaluate(self, step: int) -> None:
        self.rows.append({"step": step, "lr": self.lr(step), **evaluate(self.model, self.sets)})

    def checkpoint(self, step: int) -> None:
        self.run.save_checkpoint(step, self.model)
        self.last_good = step

    def flush(self, step: int) -> None:
        """Write the logs and the resumable state at `step` (every loss must be in `losses`)."""
        write_parquet(self.run.path / "metrics.parquet", pd.DataFrame(self.rows))
        write_parquet(self.run.path / "train_loss.parquet",
                      pd.DataFrame({"step": np.arange(len(self.losses)), "loss": np.array(self.losses)}))
        save_state(self.run, step, self.model, self.opt, self.gen)
        losses, rows = self.mirrored
        for i in range(losses, len(self.losses)):
            self.tracker.log(i, {"train/loss": self.losses[i]})
        for row in self.rows[rows:]:
            self.tracker.log(int(row["step"]), evaluation_values(row))
        self.mirrored = (len(self.losses), len(self.rows))


def open_member(config: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False) -> Member:
    """Create the run directory `out` for `config` (with baselines.json) and set up its training, or with
    resume=True reload the run's saved state, metrics and losses to continue bit-identically."""
    tc, task, device = config.train, config.task, config.train.device
    if resume:
        run = Run.load(out)
        if run.config != config:
            raise ValueError(f"cannot resume {out}: its config differs from the one given")
    else:
        run = Run.create(out, config, overwrite=overwrite)
    pool = task_pool(task.family, task.M, task.D, config.seed, device) if task.M is not None else None
    sets = prepare_eval_sets(task, pool, tc.eval_size, config.seed, device)
    model = build_model(task, config.model, config.seed, device)
    member = Member(config, run, pool, sets, model, make_optimizer(model, tc), make_generator(config.seed, "train",
                                                                                             device))
    if resume and not run.state_path.exists():  # stopped after config.json, before its first saved state
        warnings.warn(f"{run.path} has no saved state yet (stopped before its first save): training it from "
                      f"step 0", stacklevel=2)
        resume = False
    if resume:
        member.start = load_state(run, model, member.opt, member.gen)
        member.rows = [r for r in run.metrics.to_dict("records") if r["step"] < member.start]
        member.losses = run.train_loss["loss"].tolist()[:member.start]
    else:
        write_json(run.path / "baselines.json", baseline_levels(sets))
    member.last_good = max([s for s in run.checkpoint_steps if s <= member.start], default=None)
    return member


def _diverged(members: Sequence[Member], step: int, losses: list[float]) -> TrainingDiverged:
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    detail = "; ".join(f"training loss is {losses[i]} at step {step} of {members[i].run.path}; the last good "
                       f"checkpoint is step {members[i].last_good}" for i in bad)
    prefix = f"ensemble member(s) {bad}: " if len(members) > 1 else ""
    return TrainingDiverged(f"{prefix}{detail} (lower --lr or set --grad-clip)")


def run_loop(members: Sequence[Member], update: Callable[[int], Tensor] | None = None, *,
             sync: Callable[[bool], None] | None = None, progress: bool = True, stop_after: int | None = None,
             resume_hint: str = "") -> bool:
    """The training loop of `train` and `train_ensemble`: from the members' common start step to the end, at each
    step the scheduled evaluation and checkpoint of every member, then one update of every member.

    update(step) -> (N,): takes update `step` of every member and returns their losses before it (default: each
    member's `update`, one after another); a member whose loss is not finite must be left unchanged.
    sync(optimizer): brings every member's model (and with optimizer=True its AdamW) up to date before they are
    read, for updates that keep the weights elsewhere (stacked ensembles).
    Stops with resumable state saved on Ctrl-C or once `stop_after` steps are done (returns False; True when
    finished). Raises TrainingDiverged, with every member's metrics written, if a loss is not finite.
    """
    tc = members[0].config.train
    start = members[0].start
    if any(m.start != start for m in members):
        raise ValueError(f"members start at different steps: {[m.start for m in members]}")
    if update is None:
        def update(step: int) -> Tensor:
            return torch.stack([m.update(step) for m in members])
    ckpts = set(checkpoint_steps(tc.steps, *tc.checkpoint_counts))
    evals = ckpts | (set(range(0, tc.steps + 1, tc.eval_every)) if tc.eval_every else set())
    pending: list[Tensor] = []  # (N,) losses not yet synced to Python floats

    def sync_losses() -> None:
        if pending:
            for m, values in zip(members, torch.stack(pending).T.tolist(), strict=True):
                m.losses.extend(values)
            pending.clear()

    def flush(step: int) -> None:
        sync_losses()
        if sync is not None:
            sync(True)
        for m in members:
            m.flush(step)

    n = len(members)
    bar = Bar(progress, tc.steps, "train" if n == 1 else f"train ×{n}", completed=start, loss=float("nan"),
              rate=0.0, columns=("loss {task.fields[loss]:.4g}" if n == 1 else "mean loss {task.fields[loss]:.4g}",
                                 "{task.fields[rate]:.0f} steps/s"))
    t0 = time.perf_counter()
    with _stop_on_sigint() as sig, bar:
        for step in range(start, tc.steps + 1):
            if step in evals:
                if sync is not None:
                    sync(False)
                for m in members:
                    m.evaluate(step)
                    if step in ckpts:
                        m.checkpoint(step)
                if step in ckpts:
                    flush(step)
            if step == tc.steps:
                return True
            if sig["stop"] or (stop_after is not None and step >= stop_after):
                flush(step)
                bar.stop()
                print(f"stopped at step {step}; continue with: {resume_hint}")
                return False
            loss = update(step)
            if not bool(torch.isfinite(loss).all()):
                for m in members:
                    write_parquet(m.run.path / "metrics.parquet", pd.DataFrame(m.rows))
                raise _diverged(members, step, loss.tolist())
            pending.append(loss)
            if len(pending) >= 200 or step + 1 == tc.steps:
                sync_losses()
                bar.update(step + 1, loss=float(np.mean([m.losses[-1] for m in members])),
                           rate=(step + 1 - start) / (time.perf_counter() - t0))
    return True


def train(config: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, stop_after: int | None = None, wandb: str | None = None) -> Run:
    """Train a model as `config` says, writing the run to `out`; returns the Run.

    resume: continue from the run's saved state (bit-identical to an uninterrupted run on CPU).
    stop_after: stop (as an interruption would) once this many steps are done, saving resumable state.
    wandb: a Weights & Biases project to mirror the config, the training loss and every evaluation to
        (icl_lab.tracking; files under the run directory). None: wandb is not imported.
    """
    member = open_member(config, out, resume=resume, overwrite=overwrite)
    with track(member, wandb):
        run_loop([member], progress=progress, stop_after=stop_after,
                 resume_hint=f"icl-lab train --resume {member.run.path}")
    return member.run


def track(member: Member, wandb: str | None) -> Tracker:
    """Give `member` a tracker for the wandb project (None: the null tracker); use it as a context manager."""
    member.tracker = open_tracker(wandb, member.run.path, name=member.run.path.name, job_type="train",
                                  config=member.config.model_dump(mode="json"))
    member.mirrored = (len(member.losses), len(member.rows))  # a resumed run's earlier logs were sent before
    return member.tracker
