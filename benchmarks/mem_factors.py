"""AM-mem's kept block inverses (Woodbury updates) against a new inverse at every update.

Per-sample AM-mem (River's setting) updates the co-activation memory A by one sample at a time;
BCD needs the inverse of each diagonal block of A (plus a ridge). The engine keeps those
inverses and updates them by the Woodbury identity, factoring afresh only when due
(``functional.memory_refactor_due``). This script measures, on random inputs and on River
streams, the time per update and the prequential accuracy with the kept factors and with a
fresh factorization at every update (``memory_refactor_due`` forced true), in one process.

    .venv/bin/python benchmarks/mem_factors.py      # writes results/mem_factors.md
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import amstream.learner as L
from amstream import AMConfig, make_learner

RESULTS = Path(__file__).resolve().parent / "results"


@contextmanager
def refactor_every_update(on: bool):
    saved = L.F.memory_refactor_due
    if on:
        L.F.memory_refactor_due = lambda *args: True
    try:
        yield
    finally:
        L.F.memory_refactor_due = saved


def per_update_us(d: int, hidden: int, decay: float, n: int = 3000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, 7, n)
    learner = make_learner(AMConfig(arch=(d, hidden, 7), algo="am-mem", mem_decay=decay, mem_ridge=0.3, seed=seed))
    for i in range(100):
        learner.learn(x[i:i + 1], y[i:i + 1])
    t0 = time.perf_counter()
    for i in range(n):
        learner.learn(x[i:i + 1], y[i:i + 1])
    return (time.perf_counter() - t0) / n * 1e6


def stream_accuracy(name: str, decay: float) -> tuple[float, float]:
    from river import evaluate, metrics, preprocessing
    from river_benchmark import load_stream

    from amstream.river import AMClassifier

    rows = load_stream(name, 20_000 if name == "covertype" else None)
    model = preprocessing.StandardScaler() | AMClassifier(algo="am-mem", mem_decay=decay, seed=0)
    t0 = time.perf_counter()
    acc = evaluate.progressive_val_score(rows, model, metrics.Accuracy()).get()
    return acc, len(rows) / (time.perf_counter() - t0)


def main() -> None:
    torch.set_num_threads(1)
    lines = ["# AM-mem: kept block inverses (Woodbury) vs a new inverse every update", "",
             f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; seed 0; torch.set_num_threads(1); "
             f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores); "
             f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
             "- one sample per update, mem_ridge 0.3, Adam on the output layer", "",
             "| net | mem_decay | kept factors: us/update | new inverse every update: us/update | speed-up |",
             "|---|---|---|---|---|"]
    for d, hidden in ((9, 64), (54, 32), (54, 64), (200, 64)):
        for decay in (0.8, 1.0):
            with refactor_every_update(False):
                kept = per_update_us(d, hidden, decay)
            with refactor_every_update(True):
                fresh = per_update_us(d, hidden, decay)
            lines.append(f"| {d}-{hidden}-7 | {decay} | {kept:.1f} | {fresh:.1f} | {fresh / kept:.2f}x |")
            print(lines[-1], flush=True)
    lines += ["", "Prequential accuracy and samples/s of `StandardScaler() | AMClassifier(algo='am-mem')` "
              "(defaults otherwise; Covertype: first 20,000 rows):", "",
              "| stream | mem_decay | kept factors: accuracy, samples/s | new inverse every update: accuracy, samples/s |",
              "|---|---|---|---|"]
    for name in ("phishing_x4", "elec2", "covertype"):
        for decay in (0.8, 1.0):
            with refactor_every_update(False):
                a1, s1 = stream_accuracy(name, decay)
            with refactor_every_update(True):
                a2, s2 = stream_accuracy(name, decay)
            lines.append(f"| {name} | {decay} | {a1:.4f}, {s1:,.0f} | {a2:.4f}, {s2:,.0f} |")
            print(lines[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mem_factors.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
