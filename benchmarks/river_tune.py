"""Choose the AMClassifier defaults on streams that the River benchmark does not report.

Progressive validation (``StandardScaler() | AMClassifier(...)``) of a small grid on the
*tuning* streams of ``river_benchmark.STREAMS`` (RandomRBF and LED with drift, Waveform,
Mixed and Sine with drift, Weather, Moving Squares). AM-Adam's grid is hidden width x lr x mu;
AM-mem's is mem_decay x mem_ridge at AM-Adam's chosen width, lr and mu. The score of a
configuration is its mean prequential accuracy over the tuning streams; the rule, fixed
before looking: **the cheapest configuration (fewest hidden units) whose score is within
0.25 points of the best**, ties broken by score.

    .venv/bin/python benchmarks/river_tune.py            # ~10 min on 2 cores
    .venv/bin/python benchmarks/river_tune.py --quick

Writes ``benchmarks/results/river_tuning{,_quick}.{md,csv}``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import itertools
import os
import sys
import time
from pathlib import Path

from river_benchmark import QUICK, FULL, RESULTS, TITLES, TUNE, cpu_name, load_stream

ADAM_GRID = {"hidden_sizes": [(16,), (32,), (64,)], "lr": [0.001, 0.003, 0.01], "mu": [0.3, 1.0, 3.0]}
MEM_GRID = {"mem_decay": [0.8, 0.9, 0.97, 0.99, 1.0], "mem_ridge": [0.03, 0.1, 0.3]}
TOLERANCE = 0.0025


def score(params: dict, streams: dict, seed: int) -> tuple[dict, float]:
    from river import evaluate, metrics, preprocessing

    from amstream.river import AMClassifier

    acc = {}
    t0 = time.perf_counter()
    for name, rows in streams.items():
        model = preprocessing.StandardScaler() | AMClassifier(seed=seed, **params)
        acc[name] = evaluate.progressive_val_score(rows, model, metrics.Accuracy()).get()
    return acc, time.perf_counter() - t0


def choose(rows: list[dict]) -> dict:
    best = max(r["mean"] for r in rows)
    ok = [r for r in rows if r["mean"] >= best - TOLERANCE]
    return min(ok, key=lambda r: (sum(r["params"].get("hidden_sizes", (0,))), -r["mean"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    sizes = QUICK if args.quick else FULL
    streams = {name: load_stream(name, sizes[name]) for name in TUNE}
    print("tuning streams:", ", ".join(f"{TITLES[k]} ({len(v):,})" for k, v in streams.items()), flush=True)
    table = []

    def run(algo: str, grid: dict, fixed: dict) -> dict:
        rows = []
        for values in itertools.product(*grid.values()):
            params = {"algo": algo, **fixed, **dict(zip(grid, values))}
            acc, seconds = score(params, streams, args.seed)
            row = {"params": params, "mean": sum(acc.values()) / len(acc), "acc": acc, "seconds": seconds}
            rows.append(row)
            table.append(row)
            print(f"{params}  mean {row['mean']:.4f}  ({seconds:.1f} s)", flush=True)
        return choose(rows)

    adam = run("am-adam", ADAM_GRID, {})
    shared = {k: adam["params"][k] for k in ADAM_GRID}
    mem = run("am-mem", MEM_GRID, shared)

    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / ("river_tuning_quick" if args.quick else "river_tuning")
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["params", "mean", *TUNE, "seconds"])
        for r in table:
            w.writerow([r["params"], f"{r['mean']:.4f}", *(f"{r['acc'][k]:.4f}" for k in TUNE), f"{r['seconds']:.1f}"])
    lines = [
        f"# AMClassifier defaults, chosen on the tuning streams{' (quick)' if args.quick else ''}",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; seed {args.seed}; torch.set_num_threads(1); "
        f"cpu ({cpu_name()}, {os.cpu_count()} cores); load average at end "
        + " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "- streams (none of them in the River benchmark's report): "
        + ", ".join(f"{TITLES[k]} ({len(v):,})" for k, v in streams.items()),
        f"- rule: the fewest hidden units within {TOLERANCE * 100:.2f} points of the best mean accuracy",
        f"- AM-Adam chosen: {adam['params']} (mean {adam['mean']:.4f}; best of the grid "
        f"{max(r['mean'] for r in table if r['params']['algo'] == 'am-adam'):.4f})",
        f"- AM-mem chosen: {mem['params']} (mean {mem['mean']:.4f}; best of the grid "
        f"{max(r['mean'] for r in table if r['params']['algo'] == 'am-mem'):.4f})",
        "",
        "| algo | params | mean | " + " | ".join(TITLES[k] for k in TUNE) + " |",
        "|---|---|---|" + "---|" * len(TUNE),
    ]
    for r in sorted(table, key=lambda r: (r["params"]["algo"], -r["mean"])):
        params = {k: v for k, v in r["params"].items() if k != "algo"}
        lines.append(f"| {r['params']['algo']} | {params} | {r['mean']:.4f} | "
                     + " | ".join(f"{r['acc'][k]:.4f}" for k in TUNE) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
