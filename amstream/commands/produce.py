"""`amstream produce`: stream a dataset into a Kafka topic (created if missing).

Each sample becomes one message (JSON ``{"x": [...], "y": 3}`` or the binary codec), or
``--samples-per-message K`` samples become one binary message. Message keys are
``SPLIT-ROW`` (the row in the dataset's split), so the default partitioner spreads rows over
partitions by key.

The broker is ``localhost:9092`` unless ``--bootstrap-servers`` says otherwise (the same place
``amstream serve`` reads by default).

Examples::

    amstream produce --dataset mnist --topic samples --codec binary
    amstream produce --dataset covertype --limit 100000 --standardize --topic cov --partitions 4 \\
        --bootstrap-servers kafka:9092 --codec binary --samples-per-message 32 --rate 20000 \\
        --producer-config compression_type=zstd
"""
from __future__ import annotations

import argparse

from amstream.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("produce", help="stream a dataset into a Kafka topic (JSON or binary messages)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="dataset name (see `amstream datasets`) or a .csv/.npz path")
    p.add_argument("--topic", required=True)
    p.add_argument("--bootstrap-servers", default="localhost:9092", metavar="HOST:PORT",
                   help="Kafka brokers (default localhost:9092)")
    p.add_argument("--split", default="train", choices=("train", "test", "all"),
                   help="which rows (all: train then test)")
    p.add_argument("--limit", type=int, default=None, help="produce only the first N samples (after shuffling)")
    p.add_argument("--rate", type=float, default=None, help="samples per second (default: as fast as possible)")
    p.add_argument("--codec", default="json", choices=("json", "binary"))
    p.add_argument("--samples-per-message", type=int, default=1, help="binary codec: pack K samples per message")
    p.add_argument("--partitions", type=int, default=1, help="partitions when the topic is created")
    p.add_argument("--shuffle", action="store_true", help="shuffle the rows (with --seed)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--standardize", action="store_true",
                   help="standardize features with the training split's mean and std")
    p.add_argument("--no-keys", action="store_true", help="send messages without keys (sticky partitioning)")
    p.add_argument("--producer-config", action="append", default=[], metavar="KEY=VALUE",
                   help="kafka-python producer setting (repeatable), e.g. acks=1")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    import numpy as np

    from amstream.commands.serve import setup_logging
    from amstream.connectors.codec import make_codec
    from amstream.connectors.kafka import create_topic, make_producer, produce_samples
    from amstream.datasets import load_dataset
    from amstream.exceptions import ConfigError
    from amstream.training import Preprocessor

    setup_logging("warning")
    if args.samples_per_message < 1:
        raise ConfigError(f"`--samples-per-message` must be >= 1, got `{args.samples_per_message}`")
    if args.samples_per_message > 1 and args.codec != "binary":
        raise ConfigError("`--samples-per-message` needs `--codec binary`")
    if args.rate is not None and args.rate <= 0:
        raise ConfigError(f"`--rate` must be > 0, got `{args.rate}`")
    data = load_dataset(args.dataset)
    if args.split == "train":
        X, y = data.x_train, data.y_train
    elif args.split == "test":
        X, y = data.x_test, data.y_test
    else:
        X, y = data.as_stream()
    rows = np.arange(len(X))
    if args.split == "all":
        names = np.where(rows < data.n_train, "train", "test")
        local = np.where(rows < data.n_train, rows, rows - data.n_train)
    else:
        names, local = np.full(len(X), args.split), rows
    if args.shuffle:
        rows = np.random.default_rng(args.seed).permutation(len(X))
    if args.limit is not None:
        rows = rows[: args.limit]
    X, y = X[rows], y[rows]
    if args.standardize:
        X = Preprocessor.fit(data.x_train)(X)
    keys = None if args.no_keys else [f"{n}-{i}".encode() for n, i in zip(names[rows], local[rows])]
    codec = make_codec(args.codec, data.n_features, data.n_classes)
    created = create_topic(args.topic, partitions=args.partitions, bootstrap_servers=args.bootstrap_servers)
    common.log(args, f"{'created' if created else 'using existing'} topic `{args.topic}`"
                     f"{f' ({args.partitions} partitions)' if created else ''}; producing {len(X):,} "
                     f"{data.name} {args.split} samples as {args.codec} "
                     f"({args.samples_per_message} per message) to {args.bootstrap_servers}")
    producer = make_producer(args.bootstrap_servers, **common.parse_key_values(args.producer_config, "--producer-config"))
    k = args.samples_per_message
    chunk = max(k, int(args.rate / 10) // k * k if args.rate else 10000 // k * k)
    bar = None
    if not args.no_progress and not args.json and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(X), unit="sample", desc="produce")
    n_messages = 0
    t0 = time.perf_counter()
    try:
        for start in range(0, len(X), chunk):
            stop = min(len(X), start + chunk)
            n_messages += produce_samples(args.topic, X[start:stop], y[start:stop], codec=codec,
                                          bootstrap_servers=args.bootstrap_servers, producer=producer,
                                          keys=None if keys is None else keys[start:stop],
                                          samples_per_message=k)
            if bar is not None:
                bar.update(stop - start)
            if args.rate:
                ahead = stop / args.rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        producer.flush()
    finally:
        producer.close(timeout=10)
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    result = {"topic": args.topic, "samples": int(len(X)), "messages": n_messages, "codec": args.codec,
              "samples_per_message": k, "seconds": round(wall, 3),
              "samples_per_second": round(len(X) / wall, 1) if wall > 0 else None,
              "dataset": data.name, "split": args.split, "n_features": data.n_features,
              "n_classes": data.n_classes, "bootstrap_servers": args.bootstrap_servers}
    common.emit(args, result, human=f"produced {len(X):,} samples in {n_messages:,} messages to `{args.topic}` "
                                    f"in {wall:.1f} s ({len(X) / max(wall, 1e-9):,.0f} samples/s)")
    return 0
