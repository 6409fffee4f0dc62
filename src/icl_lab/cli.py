"""The `icl-lab` command (typer). Every `train` flag is generated from the config models, so none is missing, and
every LLC default is read from LLCConfig, LLCSettings and llc.DEFAULT_STEP_SIZES. A bad flag or value exits with
status 2 and one line, `error: ...`, never a traceback."""

from __future__ import annotations

import inspect
import json
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Optional  # noqa: UP035 (typer needs Optional at runtime)

import numpy as np
import torch
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

try:  # typer vendors click as typer._click from 0.2x on; older typers build on click itself
    from typer._click import exceptions as click_errors
    from typer._click.core import Context
except ImportError:  # pragma: no cover - depends on the typer version
    from click import Context
    from click import exceptions as click_errors

from icl_lab.config import SECTIONS, LLCConfig, build_run_config, read_config_file
from icl_lab.llc import DEFAULT_STEP_SIZES
from icl_lab.llc_run import LLCSettings, calibrate_run, estimate_run, load_settings, refined_table
from icl_lab.plots import llc_half_width, plot_calibration, plot_run, plot_stages
from icl_lab.progress import Bar
from icl_lab.stages import save_stage_table
from icl_lab.store import Run
from icl_lab.studies.common import check_out, llc_stages
from icl_lab.studies.runner import MissingOutputs, config_class, rebuild_report, run_study
from icl_lab.sweep import (
    STATUSES,
    SweepError,
    SweepFailed,
    check_options,
    expand_grid,
    first_line,
    load_spec,
    parse_assignments,
    parse_grid,
    read_sweep_file,
    run_sweep,
)
from icl_lab.train import TrainingDiverged, train

__all__ = ["app", "main"]

console = Console(stderr=True)

WANDB_HELP = ("mirror to this Weights & Biases project (needs icl-lab[wandb]; WANDB_MODE=offline keeps it local; "
              "files under the run directory)")
UPPER_FLAGS = {"M", "D", "K"}  # the papers' symbols keep their case: --M 2 --D 8 --K 16


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """Print `error: message` (rich markup) on stderr and exit with `code`."""
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def format_validation_error(err: ValidationError) -> str:
    """One line naming each bad field, its problem and the value given."""
    problems = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "config"
        problems.append(f"{field}: {e['msg']} (got {e.get('input')!r})")
    return "invalid configuration: " + "; ".join(problems)


class _Group(typer.core.TyperGroup):
    """A command group whose usage errors (unknown option, bad value, missing argument) end in one `error:` line
    instead of click's usage box."""

    def invoke(self, ctx: Context) -> Any:
        try:
            return super().invoke(ctx)
        except click_errors.NoArgsIsHelpError:
            raise
        except click_errors.UsageError as e:
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            fail(escape(e.format_message()) + where)


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train small transformers on in-context linear regression and watch how they learn.")


# ------------------------------------------------------------------------------------------------ train
def _flag_annotation(annotation: Any) -> Any:
    """The CLI type of a config field: bools stay bools, tuples stay tuples, everything else is parsed by
    pydantic from a string so that its error names the field and the allowed values."""
    if annotation is bool:
        return Optional[bool]  # noqa: UP045
    if typing.get_origin(annotation) is tuple:
        return Optional[annotation]  # noqa: UP045
    if annotation in (int, float):
        return Optional[annotation]  # noqa: UP045
    return Optional[str]  # noqa: UP045


def _help(field: Any) -> str:
    text = field.description or ""
    args = typing.get_args(field.annotation)
    if typing.get_origin(field.annotation) is typing.Literal:
        text += f" (one of: {', '.join(map(str, args))})"
    return f"{text} (default: {field.default!r})" if field.default is not None else text


def _config_parameters() -> list[inspect.Parameter]:
    params = [inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[int],  # noqa: UP045
                                default=typer.Option(None, "--seed", help="run seed (default: 0)")),
              inspect.Parameter("name", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],  # noqa: UP045
                                default=typer.Option(None, "--name", help="run name (default: derived)"))]
    for section, cls in SECTIONS.items():
        for key, field in cls.model_fields.items():
            flag = key if key in UPPER_FLAGS else key.replace("_", "-")
            names = [f"--{flag}/--no-{flag}"] if field.annotation is bool else [f"--{flag}"]
            params.append(inspect.Parameter(
                key, inspect.Parameter.KEYWORD_ONLY, annotation=_flag_annotation(field.annotation),
                default=typer.Option(None, *names, help=_help(field), rich_help_panel=section)))
    return params


def default_run_name(cfg: Any) -> str:
    m = "inf" if cfg.task.M is None else cfg.task.M
    return cfg.name or f"{cfg.model.preset}-M{m}-D{cfg.task.D}-K{cfg.task.K}-seed{cfg.seed}"


def train_command(config: Path | None = None, out: Path = Path("runs"), run_dir: Path | None = None,
                  resume: Path | None = None, overwrite: bool = False, quiet: bool = False,
                  wandb: str | None = None, **fields: Any) -> None:
    """Train one model; every config field is a flag, or comes from --config FILE (TOML or JSON)."""
    overrides = {k: v for k, v in fields.items() if v is not None}
    try:
        if resume is not None:
            run = Run.load(resume)
            cfg = run.config
            if overrides or config:
                fail("--resume continues a run with its saved config; do not pass config flags with it")
            target = resume
        else:
            file_values = read_config_file(config) if config else {}
            cfg = build_run_config(file_values, overrides)
            target = run_dir or out / default_run_name(cfg)
            if target.exists() and any(target.iterdir()) and not overwrite:
                fail(f"run directory {target} already exists; pass --resume {target} to continue it or "
                     f"--overwrite to replace it")
    except ValidationError as e:
        fail(format_validation_error(e))
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    console.print(f"run: {target}")
    try:
        train(cfg, target, resume=resume is not None, overwrite=overwrite, progress=not quiet, wandb=wandb)
    except TrainingDiverged as e:
        fail(str(e), code=3)
    except ValueError as e:
        fail(str(e))


train_command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],  # noqa: UP045
                      default=typer.Option(None, "--config", help="TOML or JSON config file (flags override it)")),
    inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                      default=typer.Option(Path("runs"), "--out", help="parent directory of runs")),
    inspect.Parameter("run_dir", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],  # noqa: UP045
                      default=typer.Option(None, "--run-dir", help="exact run directory (default OUT/NAME)")),
    inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],  # noqa: UP045
                      default=typer.Option(None, "--resume", help="continue this run from its saved state")),
    inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "--overwrite", help="replace an existing run directory")),
    inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "--quiet", help="no progress bar")),
    inspect.Parameter("wandb", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],  # noqa: UP045
                      default=typer.Option(None, "--wandb", metavar="PROJECT", help=WANDB_HELP)),
    *_config_parameters(),
])
app.command("train", help=train_command.__doc__)(train_command)


# ------------------------------------------------------------------------------------------------ plot, info
def _load_run(path: Path) -> Run:
    try:
        return Run.load(path)
    except (FileNotFoundError, ValueError) as e:  # ValueError: an unreadable config.json (Run.load names it)
        fail(f"cannot read run {path}: {e}")


@app.command()
def plot(run_dir: Annotated[Path, typer.Argument(help="a run directory")],
         out: Annotated[Optional[Path], typer.Option(help="figure path (default RUN/figures/curves)")] = None,  # noqa: UP045
         ) -> None:
    """Loss (mean and per-token, both eval sets, with dMMSE / ridge / zero levels) and LLC against step."""
    run = _load_run(run_dir)
    try:
        paths = plot_run(run, out)
    except ValueError as e:
        fail(str(e))
    for p in paths:
        typer.echo(str(p))


@app.command()
def info(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Print a run's config and what is on disk."""
    run = _load_run(run_dir)
    out = Console()
    out.print_json(run.config.model_dump_json())
    table = Table(title=str(run.path))
    table.add_column("item")
    table.add_column("value")
    steps = run.checkpoint_steps
    table.add_row("versions", ", ".join(f"{k} {v}" for k, v in run.versions.items()))
    table.add_row("checkpoints", f"{len(steps)}: {steps[:3]} … {steps[-3:]}" if steps else "none")
    table.add_row("finished", str(run.finished))
    table.add_row("resumable state", str(run.state_path.exists()))
    metrics = run.metrics
    if not metrics.empty:
        last = metrics.iloc[-1]
        table.add_row("metrics rows", str(len(metrics)))
        table.add_row("last eval", f"step {int(last['step'])}: id loss {last['id_loss']:.4g}, "
                                   f"ood loss {last['ood_loss']:.4g}")
    llc = run.llc
    table.add_row("llc rows", str(0 if llc is None else len(llc)))
    for f in sorted(run.path.iterdir()):
        if f.is_file():
            table.add_row(f.name, f"{f.stat().st_size / 1024:.1f} KiB")
    out.print(table)


# ------------------------------------------------------------------------------------------------ llc
_LLC = LLCConfig.model_fields
_SETTINGS = LLCSettings.model_fields
CALIBRATE_ONLY = ("--step", "--step-sizes", "--localizations", "--nbetas", "--chains", "--draws", "--burnin",
                  "--batch-size", "--sampler", "--tilted", "--no-tilted")  # options `llc estimate` refuses by name


class _LLCGroup(_Group):
    """`icl-lab llc RUN ...` is short for `icl-lab llc estimate RUN ...`."""

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["estimate", *args]
        return super().parse_args(ctx, args)


class _EstimateCommand(typer.core.TyperCommand):
    """Names the subcommand a calibration flag belongs to, rather than only calling it unknown."""

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click_errors.NoSuchOption as e:
            if e.option_name in CALIBRATE_ONLY:
                raise click_errors.UsageError(
                    f"{e.option_name}: only for `icl-lab llc calibrate`; an estimate uses the settings saved in "
                    f"RUN/llc_settings.json (calibrate again to change them)", ctx) from None
            raise


llc_app = typer.Typer(cls=_LLCGroup, no_args_is_help=True,
                      help="LLC over training: `icl-lab llc calibrate RUN` picks SGLD settings at one checkpoint and "
                           "saves them; `icl-lab llc RUN` (short for `llc estimate RUN`) then estimates every "
                           "checkpoint with them.")
app.add_typer(llc_app, name="llc")


def _floats(flag: str, text: str | None) -> list[float] | None:
    """A comma-separated list of numbers, or None when not given."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        fail(f"{flag}: {text!r} is not a comma-separated list of numbers, e.g. 1e-5,1e-4")


def _ints(flag: str, text: str | None, allowed: str = "comma-separated integers, e.g. 0,1,2") -> list[int] | None:
    """A comma-separated list of integers, or None when not given."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        fail(f"{flag}: {text!r} is not allowed; allowed: {allowed}")


def _check_device(device: str) -> None:
    if not (device == "cpu" or re.fullmatch(r"cuda(:\d+)?", device)):
        fail(f"--device: unknown device {device!r}; allowed: cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device}: no CUDA device on this machine (allowed here: cpu)")


def _batch_size(text: str) -> int | None:
    """--batch-size: a positive integer, or 'full' for the whole dataset (None in LLCConfig)."""
    if text.strip().lower() in {"full", "none"}:
        return None
    try:
        return int(text)
    except ValueError:
        fail(f"--batch-size: {text!r} is not allowed; allowed: an integer >= 1, or 'full' (the whole dataset)")


Device = Annotated[str, typer.Option(help="where the chains run: cpu or cuda[:N]")]
Quiet = Annotated[bool, typer.Option(help="no progress bar")]
RunArg = Annotated[Path, typer.Argument(metavar="RUN", help="a run directory", show_default=False)]


@llc_app.command("calibrate")
def llc_calibrate(
    run_dir: RunArg,
    step: Annotated[Optional[int], typer.Option(help="checkpoint step (default: the last)")] = None,  # noqa: UP045
    n: Annotated[int, typer.Option(help=_SETTINGS["n"].description)] = _SETTINGS["n"].default,
    data: Annotated[str, typer.Option(help="dataset: id, ood or root")] = _SETTINGS["data"].default,
    step_sizes: Annotated[str, typer.Option(help="ε grid, comma-separated (llc.DEFAULT_STEP_SIZES)")]
    = ",".join(f"{v:g}" for v in DEFAULT_STEP_SIZES),
    localizations: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="γ grid (default: llc.DEFAULT_LOCALIZATION_RATIOS × nβ; each pick checked at γ/2, 2γ)")] = None,
    nbetas: Annotated[Optional[str], typer.Option(help="nβ grid (default: n / log n)")] = None,  # noqa: UP045
    chains: Annotated[int, typer.Option(help="SGLD chains")] = _LLC["num_chains"].default,
    draws: Annotated[int, typer.Option(help=_LLC["num_draws"].description)] = _LLC["num_draws"].default,
    burnin: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="least burn-in draws (default: min_burnin(ε, γ) at each grid point)")] = _LLC["num_burnin"].default,
    batch_size: Annotated[str, typer.Option(help="SGLD minibatch size, or 'full' (the whole dataset; mala needs it)")]
    = str(_LLC["batch_size"].default),
    sampler: Annotated[str, typer.Option(help="sgld, rmsprop_sgld or mala")] = _LLC["sampler"].default,
    tilted: Annotated[bool, typer.Option(help="also sample the tilted loss at every estimate")]
    = _LLC["tilted"].default,
    device: Device = "cpu",
    quiet: Quiet = False,
) -> None:
    """Sweep ε and γ (and nβ when asked) at one checkpoint, pick the settings (on a γ-plateau when there is one)
    and save them with the run, in RUN/llc_settings.json; also writes RUN/llc_calibration.parquet and a figure."""
    _check_device(device)
    run = _load_run(run_dir)
    if step is not None and step not in run.checkpoint_steps:
        fail(f"no checkpoint at step {step} in {run.path}; steps: {run.checkpoint_steps}")
    grids = {"step_sizes": _floats("--step-sizes", step_sizes), "localizations": _floats("--localizations",
             localizations), "nbetas": _floats("--nbetas", nbetas)}
    try:
        sampler_cfg = LLCConfig(num_chains=chains, num_draws=draws, num_burnin=burnin,
                                batch_size=_batch_size(batch_size), sampler=sampler, tilted=tilted)
        base = LLCSettings(sampler=sampler_cfg, n=n, data=data, seed=run.config.seed)
        with Bar(not quiet, 1, "LLC calibration") as bar:  # the total is calibrate's upper bound, set as it goes
            cal, chosen = calibrate_run(run, step, settings=base, device=device, figure=plot_calibration, **grids,
                                        progress=lambda done, total, _: bar.update(done, total=total))
    except ValidationError as e:
        fail(format_validation_error(e))
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    Console().print(cal.table.to_string())
    verdict = "on a γ-plateau" if cal.on_plateau else "NOT on a γ-plateau: λ̂ still depends on γ"
    typer.echo(f"chosen ({verdict}): {chosen.sampler.model_dump()} ({cal.reason}); saved to "
               f"{run.path}/llc_settings.json")


@llc_app.command("estimate", cls=_EstimateCommand)
def llc_estimate(
    run_dir: RunArg,
    steps: Annotated[Optional[str], typer.Option(help="comma-separated subset of steps (default: all)")] = None,  # noqa: UP045
    workers: Annotated[int, typer.Option(min=1, help="parallel processes (one checkpoint each)")] = 1,
    n: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="dataset size; must equal the calibrated one (default: RUN/llc_settings.json's)")] = None,
    data: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="dataset: id, ood or root; must equal the calibrated one (default: RUN/llc_settings.json's)")] = None,
    refine: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="data-refined λ̂ from the same chains, comma-separated: position (each context position k), task (each "
             "pool task), fresh (fresh tasks)")] = None,
    device: Device = "cpu",
    quiet: Quiet = False,
    wandb: Annotated[Optional[str], typer.Option(metavar="PROJECT", help=WANDB_HELP)] = None,  # noqa: UP045
) -> None:
    """Estimate the LLC at every checkpoint (or --steps) with the settings `icl-lab llc calibrate` saved, into
    RUN/llc.parquet; resumable: steps already estimated with these settings are kept. --refine adds λ̂ per
    context position / pool task / fresh tasks, evaluated along the same chains (docs/llc.md)."""
    _check_device(device)
    run = _load_run(run_dir)
    subset = _ints("--steps", steps, "comma-separated checkpoint steps, e.g. 0,100,200")
    settings = load_settings(run)
    if settings is None:
        fail(f"{run.path} has no LLC settings; run `icl-lab llc calibrate {run.path}` first")
    for flag, given, saved in (("--n", n, settings.n), ("--data", data, settings.data)):
        if given is not None and given != saved:
            fail(f"{flag} {given}: the settings in {run.path}/llc_settings.json were calibrated with {flag} {saved}; "
                 f"calibrate again with {flag} {given} to estimate on that dataset")
    if refine is not None:
        kinds = [k.strip() for k in refine.split(",") if k.strip()]
        try:
            settings = settings.model_copy(update={"refine": kinds})
            LLCSettings.model_validate(settings.model_dump())
        except ValidationError as e:
            fail(f"--refine {refine}: {e.errors()[0]['msg']}; allowed: position, task, fresh (comma-separated)")
        if "task" in kinds and run.config.task.M is None:
            fail(f"--refine task: {run.path} has M = ∞ (no task pool); allowed here: position, fresh")
    try:
        df = estimate_run(run, subset, settings=settings, workers=workers, progress=not quiet, device=device,
                          wandb=wandb)
    except (ValueError, ValidationError) as e:
        fail(str(e))
    cols = [c for c in ("step", "llc_mean", "llc_lo", "llc_hi", "llc_mcse", "rhat", "ess", "flags")
            if c in df.columns]
    typer.echo(df[cols].to_string(index=False))
    refined = refined_table(df)
    if not refined.empty:
        typer.echo("\ndata-refined λ̂ (same chains):")
        typer.echo(refined.pivot(index="step", columns="name", values="llc").round(3).to_string())


@app.command()
def stages(run_dir: Annotated[Path, typer.Argument(help="a run with llc.parquet")]) -> None:
    """Stage boundaries from critical points of the LLC curve; writes RUN/stages.{parquet,csv} and a figure."""
    run = _load_run(run_dir)
    llc_df = run.llc
    if llc_df is None or llc_df.empty:
        fail(f"{run.path} has no LLC estimates; run `icl-lab llc {run.path}` first")
    llc_df = llc_df.sort_values("step")
    llc_df = llc_df[np.isfinite(llc_df["llc_mean"].to_numpy(dtype=float))]  # diverged estimates: not even drawn
    steps_ = llc_df["step"].to_numpy()
    loss = run.metrics.set_index("step").loc[steps_]["id_loss"].to_numpy()
    try:
        found = llc_stages(llc_df, loss)  # boundaries only from unflagged λ̂ > 0; the rest is drawn, not used
    except ValueError as e:  # e.g. fewer than two finite estimates
        fail(f"{run.path}: {e}")
    table = found.table
    save_stage_table(table, run.path / "stages")
    plot_stages(steps_, loss, llc_df["llc_mean"].to_numpy(), llc_half_width(llc_df), table,
                run.path / "figures" / "stages", milestones=found.milestones, trusted=found.trusted)
    Console().print(table.to_string(index=False))


# ------------------------------------------------------------------------------------------------ sweep
@app.command()
def sweep(
    grid: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--grid", help="KEY=V1,V2,... (repeatable): the values of one config field, e.g. M=1,2,inf")] = None,
    config: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="sweep file (TOML/JSON) with tables grid (KEY = list of values), base (config values) and "
             "sweep (executor, workers, address, slurm, ensemble)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--set", help="KEY=VALUE (repeatable): a config value for every run")] = None,
    out: Annotated[Path, typer.Option(help="sweep directory")] = Path("runs/sweep"),
    executor: Annotated[Optional[str], typer.Option(help="local (default), ray or slurm")] = None,  # noqa: UP045
    workers: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="local: processes (default: CPU count); ray: CPUs of a local Ray instance")] = None,
    address: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="ray: address of an existing cluster (auto, ray://host:10001, ...)")] = None,
    slurm: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--slurm", help="slurm: KEY=VALUE (repeatable) for submitit's update_parameters, e.g. "
                        "slurm_partition=gpu, timeout_min=60; cluster=local uses submitit's local executor")] = None,
    ensemble: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="train up to N stackable runs (seeds, M, lr of one architecture) together in one process")] = None,
    retry_failed: Annotated[bool, typer.Option(help="retry runs that failed before")] = True,
    dry_run: Annotated[bool, typer.Option(help="validate and list the runs; write nothing")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    wandb: Annotated[Optional[str], typer.Option(metavar="PROJECT", help=WANDB_HELP)] = None,  # noqa: UP045
) -> None:
    """Train a grid of runs into one sweep directory: OUT/runs/RUN_ID, index in OUT/index.parquet.

    Bad keys or values are rejected before anything is written. Re-running skips finished runs, resumes
    interrupted ones and retries failed ones; without --grid, --config or --set it repeats the sweep recorded in
    OUT. One failing run never stops the others; the exit status is 1 when any run failed.
    """
    try:
        spec = read_sweep_file(config) if config else {"grid": {}, "base": {}, "sweep": {}}
        flag_grid = parse_grid(grid or [])
        if set(flag_grid) & set(spec["grid"]):
            raise SweepError(f"grid fields {sorted(set(flag_grid) & set(spec['grid']))} are given both in {config} "
                             f"and as --grid flags; give each field once")
        grid_values, base = {**spec["grid"], **flag_grid}, {**spec["base"], **parse_assignments(set_ or [])}
        if not grid_values and not base:
            recorded = load_spec(out)
            grid_values, base = recorded["grid"], recorded["base"]
        flags = {"executor": executor, "workers": workers, "address": address, "ensemble": ensemble}
        opts = {"executor": "local", "ensemble": 1, **spec["sweep"],
                **{k: v for k, v in flags.items() if v is not None}}
        slurm_opts = dict(opts.get("slurm") or {})
        for key, value in parse_assignments(slurm or [], "--slurm").items():
            try:
                slurm_opts[key] = json.loads(value)  # numbers and booleans: timeout_min=60
            except (TypeError, json.JSONDecodeError):
                slurm_opts[key] = value
        check_options(opts["executor"], opts.get("workers"), opts["ensemble"])
        runs = expand_grid(grid_values, base)
    except SweepError as e:
        fail(escape(str(e)))  # messages quote [sweep] tables and lists: not rich markup
    if dry_run:
        typer.echo(f"{len(runs)} runs (dry run: nothing written)")
        for r in runs:
            typer.echo(r.run_id)
        return
    console.print(f"sweep: {out} ({len(runs)} runs, executor {opts['executor']})")
    try:
        index = run_sweep(out, grid_values, base, executor=opts["executor"], workers=opts.get("workers"), wandb=wandb,
                          address=opts.get("address"), slurm=slurm_opts, retry_failed=retry_failed,
                          progress=not quiet, ensemble=opts["ensemble"])
    except SweepError as e:
        fail(escape(str(e)))
    counts = index["status"].value_counts()
    typer.echo(f"{out / 'index.parquet'}: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts))
    failed = index[index["status"] == "failed"]
    for r in failed.itertuples():
        console.print(f"[red]failed[/] {escape(r.run_id)}: {escape(first_line(r.error))}", soft_wrap=True)
    if not failed.empty:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------ studies
# The studies: icl_lab.studies.runner.STUDIES, one Study each; their runs train through the sweep machinery.
STUDY_NAMES = ("low-diversity", "task-diversity", "transient-ridge", "stages")


@app.command()
def study(
    name: Annotated[str, typer.Argument(help=" | ".join(STUDY_NAMES))],
    out: Annotated[Optional[Path], typer.Option(help="study directory (default runs/NAME)")] = None,  # noqa: UP045
    quick: Annotated[bool, typer.Option(help="a minutes-long small version")] = False,
    config: Annotated[Optional[Path], typer.Option(help="TOML/JSON with study settings")] = None,  # noqa: UP045
    workers: Annotated[Optional[int], typer.Option(help="parallel processes")] = None,  # noqa: UP045
    seeds: Annotated[Optional[str], typer.Option(help="comma-separated seeds")] = None,  # noqa: UP045
    ms: Annotated[Optional[str], typer.Option("--Ms", help="comma-separated task diversities")] = None,  # noqa: UP045
    steps: Annotated[Optional[int], typer.Option(help="training steps per run")] = None,  # noqa: UP045
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda")] = None,  # noqa: UP045
    scale: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="papers' studies: small (default; README gives its time on 2 CPU cores) or paper (GPU / cluster)")] = None,
    executor: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="papers' studies: local (default), ray or slurm (as `icl-lab sweep`)")] = None,
    address: Annotated[Optional[str], typer.Option(help="papers' studies, ray: cluster address")] = None,  # noqa: UP045
    dry_run: Annotated[bool, typer.Option(help="papers' studies: validate and list the runs; write nothing")] = False,
    wandb: Annotated[Optional[str], typer.Option(metavar="PROJECT", help=WANDB_HELP)] = None,  # noqa: UP045
) -> None:
    """Run an end-to-end study; finished parts are reused. low-diversity: training, LLC, essential dynamics, stages
    (M = 1, 2). task-diversity: Raventós et al., M = 2^0 ... 2^k and ∞ at batch sizes B and 2B, the threshold M*.
    transient-ridge: Carroll et al., nested pools, OOD loss and t_crit per M, joint trajectory PCA, LLC against M.
    stages: Hoogland et al., M = ∞, LLC curve, essential dynamics, stage table, ICL score and LayerNorm weights."""
    if name not in STUDY_NAMES:
        fail(f"unknown study {name!r}; available: {', '.join(STUDY_NAMES)}")
    _sweep_study(name, out, quick, config, workers, seeds, ms, steps, device, scale, executor, address, dry_run,
                 wandb)


def _sweep_study(name: str, out: Path | None, quick: bool, config: Path | None, workers: int | None,
                 seeds: str | None, ms: str | None, steps: int | None, device: str | None, scale: str | None,
                 executor: str | None, address: str | None, dry_run: bool, wandb: str | None = None) -> None:
    """`icl-lab study NAME` for the papers' studies: every setting is validated (and every run config built) before
    anything is written; a bad value exits with status 2 naming the field and its allowed values."""
    try:
        overrides: dict[str, Any] = read_config_file(config) if config else {}
    except ValueError as e:  # missing file, bad suffix, bad TOML or JSON
        fail(escape(str(e)))
    scale = scale if scale is not None else overrides.pop("scale", "small")
    quick = quick or bool(overrides.pop("quick", False))
    for key, value in (("workers", workers), ("steps", steps), ("device", device), ("executor", executor),
                       ("address", address), ("wandb", wandb)):
        if value is not None:
            overrides[key] = value
    if seeds:
        try:
            overrides["seeds"] = [int(v) for v in seeds.split(",")]
        except ValueError:
            fail(f"seeds: {seeds!r} is not allowed; allowed: comma-separated integers, e.g. 0,1,2")
    if ms:
        overrides["Ms"] = [v.strip() for v in ms.split(",")]
    try:
        cfg = config_class(name).for_scale(scale, quick=quick, **overrides)
        runs = cfg.run_configs()
        check_options(cfg.executor, cfg.workers, cfg.ensemble)
        target = out or Path("runs") / (name + ("-paper" if cfg.scale == "paper" else "")
                                        + ("-quick" if cfg.quick else ""))
        check_out(target, name, runs)
    except ValidationError as e:
        fail(escape(format_validation_error(e)))
    except (ValueError, SweepError) as e:
        fail(escape(str(e)))
    sequences = sum(r.train.steps * r.train.batch_size for r in runs.values())
    if dry_run:
        typer.echo(f"{len(runs)} runs, {sequences:,} training sequences in all (dry run: nothing written to {target})")
        for line in getattr(cfg, "dry_run_lines", list)():  # a study's own summary: settings, jobs, executor
            typer.echo(line)
        for run_id in runs:
            typer.echo(run_id)
        return
    console.print(f"study {name} ({cfg.scale}{', quick' if cfg.quick else ''}): {target}, {len(runs)} runs, "
                  f"executor {cfg.executor}")
    try:
        report_path = run_study(cfg, target)
    except SweepFailed as e:
        fail(escape(str(e)), code=1)
    typer.echo(f"report: {report_path}")


@app.command()
def report(study_dir: Annotated[Path, typer.Argument(help="a study directory")]) -> None:
    """Rebuild a study's HTML report from what is on disk (nothing is trained, calibrated or estimated)."""
    try:
        path = rebuild_report(study_dir)
    except MissingOutputs as e:
        fail(escape(str(e)))
    typer.echo(f"report: {path}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
