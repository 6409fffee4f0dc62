"""An LLC curve over 40 checkpoints of a seed-preset run, with calibrated settings, end to end (issue 5 item 9).

What is timed is what a user runs: `icl-lab llc calibrate RUN` then `icl-lab llc RUN --workers 2`, through the
Python API (`icl_lab.llc_run.calibrate_run`, `icl_lab.llc_run.estimate_run`), on 2 worker processes of one torch
thread each. The run is the seed preset on M = 2 unit-norm noiseless tasks (D = 8, K = 16), 5,000 steps at batch
32, lr 3e-3, with 13 linear + 30 log-spaced checkpoints = exactly 40 distinct steps (0 and 5,000 included); it is
trained first (untimed; reused from --workdir if present). The sampler is the issue's: n = 4,096 fixed
in-distribution sequences, 4 chains × 200 draws after at least 50 burn-in (calibration raises it to
min_burnin(ε, γ) ≈ 3/(εγ) for the chosen ε: 100 at 3e-5), minibatch 32, γ = 1000 (the low-diversity
study's localisation), nβ = n / log n; calibration sweeps ε over [1e-5, 3e-5, 1e-4, 3e-4] at the final checkpoint
and `pick` chooses ε. Then every checkpoint is estimated with the chosen settings.

Reports: the calibration time, the curve time (target < 600 s), seconds per estimate and per SGLD chain-step, the
curve itself with each estimate's diagnostics, and the machine's load. Results go to
benchmarks/results/llc_curve.{json,md} (atomic writes).

    python benchmarks/llc_curve.py               # ~12 min on 2 idle cores (training ~2 min + calibration + curve)
    python benchmarks/llc_curve.py --quick       # smoke check: short run, short chains, results in a temp folder
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine_info, write_atomic, write_json_atomic  # noqa: E402
from icl_lab.config import LLCConfig, build_run_config  # noqa: E402
from icl_lab.llc import sampler_ok  # noqa: E402
from icl_lab.llc_run import LLCSettings, calibrate_run, estimate_run  # noqa: E402
from icl_lab.store import Run  # noqa: E402
from icl_lab.train import train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 600.0
STEP_SIZES = [1e-5, 3e-5, 1e-4, 3e-4]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench-llc-curve"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or (Path(tempfile.mkdtemp(prefix="llc_curve_")) if args.quick else RESULTS)
    steps, lin, log_ = (300, 4, 8) if args.quick else (5000, 13, 30)
    sampler = (LLCConfig(num_chains=2, num_draws=20, num_burnin=10, batch_size=32, localization=1000.0)
               if args.quick else
               LLCConfig(num_chains=4, num_draws=200, num_burnin=50, batch_size=32, localization=1000.0))
    n = 512 if args.quick else 4096
    res: dict = {"benchmark": "llc_curve", "quick": args.quick, "machine": machine_info(),
                 "command": "python " + " ".join(sys.argv), "target_seconds": TARGET_S, "workers": args.workers}

    cfg = build_run_config(overrides=dict(preset="seed", family="unit_norm", noise_var=0.0, M=2, steps=steps,
                                          batch_size=32, lr=3e-3, n_checkpoints_linear=lin, n_checkpoints_log=log_,
                                          seed=0, name="seed-M2"))
    run_dir = args.workdir / ("quick" if args.quick else "full")
    t0 = time.perf_counter()
    try:
        run = Run.load(run_dir)
        if run.config != cfg or not run.checkpoint_steps or run.checkpoint_steps[-1] != steps:
            raise FileNotFoundError
    except FileNotFoundError:
        run = train(cfg, run_dir, overwrite=True)
    res["train_seconds"] = time.perf_counter() - t0
    res["checkpoints"] = len(run.checkpoint_steps)
    (run.path / "llc.parquet").unlink(missing_ok=True)  # time the whole curve, never a reused one

    res["loadavg_start"] = loadavg()
    t0 = time.perf_counter()
    cal, chosen = calibrate_run(run, settings=LLCSettings(sampler=sampler, n=n, data="id", seed=0),
                                step_sizes=STEP_SIZES)
    res["calibration_seconds"] = time.perf_counter() - t0
    res["calibration"] = cal.table[["step_size", "num_burnin", "llc_mean", "llc_std", "ok", "flags"]].to_dict("records")
    res["chosen"] = {"step_size": chosen.sampler.step_size, "num_burnin": chosen.sampler.num_burnin,
                     "reason": cal.reason}
    used = chosen.sampler  # the sampler every checkpoint ran: the base with the calibrated ε and burn-in

    t0 = time.perf_counter()
    llc = estimate_run(run, settings=chosen, workers=args.workers, progress=True)
    curve_s = time.perf_counter() - t0
    res["loadavg_end"] = loadavg()
    chain_steps = len(llc) * used.num_chains * (used.num_draws + used.num_burnin)
    res |= {"curve_seconds": curve_s, "estimates": len(llc), "seconds_per_estimate": curve_s / len(llc),
            "cpu_seconds_per_chain_step": curve_s * args.workers / chain_steps,
            "target_met": curve_s < TARGET_S,
            "curve": llc[["step", "llc_mean", "llc_std", "grad_norm", "llc_slope", "ok", "flags"]
                         ].to_dict("records")}
    write_json_atomic(out / "llc_curve.json", res)
    write_atomic(out / "llc_curve.md", markdown(res, used, n))
    print(f"curve: {curve_s:.0f} s for {len(llc)} checkpoints (target < {TARGET_S:.0f} s); "
          f"calibration {res['calibration_seconds']:.0f} s; results in {out}")


def markdown(res: dict, sampler: LLCConfig, n: int) -> str:
    m = res["machine"]
    ok = sum(bool(r["ok"]) for r in res["curve"])
    n_sampler_ok = sum(sampler_ok(r["flags"]) for r in res["curve"])
    lam = np.array([r["llc_mean"] for r in res["curve"]])
    lines = [
        "# LLC curve over 40 checkpoints, end to end", "",
        f"{m['cpu_model']}, {m['cores_available']} cores, torch {m['torch']}, "
        f"{m['date_utc']}; {res['workers']} worker processes × 1 torch thread. Load average at start "
        f"{res['loadavg_start']}, at end {res['loadavg_end']}. Produced by `{res['command']}` (method in its "
        "docstring).", "",
        f"Seed preset, M = 2 unit-norm, 5,000 steps, {res['checkpoints']} checkpoints. Sampler: n = {n}, "
        f"{sampler.num_chains} chains × {sampler.num_draws} draws after {sampler.num_burnin} burn-in (calibrated), "
        f"minibatch {sampler.batch_size}, γ = {sampler.localization:g}, nβ = n/log n; ε calibrated over "
        f"{STEP_SIZES}.", "",
        "| phase | seconds |", "|---|---:|",
        f"| calibration (4 step sizes at the final checkpoint, 1 process) | {res['calibration_seconds']:.0f} |",
        f"| **LLC curve, {res['estimates']} checkpoints** | **{res['curve_seconds']:.0f}** |",
        f"| per estimate (wall, {res['workers']} in parallel) | {res['seconds_per_estimate']:.1f} |",
        f"| per SGLD chain-step (CPU, fixed costs included) | {res['cpu_seconds_per_chain_step'] * 1e3:.1f} ms |",
        "",
        f"Target (curve < {TARGET_S:.0f} s on 2 cores): **{'met' if res['target_met'] else 'NOT met'}**. "
        f"Chosen ε = {res['chosen']['step_size']:g} ({res['chosen']['reason']}). {ok}/{len(res['curve'])} "
        f"estimates without diagnostic flags ({n_sampler_ok} without a sampler flag, i.e. at most not_at_minimum); "
        f"λ̂ from {np.nanmin(lam):.3g} to {np.nanmax(lam):.3g}.", "",
        "‖g‖ = ‖∇ℓ_n(w*)‖; S = nβ·E[∇ℓ_n(w*)ᵀ(w − w*)], the slope term, by which λ̂ reads low by between |S|/2 "
        "and |S| at a checkpoint that is not a minimum (docs/llc.md); λ̂ − S/2 is shown for comparison only, it is "
        "not an estimate icl-lab reports.", "",
        "| step | λ̂ | std | ‖g‖ | S | λ̂ − S/2 | flags |", "|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {r['step']} | {r['llc_mean']:.3g} | {r['llc_std']:.2g} | {r['grad_norm']:.3g} | "
              f"{r['llc_slope']:.3g} | {r['llc_mean'] - r['llc_slope'] / 2:.3g} | {r['flags'] or 'ok'} |"
              for r in res["curve"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
