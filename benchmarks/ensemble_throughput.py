"""Ensemble throughput: 8 models trained together in one process (icl_lab.ensemble) against the same 8 models
trained one after another (issue 7 item 2).

Setting: the seed preset (2 layers, d_model 64, 4×32 heads, MLP 128), D = 8, K = 16, M = 2 unit-norm tasks,
noise 0, AdamW lr 3e-3, batch 32 per model, seeds 0-7. Everything runs in ONE process with
torch.set_num_threads(--threads: default 2; "1,2" measures both, one after the other), after warm-up, in
interleaved rounds (common.interleaved_rounds: each configuration once per round, order rotated; the cores are
shared with other jobs, so the ratio is taken per round, side by side, and the median of those paired ratios is
the headline):

  - together: one training step of the whole ensemble, exactly the step of `train_ensemble` with its defaults
    (`MemberGroups.step`): on a CPU the members split into one group per torch thread (here 2 groups of 4), the
    groups stepping concurrently on their own threads with one intra-op thread each, the members of a group taking
    `train`'s step (`train_step`) one after another; on a GPU one stack (vmap of functional_call over the model
    axis, per-member loss, clipping and `StackedAdamW`). Each member samples from its own generator and pool.
    Timed over a chunk of steps.
  - one after another: for each of the 8 models in turn, the same chunk of steps of `icl_lab.train.train`'s step
    (`sample_batch` + `train_step`: forward + loss + backward + AdamW from `make_optimizer`), on all --threads
    threads.
  - where the default does not stack (CPU), the stacked alternatives, so that the headline is not read as the gain
    of vmap: the same groups each as one stack (vmap) on its own thread, and one stack of all 8 on all threads.
  - a float32 --matmul-n² matmul (the best over all rounds = the machine's measured peak, as in
    train_throughput.py).

Both sides do the same work: 8 × chunk model-steps. Sequences/s = 8 · 32 · chunk / seconds. GFLOP/s counts
nominal model FLOPs (the formula of benchmarks/train_throughput.py, identical for both sides, so GFLOP/s is
proportional to sequences/s): F_step = 3·B·(2·N_mm·T + L·4·H·T²·e) per model step, T = 2K,
N_mm = (D+1)d + L(4Hde + 2dm) + d(D+1).

A second, smaller measurement times the whole thing end to end: `train_ensemble` on 8 configs against 8 calls of
`train` (run directories, evaluations at the default 20 linear + 30 log checkpoints, parquet logs), --e2e-steps
steps each, --e2e-rounds interleaved rounds.

Results: benchmarks/results/ensemble_throughput.{json,md} (atomic writes). `--quick` is a smoke check only and
writes to a temporary folder unless --out is given. A GPU row is added with --device cuda where one exists.

    python benchmarks/ensemble_throughput.py            # full run (~20 min on 2 cores)
    python benchmarks/ensemble_throughput.py --quick    # ~1 min smoke check
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (the shared benchmark helpers: peak, timing, statistics, atomic writes)
    interleaved_rounds,
    loadavg,
    machine_info,
    matmul_gflops,
    set_threads,
    summarize,
    write_atomic,
    write_json_atomic,
)
from icl_lab.config import ModelConfig, RunConfig, build_run_config  # noqa: E402
from icl_lab.ensemble import MemberGroups, default_groups, train_ensemble  # noqa: E402
from icl_lab.model import build_model, count_parameters  # noqa: E402
from icl_lab.tasks import make_generator, sample_batch, task_pool  # noqa: E402
from icl_lab.train import lr_factor, make_optimizer, open_member, train, train_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
D, K, M, LR = 8, 16, 2, 3e-3
TARGET_CPU, TARGET_GPU = 1.3, 5.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def configs(n: int, batch: int, steps: int = 1000, device: str = "cpu") -> list[RunConfig]:
    return [build_run_config(overrides=dict(M=M, D=D, K=K, batch_size=batch, steps=steps, family="unit_norm",
                                            noise_var=0.0, lr=LR, seed=s, device=device)) for s in range(n)]


def flops_per_step(cfg: ModelConfig, d_in: int, k: int, batch: int) -> float:
    """Nominal model FLOPs of one training step of one model (train_throughput.py's formula)."""
    d, H, e, L, m, T = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_layers, cfg.d_mlp, 2 * k
    n_mm = (d_in + 1) * d + L * (3 * H * d * e + H * e * d) + L * 2 * d * m + d * (d_in + 1)
    return 3 * batch * (2 * n_mm * T + L * 4 * H * T * T * e)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Together:
    """The step of train_ensemble, without its checkpoints and evaluations: `MemberGroups.step` with `groups` groups
    and `stack` (None: train_ensemble's defaults for the device). The members are `open_member`s in a temporary
    folder, as train_ensemble opens them."""

    def __init__(self, cfgs: list[RunConfig], groups: int | None = None, stack: bool | None = None):
        self.cfgs = cfgs
        self.device = cfgs[0].train.device
        self.groups = default_groups(len(cfgs), self.device) if groups is None else groups
        self.stack = torch.device(self.device).type != "cpu" if stack is None else stack
        self._tmp = tempfile.TemporaryDirectory(prefix="icl-ens-bench-")
        members = [open_member(c, Path(self._tmp.name) / f"m{i}") for i, c in enumerate(cfgs)]
        self.ens = MemberGroups(members, self.groups, self.stack)
        self.step = 0

    def __call__(self, n: int) -> None:
        for _ in range(n):
            loss = self.ens.step(self.step)
            if not bool(torch.isfinite(loss).all()):
                raise RuntimeError("diverged")
            self.step += 1
        _sync(self.device)


class OneAfterAnother:
    """For each model in turn, n steps of icl_lab.train.train's step (`train_step`)."""

    def __init__(self, cfgs: list[RunConfig]):
        self.cfgs = cfgs
        self.device = cfgs[0].train.device
        self.pools = [task_pool(c.task.family, c.task.M, c.task.D, c.seed, self.device) for c in cfgs]
        self.gens = [make_generator(c.seed, "train", self.device) for c in cfgs]
        self.models = [build_model(c.task, c.model, c.seed, self.device) for c in cfgs]
        self.opts = [make_optimizer(m, c.train) for m, c in zip(self.models, cfgs, strict=True)]
        self.steps = [0] * len(cfgs)

    def __call__(self, n: int) -> None:
        members = zip(self.cfgs, self.pools, self.gens, self.models, self.opts, strict=True)
        for i, (c, pool, gen, model, opt) in enumerate(members):
            tc = c.train
            for _ in range(n):
                loss = train_step(model, opt, sample_batch(c.task, pool, tc.batch_size, gen),
                                  tc.lr * lr_factor(self.steps[i], tc), tc.grad_clip)
                if not torch.isfinite(loss):
                    raise RuntimeError("diverged")
                self.steps[i] += 1
        _sync(self.device)


def timed(fn: Any, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


def e2e_together(cfgs: list[RunConfig]) -> float:
    with tempfile.TemporaryDirectory(prefix="icl-ens-bench-") as tmp:
        t0 = time.perf_counter()
        train_ensemble(cfgs, [Path(tmp) / f"m{i}" for i in range(len(cfgs))], progress=False)
        return time.perf_counter() - t0


def e2e_separate(cfgs: list[RunConfig]) -> float:
    with tempfile.TemporaryDirectory(prefix="icl-ens-bench-") as tmp:
        t0 = time.perf_counter()
        for i, c in enumerate(cfgs):
            train(c, Path(tmp) / f"m{i}", progress=False)
        return time.perf_counter() - t0


def measure(args: argparse.Namespace, device: str, threads: int) -> dict[str, Any]:
    set_threads(threads)
    cfgs = configs(args.models, args.batch, device=device)
    together, separate = Together(cfgs), OneAfterAnother(cfgs)
    # the stacked alternatives where train_ensemble's default does not stack (CPU): one stack per group (on the
    # default's threads) and one stack of all members on all threads
    parts: dict[str, Any] = {}
    if not together.stack:
        parts = {"stacked_groups": Together(cfgs, stack=True)} if together.groups > 1 else {}
        parts["one_stack"] = Together(cfgs, groups=1, stack=True)
    seqs_per_step = args.models * args.batch  # sequences per ensemble step = per 8 model-steps
    log(f"[{device}] warm-up (train_ensemble's step: {together.groups} group(s), stack={together.stack})")
    together(args.warmup)
    separate(max(args.warmup // 2, 2))
    for fn in parts.values():
        fn(max(args.warmup // 2, 2))
    # chunk: about --chunk-seconds for the together side at its warm rate (the separate side runs the same steps)
    rate_t = 10 / timed(together, 10)
    chunk = max(5, round(rate_t * args.chunk_seconds))
    if device == "cpu":
        matmul_gflops(args.matmul_n, 1)
    log(f"[{device}] chunk = {chunk} steps per model per round")

    e2e_cfgs = configs(args.models, args.batch, steps=args.e2e_steps, device=device)
    e2e_done = {"together": 0, "separate": 0}

    def e2e(kind: str):
        def f() -> float | None:
            if e2e_done[kind] >= args.e2e_rounds:
                return None
            e2e_done[kind] += 1
            secs = (e2e_together if kind == "together" else e2e_separate)(e2e_cfgs)
            return args.models * args.batch * args.e2e_steps / secs
        return f

    tasks: dict[str, Any] = {
        "together": lambda: seqs_per_step * chunk / timed(together, chunk),
        "one_after_another": lambda: seqs_per_step * chunk / timed(separate, chunk),
        **{k: (lambda fn=fn: seqs_per_step * chunk / timed(fn, chunk)) for k, fn in parts.items()},
    }
    if args.e2e_rounds > 0:
        tasks["e2e_together"] = e2e("together")
        tasks["e2e_one_after_another"] = e2e("separate")
    if device == "cpu":
        tasks["matmul"] = lambda: max(matmul_gflops(args.matmul_n, 3))
    loads: list[Any] = []

    def on_round(r: int, values: dict[str, float]) -> None:
        loads.append(loadavg())
        log(f"[{device}] round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v:.0f}" for k, v in values.items())
            + f"  (load {loads[-1]})")

    t0 = time.perf_counter()
    rounds = interleaved_rounds(tasks, args.rounds, on_round)
    return {"device": device, "threads": threads, "key": f"{device}/{threads} threads", "chunk_steps": chunk,
            "groups": together.groups, "stack": together.stack,
            "rounds": rounds, "loadavg_per_round": loads,
            "wall_s": time.perf_counter() - t0,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else None}


def _paired(a: list[float], b: list[float]) -> dict[str, Any]:
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    s = summarize(ratios)
    return {"paired_median": s["median"], "paired_min": s["min"], "paired_max": s["max"], "values": ratios}


def build_results(args: argparse.Namespace, machine: dict[str, Any], measured: list[dict[str, Any]],
                  wall: float, complete: bool) -> dict[str, Any]:
    cfg = configs(1, args.batch)[0]
    fl = flops_per_step(cfg.model, D, K, args.batch)
    res: dict[str, Any] = {
        "benchmark": "ensemble_throughput", "quick": args.quick, "complete": complete, "wall_time_s": wall,
        "machine": machine,
        "settings": {"models": args.models, "batch_per_model": args.batch, "preset": "seed", "D": D, "K": K, "M": M,
                     "lr": LR, "threads": args.threads, "rounds": args.rounds, "chunk_seconds": args.chunk_seconds,
                     "warmup_steps": args.warmup, "e2e_steps": args.e2e_steps, "e2e_rounds": args.e2e_rounds,
                     "matmul_n": args.matmul_n},
        "params_per_model": count_parameters(build_model(cfg.task, cfg.model, 0)),
        "flops_formula": "F_step = 3*B*(2*N_mm*T + L*4*H*T^2*e), T = 2K; N_mm = (D+1)d + L(4Hde + 2dm) + d(D+1)",
        "flops_per_model_step": fl,
        "results": {},
    }
    for m in measured:
        dev = m["device"]
        r = m["rounds"]
        peak = None
        out: dict[str, Any] = {"device_name": m["device_name"], "chunk_steps": m["chunk_steps"],
                               "loadavg_per_round": m["loadavg_per_round"], "wall_s": m["wall_s"], "rows": {}}
        if r.get("matmul"):
            peak = max(r["matmul"])
            out["matmul_peak"] = {"n": args.matmul_n, "dtype": "float32", "gflops_best": peak,
                                  "gflops": summarize(r["matmul"])}
        out["groups"], out["stack"] = m["groups"], m["stack"]
        for key in ("together", "one_after_another", "stacked_groups", "one_stack", "e2e_together",
                    "e2e_one_after_another"):
            if not r.get(key):
                continue
            s = summarize(r[key])
            gflops = s["median"] / args.batch * fl / 1e9  # sequences/s -> model-steps/s -> FLOP/s
            row = {"sequences_per_s": s, "gflops": gflops}
            if peak and dev == "cpu":
                row["pct_of_peak"] = 100 * gflops / peak
            out["rows"][key] = row
        out["ratios"] = {}
        if r.get("together") and r.get("one_after_another"):
            out["ratios"]["step_loop"] = _paired(r["together"], r["one_after_another"])
        for key in ("stacked_groups", "one_stack"):
            if r.get(key) and r.get("one_after_another"):
                out["ratios"][key] = _paired(r[key], r["one_after_another"])
        if r.get("e2e_together") and r.get("e2e_one_after_another"):
            out["ratios"]["end_to_end"] = _paired(r["e2e_together"], r["e2e_one_after_another"])
        ratio = out["ratios"].get("step_loop", {}).get("paired_median")
        if dev.startswith("cuda") or m["threads"] == 2:  # the targets: 2 CPU cores, or a GPU
            target = TARGET_GPU if dev.startswith("cuda") else TARGET_CPU
            out["target"] = {"ratio_required": target, "ratio": ratio, "met": ratio is not None and ratio >= target}
        out["threads"] = m["threads"]
        res["results"][m["key"]] = out
    return res


def markdown(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    lines = [f"# Ensemble throughput: {s['models']} models together vs one after another"
             f"{' (QUICK smoke run)' if res['quick'] else ''}", "",
             f"{m['cpu_model']}, {m['cores_available']} cores, torch {m['torch']}, {s['threads']} threads, "
             f"{m['date_utc']}. Load average at start {m['loadavg_at_start']} (the cores are shared with other "
             f"jobs). Wall time {res['wall_time_s'] / 60:.1f} min."
             + ("" if res["complete"] else " **INCOMPLETE.**"), "",
             f"Setting: seed preset ({res['params_per_model']:,} parameters per model), D = {s['D']}, K = {s['K']}, "
             f"M = {s['M']}, AdamW lr {s['lr']}, batch {s['batch_per_model']} per model, seeds 0-{s['models'] - 1}. "
             "Produced by `benchmarks/ensemble_throughput.py` (method in its docstring). GFLOP/s counts nominal "
             f"model FLOPs ({res['flops_per_model_step'] / 1e6:.0f} MFLOP per model step; "
             f"`{res['flops_formula']}`).", ""]
    for key, r in res["results"].items():
        dev = key.split("/")[0]
        title = key + (f" ({r['device_name']})" if r.get("device_name") else "")
        lines += [f"## {title}: sequences/s (median over {s['rounds']} interleaved rounds; chunks of "
                  f"{r['chunk_steps']} steps per model)", ""]
        if "matmul_peak" in r:
            lines += [f"Measured peak: float32 {r['matmul_peak']['n']}² matmul, best of all rounds: "
                      f"**{r['matmul_peak']['gflops_best']:.1f} GFLOP/s**.", ""]
        lines += ["| what | sequences/s median [min–max] | GFLOP/s | % of peak |", "|---|---:|---:|---:|"]
        g, per = r["groups"], s["models"] // r["groups"]
        how = (f"{g} groups of {per} on their own threads (1 intra-op thread each), " if g > 1 else "") + (
            "each group one stack (vmap)" if r["stack"] else "members one after another within a group")
        names = {"together": f"{s['models']} models together, train_ensemble's default step ({how}) — step loop",
                 "one_after_another": f"{s['models']} models one after another — step loop",
                 "stacked_groups": f"stacked instead: {g} stacks of {per} (vmap), each on its own thread",
                 "one_stack": f"stacked instead: one stack of {s['models']} (vmap) on all threads",
                 "e2e_together": f"train_ensemble end to end ({s['e2e_steps']} steps, {s['e2e_rounds']} rounds)",
                 "e2e_one_after_another": f"{s['models']} × train() end to end ({s['e2e_steps']} steps)"}
        for key, row in r["rows"].items():
            st = row["sequences_per_s"]
            pct = f"{row['pct_of_peak']:.1f}" if "pct_of_peak" in row else "—"
            lines.append(f"| {names[key]} | {st['median']:.0f} [{st['min']:.0f}–{st['max']:.0f}] | "
                         f"{row['gflops']:.2f} | {pct} |")
        lines.append("")
        for key, label in (("step_loop", "together / one after another, step loop"),
                           ("end_to_end", "together / one after another, end to end"),
                           ("stacked_groups", "stacked groups on threads / one after another"),
                           ("one_stack", "one stack on all threads / one after another")):
            if key in r["ratios"]:
                q = r["ratios"][key]
                bold = "**" if key in ("step_loop", "end_to_end") else ""
                lines.append(f"- {label}: {bold}{q['paired_median']:.2f}×{bold} "
                             f"(paired per round, median; range {q['paired_min']:.2f}–{q['paired_max']:.2f})")
        t = r.get("target")
        if t:
            where = "a GPU" if dev.startswith("cuda") else "2 CPU cores"
            verdict = "met" if t["met"] else "NOT met"
            lines += ["", f"Target (step loop ≥ {t['ratio_required']}× on {where}): **{verdict}**"
                      + (f" ({t['ratio']:.2f}×)." if t["ratio"] is not None else "."), ""]
        else:
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke check: short chunks, 2 rounds, short e2e")
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", default="2", help="comma-separated torch thread counts to measure (default 2)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7)")
    ap.add_argument("--chunk-seconds", type=float, default=None, help="seconds per timed chunk (default 6)")
    ap.add_argument("--warmup", type=int, default=30, help="warm-up steps")
    ap.add_argument("--e2e-steps", type=int, default=None, help="steps per end-to-end run (default 500)")
    ap.add_argument("--e2e-rounds", type=int, default=None, help="rounds with an end-to-end run (default 2)")
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--device", action="append", default=None,
                    help="cpu (default) and/or cuda; cuda is skipped with a note where none is available")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results; --quick: a temporary folder)")
    args = ap.parse_args(argv)
    q = args.quick
    for k, v in dict(rounds=2 if q else 7, chunk_seconds=1.0 if q else 6.0, e2e_steps=60 if q else 500,
                     e2e_rounds=1 if q else 2).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    out = args.out or (Path(tempfile.gettempdir()) / "icl-lab-bench-quick" if q else RESULTS)
    devices = args.device or ["cpu"]
    if "cuda" in devices and not torch.cuda.is_available():
        log("cuda requested but not available: skipped")
        devices = [d for d in devices if d != "cuda"]

    thread_counts = [int(t) for t in str(args.threads).split(",")]
    set_threads(thread_counts[0])
    machine = machine_info()
    t0 = time.perf_counter()
    measured: list[dict[str, Any]] = []

    def save(complete: bool) -> None:
        res = build_results(args, machine, measured, time.perf_counter() - t0, complete)
        write_json_atomic(out / "ensemble_throughput.json", res)
        write_atomic(out / "ensemble_throughput.md", markdown(res))

    for dev in devices:
        for threads in thread_counts if dev == "cpu" else thread_counts[:1]:
            log(f"measuring {dev} with {threads} torch threads")
            measured.append(measure(args, dev, threads))
            save(False)
    save(True)
    log(f"wrote {out / 'ensemble_throughput.json'} and .md")
    print((out / "ensemble_throughput.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
