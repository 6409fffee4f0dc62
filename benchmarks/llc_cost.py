"""What an LLC estimate costs at icl-lab's validated defaults, where the time goes, and the cost per unit of
precision against devinterp 2.x (issue 21, items 3 and 8).

The checkpoint is the final one (step 5,000) of llc_curve.py's run: the seed preset on M = 2 unit-norm noiseless
tasks (trained first when absent; reused from --workdir). The LLC data: n = 4,096 in-distribution sequences,
nβ = n / log n. The settings are `LLCConfig()`'s defaults made concrete by `llc.resolve` (γ = 0.01·nβ, ε = 1e-4,
burn-in min_burnin(ε, γ), 500 draws, 4 chains), at the minibatch given by --batch.

Part 1, where the time goes (minibatch 256, the default, and 64): each estimate's time is a fixed part (ℓ_n(w*)
and ∇ℓ_n(w*) on all n sequences, copies, set-up) plus a per-chain-step part. Two short estimates per minibatch
(B0 and B1 burn-in steps, 20 draws) give both by difference; from them, the time of one default estimate and of
the 40-checkpoint curve of llc_curve.py (one estimate at a time; each uses both cores) is extrapolated, with the
share spent in burn-in.

Part 2, cost per unit of precision (minibatch --batch): full default estimates of the same checkpoint by icl-lab's
SGLD, icl-lab's RMSProp-SGLD and devinterp's SGLD (same ε, γ, nβ, chains, burn-in, draws and minibatch). Every
side's post-burn-in loss trace goes through the same statistics (`icl_lab.convergence`): split-R̂, ESS and the
MCSE of λ̂. The cost of precision s is the time to reach MCSE = s: burn-in time + draw time × (MCSE / s)², the
draws scaled and the burn-in not. The speed-up is devinterp's cost over icl-lab's at s = 2 (issue 21's target:
at least 3x).

    python benchmarks/llc_cost.py              # ~40-60 min on 2 shared cores (devinterp's chains are the most)
    python benchmarks/llc_cost.py --quick      # smoke check: short run, short chains, results in a temp folder
"""

# ruff: noqa: E501  (long f-strings of the markdown tables)
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # devinterp's per-chain progress bars

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Devinterp, loadavg, machine_info, seed_m2_run, write_atomic, write_json_atomic  # noqa: E402
from icl_lab.config import LLCConfig  # noqa: E402
from icl_lab.convergence import summarize  # noqa: E402
from icl_lab.llc import default_nbeta, estimate_llc, resolve  # noqa: E402
from icl_lab.llc_run import llc_data, mse_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SE = 2.0
TARGET_SPEEDUP = 3.0
CURVE_CHECKPOINTS = 40
SEED = 1234


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cost_to_se(seconds: float, burnin: int, draws: int, mcse: float, target: float) -> float:
    """Seconds to reach MCSE = target: the burn-in's share of `seconds` plus the draws' share scaled by
    (mcse / target)² (the MCSE of a mean falls as 1/√draws once the chains are stationary)."""
    if not math.isfinite(mcse):
        return math.nan
    share = draws / (burnin + draws)
    return seconds * (1 - share) + seconds * share * (mcse / target) ** 2


def timing_model(model, data, base: LLCConfig, batch: int, b0: int, b1: int, draws: int) -> dict[str, Any]:
    """Fixed seconds and seconds per chain-step of `estimate_llc` at these settings, from two short estimates."""
    times = {}
    for b in (b0, b1):
        cfg = base.model_copy(update=dict(batch_size=batch, num_burnin=b, num_draws=draws))
        t0 = time.perf_counter()
        estimate_llc(model, data, mse_loss, config=cfg, seed=SEED)
        times[b] = time.perf_counter() - t0
    per_step = (times[b1] - times[b0]) / (b1 - b0)  # one step of all chains together
    fixed = times[b0] - per_step * (b0 + draws)
    return {"batch": batch, "short_estimates_s": times, "seconds_per_step_all_chains": per_step,
            "seconds_per_chain_step": per_step / base.num_chains, "fixed_seconds": fixed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench-llc-curve"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--batch", type=int, default=64, help="minibatch of part 2 (default 64: 4x cheaper per step)")
    ap.add_argument("--skip-devinterp", action="store_true")
    ap.add_argument("--render", action="store_true", help="only rewrite the md from the json in --out (or results)")
    args = ap.parse_args()
    if args.render:
        out = args.out or RESULTS
        write_atomic(out / "llc_cost.md", markdown(json.loads((out / "llc_cost.json").read_text())))
        return
    out = args.out or (Path(tempfile.mkdtemp(prefix="llc_cost_")) if args.quick else RESULTS)
    t_start = time.perf_counter()

    run = seed_m2_run(args.workdir, args.quick)
    step = run.checkpoint_steps[-1]
    n = 512 if args.quick else 4096
    nbeta = default_nbeta(n)
    data = llc_data(run, n, "id")
    model = run.load_checkpoint(step)
    base = resolve(LLCConfig(), nbeta)
    if args.quick:
        base = base.model_copy(update=dict(num_burnin=40, num_draws=40, num_chains=2))
    res: dict[str, Any] = {"benchmark": "llc_cost", "quick": args.quick, "machine": machine_info(),
                           "command": "python " + " ".join(sys.argv), "step": step, "n": n, "nbeta": nbeta,
                           "settings": base.model_dump(), "batch": args.batch, "part1": [], "part2": []}

    def save() -> None:
        res["seconds"] = time.perf_counter() - t_start
        res["load_at_end"] = loadavg()
        write_json_atomic(out / "llc_cost.json", res)
        write_atomic(out / "llc_cost.md", markdown(res))

    # Part 1: where the time goes.
    b0, b1 = (5, 25) if args.quick else (50, 350)
    for batch in (256, 64):
        t = timing_model(model, data, base, batch, b0, b1, 20)
        steps = base.num_burnin + base.num_draws
        t["default_estimate_s"] = t["fixed_seconds"] + t["seconds_per_step_all_chains"] * steps
        t["burnin_share"] = t["seconds_per_step_all_chains"] * base.num_burnin / t["default_estimate_s"]
        t["curve_s"] = CURVE_CHECKPOINTS * t["default_estimate_s"]
        res["part1"].append(t)
        log(f"part 1, minibatch {batch}: {t}")
        save()

    # Part 2: full estimates, the same statistics on every trace.
    cfg = base.model_copy(update=dict(batch_size=args.batch))
    sides = [("icl-lab sgld", "sgld"), ("icl-lab rmsprop_sgld", "rmsprop_sgld")]
    if not args.skip_devinterp:
        sides.append(("devinterp sgld", None))
        dev = Devinterp(*data)
    for label, sampler in sides:
        if sampler is not None:
            r = estimate_llc(model, data, mse_loss, config=cfg.model_copy(update=dict(sampler=sampler)),
                             seed=SEED)
            row = {"side": label, "seconds": r.seconds, "llc": r.llc_mean, "flags": ";".join(r.diagnostics),
                   "trace": r.loss_trace}
        else:
            d = dev.run(model, lr=cfg.step_size, localization=cfg.localization, chains=cfg.num_chains,
                        draws=cfg.num_draws, burnin=cfg.num_burnin, batch=cfg.batch_size, nbeta=nbeta, seed=SEED)
            row = {"side": label, "seconds": d["seconds"], "llc": d["llc_mean"], "flags": "", "trace": d["trace"],
                   "chain_failures": d["chain_failures"]}
        trace = row.pop("trace")
        stats = summarize(trace) if math.isfinite(float(trace.mean())) else {"rhat": math.nan, "ess": math.nan,
                                                                            "mcse": math.nan}
        row |= {"rhat": stats["rhat"], "ess": stats["ess"], "llc_mcse": nbeta * stats["mcse"],
                "seconds_to_se": cost_to_se(row["seconds"], cfg.num_burnin, cfg.num_draws, nbeta * stats["mcse"],
                                            TARGET_SE)}
        res["part2"].append(row)
        log(f"part 2: {row}")
        save()

    by = {r["side"]: r for r in res["part2"]}
    if "devinterp sgld" in by:
        res["speedup_at_se"] = by["devinterp sgld"]["seconds_to_se"] / by["icl-lab sgld"]["seconds_to_se"]
    save()
    log(f"done in {res['seconds']:.0f} s -> {out}")


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    m = res["machine"]
    lines = ["# Cost of an LLC estimate at the validated defaults (`benchmarks/llc_cost.py`)", "",
             f"{m.get('cpu_model', '')}, {m.get('cores_available')} cores, torch {m.get('torch')}; {m.get('date_utc')}; "
             f"load at start {m.get('loadavg_at_start')}, at end {res.get('load_at_end')} (the cores are shared: "
             f"absolute times are noisy). {res.get('seconds', 0):.0f} s in all.", "",
             f"Checkpoint: step {res['step']} of llc_curve.py's seed-preset M = 2 run. n = {res['n']}, nβ = "
             f"{res['nbeta']:.1f}; the defaults resolved: ε = {s['step_size']:g}, γ = {s['localization']:.3g} "
             f"(γ/nβ = {s['localization'] / res['nbeta']:.3g}), burn-in {s['num_burnin']}, {s['num_draws']} draws, "
             f"{s['num_chains']} chains.", "",
             "## Where the time goes", "",
             "From two short estimates per minibatch (the difference gives the per-step cost). One estimate at a time "
             "uses both cores; the curve is 40 such estimates.", "",
             "| minibatch | fixed s | ms per step (all chains) | one default estimate s | burn-in share | 40-checkpoint curve |",
             "|---:|---:|---:|---:|---:|---:|"]
    for t in res["part1"]:
        lines.append(f"| {t['batch']} | {t['fixed_seconds']:.1f} | {1e3 * t['seconds_per_step_all_chains']:.1f} | "
                     f"{t['default_estimate_s']:.0f} | {100 * t['burnin_share']:.0f}% | {t['curve_s'] / 60:.0f} min |")
    if res["part2"]:
        lines += ["", f"## Cost per unit of precision (minibatch {res['batch']})", "",
                  f"Full default estimates; split-R̂, ESS and MCSE from each side's post-burn-in trace by "
                  f"`icl_lab.convergence`. Time to MCSE = {TARGET_SE:g}: burn-in time + draw time × (MCSE / "
                  f"{TARGET_SE:g})².", "",
                  "| side | seconds | λ̂ | MCSE | split-R̂ | ESS | flags | seconds to MCSE 2 |",
                  "|---|---:|---:|---:|---:|---:|---|---:|"]
        for r in res["part2"]:
            lines.append(f"| {r['side']} | {r['seconds']:.0f} | {r['llc']:.2f} | {r['llc_mcse']:.2f} | "
                         f"{r['rhat']:.3f} | {r['ess']:.0f} | {r['flags'] or '—'} | {r['seconds_to_se']:.0f} |")
    if "speedup_at_se" in res:
        met = "met" if res["speedup_at_se"] >= TARGET_SPEEDUP else "not met"
        by = {r["side"]: r for r in res["part2"]}
        wall = by["devinterp sgld"]["seconds"] / by["icl-lab sgld"]["seconds"]
        lines += ["", f"Speed-up at MCSE {TARGET_SE:g} (devinterp / icl-lab SGLD): **{res['speedup_at_se']:.2f}x**; "
                      f"target ≥ {TARGET_SPEEDUP:g}x: **{met}**. The same number of chain-steps took {wall:.2f}x "
                      "longer in devinterp (wall time, same settings). Both sides run the same SGLD chain, so the "
                      "precision per draw differs only by chance: with 4 chains the MCSE itself is uncertain by "
                      "tens of percent, and that uncertainty carries into the ratio at equal precision."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
