"""Is minibatch 64 as good as 256 at the validated defaults? The ground-truth suite at both minibatch sizes.

A study's LLC at the validated defaults (γ/nβ = 0.01, ε = 1e-4, burn-in min_burnin(ε, γ), 4 chains × 500 draws)
costs tens of minutes per checkpoint on 2 CPU cores at minibatch 256, and about a quarter of that per step at
minibatch 64 (benchmarks/results/llc_cost.md). The ground-truth suite validated 256 only. This benchmark runs
`ground_truth.validate` with a fixed config (no calibration) on every case of `ground_truth.SUITE` (n = 4,096,
seed 0) at minibatch 256 and 64, everything else the library's defaults.

Check, written before the run: minibatch 64 is as good as 256 on these networks if every case that reads within
10% of its λ at 256 also does at 64, and |λ̂_64 − λ̂_256| ≤ 10% of λ on every case.

Usage: nice -n 10 python benchmarks/llc_minibatch.py [--cases dln2_r0 ...] [--out DIR]
Results: benchmarks/results/llc_minibatch.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine_info, write_atomic, write_json_atomic  # noqa: E402
from icl_lab.config import LLCConfig  # noqa: E402
from icl_lab.ground_truth import SUITE, validate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (256, 64)
TOL = 0.10


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = ["# The ground-truth suite at minibatch 256 and 64 (validated defaults otherwise)", "",
             f"{m['cpu_model']}, {m['cores_available']} cores, 1 torch thread, torch {m['torch']}, {m['date_utc']}; "
             f"load average at start {res['loadavg_start']}, at end {res['loadavg_end']}. Produced by "
             f"`{res['command']}`. Method and the check (written before the run): the docstring of "
             "`benchmarks/llc_minibatch.py`.", "",
             "| case | d | λ | λ̂ (256) ± SE | rel | flags | s | λ̂ (64) ± SE | rel | flags | s | |λ̂₆₄ − λ̂₂₅₆| / λ |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|"]
    for r in res["rows"]:
        a, b = r["256"], r["64"]
        lines.append(f"| {r['case']} | {r['d']:,} | {r['llc']:.4g} | {a['llc_mean']:.4g} ± {a['llc_se']:.2g} | "
                     f"{a['rel_error']:+.1%} | {a['flags'] or 'ok'} | {a['seconds']:.0f} | {b['llc_mean']:.4g} ± "
                     f"{b['llc_se']:.2g} | {b['rel_error']:+.1%} | {b['flags'] or 'ok'} | {b['seconds']:.0f} | "
                     f"{r['gap']:.1%} |")
    lines += ["", f"**Check:** {'met' if res['check'] else 'not met'}. {res['verdict']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=list(SUITE))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = loadavg()
    rows = []
    for name in args.cases:
        case, row = SUITE[name], {"case": name}
        row |= {"d": case.d, "llc": case.llc}
        for batch in BATCHES:
            t0 = time.perf_counter()
            v = validate(case, n=4096, config=LLCConfig(batch_size=batch))
            row[str(batch)] = {"llc_mean": v.llc_mean, "llc_se": v.llc_se, "rel_error": v.rel_error,
                               "flags": v.flags, "seconds": time.perf_counter() - t0}
            print(f"{name} minibatch {batch}: λ̂ = {v.llc_mean:.4g} ± {v.llc_se:.2g} (λ = {case.llc:.4g}, "
                  f"{v.rel_error:+.1%}) {v.flags or 'ok'}", flush=True)
        row["gap"] = abs(row["64"]["llc_mean"] - row["256"]["llc_mean"]) / case.llc
        rows.append(row)
    kept = all(abs(r["64"]["rel_error"]) <= TOL for r in rows if abs(r["256"]["rel_error"]) <= TOL)
    close = all(r["gap"] <= TOL for r in rows)
    within = {b: sum(abs(r[str(b)]["rel_error"]) <= TOL for r in rows) for b in BATCHES}
    res = {"benchmark": "llc_minibatch", "machine": machine_info(), "command": "python " + " ".join(sys.argv),
           "loadavg_start": start, "loadavg_end": loadavg(), "rows": rows, "check": kept and close,
           "verdict": f"Within 10% of λ: {within[256]}/{len(rows)} cases at 256, {within[64]}/{len(rows)} at 64; "
                      f"largest |λ̂₆₄ − λ̂₂₅₆| = {max(r['gap'] for r in rows):.1%} of λ."}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "llc_minibatch.json", res)
    write_atomic(args.out / "llc_minibatch.md", markdown(res))
    print(res["verdict"])


if __name__ == "__main__":
    main()
