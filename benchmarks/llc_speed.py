"""LLC estimation speed: icl-lab's `estimate_llc` against devinterp 2.x (issue 5 item 9).

Setting (identical on both sides): n = 4,096 fixed sequences (D = 8, K = 16, M = 2 unit-norm noiseless tasks from
icl_lab.tasks, generator make_generator(0, "bench")), 4 chains × 200 draws after 50 burn-in steps, minibatch 256 and
minibatch 32, ε = 1e-4, γ = 100, nβ = n / log n (passed explicitly to devinterp, whose own default would use the
batch size). Models are trained briefly first (300 Adam steps, lr 3e-3, batch 32 of fresh sequences from the same
task pool) so that w* sits near a minimum.

Rows:
  1. the user's TransformerLens model exactly as the seed configures it (tests/seed_model.py; use_attn_result and
     use_split_qkv_input on): icl-lab vs devinterp. A full estimate here takes many minutes per side, so by default
     both sides run SHORT estimates (4 chains, few draws) at two lengths, the time is fitted as a + b·steps and
     extrapolated linearly to the full 4 × (200 + 50) steps; the md/json label these numbers "extrapolated".
  2. icl-lab's plain PyTorch `seed` preset (icl_lab.model.build_model): icl-lab vs devinterp, FULL estimates,
     λ̂ ± std of both and whether they agree within the chains' standard errors.
     Also icl-lab on the user's TransformerLens WEIGHTS converted by `icl_lab.interp.from_seed_model` into the
     `seed` preset: the same function of the same parameter tensors (W_E and W_pos, unused by the seed's forward,
     are excluded on every side), so the same λ; one full estimate, measured, conversion time included.
  3. sampler overhead, paired: in each round (rotated order) S plain forward + backward steps of the plain model,
     and one-chain icl-lab estimates of S0 and S0 + S draws; one SGLD draw = (t(S0 + S) − t(S0)) / S, so fixed
     costs (copy, ℓ_n(w*), selection) cancel. Median over rounds of the per-round ratio. The amortised figure
     (full estimate seconds / chain-steps, fixed costs included) of both tools is shown beside it. Achieved
     GFLOP/s against the measured matmul peak (nominal FLOPs, benchmarks/ensemble_throughput.py formula).
  4. an LLC curve over 40 checkpoints: 40 × the measured per-estimate time (minibatch 32), computed, not run.

devinterp adapter: devinterp.slt.sampling.sample wants a `datasets.Dataset` with an integer `input_ids` column of
length >= 2 and a per-token loss (batch, len - 1). Rows are [i, i] (indices into the fixed x, y tensors); the loss
gathers x[i], y[i], runs the model and returns the per-sequence MSE as a (batch, 1) "per-token" loss, whose mean
over the minibatch is exactly icl-lab's minibatch loss. devinterp's `llc`/`compute_llc` average over every step
INCLUDING burn-in and has no option to drop it, so the benchmark calls `sample(..., num_burnin_steps=50)` (the
time of `llc` is that of `sample` plus a tiny reduction) and computes λ̂ from its post-burn-in per-draw losses
(`sampling_loss`), exactly like icl-lab; devinterp's own all-steps value is recorded too. num_init_loss_batches =
n / minibatch so devinterp's ℓ_n(w*) covers the whole data, like icl-lab's. Its progress bars are disabled
(TQDM_DISABLE), and output goes to a temporary zarr store (its only mode).

Everything runs in ONE process with torch.set_num_threads(--threads, default 2), after warm-up, both sides
interleaved round by round (common.interleaved_rounds). The cores are shared: load averages are recorded.
icl-lab runs this model's chains one at a time per thread, concurrently over the threads (one intra-op thread
each, llc._run_sequential); devinterp 2.x runs its chains one after another (2.0 removed its `cores` option).

    python benchmarks/llc_speed.py            # default (full) mode, ~15-20 min on 2 shared cores
    python benchmarks/llc_speed.py --quick    # ~2 min smoke check (short chains; results in a temp folder)
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Devinterp,
    interleaved_rounds,
    loadavg,
    machine_info,
    matmul_gflops,
    set_threads,
    summarize,
    write_atomic,
    write_json_atomic,
)
from icl_lab.config import LLCConfig, ModelConfig, TaskConfig  # noqa: E402
from icl_lab.interp import from_seed_model  # noqa: E402
from icl_lab.llc import estimate_llc  # noqa: E402
from icl_lab.model import build_model, count_parameters  # noqa: E402
from icl_lab.tasks import make_generator, sample_batch, task_pool  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
D, K, M, N = 8, 16, 2, 4096
EPS, GAMMA = 1e-4, 100.0
TARGET_TL, TARGET_PLAIN_32, TARGET_OVERHEAD, TARGET_CURVE_S = 10.0, 1.5, 1.1, 600.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ data and models


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    task = TaskConfig(D=D, K=K, M=M)
    pool = task_pool("unit_norm", M, D, 0)
    b = sample_batch(task, pool, n, make_generator(0, "bench"))
    return b.x.contiguous(), b.y.contiguous()


def mse(forward, batch):
    x, y = batch
    return (forward(x, y) - y).square().mean()


def brief_train(model: torch.nn.Module, steps: int, lr: float = 3e-3, batch: int = 32) -> float:
    task = TaskConfig(D=D, K=K, M=M)
    pool = task_pool("unit_norm", M, D, 0)
    gen = make_generator(0, "train")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        b = sample_batch(task, pool, batch, gen)
        loss = mse(model, (b.x, b.y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def seed_tl_model() -> torch.nn.Module:
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    from seed_model import ICLTransformer as SeedTL  # the user's TransformerLens model, verbatim from the seed

    torch.manual_seed(0)
    return SeedTL(input_dim=D, seq_length=K)


def flops_fwd_bwd(cfg: ModelConfig, batch: int) -> float:
    """Nominal FLOPs of one forward + backward of the icl-lab model (benchmarks/ensemble_throughput.py formula)."""
    d, H, e, L, m, T = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_layers, cfg.d_mlp, 2 * K
    n_mm = (D + 1) * d + L * (3 * H * d * e + H * e * d) + L * 2 * d * m + d * (D + 1)
    return 3 * batch * (2 * n_mm * T + L * 4 * H * T * T * e)


# ------------------------------------------------------------------------------------------------ the two sides


def run_icl_lab(model, x, y, *, chains, draws, burnin, batch, nbeta, seed=0) -> dict[str, Any]:
    cfg = LLCConfig(step_size=EPS, nbeta=nbeta, localization=GAMMA, num_chains=chains, num_draws=draws,
                    num_burnin=burnin, batch_size=batch)
    t0 = time.perf_counter()
    res = estimate_llc(model, (x, y), mse, config=cfg, seed=seed)
    wall = time.perf_counter() - t0
    return {"seconds": wall, "llc_mean": float(res.llc_mean), "llc_std": float(res.llc_std),
            "llc_se": float(res.llc_se), "llc_per_chain": [float(v) for v in res.llc_per_chain],
            "init_loss": float(res.init_loss), "d": int(res.d), "vectorized": bool(res.vectorized),
            "flags": sorted(res.diagnostics), "steps": chains * (draws + burnin), "reported_seconds": res.seconds}


def fwd_bwd_seconds(model, x, y, batch: int, steps: int, gen: torch.Generator) -> float:
    """Seconds per plain forward + backward (+ zero_grad) of `model` on random minibatches of the fixed data."""
    n = x.shape[0]
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        loss = mse(model, (x[idx], y[idx]))
        model.zero_grad(set_to_none=True)
        loss.backward()
    return (time.perf_counter() - t0) / steps


def agreement(a: dict, b: dict) -> dict[str, Any]:
    diff = a["llc_mean"] - b["llc_mean"]
    se = math.sqrt(a["llc_se"] ** 2 + b["llc_se"] ** 2)
    z = diff / se if se > 0 else float("inf")
    return {"diff": diff, "se_of_diff": se, "z": z, "within_1se": abs(z) <= 1.0, "within_2se": abs(z) <= 2.0}


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares intercept a and slope b of seconds = a + b·steps."""
    s = np.array([p[0] for p in points], dtype=float)
    t = np.array([p[1] for p in points], dtype=float)
    b, a = np.polyfit(s, t, 1)
    return float(a), float(b)


def yn(v: bool | None) -> str:
    return "n/a" if v is None else ("yes" if v else "no")


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke check; writes to a temp folder unless --out")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the plain-model rows (full: 2)")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--tl-draws", type=int, nargs=2, default=None,
                    help="two short draw counts for the TransformerLens row (full: 4 16); burn-in = 4 each")
    ap.add_argument("--draws-256", type=int, default=None,
                    help="draws of the plain-model minibatch-256 row (default: same as the others); burn-in as the "
                         "others. Fewer draws keep the run short on loaded cores; the md says so")
    ap.add_argument("--overhead-rounds", type=int, default=None,
                    help="rounds of the paired sampler-overhead measurement (full: 4)")
    ap.add_argument("--reuse-plain", action="store_true",
                    help="keep the plain-model rows, the paired overhead and the matmul peak of the results file "
                         "already in --out (an earlier full run) and run only the TransformerLens rows; the md says so")
    ap.add_argument("--tl-full", action="store_true", help="run the TransformerLens row at the full settings "
                    "instead of extrapolating (very slow on CPU)")
    args = ap.parse_args()

    quick = args.quick
    out = args.out or (Path(tempfile.mkdtemp(prefix="llc_speed_quick_")) if quick else RESULTS)
    threads = set_threads(args.threads)
    rounds = args.rounds or (1 if quick else 2)
    chains, draws, burnin = (2, 6, 2) if quick else (4, 200, 50)
    draws_256 = args.draws_256 or draws
    tl_draws = args.tl_draws or ((1, 3) if quick else (2, 6))
    # at minibatch 32 a TL step is ~8x cheaper than devinterp's fixed cost (~40 s of ℓ_n(w*) passes): longer runs
    tl_draws_32 = args.tl_draws or ((1, 3) if quick else (2, 30))
    tl_burnin = 1 if quick else 2
    batches = (32, 256)
    nbeta = N / math.log(N)
    full_steps = 4 * (200 + 50)
    t_start = time.perf_counter()

    machine = machine_info()
    machine["torch_threads"] = threads
    log(f"machine: {machine['cpu_model']}, {threads} threads, load {machine['loadavg_at_start']}")
    results: dict[str, Any] = {
        "benchmark": "llc_speed", "mode": "quick" if quick else "full", "status": "running", "machine": machine,
        "settings": {"n": N, "D": D, "K": K, "M": M, "family": "unit_norm", "noise_var": 0.0,
                     "data": "sample_batch(TaskConfig(D=8,K=16,M=2), task_pool('unit_norm',2,8,0), 4096, "
                             "make_generator(0,'bench'))",
                     "step_size": EPS, "localization": GAMMA, "nbeta": nbeta, "nbeta_rule": "n / log n",
                     "chains": chains, "draws": draws, "burnin": burnin, "draws_minibatch_256_plain": draws_256, "minibatches": list(batches),
                     "train": f"{args.train_steps} Adam steps, lr 3e-3, batch 32 fresh sequences, same task pool",
                     "rounds": rounds, "threads": threads,
                     "tl_short_runs": {"chains": 4, "draws": list(tl_draws), "draws_minibatch_32": list(tl_draws_32),
                                       "burnin": tl_burnin,
                                       "extrapolated_to_steps": full_steps} if not args.tl_full else "full",
                     "icl_lab_seed": 0, "devinterp_init_seed": 100,
                     "devinterp_call": "devinterp.slt.sampling.sample(model, Dataset(input_ids=[[i,i]]), {}, lr=ε, "
                                       "n_beta=nβ, localization=γ, num_chains, num_draws, batch_size, "
                                       "num_burnin_steps, num_init_loss_batches=n/batch, loss_fn=adapter); λ̂ from "
                                       "post-burn-in sampling_loss"},
        "loadavg": {"start": loadavg()},
    }

    reused: dict[str, Any] = {}
    if args.reuse_plain:  # read before this run's first save overwrites the file
        old = json.loads((out / "llc_speed.json").read_text())
        keys = ("plain", "overhead_paired", "matmul_peak_gflops", "llc_curve_40_checkpoints")
        reused = {k: old[k] for k in keys if k in old}
        reused["reused_from"] = old["machine"]["date_utc"]
        peaks_old = old.get("matmul_peak_gflops", {}).get("values", [])
        results.update(reused)  # nothing below writes these keys when they are reused

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - t_start
        results["loadavg"]["last"] = loadavg()
        write_json_atomic(out / "llc_speed.json", results)
        write_atomic(out / "llc_speed.md", render_md(results))

    # ---------------------------------------------------------------- data, models, brief training
    x, y = make_data(N)
    plain = build_model(TaskConfig(D=D, K=K, M=M), ModelConfig(), seed=0)
    tl = seed_tl_model()
    t0 = time.perf_counter()
    loss_plain = brief_train(plain, args.train_steps)
    loss_tl = brief_train(tl, args.train_steps)
    with torch.no_grad():
        full_plain, full_tl = float(mse(plain, (x, y))), float(mse(tl, (x, y)))
    results["models"] = {
        "plain": {"what": "icl_lab.model.build_model(TaskConfig(D=8,K=16,M=2), ModelConfig(), seed=0)",
                  "params": count_parameters(plain), "last_train_loss": loss_plain, "loss_on_bench_data": full_plain},
        "transformer_lens": {"what": "tests/seed_model.ICLTransformer(input_dim=8, seq_length=16), torch seed 0",
                             "params": sum(p.numel() for p in tl.parameters()), "last_train_loss": loss_tl,
                             "loss_on_bench_data": full_tl},
        "train_seconds_both": time.perf_counter() - t0,
    }
    log(f"trained: plain loss {full_plain:.4g}, TL loss {full_tl:.4g} ({time.perf_counter() - t0:.0f}s)")
    dev = Devinterp(x, y)
    dev_settings = {"lr": EPS, "localization": GAMMA}

    # ---------------------------------------------------------------- warm-up (both sides, both models)
    t0 = time.perf_counter()
    for model in (plain, tl):
        run_icl_lab(model, x, y, chains=1, draws=3, burnin=1, batch=32, nbeta=nbeta)
        dev.run(model, chains=1, draws=3, burnin=1, batch=32, nbeta=nbeta, **dev_settings)
    fwd_bwd_seconds(plain, x, y, 32, 5, torch.Generator().manual_seed(1))
    peaks = matmul_gflops(n=1024, repeats=3)
    results["warmup_seconds"] = time.perf_counter() - t0
    log(f"warm-up done ({results['warmup_seconds']:.0f}s)")

    # ---------------------------------------------------------------- plain model: full estimates, interleaved
    store: dict[str, list[dict]] = {}
    gen = torch.Generator().manual_seed(2)

    def est(side: str, batch: int):
        def task() -> float:
            kw = dict(chains=chains, draws=draws if batch != 256 else draws_256, burnin=burnin, batch=batch,
                      nbeta=nbeta)
            r = run_icl_lab(plain, x, y, **kw) if side == "icl_lab" else dev.run(plain, **kw, **dev_settings)
            r.pop("trace", None)  # the arrays stay out of the JSON
            store.setdefault(f"{side}/{batch}", []).append(r)
            log(f"  plain {side:9s} m={batch:3d}: {r['seconds']:.1f}s  λ̂ = {r['llc_mean']:.2f} ± {r['llc_std']:.2f}")
            return r["seconds"]
        return task

    def fb(batch: int):
        def task() -> float:
            steps = 100 if batch == 32 else 20
            s = fwd_bwd_seconds(plain, x, y, batch, steps, gen)
            store.setdefault(f"fwdbwd/{batch}", []).append({"seconds_per_step": s})
            return s
        return task

    def mm() -> float:
        v = max(matmul_gflops(n=1024, repeats=3))
        peaks.append(v)
        return v

    def plain_tasks(b: int) -> dict:
        return {f"icl_lab/{b}": est("icl_lab", b), f"devinterp/{b}": est("devinterp", b), f"fwdbwd/{b}": fb(b),
                f"matmul/{b}": mm}

    def on_round_of(b: int):
        def on_round(r: int, values: dict) -> None:
            results["loadavg"][f"plain_m{b}_round_{r}"] = loadavg()
            fill_plain()
            save()
            log(f"plain m={b} round {r + 1}/{rounds} done, load {loadavg()}")
        return on_round

    def fill_plain() -> None:
        peak = max(peaks)
        rows = {}
        for b in batches:
            il, dv, fbs = store.get(f"icl_lab/{b}", []), store.get(f"devinterp/{b}", []), store.get(f"fwdbwd/{b}", [])
            if not il or not dv:
                continue
            ratios = [d["seconds"] / i["seconds"] for i, d in zip(il, dv, strict=False)]
            row: dict[str, Any] = {
                "icl_lab_seconds": summarize([r["seconds"] for r in il]),
                "devinterp_seconds": summarize([r["seconds"] for r in dv]),
                "speedup_per_round": ratios, "speedup_median": float(np.median(ratios)),
                "icl_lab_estimates": il, "devinterp_estimates": dv,
                "agreement_first_round": agreement(il[0], dv[0]),
            }
            if fbs:
                fwd = float(np.median([f["seconds_per_step"] for f in fbs]))
                per_step = float(np.median([r["seconds"] / r["steps"] for r in il]))
                per_step_dev = float(np.median([r["seconds"] / r["steps"] for r in dv]))
                fl = flops_fwd_bwd(ModelConfig(), b)
                row["overhead"] = {
                    "fwd_bwd_seconds": summarize([f["seconds_per_step"] for f in fbs]),
                    "icl_lab_seconds_per_chain_step_amortised": per_step,
                    "devinterp_seconds_per_chain_step_amortised": per_step_dev,
                    "icl_lab_ratio_to_fwd_bwd": per_step / fwd, "devinterp_ratio_to_fwd_bwd": per_step_dev / fwd,
                    "flops_per_fwd_bwd": fl, "gflops_fwd_bwd": fl / fwd / 1e9,
                    "gflops_icl_lab_sgld": fl / per_step / 1e9, "gflops_devinterp_sgld": fl / per_step_dev / 1e9,
                    "matmul_peak_gflops": peak, "fraction_of_peak_icl_lab": fl / per_step / 1e9 / peak,
                    "note": "wall time per chain-step (icl-lab's chains run concurrently over the threads); the "
                            "target's measure is overhead_paired",
                }
            if b == 32:
                row["target"] = f">= {TARGET_PLAIN_32}x"
                row["target_met"] = row["speedup_median"] >= TARGET_PLAIN_32
            else:
                row["target"] = "never slower (>= 1.0x)"
                row["target_met"] = min(ratios) >= 1.0
            rows[str(b)] = row
        results["plain"] = rows
        results["matmul_peak_gflops"] = {"best": peak, "values": list(peaks), "n": 1024}
        if "32" in rows:
            per_est = rows["32"]["icl_lab_seconds"]["median"]
            curve = 40 * per_est
            results["llc_curve_40_checkpoints"] = {
                "seconds": curve, "per_estimate_seconds": per_est, "how": "computed: 40 × the measured median "
                "per-estimate time of icl-lab at minibatch 32 in one process (plain seed preset, settings above); the "
                "2-process end-to-end curve is benchmarks/llc_curve.py",
                "settings_are_full": not quick, "target_seconds": TARGET_CURVE_S, "target_met": curve < TARGET_CURVE_S}

    if reused:
        peaks.extend(peaks_old)
    else:
        log(f"plain-model rows, minibatch 32: {rounds} round(s) of estimates ({chains}×({draws}+{burnin}))")
        interleaved_rounds(plain_tasks(32), rounds, on_round=on_round_of(32))

    # ---------------------------------------------------------------- TransformerLens model
    tl_store: dict[str, list[dict]] = {}

    def tl_task(side: str, batch: int, nd: int):
        def task() -> float:
            if args.tl_full or side == "icl_lab_converted":  # the converted model is cheap: one full estimate
                kw = dict(chains=chains, draws=draws, burnin=burnin)
            else:
                kw = dict(chains=4, draws=nd, burnin=tl_burnin)
            if side == "icl_lab":
                r = run_icl_lab(tl, x, y, batch=batch, nbeta=nbeta, **kw)
            elif side == "icl_lab_converted":  # the user's weights in icl-lab's own module; conversion timed
                t0 = time.perf_counter()
                converted = from_seed_model(tl, D=D, K=K)
                convert_s = time.perf_counter() - t0
                r = run_icl_lab(converted, x, y, batch=batch, nbeta=nbeta, **kw)
                r["seconds"] += convert_s
                r["convert_seconds"] = convert_s
            else:
                r = dev.run(tl, batch=batch, nbeta=nbeta, **kw, **dev_settings)
                r.pop("trace", None)
            tl_store.setdefault(f"{side}/{batch}", []).append(r)
            log(f"  TL {side:9s} m={batch:3d} steps={r['steps']:4d}: {r['seconds']:.1f}s ({r['seconds'] / r['steps'] * 1e3:.0f} ms/step)")
            return r["seconds"]
        return task

    def fill_tl() -> None:
        rows = {}
        for b in batches:
            sides = {}
            for side in ("icl_lab", "devinterp", "icl_lab_converted"):
                runs = tl_store.get(f"{side}/{b}", [])
                if not runs:
                    continue
                if args.tl_full or side == "icl_lab_converted":
                    sides[side] = {"runs": runs, "seconds_full_estimate": float(np.median([r["seconds"] for r in runs])),
                                   "measured_or_extrapolated": "measured"}
                    continue
                if len({r["steps"] for r in runs}) < 2:
                    continue
                a, slope = fit_line([(r["steps"], r["seconds"]) for r in runs])
                longest = max(runs, key=lambda r: r["steps"])
                sides[side] = {"runs": runs, "intercept_seconds": a, "seconds_per_chain_step": slope,
                               "fit_valid": slope > 0 and a >= 0,
                               "seconds_full_estimate": a + slope * full_steps,
                               "seconds_full_estimate_naive": longest["seconds"] / longest["steps"] * full_steps,
                               "measured_or_extrapolated": f"extrapolated linearly from {len(runs)} short runs "
                                                           f"(steps {sorted({r['steps'] for r in runs})}) to "
                                                           f"{full_steps} chain-steps"}
            if "icl_lab" in sides and "devinterp" in sides:
                valid = args.tl_full or (sides["icl_lab"]["fit_valid"] and sides["devinterp"]["fit_valid"])
                key = "seconds_full_estimate" if valid else "seconds_full_estimate_naive"
                sp = sides["devinterp"][key] / sides["icl_lab"][key]
                rows[str(b)] = {**sides, "speedup": sp, "speedup_from": key, "fit_valid": valid,
                                "target": f">= {TARGET_TL}x", "target_met": sp >= TARGET_TL}
                conv = sides.get("icl_lab_converted")
                if conv is not None:  # the user's TransformerLens model: devinterp on it, icl-lab on its weights
                    dims = {r["d"] for r in conv["runs"]} | {r["d"] for r in sides["icl_lab"]["runs"]}
                    usp = sides["devinterp"][key] / conv["seconds_full_estimate"]
                    rows[str(b)]["user_pipeline"] = {
                        "devinterp_on_tl_seconds": sides["devinterp"][key],
                        "icl_lab_converted_seconds": conv["seconds_full_estimate"], "icl_lab_converted": "measured",
                        "speedup": usp, "speedup_from": key, "target_met": usp >= TARGET_TL,
                        "sampled_parameters_d": sorted(dims), "same_d": len(dims) == 1,
                        "note": "icl_lab.interp.from_seed_model(tl) puts the user's trained weights into icl-lab's "
                                "`seed` preset: the same function (outputs equal within 1e-6, tests/test_interp.py) "
                                "of the same parameter tensors, so the same λ; conversion time included; one full "
                                "estimate, measured"}
        results["transformer_lens"] = rows

    def tl_tasks(b: int) -> dict:
        out_tasks = {}
        lengths = (None,) if args.tl_full else (tl_draws if b == 256 else tl_draws_32)
        for nd in lengths:
            out_tasks[f"icl_lab/{b}/{nd}"] = tl_task("icl_lab", b, nd)
            out_tasks[f"devinterp/{b}/{nd}"] = tl_task("devinterp", b, nd)
        out_tasks[f"icl_lab_converted/{b}"] = tl_task("icl_lab_converted", b, None)
        return out_tasks

    def on_tl_round(r: int, values: dict) -> None:
        results["loadavg"][f"tl_round_{r}"] = loadavg()
        fill_tl()
        save()

    # ---------------------------------------------------------------- sampler overhead, paired
    ov_store: dict[str, list[float]] = {}

    def ov_steps(b: int) -> tuple[int, int]:
        """(S0, S): draws of the short estimate and the extra draws timed (about 5 s of sampling each)."""
        return (2, 4) if quick else ((10, 40) if b == 256 else (20, 250))

    def ov_fb(b: int):
        def task() -> float:
            s = fwd_bwd_seconds(plain, x, y, b, ov_steps(b)[1], gen)
            ov_store.setdefault(f"fwdbwd/{b}", []).append(s)
            return s
        return task

    def ov_sgld(b: int):
        def task() -> float:
            s0, s1 = ov_steps(b)
            kw = dict(chains=1, burnin=0, batch=b, nbeta=nbeta)
            short = run_icl_lab(plain, x, y, draws=s0, **kw)["seconds"]
            long = run_icl_lab(plain, x, y, draws=s0 + s1, **kw)["seconds"]
            v = (long - short) / s1
            ov_store.setdefault(f"sgld/{b}", []).append(v)
            return v
        return task

    def fill_overhead() -> None:
        rows = {}
        for b in batches:
            fbs, sg = ov_store.get(f"fwdbwd/{b}", []), ov_store.get(f"sgld/{b}", [])
            k = min(len(fbs), len(sg))
            if k == 0:
                continue
            ratios = [sg[i] / fbs[i] for i in range(k)]
            med = float(np.median(ratios))
            fl = flops_fwd_bwd(ModelConfig(), b)
            rows[str(b)] = {"steps": dict(zip(("short", "timed"), ov_steps(b), strict=True)),
                            "fwd_bwd_seconds": summarize(fbs[:k]), "sgld_draw_seconds": summarize(sg[:k]),
                            "ratio_per_round": ratios, "ratio_median": med, "target_ratio": TARGET_OVERHEAD,
                            "target_met": med <= TARGET_OVERHEAD, "flops_per_fwd_bwd": fl,
                            "gflops_sgld": fl / float(np.median(sg[:k])) / 1e9,
                            "gflops_fwd_bwd": fl / float(np.median(fbs[:k])) / 1e9}
        results["overhead_paired"] = rows
        results["matmul_peak_gflops"] = {"best": max(peaks), "values": list(peaks), "n": 1024}

    def on_ov_round(r: int, values: dict) -> None:
        results["loadavg"][f"overhead_round_{r}"] = loadavg()
        fill_overhead()
        save()

    ov_tasks = {f"{kind}/{b}": (ov_fb(b) if kind == "fwdbwd" else ov_sgld(b))
                for b in batches for kind in ("fwdbwd", "sgld")}
    ov_tasks["matmul"] = mm
    if not reused:
        log(f"sampler overhead, paired: {args.overhead_rounds or (1 if quick else 4)} round(s)")
        interleaved_rounds(ov_tasks, args.overhead_rounds or (1 if quick else 4), on_round=on_ov_round)

    # order by priority (the run may be cut short on loaded cores; every section saves its results)
    log("TransformerLens rows, minibatch 32" + (" (full)" if args.tl_full else f" (short runs, draws {tl_draws})"))
    interleaved_rounds(tl_tasks(32), 1, on_round=on_tl_round)
    if not reused:
        log(f"plain-model rows, minibatch 256: {rounds} round(s) of estimates ({chains}×({draws_256}+{burnin}))")
        interleaved_rounds(plain_tasks(256), rounds, on_round=on_round_of(256))
    log("TransformerLens rows, minibatch 256" + (" (full)" if args.tl_full else f" (short runs, draws {tl_draws})"))
    interleaved_rounds(tl_tasks(256), 1, on_round=on_tl_round)

    results["status"] = "complete"
    results["loadavg"]["end"] = loadavg()
    save()
    log(f"done in {time.perf_counter() - t_start:.0f}s; wrote {out / 'llc_speed.json'} and .md")
    print(render_md(results))


# ------------------------------------------------------------------------------------------------ markdown


def render_md(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    L: list[str] = []
    L.append("# LLC estimation speed: icl-lab vs devinterp 2.x (issue 5 item 9)\n")
    L.append(f"Mode: **{res['mode']}**, status: **{res['status']}**, elapsed {res.get('elapsed_s', 0):.0f} s. "
             f"Machine: {m['cpu_model']}, {m['cores_available']} cores available, torch {m['torch']} with "
             f"{s['threads']} threads; devinterp {m['packages'].get('devinterp')}, transformer-lens "
             f"{m['packages'].get('transformer-lens')}; {m['date_utc']}.")
    la = res["loadavg"]
    L.append(f"Load average (1/5/15 min) at start {la.get('start')}, last {la.get('last')}: the 2 cores are shared "
             "with other jobs, so absolute times are noisy; the two sides were interleaved round by round.\n")
    L.append(f"Settings (both sides): n = {s['n']}, D = {s['D']}, K = {s['K']}, M = {s['M']} unit-norm noiseless; "
             f"ε = {s['step_size']:g}, γ = {s['localization']:g}, nβ = n/log n = {s['nbeta']:.2f} (given to devinterp "
             f"explicitly); {s['chains']} chains × {s['draws']} draws after {s['burnin']} burn-in; minibatch "
             f"{' and '.join(map(str, s['minibatches']))}; models trained {s['train']}. λ̂ on both sides = nβ·(mean "
             "post-burn-in minibatch loss − ℓ_n(w*)).\n")
    if "reused_from" in res:
        L.append(f"The plain-model rows, the paired overhead and the matmul peak were measured on {res['reused_from']} "
                 "with the same code and kept (`--reuse-plain`); this run re-measured the TransformerLens rows.\n")
    mp = res.get("matmul_peak_gflops", {})
    tl = res.get("transformer_lens", {})
    pl = res.get("plain", {})
    L.append("| comparison | minibatch | icl-lab | devinterp | speed-up | target | met |")
    L.append("|---|---|---|---|---|---|---|")
    for b in ("256", "32"):
        if b in tl:
            r = tl[b]
            ext = "extrapolated" not in r["icl_lab"]["measured_or_extrapolated"]
            tag = "" if ext else " (extrapolated)"
            key = r.get("speedup_from", "seconds_full_estimate")
            if key == "seconds_full_estimate_naive":
                tag = (" (EXTRAPOLATED, naive: longest short run's seconds per chain-step × 1000, fixed costs "
                       "included; the 2-point fit was invalid under load)")
            L.append(f"| TransformerLens seed model, 1 estimate{tag} | {b} | {r['icl_lab'][key]:.0f} s"
                     f" | {r['devinterp'][key]:.0f} s | {r['speedup']:.2f}x | {r['target']} | "
                     f"{yn(r['target_met'])} |")
            if "user_pipeline" in r:
                u = r["user_pipeline"]
                L.append(f"| the user's TransformerLens model: devinterp on it{tag} vs icl-lab on its weights converted "
                         f"by `from_seed_model` (same function, same parameters{', same d' if u['same_d'] else ', d DIFFERS'}"
                         f"; measured, conversion included) | {b} | {u['icl_lab_converted_seconds']:.0f} s | "
                         f"{u['devinterp_on_tl_seconds']:.0f} s | {u['speedup']:.2f}x | {r['target']} | "
                         f"{yn(u['target_met'])} |")
    for b in ("256", "32"):
        if b in pl:
            r = pl[b]
            L.append(f"| plain seed preset, 1 estimate of {r['icl_lab_estimates'][0]['steps']} chain-steps (measured, "
                     f"median of {r['icl_lab_seconds']['n']}) | {b} | "
                     f"{r['icl_lab_seconds']['median']:.1f} s | {r['devinterp_seconds']['median']:.1f} s | "
                     f"{r['speedup_median']:.2f}x (rounds: {', '.join(f'{v:.2f}' for v in r['speedup_per_round'])}) | "
                     f"{r['target']} | {yn(r['target_met'])} |")
    L.append("")
    if pl:
        L.append("Values on the plain seed preset (λ̂ mean ± std over chains; agreement: |difference| against the "
                 "combined standard error √(se₁² + se₂²), se = std/√chains):\n")
        L.append("| minibatch | round | icl-lab λ̂ | devinterp λ̂ (post burn-in) | devinterp's own llc (all steps incl. "
                 "burn-in) | z | within 1 se | within 2 se | icl-lab flags |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for b in ("256", "32"):
            if b not in pl:
                continue
            for i, (a, d) in enumerate(zip(pl[b]["icl_lab_estimates"], pl[b]["devinterp_estimates"], strict=False)):
                ag = agreement(a, d)
                L.append(f"| {b} | {i + 1} | {a['llc_mean']:.2f} ± {a['llc_std']:.2f} | {d['llc_mean']:.2f} ± "
                         f"{d['llc_std']:.2f} | {d['llc_mean_devinterp_all_steps_incl_burnin']:.2f} | {ag['z']:+.2f} | "
                         f"{yn(ag['within_1se'])} | {yn(ag['within_2se'])} | {', '.join(a['flags']) or 'none'} |")
        L.append("")
        L.append("Throughput per chain-step, amortised (plain seed preset; full estimate wall time / (chains × "
                 "(draws + burn-in)), fixed costs included; nominal FLOPs of a forward + backward). icl-lab runs its "
                 "4 chains concurrently over the 2 threads (one intra-op thread each) and devinterp one after "
                 "another, so this is wall time per chain-step, not the cost of one draw: the paired section below "
                 "is the target's measure.\n")
        L.append("| minibatch | plain fwd+bwd | icl-lab per chain-step | ratio | devinterp per chain-step | ratio | "
                 "icl-lab GFLOP/s | % of matmul peak |")
        L.append("|---|---|---|---|---|---|---|---|")
        for b in ("256", "32"):
            o = pl.get(b, {}).get("overhead")
            if o:
                L.append(f"| {b} | {o['fwd_bwd_seconds']['median'] * 1e3:.2f} ms | "
                         f"{o['icl_lab_seconds_per_chain_step_amortised'] * 1e3:.2f} ms | "
                         f"{o['icl_lab_ratio_to_fwd_bwd']:.2f}x | {o['devinterp_seconds_per_chain_step_amortised'] * 1e3:.2f} ms"
                         f" | {o['devinterp_ratio_to_fwd_bwd']:.2f}x | {o['gflops_icl_lab_sgld']:.1f} | "
                         f"{100 * o['fraction_of_peak_icl_lab']:.1f}% |")
        L.append(f"\nMeasured float32 matmul peak ({mp.get('n')}² @ {mp.get('n')}², best of all rounds): "
                 f"{mp.get('best', float('nan')):.1f} GFLOP/s.\n")
    ov = res.get("overhead_paired", {})
    if ov:
        L.append("Sampler overhead, paired (the target's measure: one SGLD draw of icl-lab = (t(S0 + S draws) − "
                 "t(S0 draws)) / S of one-chain estimates, so its fixed costs cancel, against one plain forward + "
                 "backward of the same model and minibatch in the same round; median of the per-round ratios):\n")
        L.append("| minibatch | S0, S | plain fwd+bwd (median) | SGLD draw (median) | ratio per round | median ratio | "
                 "SGLD GFLOP/s | % of matmul peak | target ≤ 1.1x met |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        peak = mp.get("best", float("nan"))
        for b in ("256", "32"):
            o = ov.get(b)
            if o:
                L.append(f"| {b} | {o['steps']['short']}, {o['steps']['timed']} | "
                         f"{o['fwd_bwd_seconds']['median'] * 1e3:.2f} ms | {o['sgld_draw_seconds']['median'] * 1e3:.2f} ms | "
                         f"{', '.join(f'{v:.3f}' for v in o['ratio_per_round'])} | {o['ratio_median']:.3f}x | "
                         f"{o['gflops_sgld']:.1f} | {100 * o['gflops_sgld'] / peak:.1f}% | {yn(o['target_met'])} |")
        L.append("")
    c = res.get("llc_curve_40_checkpoints")
    if c:
        L.append(f"LLC curve over 40 checkpoints: one process, one estimate after another (chains concurrent), would take 40 × "
                 f"{c['per_estimate_seconds']:.1f} s = {c['seconds']:.0f} s ({c['seconds'] / 60:.1f} min) at these "
                 "settings; the curve as `icl-lab llc RUN --workers 2` runs it (2 processes, calibrated ε) is measured "
                 "end to end by benchmarks/llc_curve.py (results/llc_curve.md)" + ("" if c["settings_are_full"] else
                 " (QUICK mode: short chains, not the target settings)") + ".\n")
    if tl:
        L.append("TransformerLens rows: " + next(iter(tl.values()))["icl_lab"]["measured_or_extrapolated"] +
                 "; per chain-step and fixed costs:\n")
        L.append("| minibatch | side | s per chain-step | fixed s | short runs (steps: seconds) |")
        L.append("|---|---|---|---|---|")
        for b in ("256", "32"):
            for side in ("icl_lab", "devinterp", "icl_lab_converted"):
                r = tl.get(b, {}).get(side)
                if r and "seconds_per_chain_step" in r:
                    runs = ", ".join(f"{x['steps']}: {x['seconds']:.1f}" for x in r["runs"])
                    L.append(f"| {b} | {side} | {r['seconds_per_chain_step']:.3f} | {r['intercept_seconds']:.1f} | "
                             f"{runs} |")
        L.append("")
    L.append("Notes: devinterp's `llc()` averages every step including burn-in and has no burn-in option, so "
             "`sample(num_burnin_steps=50)` was called and λ̂ computed from its post-burn-in per-draw losses (its "
             "all-steps value is shown for reference). devinterp cycles one shuffle of the data and gives every chain "
             "the same minibatch order; icl-lab reshuffles each epoch and per chain, so values agree only "
             "statistically. devinterp's time includes its zarr output and per-chain ℓ_n(w*) passes (its only mode); "
             "its progress bars were disabled. See benchmarks/llc_speed.py for the exact calls.")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
