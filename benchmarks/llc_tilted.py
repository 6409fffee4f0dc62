"""Does the tilted loss remove the user's zig-zag? (issue 21 item 5)

The run is benchmarks/llc_curve.py's: the seed preset on M = 2 unit-norm noiseless tasks (D = 8, K = 16), 5,000
steps at batch 32, lr 3e-3 constant, 13 linear + 30 log-spaced checkpoints (reused from --workdir if present).
The checkpoints between steps 110 and 789 (at most ten; eight on this run's grid) are estimated at the settings
that gave the zig-zag (the studies' γ = 1000, ε = 3e-5, nβ = n / log n with n = 4,096, 4 chains × 200 draws
after min_burnin(ε, γ) = 100, minibatch 32), with `tilted=True`: every estimate also samples the tilted loss
ℓ_n(w) − ∇ℓ_n(w*)ᵀ(w − w*) with the same random numbers. The table gives λ̂, its slope term S, λ̂ − S/2 and
λ̂_tilted, each with its standard error.

The check, written before the run: a change between consecutive checkpoints is *significant* when it exceeds
two standard errors of the difference, 2·√(se₁² + se₂²) (se = the Monte-Carlo standard error). The tilt removes
the zig-zag when λ̂_tilted has at most 1 significant change among the consecutive pairs while λ̂ has at least 3.

    python benchmarks/llc_tilted.py            # training (~1-2 min, skipped when the run exists) + 10 × 2 estimates
    python benchmarks/llc_tilted.py --quick    # smoke check: short run, short chains, results in a temp folder
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine_info, seed_m2_run, write_atomic, write_json_atomic  # noqa: E402
from icl_lab.config import LLCConfig  # noqa: E402
from icl_lab.llc import estimate_llc  # noqa: E402
from icl_lab.llc_run import LLCSettings, _sgld_seed, llc_data, mse_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def significant_changes(values: list[float], ses: list[float]) -> int:
    """Consecutive changes larger than two standard errors of the difference."""
    return sum(abs(b - a) > 2 * math.hypot(sa, sb)
               for a, b, sa, sb in zip(values, values[1:], ses, ses[1:], strict=False))


def markdown(res: dict) -> str:
    """The results file's text, from the JSON."""
    rows, sampler = res["rows"], res["sampler"]
    plain, tilted = res["significant_changes"]["llc"], res["significant_changes"]["llc_tilted"]
    machine = res["machine"]
    lines = ["# Does the tilted loss remove the zig-zag? (`benchmarks/llc_tilted.py`)", "",
             f"{machine.get('cpu_model') or machine.get('cpu', '')}; {res.get('date', '')}; load {res['load']}; "
             f"{res['seconds']:.0f} s for {len(rows)} estimates (each samples the plain and the tilted loss).", "",
             f"Settings: ε = {sampler['step_size']:g}, γ = {sampler['localization']:g}, nβ = n/log n "
             f"(n = {res['n']}), {sampler['num_chains']} chains × {sampler['num_draws']} draws after "
             f"{sampler['num_burnin']}, minibatch {sampler['batch_size']}. Checkpoints: those of the run between "
             "steps 110 and 789. Standard errors are Monte-Carlo (MCSE).", "",
             "| step | λ̂ | S | λ̂ − S/2 | λ̂_tilted | ‖∇ℓ_n(w*)‖ | flags |", "|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['llc']:.2f} ± {r['llc_mcse']:.2f} | {r['slope']:.2f} | "
                     f"{r['llc_minus_half_slope']:.2f} | {r['llc_tilted']:.2f} ± {r['llc_tilted_mcse']:.2f} | "
                     f"{r['grad_norm']:.3g} | {r['flags'] or '—'} |")
    lines += ["", f"Significant consecutive changes (> 2 standard errors of the difference, of {len(rows) - 1}): "
              f"λ̂ {plain}, λ̂_tilted {tilted}. Check (written before the run): the tilt removes the zig-zag when "
              f"λ̂_tilted has at most 1 while λ̂ has at least 3. **Verdict: {res['verdict']}.**", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench-llc-curve"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--render", action="store_true", help="only rewrite the md from the json in --out (or results)")
    args = ap.parse_args()
    out = args.out or (Path(tempfile.mkdtemp(prefix="llc_tilted_")) if args.quick else RESULTS)
    if args.render:
        write_atomic(out / "llc_tilted.md", markdown(json.loads((out / "llc_tilted.json").read_text())))
        return
    sampler = LLCConfig(step_size=3e-5, localization=1000.0, num_chains=2 if args.quick else 4,
                        num_draws=20 if args.quick else 200, num_burnin=10 if args.quick else 100, batch_size=32,
                        tilted=True)
    settings = LLCSettings(sampler=sampler, n=512 if args.quick else 4096)
    run = seed_m2_run(args.workdir, args.quick)  # the same run as llc_curve.py's
    lo, hi = (10, 300) if args.quick else (110, 789)
    chosen = [s for s in run.checkpoint_steps if lo <= s <= hi][:10]
    data = llc_data(run, settings.n, settings.data)
    rows = []
    t0 = time.perf_counter()
    for step in chosen:
        r = estimate_llc(run.load_checkpoint(step), data, mse_loss, config=sampler, seed=_sgld_seed(settings))
        rows.append({"step": step, "llc": r.llc_mean, "llc_mcse": r.llc_mcse, "slope": r.llc_slope,
                     "llc_minus_half_slope": r.llc_mean - r.llc_slope / 2, "llc_tilted": r.llc_tilted,
                     "llc_tilted_mcse": r.llc_tilted_mcse, "grad_norm": r.grad_norm,
                     "flags": ";".join(r.diagnostics), "seconds": r.seconds})
        print(rows[-1], flush=True)
    plain = significant_changes([r["llc"] for r in rows], [r["llc_mcse"] for r in rows])
    tilted = significant_changes([r["llc_tilted"] for r in rows], [r["llc_tilted_mcse"] for r in rows])
    verdict = "removed" if tilted <= 1 and plain >= 3 else "not removed" if plain >= 3 else "no zig-zag to remove"
    res = {"benchmark": "llc_tilted", "quick": args.quick, "machine": machine_info(), "load": loadavg(),
           "command": "python " + " ".join(sys.argv), "sampler": sampler.model_dump(), "n": settings.n,
           "rows": rows, "significant_changes": {"llc": plain, "llc_tilted": tilted}, "verdict": verdict,
           "seconds": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d")}
    write_json_atomic(out / "llc_tilted.json", res)
    write_atomic(out / "llc_tilted.md", markdown(res))
    print(f"wrote {out / 'llc_tilted.md'}")


if __name__ == "__main__":
    main()
