"""Distributed AM: samples/s with 1 and 2 ranks (gloo, one process per rank), and what the
layer-parallel reduction buys.

Each rank learns minibatches of ``--batch`` MNIST images per step (so N ranks learn N x batch
per step: weak scaling), one torch thread per rank. Per configuration it reports steps/s and
samples/s of the whole group, the scaling efficiency (samples/s of N ranks / (N x that of 1)),
and, for AM-Adam, the time per step with each layer's gradient all-reduced asynchronously as
soon as it is known (``overlap``, the default) against blocking reductions.

    .venv/bin/python benchmarks/distributed_scaling.py            # writes results/distributed_scaling.md
    .venv/bin/python benchmarks/distributed_scaling.py --ranks 1 2 4 --steps 100

On this 2-core machine 2 ranks have one core each; more ranks than cores only measure contention.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results"


def _rank(rank: int, world: int, init: str, out: str, arch: list, algo: str, batch: int, steps: int,
          overlap: bool) -> None:
    import torch.distributed as dist

    from amstream import AMConfig, distributed, make_learner
    from amstream.datasets import load_dataset

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    data = load_dataset("mnist")
    rng = np.random.default_rng(rank)
    learner = make_learner(AMConfig(arch=tuple(arch), algo=algo, seed=1))
    if world > 1:
        distributed.attach(learner, overlap=overlap)
    order = rng.permutation(len(data.x_train))
    warm = 5
    for s in range(warm + steps):
        if s == warm:
            dist.barrier()
            t0 = time.perf_counter()
        idx = order[(s * batch) % 50_000:(s * batch) % 50_000 + batch]
        learner.learn(data.x_train[idx], data.y_train[idx])
    dist.barrier()
    seconds = time.perf_counter() - t0
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds, "samples": learner.n_samples}))
    dist.destroy_process_group()


def measure(world: int, arch, algo: str, batch: int, steps: int, overlap: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_rank, args=(world, os.path.join(tmp, "init"), out, list(arch), algo, batch, steps,
                                        overlap), nprocs=world, join=True, start_method="spawn")
        r = json.loads(Path(out).read_text())
    return {"ranks": world, "algo": algo, "overlap": overlap, "steps_per_s": steps / r["seconds"],
            "samples_per_s": steps * batch * world / r["seconds"], "ms_per_step": 1e3 * r["seconds"] / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--arch", default="784-500-500-10")
    p.add_argument("--batch", type=int, default=200, help="samples per rank per step")
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    arch = tuple(int(v) for v in args.arch.split("-"))
    rows = []
    for algo in ("am-adam", "am-mem"):
        for world in args.ranks:
            for overlap in ((True, False) if (algo == "am-adam" and world > 1) else (True,)):
                rows.append(measure(world, arch, algo, args.batch, args.steps, overlap))
                print(rows[-1], flush=True)
    base = {r["algo"]: r["samples_per_s"] for r in rows if r["ranks"] == 1}
    lines = ["# Distributed AM: samples/s with 1 and more ranks (gloo)", "",
             f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; MNIST {args.arch}, {args.batch} samples per "
             f"rank per step (weak scaling), {args.steps} timed steps after 5; seed 1",
             f"- one torch thread per rank; device cpu ({platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores); torch {torch.__version__}",
             f"- load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", "",
             "| algo | ranks | reductions | ms/step | steps/s | samples/s | scaling efficiency |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        eff = r["samples_per_s"] / (r["ranks"] * base[r["algo"]]) if r["algo"] in base else float("nan")
        mode = "-" if r["ranks"] == 1 else ("overlapped (async, per layer)" if r["overlap"] else "blocking")
        lines.append(f"| {r['algo']} | {r['ranks']} | {mode} | {r['ms_per_step']:.1f} | {r['steps_per_s']:.1f} | "
                     f"{r['samples_per_s']:,.0f} | {eff:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
