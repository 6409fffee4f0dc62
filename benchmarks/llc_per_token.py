"""Per-position λ̂ against the published per-token curves: Hoogland et al. (2024), L2H4, M = ∞, steps ≤ 20,202.

The check of the data-refined LLC (`llc.Observable`, `llc_run.position_observable`) against published numbers.
The authors' stored results (benchmarks/data/hoogland_L2H4Minf_llc.csv, 5 seeds) hold, besides the token-averaged
λ̂, one value per context position k: λ̂_k = nβ·(E[ℓ_k(w)] − ℓ_k(w*)), with the chains sampling the full
(token-averaged) loss and ℓ_k evaluated along them, so that mean_k λ̂_k = λ̂.

Run, checkpoints, sampler and data are those of `benchmarks/llc_published.py --settings paper` (its docstring): the
`hoogland` preset trained with the paper's schedule to step 20,203, the authors' SGLD (ε = 3e-4, nβ = 200/3,
γ = 20/3), 4 chains × 1,000 draws after 500 burn-in, minibatch 256 of n = 4,096 fresh-task sequences, the same
SGLD seed at every step. Each estimate here runs the same chains as that benchmark's (the observables consume no
randomness), plus one forward pass per recorded draw for the eight ℓ_k.

Checks, written down before the run (the token-averaged benchmark's rule, applied per position):
1. per (step, k): λ̂_k within 5% of the authors' 5-seed mean, or inside their 5-seed range widened by two of our
   standard errors (chain-based: std over chains / √chains);
2. per step: mean_k λ̂_k equals our token-averaged λ̂ within 1e-3 (the identity of the method, up to float32
   rounding of nβ·ℓ, about 1e-5 here);
3. the profile at the last step (20,202): λ̂_k increases with k as the authors' does (Spearman ρ between our
   λ̂_k and their mean λ̂_k over the 8 positions ≥ 0.9), and λ̂_7 / λ̂_0 lies inside the authors' 5-seed range
   of that ratio.
Misses are reported with the measured numbers; the thresholds are not moved after the run.

Usage: python benchmarks/llc_per_token.py [--steps 984,20202] [--workers 2] [--smoke]
Results: benchmarks/results/llc_per_token.{json,md}; estimates are cached in the run directory
(bench_llc_per_token.json) so an interrupted job resumes.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine_info, write_atomic, write_json_atomic  # noqa: E402
from icl_lab.config import LLCConfig  # noqa: E402
from icl_lab.llc import estimate_llc  # noqa: E402
from icl_lab.llc_run import llc_data, mse_loss, position_observable  # noqa: E402
from icl_lab.seeding import derive_seed  # noqa: E402
from icl_lab.store import Run  # noqa: E402
from llc_published import (  # noqa: E402
    DEFAULT_STEPS,
    LAST_PUBLISHED,
    N_DATA,
    OFFSET,
    PAPER_RUN,
    PAPER_SAMPLER,
    PUBLISHED,
    REL_TARGET,
    SMOKE_RUN,
    SMOKE_STEPS,
    estimate_steps,
    run_config,
    train_cached,
)

RESULTS = Path(__file__).resolve().parent / "results"
K = 8
RHO_MIN = 0.9


def published_tokens(path: Path = PUBLISHED) -> pd.DataFrame:
    """Per (published step, k): the 5-seed mean, min and max of llc_token_k, and of the ratio λ̂_7 / λ̂_0."""
    df = pd.read_csv(path)
    rows = []
    for step, g in df.groupby("step"):
        ratio = (g["llc_token_7"] / g["llc_token_0"]).to_numpy()
        for k in range(K):
            v = g[f"llc_token_{k}"]
            rows.append({"step": int(step), "k": k, "mean": v.mean(), "min": v.min(), "max": v.max(),
                         "ratio_min": ratio.min(), "ratio_max": ratio.max(), "ratio_mean": ratio.mean()})
    return pd.DataFrame(rows).set_index(["step", "k"])


def estimate_one(run_dir: str, published_step: int, sampler_json: str, n: int, seed: int) -> dict[str, Any]:
    """λ̂ and λ̂_k at one checkpoint in a worker process with one torch thread."""
    torch.set_num_threads(1)
    run = Run.load(run_dir)
    step = published_step + OFFSET
    res = estimate_llc(run.load_checkpoint(step), llc_data(run, n, "id"), mse_loss,
                       config=LLCConfig.model_validate_json(sampler_json), seed=seed,
                       observables=position_observable(run.config.task.K))
    table = res.refined()
    C = len(res.llc_per_chain)
    return {"published_step": published_step, "step": step, "llc_mean": res.llc_mean, "llc_se": res.llc_se,
            "llc_mcse": res.llc_mcse, "tokens": table["llc"].tolist(),
            "tokens_se": (res.llc_refined_per_chain.std(axis=0, ddof=1) / math.sqrt(C)).tolist(),
            "tokens_lo": table["lo"].tolist(), "tokens_hi": table["hi"].tolist(),
            "tokens_mcse": table["mcse"].tolist(), "flags": ";".join(res.diagnostics), "seconds": res.seconds,
            "fingerprint": res.fingerprint, "loadavg_end": loadavg()}


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def judge(rows: list[dict[str, Any]], pub: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        s = r["published_step"]
        per_k = []
        for k in range(K):
            p = pub.loc[(s, k)]
            lam, se = r["tokens"][k], r["tokens_se"][k]
            rel = (lam - p["mean"]) / abs(p["mean"])
            in_range = p["min"] - 2 * se <= lam <= p["max"] + 2 * se
            per_k.append({"k": k, "ours": lam, "se": se, "lo": r["tokens_lo"][k], "hi": r["tokens_hi"][k],
                          "pub_mean": p["mean"], "pub_min": p["min"], "pub_max": p["max"], "rel_diff": rel,
                          "within_target": bool(abs(rel) <= REL_TARGET or in_range)})
        p0 = pub.loc[(s, 0)]
        ratio = r["tokens"][7] / r["tokens"][0] if r["tokens"][0] != 0 else float("nan")
        out.append(r | {"per_k": per_k, "mean_of_tokens": float(np.mean(r["tokens"])),
                        "identity_ok": bool(abs(np.mean(r["tokens"]) - r["llc_mean"]) <= 1e-3),
                        "rho": spearman(r["tokens"], [pub.loc[(s, k)]["mean"] for k in range(K)]),
                        "ratio": ratio, "pub_ratio_min": p0["ratio_min"], "pub_ratio_max": p0["ratio_max"],
                        "ratio_ok": bool(p0["ratio_min"] <= ratio <= p0["ratio_max"])})
    return out


def markdown(res: dict[str, Any]) -> str:
    rows, m = res["rows"], res["machine"]
    last = rows[-1]
    n_tok = sum(k["within_target"] for r in rows for k in r["per_k"])
    lines = [
        "# Per-position λ̂ against the published per-token curves: Hoogland et al. (2024), L2H4, M = ∞", "",
        "Reference: `benchmarks/data/hoogland_L2H4Minf_llc.csv` (the authors' llc_token_k, 5 seeds). Method and "
        "the checks (written before the run): the docstring of `benchmarks/llc_per_token.py`.", "",
        f"{m.get('cpu_model', '?')}, {m.get('cores_available', '?')} cores, torch {m.get('torch', '?')}, "
        f"{m.get('date_utc', '?')}; {res['workers']} worker processes × 1 torch thread, the cores shared with other "
        f"jobs (load average at start {res['loadavg_start']}, at end {res['loadavg_end']}). Produced by "
        f"`{res['command']}`.", "",
        f"Sampler: {res['sampler_text']}. Time: {len(rows)} estimates in {res['wall_seconds']:.0f} s wall; per "
        f"estimate median {res['seconds_median']:.0f} s.", "",
        "Each cell: ours ± SE (chain-based) / published 5-seed mean [min, max]; **bold** where outside the target "
        "(within 5% of the mean or inside the range widened by 2 SE).", "",
        "| published step | λ̂ (mean of λ̂_k) | " + " | ".join(f"k = {k}" for k in range(K)) + " | ρ | λ̂_7/λ̂_0 |",
        "|---:|---:|" + "---:|" * K + "---:|---:|",
    ]
    for r in rows:
        cells = []
        for c in r["per_k"]:
            txt = f"{c['ours']:.1f} ± {c['se']:.1f} / {c['pub_mean']:.1f} [{c['pub_min']:.1f}, {c['pub_max']:.1f}]"
            cells.append(txt if c["within_target"] else f"**{txt}**")
        lines.append(f"| {r['published_step']:,} | {r['llc_mean']:.2f} ({r['mean_of_tokens']:.2f}) | "
                     + " | ".join(cells) + f" | {r['rho']:.2f} | {r['ratio']:.1f} "
                     f"[{r['pub_ratio_min']:.1f}, {r['pub_ratio_max']:.1f}] |")
    total = K * len(rows)
    lines += [
        "",
        f"**Check 1:** {n_tok}/{total} (step, k) cells within target.",
        f"**Check 2:** mean_k λ̂_k = λ̂ at {sum(r['identity_ok'] for r in rows)}/{len(rows)} steps.",
        f"**Check 3 (step {last['published_step']:,}):** Spearman ρ = {last['rho']:.3f} (target ≥ {RHO_MIN}: "
        f"{'met' if last['rho'] >= RHO_MIN else 'not met'}); λ̂_7/λ̂_0 = {last['ratio']:.1f} against the authors' "
        f"[{last['pub_ratio_min']:.1f}, {last['pub_ratio_max']:.1f}] ({'met' if last['ratio_ok'] else 'not met'}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=str, default=None, help="comma-separated PUBLISHED steps ≤ 20,202")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="201 training steps, tiny chains, results in a temp folder")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench-llc-published"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.0f} s] {msg}", flush=True)
    steps = [int(s) for s in args.steps.split(",")] if args.steps else (SMOKE_STEPS if args.smoke else DEFAULT_STEPS)
    pub = published_tokens()
    bad = [s for s in steps if s > LAST_PUBLISHED or (s, 0) not in pub.index]
    if bad:
        raise SystemExit(f"not published steps ≤ {LAST_PUBLISHED}: {bad}")
    steps = sorted(set(steps))
    out = args.out or (Path(tempfile.mkdtemp(prefix="llc_per_token_")) if args.smoke else RESULTS)
    run, _ = train_cached(run_config(0), args.workdir / ("smoke" if args.smoke else "seed0"),
                          [s + OFFSET for s in steps], log)
    base = SMOKE_RUN if args.smoke else PAPER_RUN
    sampler = LLCConfig(**PAPER_SAMPLER, num_chains=base["chains"], num_draws=base["draws"],
                        num_burnin=base["burnin"])
    seed = derive_seed(0, "sgld") % (2**31)  # as llc_published and llc_run
    start_load = loadavg()
    describe = lambda row: (f"published step {row['published_step']}: λ̂ = {row['llc_mean']:.2f}; λ̂_k = "  # noqa: E731
                            + ", ".join(f"{v:.1f}" for v in row["tokens"]) + f" ({row['seconds']:.0f} s)")
    done, wall = estimate_steps(run, steps, sampler, N_DATA, seed, args.workers,
                                run.path / "bench_llc_per_token.json", log, estimate=estimate_one, describe=describe)
    rows = judge(done, pub)
    secs = [r["seconds"] for r in rows]
    res = {"benchmark": "llc_per_token", "machine": machine_info(), "command": "python " + " ".join(sys.argv),
           "workers": args.workers, "loadavg_start": start_load, "loadavg_end": loadavg(),
           "sampler": sampler.model_dump(), "n": N_DATA, "sgld_seed": seed,
           "sampler_text": f"ε = {sampler.step_size:g}, nβ = {sampler.nbeta:.2f}, γ = {sampler.localization:.3f}, "
                           f"{sampler.num_chains} chains × {sampler.num_draws} draws after {sampler.num_burnin} "
                           f"burn-in, minibatch {sampler.batch_size} of n = {N_DATA:,}",
           "wall_seconds": wall, "seconds_median": statistics.median(secs), "rows": rows,
           "rho_min": RHO_MIN, "rel_target": REL_TARGET}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "llc_per_token.json", res)
    write_atomic(out / "llc_per_token.md", markdown(res))
    log(f"results in {out}")


if __name__ == "__main__":
    main()
