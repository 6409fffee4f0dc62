"""One LLC estimate of a low-diversity run's final checkpoint at the validated defaults, with λ̂ per context
position, per pool task and on fresh tasks: what one estimate of the user's model costs, and where its complexity
sits (k = 1 against k ≥ 2).

Settings: `LLCSettings(sampler=LLCConfig(), n=4096, data="id", seed=0, refine=["position", "task", "fresh"])`,
the settings of the low-diversity study's small scale without the tilted chains, estimated in-process by
`llc_run.estimate_step` at the run's last checkpoint with `--threads` torch threads.

    python benchmarks/llc_seed_refined.py RUN OUT.json [--threads 1]     # one estimate (about an hour on a core)
    python benchmarks/llc_seed_refined.py --render A.json B.json ...     # the markdown table of saved estimates
Results: benchmarks/results/llc_seed_refined.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine_info, write_atomic, write_json_atomic  # noqa: E402
from icl_lab.config import LLCConfig  # noqa: E402
from icl_lab.llc_run import LLCSettings, estimate_step  # noqa: E402
from icl_lab.store import Run  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def estimate(run_dir: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    run = Run.load(run_dir)
    settings = LLCSettings(sampler=LLCConfig(), n=4096, data="id", seed=0, refine=["position", "task", "fresh"])
    t0, start = time.time(), loadavg()
    row = estimate_step(run_dir, run.checkpoint_steps[-1], settings.model_dump_json())
    return row | {"run": run.path.name, "wall_seconds": time.time() - t0, "torch_threads": threads,
                  "loadavg_start": start, "loadavg_end": loadavg(), "machine": machine_info()}


def markdown(rows: list[dict]) -> str:
    lines = ["# λ̂ of the user's model at the validated defaults, per context position, task and fresh tasks", "",
             "Method: the docstring of `benchmarks/llc_seed_refined.py`. Intervals: 95% t over the 4 chains.", ""]
    for r in rows:
        m = r.get("machine") or {"cpu_model": "CPU not recorded", "torch": "2.13.0+cpu",
                                 "date_utc": "date not recorded"}
        K = sum(1 for k in r if k.startswith("llc_refined_k") and k[13:].isdigit())
        ks = np.array([r[f"llc_refined_k{k}"] for k in range(K)])
        tasks = sorted(k[len("llc_refined_"):] for k in r if k.startswith("llc_refined_task") and k[16:].isdigit())
        lines += [f"## {r['run']}, step {r['step']:,}", "",
                  f"{m['cpu_model']}, {r['torch_threads']} torch thread(s), torch {m['torch']}, {m['date_utc']}; "
                  f"load average at start {r.get('loadavg_start', 'not recorded')}, at end "
                  f"{r.get('loadavg_end', 'not recorded')}. "
                  f"{r['wall_seconds']:.0f} s "
                  f"wall for one estimate (d = {r['d']:,}, nβ = {r['nbeta']:.4g}, γ = {r['localization']:.4g}, "
                  f"burn-in {r['num_burnin']:,}, 4 chains × 500 draws, minibatch 256).", "",
                  "| quantity | λ̂ | 95% interval |", "|---|---:|---|",
                  f"| λ̂ (all positions) | {r['llc_mean']:.1f} | [{r['llc_lo']:.1f}, {r['llc_hi']:.1f}] |",
                  f"| k = 1 | {ks[0]:.1f} | [{r['llc_refined_k0_lo']:.1f}, {r['llc_refined_k0_hi']:.1f}] |",
                  f"| k ≥ 2, mean (range) | {ks[1:].mean():.1f} | ({ks[1:].min():.1f} to {ks[1:].max():.1f}) |"]
        lines += [f"| {t} | {r['llc_refined_' + t]:.1f} | [{r['llc_refined_' + t + '_lo']:.1f}, "
                  f"{r['llc_refined_' + t + '_hi']:.1f}] |" for t in tasks + ["fresh"]]
        lines += ["", f"Flags: {r['flags'] or 'none'}; split-R̂ {r['rhat']:.3f}, ESS {r['ess']:.0f}, MCSE "
                  f"{r['llc_mcse']:.2f}, slope term {r['llc_slope']:.2f}; mean_k λ̂_k = {ks.mean():.2f}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="RUN OUT.json, or with --render the saved estimates")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not args.render:
        run_dir, out = args.paths
        write_json_atomic(Path(out), estimate(run_dir, args.threads))
        return
    rows = [json.loads(Path(p).read_text()) for p in args.paths]
    write_json_atomic(args.out / "llc_seed_refined.json", {"benchmark": "llc_seed_refined", "rows": rows})
    write_atomic(args.out / "llc_seed_refined.md", markdown(rows))


if __name__ == "__main__":
    main()
