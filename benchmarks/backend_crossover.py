"""Where the NumPy backend beats the torch one: time per AM update, both backends, one process.

On the CPU an AMLearner runs its update on NumPy unless told otherwise (``backend="auto"``).
This script times ``learner.learn`` on random data with each backend (``backend="numpy"`` /
``"torch"``), over networks from River-sized to MNIST-sized and minibatches from 1 to 512,
so that choice can be checked against measurements.

    .venv/bin/python benchmarks/backend_crossover.py            # writes results/backend_crossover.{md,csv}
    .venv/bin/python benchmarks/backend_crossover.py --quick

Both backends run on ``--threads`` threads (default 1): torch's intra-op pool and, through
threadpoolctl, NumPy's BLAS. (Below 2^18 multiply-adds OpenBLAS uses one thread whatever it
is allowed, so the learner's NumPy updates need no limit; above it, on these 2-core machines
with another process busy, OpenBLAS's default of 2 threads was seen 10-40x slower than one.)
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from amstream import AMConfig, make_learner

RESULTS = Path(__file__).resolve().parent / "results"
ARCHS = [(9, 32, 2), (54, 32, 7), (54, 64, 64, 7), (784, 100, 10), (784, 100, 100, 10)]
BATCHES = [1, 8, 32, 128, 512]


def blas_threads() -> str:  # (read while the limit holds)
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover
        return "unknown"
    return ", ".join(f"{i['internal_api']} {i['num_threads']}" for i in threadpool_info()) or "none"


def time_updates(arch, algo, batch, *, force, n, seed) -> float:
    """Median seconds per update over n updates (after 5 warm-up updates)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + 5, batch, arch[0])).astype(np.float32)
    y = rng.integers(0, arch[-1], size=(n + 5, batch))
    learner = make_learner(AMConfig(arch=arch, algo=algo, seed=seed, mem_ridge=0.1), backend=force)
    times = []
    for i in range(n + 5):
        t0 = time.perf_counter()
        learner.learn(x[i], y[i])
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n = 20 if args.quick else 60
    rows = []
    limits = threadpool_limits(args.threads, user_api="blas")
    pools = blas_threads()
    for arch in ARCHS:
        for algo in ("am-adam", "am-mem"):
            for batch in BATCHES:
                work = batch * max(i * o for i, o in zip(arch[:-1], arch[1:]))
                t_np = time_updates(arch, algo, batch, force="numpy", n=n, seed=args.seed)
                t_t = time_updates(arch, algo, batch, force="torch", n=n, seed=args.seed)
                picked = make_learner(AMConfig(arch=arch, algo=algo)).backend.name
                rows.append({"arch": "-".join(map(str, arch)), "algo": algo, "batch": batch, "work": work,
                             "numpy_us": round(t_np * 1e6, 1), "torch_us": round(t_t * 1e6, 1),
                             "faster": "numpy" if t_np < t_t else "torch", "picked": picked})
                print(rows[-1], flush=True)
    limits.restore_original_limits()
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / ("backend_crossover_quick" if args.quick else "backend_crossover")
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    right = sum(r["faster"] == r["picked"] for r in rows)
    lost = [r for r in rows if r["faster"] != r["picked"]]
    worst = max((max(r["numpy_us"], r["torch_us"]) / min(r["numpy_us"], r["torch_us"]) for r in lost), default=1.0)
    lines = [
        "# Backend crossover: microseconds per AM update, NumPy vs torch",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- seed: {args.seed}; median of {n} updates after 5 warm-up updates; random N(0, 1) inputs",
        f"- threads: torch.set_num_threads({args.threads}); BLAS pools (limited to the same): {pools}",
        f"- device: cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        f"- load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"- the learner (backend=auto) picked the faster backend in {right} of {len(rows)} cases; where it did not, "
        f"the faster one was at most {worst:.2f}x faster",
        "",
        "| arch | algo | batch | work | NumPy us | torch us | faster | picked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['arch']} | {r['algo']} | {r['batch']} | {r['work']:,} | {r['numpy_us']:,} | "
              f"{r['torch_us']:,} | {r['faster']} | {r['picked']} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:10]))


if __name__ == "__main__":
    main()
