"""Where does the seed transformer's λ̂ stop depending on γ, and what does a stationary chain cost there?
(issue 21 items 1, 3 and 8, on the user's model)

The checkpoint is the final one (step 5,000) of benchmarks/llc_curve.py's run: the seed preset on M = 2 unit-norm
noiseless tasks, batch 32, lr 3e-3 constant (trained first when absent; reused from --workdir). The LLC data are
that run's n = 4,096 fixed in-distribution sequences, nβ = n / log n = 492, minibatch 64. At ε = 1e-4 (the
validated default) λ̂ is estimated at γ/nβ ∈ {0.2, 0.1, 0.05, 0.02, 0.01} with plain SGLD, each with burn-in
min_burnin(ε, γ) ≈ 3/(εγ) and 4 chains × 300 draws; at the two smallest ratios also with RMSProp-SGLD and a
burn-in of 500 steps, to see whether the preconditioner reaches the same value at a fraction of the cost.

Reported per estimate: λ̂ ± MCSE, split-R̂, ESS, the slope term S, flags, seconds and chain-steps. Nothing here is
judged against a threshold: the point is to measure how λ̂ moves with γ on this model and what it costs.

    python benchmarks/llc_localization.py          # about 10-20 min on 2 idle cores
    python benchmarks/llc_localization.py --quick  # smoke check: short run and chains, results in a temp folder
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine_info, seed_m2_run, write_atomic, write_json_atomic  # noqa: E402
from icl_lab.config import LLCConfig  # noqa: E402
from icl_lab.llc import default_nbeta, estimate_llc, min_burnin  # noqa: E402
from icl_lab.llc_run import LLCSettings, _sgld_seed, llc_data, mse_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (0.2, 0.1, 0.05, 0.02, 0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench-llc-curve"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or (Path(tempfile.mkdtemp(prefix="llc_localization_")) if args.quick else RESULTS)
    run = seed_m2_run(args.workdir, args.quick)  # the same run as llc_curve.py's
    n = 512 if args.quick else 4096
    nbeta = default_nbeta(n)
    draws, chains, eps = (20, 2, 1e-4) if args.quick else (300, 4, 1e-4)
    settings = LLCSettings(n=n)
    data = llc_data(run, n, settings.data)
    model = run.load_checkpoint(run.checkpoint_steps[-1])
    plan = [("sgld", r, None) for r in RATIOS] + [("rmsprop_sgld", r, 500) for r in RATIOS[-2:]]
    rows = []
    t0 = time.perf_counter()
    for sampler, ratio, burnin in plan:
        gamma = ratio * nbeta
        b = min_burnin(eps, gamma) if burnin is None else burnin
        if args.quick:
            b = min(b, 50)
        config = LLCConfig(step_size=eps, localization=gamma, num_burnin=b, num_draws=draws, num_chains=chains,
                           batch_size=64, sampler=sampler)
        r = estimate_llc(model, data, mse_loss, config=config, seed=_sgld_seed(settings))
        rows.append({"sampler": sampler, "ratio": ratio, "gamma": gamma, "burnin": b, "llc": r.llc_mean,
                     "llc_mcse": r.llc_mcse, "rhat": r.rhat, "ess": r.ess, "slope": r.llc_slope,
                     "flags": ";".join(r.diagnostics), "seconds": r.seconds, "chain_steps": chains * (b + draws)})
        print(rows[-1], flush=True)
    res = {"benchmark": "llc_localization", "quick": args.quick, "machine": machine_info(), "load": loadavg(),
           "command": "python " + " ".join(sys.argv), "step": run.checkpoint_steps[-1], "n": n, "nbeta": nbeta,
           "step_size": eps, "rows": rows, "seconds": time.perf_counter() - t0}
    write_json_atomic(out / "llc_localization.json", res)
    lines = ["# λ̂ of the seed transformer against γ (`benchmarks/llc_localization.py`)", "",
             f"{res['machine'].get('cpu_model', '')}; {time.strftime('%Y-%m-%d')}; load at the end {res['load']}; "
             f"{res['seconds']:.0f} s in all.", "",
             f"Checkpoint: step {res['step']} of the seed-preset M = 2 run of llc_curve.py. n = {n}, nβ = "
             f"{nbeta:.1f}, ε = {eps:g}, minibatch 64, {chains} chains × {draws} draws. Standard errors: MCSE.", "",
             "| sampler | γ/nβ | γ | burn-in | λ̂ | split-R̂ | ESS | S | flags | seconds | chain-steps |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['ratio']:g} | {r['gamma']:.3g} | {r['burnin']} | {r['llc']:.2f} ± "
                     f"{r['llc_mcse']:.2f} | {r['rhat']:.3f} | {r['ess']:.0f} | {r['slope']:.2f} | "
                     f"{r['flags'] or '—'} | {r['seconds']:.0f} | {r['chain_steps']} |")
    write_atomic(out / "llc_localization.md", "\n".join(lines) + "\n")
    print(f"wrote {out / 'llc_localization.md'}")


if __name__ == "__main__":
    main()
