"""Kafka throughput probe: produce, consume (raw) and consume+decode, JSON vs binary codec.

Starts the embedded Tansu broker (or uses ``--bootstrap-servers``), produces ``--n`` samples of
``--features`` float32 features to a ``--partitions``-partition topic per codec, then consumes
them in a fresh consumer group twice: raw records only, and records decoded into a float32
matrix (with a commit every ``--commit-every`` polls, like a serve loop). Rates exclude the
consumer-group join, which is reported separately.

    python benchmarks/kafka_throughput.py                      # 200k samples, 54 features
    python benchmarks/kafka_throughput.py --n 50000 --codecs binary \\
        --consumer-config max_poll_records=20000 --producer-config acks=1
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import sys
import time
from typing import Any, Dict, List

import numpy as np

from amstream.connectors.broker import EmbeddedBroker
from amstream.connectors.codec import make_codec
from amstream.connectors.kafka import (
    CONSUMER_DEFAULTS,
    PRODUCER_DEFAULTS,
    KafkaSource,
    create_topic,
    make_producer,
)


def _cpu_seconds(pid: int | None) -> float:
    """utime + stime of another process (the broker), from /proc; 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


BROKER_PID: int | None = None


def _settings(pairs: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def produce(servers: str, topic: str, values: List[bytes], keys: List[bytes], config: Dict[str, Any]) -> Dict[str, float]:
    producer = make_producer(servers, **config)
    try:
        start, cpu, broker_cpu = time.perf_counter(), time.process_time(), _cpu_seconds(BROKER_PID)
        send = producer.send
        for key, value in zip(keys, values):
            send(topic, value=value, key=key)
        producer.flush()
        return {
            "seconds": time.perf_counter() - start,
            "client_cpu_s": time.process_time() - cpu,
            "broker_cpu_s": _cpu_seconds(BROKER_PID) - broker_cpu,
        }
    finally:
        producer.close()


def consume(
    servers: str, topic: str, n: int, group: str, config: Dict[str, Any], *, codec: Any = None,
    commit_every: int = 0, max_records: int = 5000, expect_rows: int | None = None,
) -> Dict[str, float]:
    source = KafkaSource([topic], bootstrap_servers=servers, group_id=group, consumer_config=config)
    t_open = time.perf_counter()
    got = rows = polls = 0
    with source:
        first: List[Any] = []
        while not source.assignment():  # the group join happens inside these polls
            first += source.next_batch(max_records=1, timeout_ms=100)
        t_first, cpu, broker_cpu = time.perf_counter(), time.process_time(), _cpu_seconds(BROKER_PID)
        batch = first
        while True:
            got += len(batch)
            polls += 1
            if codec is not None:
                decoded = codec.decode_records(batch)
                rows += len(decoded)
            if commit_every and polls % commit_every == 0:
                source.commit()
            if got >= n:
                break
            batch = source.next_batch(max_records=max_records, timeout_ms=1000)
            if not batch and time.perf_counter() - t_first > 600:
                raise RuntimeError(f"only {got} of {n} records after 600 s")
        t_end, cpu, broker_cpu = time.perf_counter(), time.process_time() - cpu, _cpu_seconds(BROKER_PID) - broker_cpu
        if commit_every:
            source.commit()
    if codec is not None and rows != (n if expect_rows is None else expect_rows):
        raise RuntimeError(f"decoded {rows} samples, expected {expect_rows or n}")
    # rates count from the end of the group join on (the few records polled during it are left out)
    return {
        "join_s": t_first - t_open,
        "seconds": t_end - t_first,
        "msgs_per_s": (got - len(first)) / max(1e-9, t_end - t_first),
        "msgs_per_client_cpu_s": (got - len(first)) / max(1e-9, cpu),
        "client_cpu_s": cpu,
        "broker_cpu_s": broker_cpu,
        "polls": polls,
    }


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=54)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--codecs", nargs="+", default=["binary", "json"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-message", type=int, default=1, help="binary only: pack samples")
    parser.add_argument("--bootstrap-servers", default=None, help="default: start the embedded broker")
    parser.add_argument("--max-records", type=int, default=5000, help="max_records per next_batch")
    parser.add_argument("--commit-every", type=int, default=10, help="commit every N polls when decoding")
    parser.add_argument("--consumer-config", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--producer-config", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--csv", default=None, help="append result rows to this CSV file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    consumer_config = _settings(args.consumer_config)
    producer_config = _settings(args.producer_config)
    rng = np.random.default_rng(args.seed)
    X = rng.standard_normal((args.n, args.features)).astype(np.float32)
    y = rng.integers(0, args.classes, args.n)
    keys = [b"%d" % i for i in range(args.n)]
    env = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "device": "cpu (no accelerator involved)",
        "threads": "main + kafka-python I/O thread per client; broker is a separate process",
        "seed": args.seed,
        "n": args.n,
        "features": args.features,
        "partitions": args.partitions,
        "consumer": {**CONSUMER_DEFAULTS, **consumer_config},
        "producer": {**PRODUCER_DEFAULTS, **producer_config},
    }
    print(json.dumps(env, indent=None, default=str))
    broker = None
    servers = args.bootstrap_servers
    if servers is None:
        global BROKER_PID
        broker = EmbeddedBroker().start()
        servers = broker.bootstrap_servers
        BROKER_PID = broker.pid
    results = []
    try:
        for name in args.codecs:
            codec = make_codec(name, args.features, args.classes)
            k = args.samples_per_message if name == "binary" else 1
            t0 = time.perf_counter()
            values = codec.encode_many(X, y, samples_per_message=k) if k > 1 else codec.encode_many(X, y)
            n_msgs = len(values)
            encode_s = time.perf_counter() - t0
            topic = f"bench-{name}-{int(time.time())}"
            create_topic(topic, partitions=args.partitions, bootstrap_servers=servers)
            prod = produce(servers, topic, values, keys[::k], producer_config)
            raw = consume(servers, topic, n_msgs, f"{topic}-raw", consumer_config, max_records=args.max_records)
            dec = consume(
                servers, topic, n_msgs, f"{topic}-dec", consumer_config, codec=codec,
                commit_every=args.commit_every, max_records=args.max_records, expect_rows=args.n,
            )
            row = {
                "codec": name,
                "samples_per_msg": k,
                "msg_bytes": len(values[0]),
                "encode_per_s": args.n / encode_s,
                "produce_msgs_per_s": n_msgs / prod["seconds"],
                "produce_msgs_per_client_cpu_s": n_msgs / prod["client_cpu_s"],
                "consume_raw_msgs_per_s": raw["msgs_per_s"],
                "consume_decode_msgs_per_s": dec["msgs_per_s"],
                "consume_decode_samples_per_s": dec["msgs_per_s"] * k,
                "consume_raw_msgs_per_client_cpu_s": raw["msgs_per_client_cpu_s"],
                "consume_decode_msgs_per_client_cpu_s": dec["msgs_per_client_cpu_s"],
                "broker_cpu_s_produce": prod["broker_cpu_s"],
                "broker_cpu_s_consume_decode": dec["broker_cpu_s"],
                "join_s": raw["join_s"],
            }
            results.append(row)
            print(
                f"{name:>6} x{k:<3d} {row['msg_bytes']:6d} B/msg  encode {row['encode_per_s']:>9,.0f} samples/s  "
                f"produce {row['produce_msgs_per_s']:>7,.0f} msgs/s  consume raw {row['consume_raw_msgs_per_s']:>7,.0f} msgs/s  "
                f"consume+decode {row['consume_decode_msgs_per_s']:>7,.0f} msgs/s = "
                f"{row['consume_decode_samples_per_s']:>8,.0f} samples/s  (group join {row['join_s']:.1f} s)\n"
                f"{'':11s} per client CPU-second: produce {row['produce_msgs_per_client_cpu_s']:>7,.0f}  "
                f"consume raw {row['consume_raw_msgs_per_client_cpu_s']:>7,.0f}  consume+decode "
                f"{row['consume_decode_msgs_per_client_cpu_s']:>7,.0f} msgs; broker CPU "
                f"{row['broker_cpu_s_produce']:.1f} s (produce), {row['broker_cpu_s_consume_decode']:.1f} s (consume+decode)",
                flush=True,
            )
    finally:
        if broker is not None:
            broker.stop()
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["seed", "n", "features", "partitions", *results[0]])
            if new:
                writer.writeheader()
            for row in results:
                writer.writerow({"seed": args.seed, "n": args.n, "features": args.features, "partitions": args.partitions, **row})
    return 0


if __name__ == "__main__":
    sys.exit(main())
