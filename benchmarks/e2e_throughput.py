"""End-to-end throughput: samples/s from Kafka through the serve loop into the learner.

For each case the script produces ``n`` samples of a real dataset into a fresh topic of the
embedded broker (or ``--bootstrap-servers``), then runs `amstream.serve.Runner` on it in a
fresh consumer group (checkpoints every 100 minibatches, as a service would) until every sample
is learned. Beside the end-to-end rate it reports where the time went:

* ``learner only``: the same learner on the same minibatches from memory (the ceiling);
* ``learn s``: time inside ``learner.learn`` during the run;
* ``decode s``: decoding and validating records;
* ``wait s``: the learning thread waiting for records (what the Kafka client did not hide);
* ``fetch s``: the prefetching thread inside ``next_batch`` (overlaps learning);
* ``client alone``: records/s of `KafkaSource.next_batch` on the same topic with nothing else to do
  (kafka-python's fetch and record parsing: the ceiling of one-sample-per-message streams).

Cases: Covertype (54 features, MLP 54-64-64-7) and MNIST (784, MLP 784-256-256-10), JSON vs the
binary codec, one sample per message vs ``K`` packed samples per message, and each Kafka
compression codec (``compression_type`` of the producer: gzip, snappy, lz4, zstd) on the
Covertype binary cases.

    python benchmarks/e2e_throughput.py                 # all cases, ~5 minutes on 2 cores
    python benchmarks/e2e_throughput.py --quick         # smaller n
    python benchmarks/e2e_throughput.py --cases cov-binary-k64 --cov-batch 2048
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from amstream import AMConfig, make_learner
from amstream.checkpoint import CheckpointManager
from amstream.connectors.broker import EmbeddedBroker
from amstream.connectors.codec import make_codec
from amstream.connectors.kafka import KafkaSource, create_topic, make_producer, produce_samples
from amstream.datasets import load_dataset
from amstream.serve import Engine, Runner, RunnerConfig, StreamModel
from amstream.training import Preprocessor


COMPRESSIONS = ("gzip", "snappy", "lz4", "zstd")


@dataclass
class Case:
    name: str
    dataset: str
    codec: str
    per_message: int
    n: int
    compression: Optional[str] = None  # the producer's compression_type


def cases(scale: float) -> List[Case]:
    s = scale
    out = [
        Case("cov-json", "covertype", "json", 1, int(40_000 * s)),
        Case("cov-binary", "covertype", "binary", 1, int(200_000 * s)),
        Case("cov-binary-k64", "covertype", "binary", 64, int(800_000 * s)),
        Case("cov-binary-k256", "covertype", "binary", 256, int(800_000 * s)),
        Case("mnist-json", "mnist", "json", 1, int(10_000 * s)),
        Case("mnist-binary", "mnist", "binary", 1, int(20_000 * s)),
        Case("mnist-binary-k16", "mnist", "binary", 16, int(40_000 * s)),
    ]
    for c in COMPRESSIONS:
        out.append(Case(f"cov-binary-{c}", "covertype", "binary", 1, int(200_000 * s), c))
        out.append(Case(f"cov-binary-k64-{c}", "covertype", "binary", 64, int(800_000 * s), c))
    return out


_DATA: Dict[str, Any] = {}


def data_for(name: str):
    """Standardized training rows (Covertype: the first 100k rows of the stream, MNIST: train)."""
    if name not in _DATA:
        ds = load_dataset(name, limit=100_000 if name == "covertype" else None)
        x = ds.x_train if name == "mnist" else Preprocessor.fit(ds.x_train)(ds.x_train)
        _DATA[name] = (np.ascontiguousarray(x, dtype=np.float32), ds.y_train.astype(np.int64), ds.n_classes)
    return _DATA[name]


def rows(name: str, n: int):
    x, y, k = data_for(name)
    reps = -(-n // len(x))
    return np.tile(x, (reps, 1))[:n], np.tile(y, reps)[:n], k


def learner_only(arch, x, y, batch: int, seed: int) -> float:
    """Samples/s of the learner alone on the same minibatches (after a short warm-up)."""
    learner = make_learner(AMConfig(arch=arch, algo="am-adam", seed=seed))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for i in range(0, min(len(x), 4 * batch), batch):
        learner.learn(xt[i:i + batch], yt[i:i + batch])
    n = min(len(x), max(20 * batch, 50_000))
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        learner.learn(xt[i:i + batch], yt[i:i + batch])
    return n / (time.perf_counter() - t0)


def client_only(topic: str, servers: str, n_messages: int, partitions: int) -> float:
    """Records/s of `KafkaSource.next_batch` alone on ``topic`` (no group, from offset 0, after the
    connection is open), in polls of the size the prefetch thread uses."""
    source = KafkaSource(partitions=[(topic, p) for p in range(partitions)], bootstrap_servers=servers,
                         group_id=None, on_assign=lambda parts: {tp: 0 for tp in parts})
    with source:
        seen, t0 = 0, time.perf_counter()
        while seen < n_messages:
            records = source.next_batch(max_records=5000, timeout_ms=5000)
            if not records:
                break
            seen += len(records)
        return seen / (time.perf_counter() - t0)


def _delete_topic(topic: str, servers: str) -> None:
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=servers, client_id="e2e-bench")
    try:
        admin.delete_topics([topic])
    finally:
        admin.close()


def run_case(case: Case, args, servers: str) -> Dict[str, Any]:
    batch = args.cov_batch if case.dataset == "covertype" else args.mnist_batch
    # whole minibatches only: a last partial one would wait `flush_after_s` and time the wait
    x, y, n_classes = rows(case.dataset, -(-case.n // batch) * batch)
    arch = (x.shape[1], 64, 64, n_classes) if case.dataset == "covertype" else (784, 256, 256, 10)
    codec = make_codec(case.codec, x.shape[1], n_classes)
    topic = f"bench-{case.name}-{int(time.time() * 1000) % 10**8}"
    create_topic(topic, partitions=args.partitions, bootstrap_servers=servers)
    t0 = time.perf_counter()
    compression = {"compression_type": case.compression} if case.compression else {}
    producer = make_producer(servers, batch_size=1 << 20, linger_ms=50, **compression)
    try:
        keys = [b"%d" % i for i in range(len(x))] if args.partitions > 1 else None  # spread over partitions
        n_messages = produce_samples(topic, x, y, codec=codec, bootstrap_servers=servers, producer=producer,
                                     samples_per_message=case.per_message, keys=keys)
    finally:
        producer.close()
    produce_s = time.perf_counter() - t0
    alone = learner_only(arch, x, y, batch, args.seed)
    client = client_only(topic, servers, n_messages, args.partitions)
    load = os.getloadavg()[0]

    learner = make_learner(AMConfig(arch=arch, algo="am-adam", seed=args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        source = KafkaSource([topic], bootstrap_servers=servers, group_id=f"g-{topic}",
                             consumer_config={"session_timeout_ms": 2000, "heartbeat_interval_ms": 500})
        runner = Runner(Engine(StreamModel(learner, codec), batch_size=batch), source,
                        checkpoints=CheckpointManager(tmp, keep=2),
                        config=RunnerConfig(checkpoint_every_batches=100, checkpoint_every_seconds=30,
                                            max_samples=len(x), idle_exit_s=10, flush_after_s=1.0))
        r = runner.run()
    _delete_topic(topic, servers)  # the in-memory broker holds every case's data otherwise
    active = r["active_seconds"]
    return {
        "case": case.name, "dataset": case.dataset, "arch": "-".join(map(str, arch)), "codec": case.codec,
        "compression": case.compression or "none",
        "samples_per_message": case.per_message, "batch_size": batch, "samples": r["learned_samples"],
        "messages": n_messages, "e2e_samples_per_s": round(r["learned_samples"] / active, 1),
        "learner_only_samples_per_s": round(alone, 1),
        "client_only_records_per_s": round(client, 1),
        "e2e_vs_learner_only": round(r["learned_samples"] / active / alone, 3),
        "active_s": round(active, 3), "learn_s": r["learn_seconds"], "decode_s": r["decode_seconds"],
        "wait_s": round(max(0.0, active - r["learn_seconds"] - r["decode_seconds"] - r["checkpoint_seconds"]), 3),
        "fetch_s": r["fetch_seconds"], "checkpoint_s": r["checkpoint_seconds"],
        "learner_busy": round(r["learn_seconds"] / active, 3),
        "produce_samples_per_s": round(len(x) / produce_s, 1),
        "prequential_accuracy": r["prequential_accuracy"], "partitions": args.partitions,
        "load_avg": round(load, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap-servers", default=None, help="use this broker instead of the embedded one")
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--quick", action="store_true", help="a quarter of the samples (same as --scale 0.25)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every case's sample count")
    p.add_argument("--cov-batch", type=int, default=1000)
    p.add_argument("--mnist-batch", type=int, default=256)
    p.add_argument("--partitions", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="", help="suffix for the result files")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    selected = cases(0.25 if args.quick else args.scale)
    if args.cases:
        names = set(args.cases.split(","))
        selected = [c for c in selected if c.name in names]
    env = {"seed": args.seed, "threads": args.threads, "device": "cpu", "cpus": os.cpu_count(),
           "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "load_avg_start": round(os.getloadavg()[0], 2)}
    results = []
    broker = None
    try:
        if args.bootstrap_servers:
            servers = args.bootstrap_servers
        else:
            broker = EmbeddedBroker().start()
            servers = broker.bootstrap_servers
        for case in selected:
            res = run_case(case, args, servers)
            results.append(res)
            print(f"{res['case']:<22} {res['e2e_samples_per_s']:>10,.0f} samples/s end to end "
                  f"(learner alone {res['learner_only_samples_per_s']:,.0f}/s, client alone "
                  f"{res['client_only_records_per_s']:,.0f} records/s, wait {res['wait_s']:.2f} s "
                  f"of {res['active_s']:.2f} s, load {res['load_avg']})", file=sys.stderr, flush=True)
    finally:
        if broker is not None:
            broker.stop()
    env["load_avg_end"] = round(os.getloadavg()[0], 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"e2e_throughput{args.tag}"
    with open(f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(results[0]) + list(env))
        w.writeheader()
        for r in results:
            w.writerow({**r, **env})
    cols = [("case", "case"), ("codec", "codec"), ("compression", "compression"), ("samples_per_message", "K"),
            ("batch_size", "batch"), ("samples", "samples"), ("e2e_samples_per_s", "end-to-end samples/s"),
            ("learner_only_samples_per_s", "learner alone samples/s"),
            ("client_only_records_per_s", "client alone records/s"), ("e2e_vs_learner_only", "ratio"),
            ("learn_s", "learn s"), ("decode_s", "decode s"), ("wait_s", "wait s"), ("fetch_s", "fetch s"),
            ("checkpoint_s", "ckpt s"), ("prequential_accuracy", "preq. acc"), ("load_avg", "load")]

    def fmt(v):
        return f"{v:,.0f}" if isinstance(v, float) and v >= 100 else str(v)

    lines = [f"# End-to-end throughput (Kafka -> serve loop -> learner)\n",
             f"seed {env['seed']}, torch threads {env['threads']}, device {env['device']}, {env['cpus']} CPUs "
             f"({env['cpu']}), Python {env['python']}, torch {env['torch']}, embedded Tansu broker on the same "
             f"machine, {args.partitions} partition(s); load average {env['load_avg_start']} at the start, "
             f"{env['load_avg_end']} at the end.\n",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        lines.append("| " + " | ".join(fmt(r[k]) for k, _ in cols) + " |")
    table = "\n".join(lines) + "\n"
    Path(f"{stem}.md").write_text(table)
    print(table)
    print(json.dumps(env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
