"""Scale-out: samples/s of `amstream serve` with 1 and 2 ranks (torchrun), and of the learner alone.

End to end: the script produces ``--samples`` MNIST training images (binary codec, ``--per-message``
samples per message) into a topic of ``--partitions`` partitions on the embedded broker, then
drains it three ways, each in a fresh consumer group with a fresh checkpoint directory:

* ``plain``: one `amstream serve` process (no torch.distributed);
* ``1 rank`` / ``2 ranks``: ``torchrun --standalone --nproc-per-node R amstream serve --distributed``.

Each run ends by ``--idle-exit``. Two rates: the samples the group learned over the longest
rank's active time (first record to last update: group joins and the rollbacks they cause at
start-up included), and the *steady* rate, the slope of learned samples over the times of the
checkpoints (every 0.5 s) from the one holding 25% of the samples to the one holding 90%.
Each rank learns ``--batch`` samples per step (a group step learns up to R x batch: weak scaling).

Learner alone: `benchmarks/distributed_scaling.py`'s measurement (gloo ranks, minibatches from
memory), for AM-Adam with its per-layer gradient all-reduces overlapped (asynchronous, started as
each layer's gradient is known) and blocking, and for AM-mem.

    .venv/bin/python benchmarks/distributed_serve.py               # writes results/distributed_serve_b256.{md,csv}
    .venv/bin/python benchmarks/distributed_serve.py --batch 1024  # ... _b1024: more compute per all-reduce

Scaling efficiency = samples/s of R ranks / (R x samples/s of 1 rank). One torch thread per
rank; on a 2-core machine 2 ranks share the cores with the broker and the Kafka clients.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from amstream.checkpoint import CheckpointManager, load_checkpoint
from amstream.connectors.broker import EmbeddedBroker
from amstream.connectors.codec import make_codec
from amstream.connectors.kafka import make_producer, produce_samples
from amstream.datasets import load_dataset

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from distributed_scaling import measure  # noqa: E402  (the learner-alone measurement, reused)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def steady_rate(directory: Path, total: int) -> float:
    """Samples/s between the checkpoints that first hold 25% and 90% of the samples (after the
    group has joined and settled): the slope of learned samples over checkpoint times."""
    points = []
    for path in CheckpointManager(directory).checkpoints():
        meta = load_checkpoint(path)["metadata"]
        points.append((meta["time"], meta["learned_samples"]))
    points.sort()
    a = next(p for p in points if p[1] >= 0.25 * total)
    b = next(p for p in points if p[1] >= 0.9 * total)
    return (b[1] - a[1]) / (b[0] - a[0]) if b[0] > a[0] else float("nan")


def serve_run(ranks: int, servers: str, topic: str, args: argparse.Namespace, tmp: Path) -> Dict[str, Any]:
    """One drain of the topic; ``ranks == 0``: plain serve, no torchrun."""
    name = "plain" if ranks == 0 else f"r{ranks}"
    flags = ["--topic", topic, "--bootstrap-servers", servers, "--group-id", f"bench-{name}-{time.time_ns()}",
             "--n-features", "784", "--n-classes", "10", "--arch", args.arch, "--algo", args.algo,
             "--batch-size", str(args.batch), "--seed", "1", "--threads", "1", "--idle-exit", str(args.idle_exit),
             "--flush-after", "1", "--log-every", "0", "--json", "--checkpoint-dir", str(tmp / f"ck-{name}"),
             "--checkpoint-every-seconds", "0.5", "--keep-checkpoints", "100000"]
    if ranks == 0:
        cmd = [sys.executable, "-m", "amstream", "serve", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "--log-dir", str(tmp / f"logs-{name}"), "--redirects", "3", "-m", "amstream", "serve", "--distributed",
               *flags]
    load_before = _load()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    if ranks == 0:
        summaries = [json.loads(proc.stdout.strip().splitlines()[-1])]
    else:
        summaries = [json.loads(p.read_text().strip().splitlines()[-1])
                     for p in sorted((tmp / f"logs-{name}").rglob("stdout.log"))]
    learned = sum(s["learned_samples_this_run"] for s in summaries)
    active = max(s["active_seconds"] for s in summaries)
    if ranks:
        digests = {s["model_digest"] for s in summaries}
        assert len(digests) == 1, f"ranks disagree: {digests}"
    return {"case": "serve", "mode": name, "ranks": max(1, ranks), "algo": args.algo, "samples": learned,
            "active_s": round(active, 2), "wall_s": round(wall, 1), "samples_per_s": learned / active,
            "steady_per_s": steady_rate(tmp / f"ck-{name}", learned),
            "rollbacks": sum(s.get("rollbacks", 0) for s in summaries), "learn_s": round(max(
                s["learn_seconds"] for s in summaries), 2), "load_before": load_before, "load_after": _load()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=240_000, help="samples produced (MNIST train, repeated)")
    p.add_argument("--per-message", type=int, default=16)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--arch", default="784-256-256-10")
    p.add_argument("--algo", default="am-adam")
    p.add_argument("--batch", type=int, default=256, help="samples per rank per step")
    p.add_argument("--idle-exit", type=float, default=3.0)
    p.add_argument("--learner-steps", type=int, default=60, help="timed steps of the learner-alone measurement")
    p.add_argument("--skip-learner", action="store_true")
    args = p.parse_args()
    rows: List[Dict[str, Any]] = []

    if not args.skip_learner:
        arch = tuple(int(v) for v in args.arch.split("-"))
        for algo in ("am-adam", "am-mem"):
            for world in args.ranks:
                for overlap in ((True, False) if (algo == "am-adam" and world > 1) else (True,)):
                    load_before = _load()
                    r = measure(world, arch, algo, args.batch, args.learner_steps, overlap)
                    rows.append({"case": "learner", "mode": "-" if world == 1 else ("overlapped" if overlap else
                                                                                  "blocking"),
                                 "ranks": world, "algo": algo, "samples": args.batch * world * args.learner_steps,
                                 "ms_per_step": round(r["ms_per_step"], 2), "samples_per_s": r["samples_per_s"],
                                 "load_before": load_before, "load_after": _load()})
                    print(rows[-1], flush=True)

    data = load_dataset("mnist")
    reps = -(-args.samples // len(data.x_train))
    x = torch.from_numpy(data.x_train).repeat(reps, 1)[:args.samples].numpy()
    y = torch.from_numpy(data.y_train).repeat(reps)[:args.samples].numpy()
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        topic = "bench-dist"
        broker.create_topic(topic, partitions=args.partitions)
        producer = make_producer(broker.bootstrap_servers)
        t0 = time.perf_counter()
        produce_samples(topic, x, y, codec=make_codec("binary", 784, 10), bootstrap_servers=broker.bootstrap_servers,
                        producer=producer, samples_per_message=args.per_message,
                        keys=[b"k%d" % i for i in range(len(x))])
        producer.close()
        print(f"produced {len(x):,} samples in {time.perf_counter() - t0:.1f} s", flush=True)
        for ranks in [0, *args.ranks]:
            rows.append(serve_run(ranks, broker.bootstrap_servers, topic, args, Path(tmp)))
            print(rows[-1], flush=True)

    for key, eff in (("samples_per_s", "efficiency"), ("steady_per_s", "steady_efficiency")):
        base = {(r["case"], r["algo"]): r.get(key) for r in rows if r["ranks"] == 1 and r["mode"] in ("-", "r1")}
        for r in rows:
            b = base.get((r["case"], r["algo"]))
            r[eff] = round(r[key] / (r["ranks"] * b), 2) if b and key in r and r["mode"] != "plain" else ""
    for r in rows:
        for key in ("samples_per_s", "steady_per_s"):
            if key in r:
                r[key] = round(r[key], 1)
    RESULTS.mkdir(exist_ok=True)
    fields = ["case", "mode", "ranks", "algo", "samples", "samples_per_s", "efficiency", "steady_per_s",
              "steady_efficiency", "ms_per_step", "active_s",
              "wall_s", "learn_s", "rollbacks", "load_before", "load_after"]
    out = RESULTS / f"distributed_serve_b{args.batch}"
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["# Scale-out: samples/s with 1 and 2 ranks", "",
             f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; seed 1; one torch thread per rank; device cpu "
             f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores); torch {torch.__version__}",
             f"- MNIST {args.arch}, {args.batch} samples per rank per step (weak scaling)",
             f"- serve: {args.samples:,} samples, binary codec, {args.per_message} per message, {args.partitions} "
             f"partitions, embedded broker on the same machine; rate = learned / longest rank's active time",
             f"- learner alone: {args.learner_steps} timed steps after 5 (benchmarks/distributed_scaling.py)", "",
             "| case | algo | mode | ranks | samples/s | scaling efficiency | steady samples/s (efficiency) | ms/step "
             "| rollbacks | load before / after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steady = f"{r['steady_per_s']:,.0f} ({r['steady_efficiency']})" if "steady_per_s" in r else ""
        lines.append(f"| {r['case']} | {r['algo']} | {r['mode']} | {r['ranks']} | {r['samples_per_s']:,.0f} | "
                     f"{r['efficiency']} | {steady} | {r.get('ms_per_step', '')} | {r.get('rollbacks', '')} | "
                     f"{r['load_before']} / {r['load_after']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
